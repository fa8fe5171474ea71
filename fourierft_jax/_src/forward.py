"""The adapted forward pass of any function of the parameters: ``fn(params, *args)`` with FourierFT on.

Every adapted kernel enters ``rewrite.run_with`` as a tracked value; each ``dot_general`` that consumes it runs
as ``adapted_dot`` ("fused", "spectral", or per call by ``choose_path`` for "auto"), so no weight-sized gradient
is formed whatever library built ``fn``. A kernel used any other way is merged for that use, with a warning.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Mapping, Optional

import jax.numpy as jnp
import numpy as np

from bridge._src.auto_rule import choose_path

from .adapted_dot import ContractionError, DotPlan, adapted_dot, adapted_parts_dot
from .adapter import AdapterSet, adapter_state, layer_spectrum
from .delta import delta_kernel
from .kernel_view import arrange
from .layer import LayerSpec
from .rewrite import Tracked, run_with
from .sharding import call_sharding
from .tree import Path, dotted, leaf_paths


class _Adapters:
    """The runtime handler: adapted kernels by kernel path, with their adapters' layers and spectra."""

    def __init__(self, table: dict[Path, list[tuple[LayerSpec, Any]]], mode: str, shardings: Any) -> None:
        self.table, self.mode, self.shardings = table, mode, shardings
        self.reached: set[Path] = set()
        self.merged: dict[Path, str] = {}

    def _layers(self, tracked: Tracked) -> list[tuple[LayerSpec, Any]]:
        entries = self.table[tracked.key]
        if tracked.stack is None:
            return entries
        return [(layer.unstacked, row) for (layer, _), row in zip(entries, tracked.rows)]

    def dot(self, x: Any, tracked: Tracked, side: int, params: dict) -> Any:
        plan = DotPlan.of(side, params, tracked.view, jnp.ndim(x))
        entries = self._layers(tracked)
        layer = entries[0][0]
        try:
            axes = plan.contracted_axes()
        except ContractionError as error:
            return self._merged_dot(x, tracked, plan, f"dot_general: {error}")
        if layer.stacked:  # the whole stack (or split kernel) in one dot: no scan slices it
            return self._parts_dot(x, tracked, plan, axes, entries)
        # Size-1 kernel axes carry no elements: contracted or kept, the matrix is the same.
        wanted = tuple(a for a in layer.contracted if layer.dims[a] != 1)
        if tuple(plan.view.root) != tuple(layer.dims) or axes != wanted:
            raise ContractionError(
                f"fourierft_jax: layer {layer.name!r}: the model contracts axes {list(axes)} of its kernel "
                f"{tuple(plan.view.root)}, but the adapter was built for axes {list(layer.contracted)} of "
                f"{layer.dims}; build the adapter with trace= (or contracting=) from this model")
        path = self.mode
        stored = self.table[tracked.key][0][0]
        sharding = call_sharding(self.shardings, stored) if self.shardings is not None else None
        if path == "auto":
            path = "fused" if sharding is not None else choose_path(plan.tokens(jnp.shape(x)), layer.out_features, layer.in_features)
        self.reached.add(tracked.key)
        return adapted_dot(x, tracked.value, [s for _, s in entries], [l for l, _ in entries], plan, path,
                           sharding=sharding)

    def _parts_dot(self, x: Any, tracked: Tracked, plan: DotPlan, axes: tuple, entries: list) -> Any:
        # Each slice along the stack axis is its own layer; fine as long as the contraction keeps that axis.
        layer = entries[0][0]
        part = layer.unstacked
        inside = tuple(a - (a > layer.stack_axis) for a in axes)
        wanted = tuple(a for a in part.contracted if part.dims[a] != 1)
        if layer.stack_axis in axes or inside != wanted or tuple(plan.view.root) != layer.param_shape:
            return self._merged_dot(x, tracked, plan, "a contraction over its whole layer stack")
        plan = dataclasses.replace(plan, part_axis=layer.stack_axis)
        path = self.mode if self.mode != "auto" else choose_path(plan.tokens(jnp.shape(x)), part.out_features, part.in_features)
        self.reached.add(tracked.key)
        rows = self.scan_rows(tracked, layer.stack_axis)
        return adapted_parts_dot(x, tracked.value, rows, [l.unstacked for l, _ in entries], plan, path)

    def _merged_dot(self, x: Any, tracked: Tracked, plan: DotPlan, why: str) -> Any:
        return plan.dot(x, self.materialize(tracked, why))

    def materialize(self, tracked: Tracked, why: str) -> Any:
        entries = self._layers(tracked)
        delta = None
        for layer, spectrum in entries:
            term = delta_kernel(spectrum, layer)
            delta = term if delta is None else delta + term
        view = tracked.view
        laid = arrange(delta, 0, view.canonical(range(len(view.root))), view.axes)
        self.merged.setdefault(tracked.key, why)
        self.reached.add(tracked.key)
        return tracked.value + laid.astype(tracked.value.dtype)

    def scan_rows(self, tracked: Tracked, axis: int) -> Optional[Any]:
        entries = self.table[tracked.key]
        layer = entries[0][0]
        if not layer.stacked or axis != layer.stack_axis:
            return None
        rows = []
        for layer, spectrum in entries:
            full = jnp.zeros((layer.stack_size, layer.n_frequency), spectrum.dtype)
            rows.append(full.at[np.asarray(layer.stack_ids)].set(spectrum))
        return tuple(rows)


def adapted_call(
    fn: Callable[..., Any],
    variables: Any,
    args: tuple,
    kwargs: dict,
    trainable: Mapping[str, Any],
    static: AdapterSet,
    mode: str,
    shardings: Any = None,
) -> Any:
    """``fn(variables, *args, **kwargs)`` with the active adapters of ``static`` on their kernels."""
    table: dict[Path, list[tuple[LayerSpec, Any]]] = {}
    for name, spec in static.adapters:
        state = adapter_state(trainable, name)
        for layer in spec.layers:
            table.setdefault(layer.kernel_path, []).append((layer, layer_spectrum(state, layer, name)))
    index = {path: i for i, path in enumerate(leaf_paths(variables))}
    missing = [dotted(path) for path in table if path not in index]
    if missing:
        raise KeyError(f"fourierft_jax: the parameters have no kernel at {missing[0]!r}; is this the tree the "
                       "adapter was built for?")
    handler = _Adapters(table, mode, shardings)
    out = run_with(fn, variables, args, kwargs, {index[path]: path for path in table}, handler)
    unused = sorted(dotted(p) for p in table if p not in handler.reached)
    if unused and len(unused) == len(table):
        raise ValueError(f"fourierft_jax: the function never used an adapted kernel (e.g. {unused[0]!r}): is it "
                         "the model these parameters belong to?")
    if unused:
        warnings.warn(f"fourierft_jax: adapted layers {unused} were not used in this forward pass; their spectra "
                      "get no gradient", UserWarning, stacklevel=3)
    for path, why in handler.merged.items():
        warnings.warn(f"fourierft_jax: layer {dotted(path)!r} is used by {why}; that use runs on the merged "
                      "kernel W + ΔW (correct, but its gradient is weight-sized)", UserWarning, stacklevel=3)
    return out
