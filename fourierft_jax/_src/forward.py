"""The adapted forward pass of any function of the parameters: ``fn(params, *args)`` with FourierFT on.

Every adapted kernel enters ``rewrite.run_with`` as a tracked value; each ``dot_general`` that consumes it runs
as ``adapted_dot`` ("fused", "spectral", or per call by ``choose_path`` for "auto"), so no weight-sized gradient
is formed whatever library built ``fn``. A kernel used any other way is merged for that use, with a warning.

``bank_call`` is the same walk for an adapter bank (``bank.py``): each adapted contraction becomes ``bank_dot``,
every example with its own coefficient row; a kernel used any other way is an error (no per-example merge).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Mapping, Optional

import jax.numpy as jnp
import numpy as np

from bridge._src.auto_rule import choose_path

from .adapted_dot import ContractionError, DotPlan, adapted_dot, adapted_parts_dot
from .bank_dot import bank_dot, slot_rows
from .adapter import AdapterSet, adapter_state, layer_spectrum
from .delta import delta_kernel
from .kernel_view import arrange
from .layer import LayerSpec
from .rewrite import Tracked, run_with
from .sharding import call_sharding
from .tree import Path, dotted, leaf_paths


def check_contraction(layer: LayerSpec, plan: DotPlan, axes: tuple[int, ...]) -> None:
    """Raise ``ContractionError`` naming the layer unless the dot contracts the axes the layer was built for."""
    # Size-1 kernel axes carry no elements: contracted or kept, the matrix is the same.
    wanted = tuple(a for a in layer.contracted if layer.dims[a] != 1)
    if tuple(plan.view.root) != tuple(layer.dims) or axes != wanted:
        raise ContractionError(
            f"fourierft_jax: layer {layer.name!r}: the model contracts axes {list(axes)} of its kernel "
            f"{tuple(plan.view.root)}, but the adapter was built for axes {list(layer.contracted)} of "
            f"{layer.dims}; build the adapter with trace= (or contracting=) from this model")


def parts_fit(layer: LayerSpec, plan: DotPlan, axes: tuple[int, ...]) -> bool:
    """Whether a dot over a whole stacked (or split) kernel keeps its stack axis and contracts each slice as
    one layer of the stack: then every slice is a separate layer (``DotPlan.part_axis``)."""
    part = layer.unstacked
    inside = tuple(a - (a > layer.stack_axis) for a in axes)
    wanted = tuple(a for a in part.contracted if part.dims[a] != 1)
    return layer.stack_axis not in axes and inside == wanted and tuple(plan.view.root) == layer.param_shape


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
        check_contraction(layer, plan, axes)
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
        if not parts_fit(layer, plan, axes):
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
    handler = _Adapters(table, mode, shardings)
    out = run_with(fn, variables, args, kwargs, _kernel_leaves(variables, table), handler)
    _check_reached(table, handler.reached, "their spectra get no gradient")
    for path, why in handler.merged.items():
        warnings.warn(f"fourierft_jax: layer {dotted(path)!r} is used by {why}; that use runs on the merged "
                      "kernel W + ΔW (correct, but its gradient is weight-sized)", UserWarning, stacklevel=3)
    return out


def _kernel_leaves(variables: Any, table: Mapping[Path, Any]) -> dict[int, Path]:
    """``{leaf index: kernel path}`` of the adapted kernels in ``variables`` (``run_with``'s ``tracked``)."""
    index = {path: i for i, path in enumerate(leaf_paths(variables))}
    missing = [dotted(path) for path in table if path not in index]
    if missing:
        raise KeyError(f"fourierft_jax: the parameters have no kernel at {missing[0]!r}; is this the tree the "
                       "adapter was built for?")
    return {index[path]: path for path in table}


def _check_reached(table: Mapping[Path, Any], reached: set, consequence: str) -> None:
    unused = sorted(dotted(p) for p in table if p not in reached)
    if unused and len(unused) == len(table):
        raise ValueError(f"fourierft_jax: the function never used an adapted kernel (e.g. {unused[0]!r}): is it "
                         "the model these parameters belong to?")
    if unused:
        warnings.warn(f"fourierft_jax: adapted layers {unused} were not used in this forward pass; {consequence}",
                      UserWarning, stacklevel=4)


# -- adapter banks: every example of a batch with its own adapter (bank.py) -----------------------------------
@dataclasses.dataclass(frozen=True)
class BankEntry:
    """One bank's layer on an adapted kernel: its table (``(capacity, n)`` or ``(capacity, rows, n)``) and the
    offset of the bank's slots in the global ``adapter_index``."""

    layer: LayerSpec
    table: Any
    offset: int


def _stack_positions(layer: LayerSpec) -> np.ndarray:
    """For each layer of a stack, its row in the bank table (``stack_ids`` order), or -1 where not adapted."""
    positions = np.full(layer.stack_size, -1, np.int32)
    positions[list(layer.stack_ids)] = np.arange(len(layer.stack_ids), dtype=np.int32)
    return positions


class _Bank:
    """The runtime handler of a bank forward: each adapted contraction adds every example's own adapter output."""

    def __init__(self, table: dict[Path, list[BankEntry]], index: Any, invalid: Any) -> None:
        self.table, self.index, self.invalid = table, index, invalid
        self.reached: set[Path] = set()

    def _coefficients(self, tracked: Tracked) -> list[list[Any]]:
        out = []
        for entry in self.table[tracked.key]:
            local, layer = self.index - entry.offset, entry.layer
            if tracked.stack is not None:  # one step of a scan over the stack: rows[0] is the layer's number
                row = jnp.asarray(_stack_positions(layer))[tracked.rows[0]]
                out.append([slot_rows(entry.table, local, self.invalid, row)])
            elif layer.stacked:  # the whole stack (or split kernel) in one dot: one table per slice
                out.append([slot_rows(entry.table, local, self.invalid, jnp.int32(p)) for p in _stack_positions(layer)])
            else:
                out.append([slot_rows(entry.table, local, self.invalid)])
        return out

    def dot(self, x: Any, tracked: Tracked, side: int, params: dict) -> Any:
        plan = DotPlan.of(side, params, tracked.view, jnp.ndim(x))
        entries = self.table[tracked.key]
        layer = entries[0].layer.unstacked if tracked.stack is not None else entries[0].layer
        try:
            axes = plan.contracted_axes()
        except ContractionError as error:
            raise self._refuse(tracked, f"a dot_general FourierFT cannot map onto its matrix ({error})") from None
        if layer.stacked:
            if not parts_fit(layer, plan, axes):
                raise self._refuse(tracked, "a contraction over its whole layer stack")
            plan = dataclasses.replace(plan, part_axis=layer.stack_axis)
        else:
            check_contraction(layer, plan, axes)
        self.reached.add(tracked.key)
        return bank_dot(x, tracked.value, plan, self._coefficients(tracked), [e.layer.flat for e in entries])

    def _refuse(self, tracked: Tracked, why: str) -> NotImplementedError:
        name = self.table[tracked.key][0].layer.name
        return NotImplementedError(
            f"fourierft_jax: layer {name!r} is used by {why}; a bank forward serves each example's adapter only "
            "through the model's contractions of the kernel (a per-example merged kernel is never built)")

    def materialize(self, tracked: Tracked, why: str) -> Any:
        raise self._refuse(tracked, why)

    def scan_rows(self, tracked: Tracked, axis: int) -> Optional[Any]:
        layer = self.table[tracked.key][0].layer
        if not layer.stacked or axis != layer.stack_axis:
            return None
        return (jnp.arange(layer.stack_size, dtype=jnp.int32),)  # each step gets its layer number


def bank_call(fn: Callable[..., Any], variables: Any, args: tuple, kwargs: dict,
              table: dict[Path, list[BankEntry]], index: Any, total: int) -> Any:
    """``fn(variables, *args, **kwargs)`` with example ``b`` of every adapted contraction run with the adapter in
    global slot ``index[b]`` (``-1``: none; any other value outside ``0 .. total - 1``: NaN rows)."""
    invalid = (index < -1) | (index >= total)
    handler = _Bank(table, index, invalid)
    out = run_with(fn, variables, args, kwargs, _kernel_leaves(variables, table), handler)
    _check_reached(table, handler.reached, "those layers run as the base model")
    return out
