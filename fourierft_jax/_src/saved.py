"""``SavedAdapter``: one adapter detached from any model (config, layers, trained arrays) and how to attach it.

The common currency of the Orbax checkpoint and the PEFT converter: it holds what a file holds -- the config,
each adapted layer's path and shape (``LayerSpec``), the trainable state
``{"spectra": {layer: (n,)}, "bias": {module: (out,)}, "modules_to_save": {module: subtree}}`` and, for PEFT's
``bias="all"`` with ``modules_to_save``, the untouched original biases of those modules (``originals``). Never
the base model's weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Union

import jax
import numpy as np

import bridge

from .adapter import BIAS, MODULES_TO_SAVE, SPECTRA, AdapterSpec
from .layer import LayerSpec
from .model import FourierFTAdapter
from .saved_common import AdapterMismatchError, flat_leaves
from .saved_nnx import attach_nnx, nnx_params_view, nnx_spec_and_state
from .tree import Path, dotted, get_path, iter_nodes, split_collection

__all__ = ["AdapterMismatchError", "SavedAdapter", "as_saved", "attach", "from_adapter", "from_nnx"]  # and helpers


@dataclasses.dataclass
class SavedAdapter:
    """One adapter without its model: what ``load_adapter``/``read_peft`` return and ``attach`` consumes.

    Args:
        config: the adapter's config.
        spec: its layers (paths, ``(in, out)``, ``n_frequency``, scaling, seed) and trained bias/module paths.
        state: ``{"spectra": ..., "bias": ..., "modules_to_save": ...}`` (arrays keep their dtype).
        originals: ``{module: subtree of biases}``: the untrained biases of ``modules_to_save`` modules, which PEFT
            writes with ``bias="all"``; empty when not needed or unknown.

    Example:
        >>> import numpy as np
        >>> params = {"q": {"kernel": np.zeros((8, 4), np.float32)}}
        >>> adapter = apply_for_doc(params)
        >>> saved = from_adapter(adapter)
        >>> [layer.name for layer in saved.spec.layers], saved.state["spectra"]["q"].shape
        (['q'], (3,))
    """

    config: bridge.FourierFTConfig
    spec: AdapterSpec
    state: dict[str, dict[str, Any]]
    originals: dict[str, Any] = dataclasses.field(default_factory=dict)

    def attach(self, target: Any, adapter_name: str = "default") -> Any:
        """Attach to a linen params tree (gives a ``FourierFTAdapter``) or an NNX model; see ``attach``.

        Example:
            >>> import numpy as np
            >>> params = {"q": {"kernel": np.zeros((8, 4), np.float32)}}
            >>> from_adapter(apply_for_doc(params)).attach(params).active_adapters
            ['default']
        """
        return attach(self, target, adapter_name=adapter_name)


def apply_for_doc(params: Mapping[str, Any]) -> FourierFTAdapter:
    # A tiny adapter for the doctests of this package's conversion modules.
    from .model import apply

    return apply(params, bridge.FourierFTConfig(n_frequency=3, target_modules=["q"], init_weights=True))


def from_adapter(
    adapter: FourierFTAdapter, adapter_name: Optional[str] = None, params: Optional[Mapping[str, Any]] = None
) -> SavedAdapter:
    """The ``SavedAdapter`` of one adapter of a ``FourierFTAdapter`` (default: the first active one).

    ``params`` (the base parameters) is only read for PEFT's ``original_module`` biases (``bias="all"`` with
    ``modules_to_save``); nothing else of the base is kept.

    Example:
        >>> import numpy as np
        >>> saved = from_adapter(apply_for_doc({"q": {"kernel": np.zeros((8, 4), np.float32)}}))
        >>> saved.config.n_frequency
        3
    """
    name = adapter_name or adapter.active_adapters[0]
    adapter._require(name)
    spec, config = adapter.specs[name], adapter.configs[name]
    originals: dict[str, Any] = {}
    if params is not None and config.bias == "all":
        inner, _ = split_collection(params)
        for path in spec.save_paths:
            biases = _bias_subtree(get_path(inner, path))
            if biases:
                originals[dotted(path)] = biases
    return SavedAdapter(config, spec, adapter.state[name], originals)


def from_nnx(model: Any, config: bridge.FourierFTConfig) -> SavedAdapter:
    """The ``SavedAdapter`` of an NNX model adapted by ``fourierft_jax.nnx.apply(model, config)``.

    Example:
        >>> from flax import nnx
        >>> import fourierft_jax
        >>> class One(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.fc = nnx.Linear(6, 4, rngs=rngs)
        >>> cfg = fourierft_jax.FourierFTConfig(n_frequency=5, target_modules=["fc"], init_weights=True)
        >>> saved = from_nnx(fourierft_jax.nnx.apply(One(nnx.Rngs(0)), cfg), cfg)
        >>> saved.spec.layers[0].name, saved.state["spectra"]["fc"].shape
        ('fc', (5,))
    """
    spec, state = nnx_spec_and_state(model, config)
    return SavedAdapter(config, spec, state)


def _bias_subtree(node: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not isinstance(node, Mapping):
        return out
    for key, value in node.items():
        if isinstance(value, Mapping):
            sub = _bias_subtree(value)
            if sub:
                out[str(key)] = sub
        elif key == "bias":
            out["bias"] = value
    return out


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in np.shape(value))


def check_params(saved: SavedAdapter, params: Mapping[str, Any]) -> None:
    """Raise ``AdapterMismatchError`` unless every layer, bias and module of ``saved`` exists in ``params`` with the
    recorded shape; the message lists every path at fault with both shapes.

    Example:
        >>> import numpy as np
        >>> saved = from_adapter(apply_for_doc({"q": {"kernel": np.zeros((8, 4), np.float32)}}))
        >>> check_params(saved, {"q": {"kernel": np.zeros((8, 5))}})
        Traceback (most recent call last):
        ...
        fourierft_jax._src.saved_common.AdapterMismatchError: adapter does not fit the parameters: layer 'q': kernel has shape (8, 5) in the parameters but the adapter was saved for (8, 4)
    """
    inner, _ = split_collection(params)
    problems: list[str] = []

    def lookup(path: Path) -> Any:
        node: Any = inner
        for depth, key in enumerate(path):
            if not isinstance(node, Mapping) or key not in node:
                return dotted(path[: depth + 1])
            node = node[key]
        return _Found(node)

    for layer in saved.spec.layers:
        found = lookup(layer.kernel_path)
        if not isinstance(found, _Found):
            problems.append(f"layer {layer.name!r}: no Dense kernel (or other projection kernel) at "
                            f"{dotted(layer.kernel_path)!r} "
                            f"(missing {found!r})")
        elif _shape(found.value) != layer.param_shape:
            problems.append(f"layer {layer.name!r}: kernel has shape {_shape(found.value)} in the parameters but "
                            f"the adapter was saved for {layer.param_shape}")
        spectrum = saved.state.get(SPECTRA, {}).get(layer.name)
        if spectrum is not None and _shape(spectrum) != layer.spectrum_shape:
            problems.append(f"layer {layer.name!r}: spectrum has shape {_shape(spectrum)} in the adapter but the "
                            f"layer needs {layer.spectrum_shape}")
    for path in saved.spec.bias_paths:
        found = lookup(path + ("bias",))
        want = _shape(saved.state[BIAS][dotted(path)])
        if not isinstance(found, _Found):
            problems.append(f"bias {dotted(path)!r}: not in the parameters (missing {found!r})")
        elif _shape(found.value) != want:
            problems.append(f"bias {dotted(path)!r} has shape {_shape(found.value)} in the parameters but {want} "
                            f"in the adapter")
    for path in saved.spec.save_paths:
        found = lookup(path)
        if not isinstance(found, _Found):
            problems.append(f"module_to_save {dotted(path)!r}: not in the parameters (missing {found!r})")
            continue
        for rel, value in flat_leaves(saved.state[MODULES_TO_SAVE][dotted(path)]):
            sub = lookup(path + rel)
            name = dotted(path + rel)
            if not isinstance(sub, _Found):
                problems.append(f"module_to_save tensor {name!r}: not in the parameters")
            elif _shape(sub.value) != _shape(value):
                problems.append(f"module_to_save tensor {name!r} has shape {_shape(sub.value)} in the parameters "
                                f"but {_shape(value)} in the adapter")
    if problems:
        raise AdapterMismatchError("adapter does not fit the parameters: " + "; ".join(problems))


@dataclasses.dataclass
class _Found:
    value: Any


def attach(saved: SavedAdapter, target: Any, adapter_name: str = "default") -> Any:
    """Put a saved adapter on a model: a linen params tree gives a ``FourierFTAdapter``; an NNX model is adapted in
    place (its targeted ``nnx.Linear`` become ``FourierFTLinear`` holding the saved arrays) and returned.

    Every layer, bias and module must exist with the recorded shape (``AdapterMismatchError`` names each path at
    fault and both shapes); nothing is changed before that check passes. Arrays keep their saved dtype.

    Example:
        >>> import numpy as np
        >>> params = {"q": {"kernel": np.zeros((8, 4), np.float32)}}
        >>> adapter = attach(from_adapter(apply_for_doc(params)), params)
        >>> adapter.layers()
        ['q']
    """
    if isinstance(target, Mapping):
        check_params(saved, target)
        adapter = FourierFTAdapter()
        adapter.configs[adapter_name] = saved.config
        adapter.specs[adapter_name] = saved.spec
        adapter.state[adapter_name] = jax.tree.map(jax.numpy.asarray, _plain_state(saved.state))
        adapter.active_adapters = [adapter_name]
        return adapter
    return attach_nnx(target, saved.config, saved.spec, saved.state)


def _plain_state(state: Mapping[str, Any]) -> dict[str, Any]:
    return {SPECTRA: dict(state.get(SPECTRA, {})), BIAS: dict(state.get(BIAS, {})),
            MODULES_TO_SAVE: dict(state.get(MODULES_TO_SAVE, {}))}


SavedSource = Union[SavedAdapter, FourierFTAdapter, Any]


def as_saved(
    source: SavedSource,
    *,
    adapter_name: Optional[str] = None,
    params: Optional[Mapping[str, Any]] = None,
    config: Optional[bridge.FourierFTConfig] = None,
) -> SavedAdapter:
    """A ``SavedAdapter`` from a ``SavedAdapter``, a ``FourierFTAdapter`` or an NNX model adapted by
    ``fourierft_jax.nnx.apply`` (which needs the ``config`` it was adapted with). ``params`` (the base parameters:
    a linen tree, or the untouched NNX base model) is only read for PEFT's original ``modules_to_save`` biases.

    Example:
        >>> import numpy as np
        >>> as_saved(apply_for_doc({"q": {"kernel": np.zeros((8, 4), np.float32)}})).spec.layers[0].n_frequency
        3
    """
    if isinstance(source, SavedAdapter):
        return source
    if isinstance(source, FourierFTAdapter):
        return from_adapter(source, adapter_name, params)
    if config is None:
        raise TypeError(
            f"fourierft_jax: cannot save a {type(source).__name__}: pass a FourierFTAdapter, a SavedAdapter, or an "
            f"NNX model adapted by fourierft_jax.nnx.apply together with config=<its FourierFTConfig>"
        )
    saved = from_nnx(source, config)
    if params is not None and config.bias == "all":
        # The model's modules_to_save were trained in place: their original biases come from the base given.
        view = params if isinstance(params, Mapping) else nnx_params_view(params)
        inner, _ = split_collection(view)
        for path in saved.spec.save_paths:
            biases = _bias_subtree(get_path(inner, path))
            if biases:
                saved.originals[dotted(path)] = biases
    return saved


def layer_spec(path: Path, in_features: int, out_features: int, n_frequency: int,
               config: bridge.FourierFTConfig, **fields: Any) -> LayerSpec:
    """A ``LayerSpec`` with the config's scaling and seed; ``fields`` holds its stack fields (``stack_axis``,
    ``stack_size``, ``stack_ids``, ``stack_depth``) for a stacked kernel and its kernel layout (``kernel_leaf``,
    ``kernel_dims``, ``in_axes``) for an N-D or non-``kernel`` leaf, as ``stack_fields`` writes them.

    Example:
        >>> layer_spec(("q",), 8, 4, 3, bridge.FourierFTConfig()).seed
        777
        >>> layer_spec(("l", "q"), 8, 4, 3, bridge.FourierFTConfig(), stack_axis=0, stack_size=2, stack_ids=[1],
        ...            stack_depth=1).torch_names
        ('l.1.q',)
    """
    extra: dict[str, Any] = {}
    if fields.get("stack_axis") is not None:
        extra = dict(stack_axis=int(fields["stack_axis"]), stack_size=int(fields["stack_size"]),
                     stack_ids=tuple(int(i) for i in fields["stack_ids"]), stack_depth=int(fields["stack_depth"]))
    if "kernel_leaf" in fields:
        extra["kernel_leaf"] = str(fields["kernel_leaf"])
    for name in ("kernel_dims", "in_axes"):
        if fields.get(name):
            extra[name] = tuple(int(d) for d in fields[name])
    return LayerSpec(tuple(path), int(in_features), int(out_features), int(n_frequency), float(config.scaling),
                     int(config.random_loc_seed), **extra)


STACK_FIELDS = ("stack_axis", "stack_size", "stack_ids", "stack_depth", "kernel_leaf", "kernel_dims", "in_axes")


def stack_fields(layer: LayerSpec) -> dict[str, Any]:
    """The stack and kernel-layout fields of a layer as JSON-ready values (empty for a plain Dense kernel).

    Example:
        >>> stack_fields(layer_spec(("q",), 8, 4, 3, bridge.FourierFTConfig()))
        {}
        >>> stack_fields(layer_spec(("q",), 8, 12, 3, bridge.FourierFTConfig(), kernel_leaf="w", kernel_dims=[8, 3, 4],
        ...                         in_axes=[0]))
        {'kernel_leaf': 'w', 'kernel_dims': [8, 3, 4], 'in_axes': [0]}
    """
    out: dict[str, Any] = {}
    if layer.stacked:
        out = {"stack_axis": layer.stack_axis, "stack_size": layer.stack_size, "stack_ids": list(layer.stack_ids),
               "stack_depth": layer.stack_depth}
    if layer.kernel_leaf != "kernel":
        out["kernel_leaf"] = layer.kernel_leaf
    if layer.kernel_dims:
        out.update(kernel_dims=list(layer.kernel_dims), in_axes=list(layer.in_axes))
    return out


def node_paths(params: Mapping[str, Any]) -> dict[str, Path]:
    """``{dotted name: path}`` of every dict node of a params tree (the ``params`` collection)."""
    inner, _ = split_collection(params)
    return {dotted(path): path for path, _ in iter_nodes(inner) if path}
