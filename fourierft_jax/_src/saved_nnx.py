"""Saved adapters to and from NNX models adapted by ``fourierft_jax.nnx.apply`` (``saved.from_nnx`` and
``saved.attach`` wrap these functions in ``SavedAdapter`` terms; this module does not import ``saved``).

Names are the dotted attribute paths, as in ``fourierft_jax.nnx``; the bias of an adapted layer is recorded under
the layer's path (as for linen trees), although NNX keeps it in ``<layer>.base.bias``. A stacked layer (``nnx.vmap``
stack) is recorded as for linen: its ``LayerSpec`` carries the stack fields and its spectrum, keyed by the path
without a layer index, is ``(L, n)``; attaching re-creates the stack from those fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

import bridge

from .adapter import BIAS, MODULES_TO_SAVE, SPECTRA, AdapterSpec
from .nnx_layer import FourierFTLinear
from .nnx_model import apply as nnx_apply, select_nnx_layers
from .saved_common import AdapterMismatchError, flat_leaves
from .tree import Path, dotted


def _modules(model: nnx.Module) -> list[tuple[Path, nnx.Module]]:
    return [(tuple(str(k) for k in path), module) for path, module in nnx.iter_modules(model) if path]


def _get(model: Any, path: Path) -> Any:
    node = model
    for key in path:
        node = node[int(key)] if key.isdigit() and not hasattr(node, key) else getattr(node, key)
    return node


def _saved_paths(model: nnx.Module, config: bridge.FourierFTConfig) -> list[Path]:
    found: list[Path] = []
    for path, _ in _modules(model):
        if any(path[: len(p)] == p for p in found):
            continue
        if any(dotted(path).endswith(entry) for entry in config.modules_to_save or ()):
            found.append(path)
    return found


def _pure(module: nnx.Module) -> dict[str, Any]:
    return nnx.state(module, nnx.Param).to_pure_dict()


def nnx_spec_and_state(model: nnx.Module, config: bridge.FourierFTConfig) -> tuple[AdapterSpec, dict[str, Any]]:
    """The layers (``AdapterSpec``) and trained arrays of an NNX model adapted by ``fourierft_jax.nnx.apply(model,
    config)``: what ``saved.from_nnx`` wraps as a ``SavedAdapter``.

    Example:
        >>> from flax import nnx
        >>> import fourierft_jax
        >>> class One(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.fc = nnx.Linear(6, 4, rngs=rngs)
        >>> cfg = fourierft_jax.FourierFTConfig(n_frequency=5, target_modules=["fc"], init_weights=True)
        >>> spec, state = nnx_spec_and_state(fourierft_jax.nnx.apply(One(nnx.Rngs(0)), cfg), cfg)
        >>> spec.layers[0].name, state["spectra"]["fc"].shape
        ('fc', (5,))
    """
    modules = _modules(model)
    adapted = {path: module for path, module in modules if isinstance(module, FourierFTLinear)}
    if not adapted:
        raise ValueError("fourierft_jax: the NNX model has no FourierFT layers (adapt it with fourierft_jax.nnx.apply)")
    layers = tuple(dataclasses.replace(module.layer, path=path) for path, module in adapted.items())
    spectra = {dotted(path): module.spectrum[...] for path, module in adapted.items()}
    saved = _saved_paths(model, config)
    biases: dict[str, Any] = {}
    bias_paths: list[Path] = []
    if config.bias != "none":
        for path, module in modules:
            if isinstance(module, FourierFTLinear) or any(path[: len(p)] == p for p in saved):
                continue
            owner = path
            if path[-1:] == ("base",) and path[:-1] in adapted:
                owner = path[:-1]
            elif config.bias == "fourier_only":
                continue
            if config.bias == "fourier_only" and owner not in adapted:
                continue
            bias = getattr(module, "bias", None)
            if isinstance(bias, nnx.Variable) and bias.value is not None:
                bias_paths.append(owner)
                biases[dotted(owner)] = bias[...]
    state = {
        SPECTRA: spectra,
        BIAS: biases,
        MODULES_TO_SAVE: {dotted(path): _pure(_get(model, path)) for path in saved},
    }
    return AdapterSpec(layers, tuple(bias_paths), tuple(saved), config.bias), state


def _check(spec: AdapterSpec, state: dict[str, Any], model: nnx.Module) -> None:
    modules = dict(_modules(model))
    problems: list[str] = []
    for layer in spec.layers:
        module = modules.get(layer.path)
        if isinstance(module, FourierFTLinear):
            module = module.base
        if not isinstance(module, (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)):
            problems.append(f"layer {layer.name!r}: the model has no nnx.Linear/LinearGeneral/Einsum there (found "
                            f"{type(module).__name__})")
        elif tuple(module.kernel.shape) != layer.param_shape:
            problems.append(f"layer {layer.name!r}: kernel has shape {tuple(module.kernel.shape)} in the model but "
                            f"the adapter was saved for {layer.param_shape}")
        spectrum = state[SPECTRA].get(layer.name)
        if spectrum is None or tuple(np.shape(spectrum)) != layer.spectrum_shape:
            found = "none" if spectrum is None else tuple(np.shape(spectrum))
            problems.append(f"layer {layer.name!r}: the adapter's spectrum has shape {found}, its layer needs "
                            f"{layer.spectrum_shape}")
        if layer.stacked and (layer.stack_axis != 0 or len(layer.stack_ids) != layer.stack_size):
            problems.append(f"layer {layer.name!r}: adapts layers {list(layer.stack_ids)} of a stack of "
                            f"{layer.stack_size} along axis {layer.stack_axis}; an NNX stack needs all of them, "
                            "along axis 0")
    for path in spec.bias_paths:
        module = modules.get(path)
        if isinstance(module, FourierFTLinear):
            module = module.base
        want = tuple(np.shape(state[BIAS][dotted(path)]))
        bias = getattr(module, "bias", None)
        if not isinstance(bias, nnx.Variable) or bias.value is None:
            problems.append(f"bias {dotted(path)!r}: the model has no bias there")
        elif tuple(bias.shape) != want:
            problems.append(
                f"bias {dotted(path)!r} has shape {tuple(bias.shape)} in the model but {want} in the adapter"
            )
    for path in spec.save_paths:
        if path not in modules:
            problems.append(f"module_to_save {dotted(path)!r}: not in the model")
            continue
        have = dict(flat_leaves(_pure(modules[path])))
        for rel, value in flat_leaves(state[MODULES_TO_SAVE][dotted(path)]):
            if rel not in have:
                problems.append(f"module_to_save tensor {dotted(path + rel)!r}: not in the model")
            elif tuple(np.shape(have[rel])) != tuple(np.shape(value)):
                problems.append(f"module_to_save tensor {dotted(path + rel)!r} has shape {tuple(np.shape(have[rel]))} "
                                f"in the model but {tuple(np.shape(value))} in the adapter")
    if problems:
        raise AdapterMismatchError("adapter does not fit the model: " + "; ".join(problems))


def attach_nnx(model: nnx.Module, config: bridge.FourierFTConfig, spec: AdapterSpec,
               state: dict[str, Any]) -> nnx.Module:
    """Adapt ``model`` (plain, or already adapted with the same layers) and load a saved adapter's arrays (its
    ``config``, ``spec`` and ``state``, as a ``SavedAdapter`` holds them); returns the model.

    Example:
        >>> from flax import nnx
        >>> import fourierft_jax
        >>> class One(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.fc = nnx.Linear(6, 4, rngs=rngs)
        >>> cfg = fourierft_jax.FourierFTConfig(n_frequency=5, target_modules=["fc"], init_weights=True)
        >>> spec, state = nnx_spec_and_state(fourierft_jax.nnx.apply(One(nnx.Rngs(0)), cfg), cfg)
        >>> type(attach_nnx(One(nnx.Rngs(1)), cfg, spec, state).fc).__name__
        'FourierFTLinear'
    """
    _check(spec, state, model)
    config = dataclasses.replace(config, init_weights=True)
    stacked = spec_stacks(spec) or None
    have = {path: module.layer for path, module in _modules(model) if isinstance(module, FourierFTLinear)}
    fresh = not have
    if fresh:
        # Matched (and so validated) before the model is touched.
        have = {layer.path: layer for layer in select_nnx_layers(model, config, stacked=stacked)}
    want = {layer.path: layer for layer in spec.layers}
    if set(have) != set(want):
        raise AdapterMismatchError(
            f"adapter does not fit the model: the config adapts {sorted(map(dotted, have))} but the adapter holds "
            f"{sorted(map(dotted, want))}"
        )
    for path, layer in want.items():
        if have[path] != layer:
            raise AdapterMismatchError(
                f"adapter does not fit the model: layer {layer.name!r} is {have[path]} in the model but {layer} in "
                "the adapter"
            )
    if fresh:
        nnx_apply(model, config, stacked=stacked)
    for layer in spec.layers:
        module = _get(model, layer.path)
        module.spectrum.set_value(jnp.asarray(state[SPECTRA][layer.name]))
    for path in spec.bias_paths:
        module = _get(model, path)
        module = module.base if isinstance(module, FourierFTLinear) else module
        module.bias.set_value(jnp.asarray(state[BIAS][dotted(path)]))
    for path in spec.save_paths:
        module = _get(model, path)
        params = nnx.state(module, nnx.Param)
        nnx.replace_by_pure_dict(params, state[MODULES_TO_SAVE][dotted(path)])
        nnx.update(module, params)
    return model


def spec_stacks(spec: AdapterSpec) -> dict[str, int]:
    """``{stack path: layer axis}`` of the stacked layers of ``spec``: the ``stacked=`` that re-creates them.

    Example:
        >>> from fourierft_jax._src.layer import LayerSpec
        >>> layer = LayerSpec(("layers", "fc"), 8, 4, 3, 1.0, 0, stack_axis=0, stack_size=2, stack_ids=(0, 1),
        ...                   stack_depth=1)
        >>> spec_stacks(AdapterSpec((layer,)))
        {'layers': 0}
    """
    return {dotted(layer.path[: layer.stack_depth]): int(layer.stack_axis)
            for layer in spec.layers if layer.stacked}


def nnx_params_view(model: nnx.Module) -> dict[str, Any]:
    """The model's ``nnx.Param`` values as a linen-style nested dict with string keys (an adapted layer's
    ``base`` folded into the layer), for name and shape look-ups.

    Example:
        >>> from flax import nnx
        >>> class One(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.fc = nnx.Linear(6, 4, rngs=rngs)
        >>> nnx_params_view(One(nnx.Rngs(0)))["fc"]["kernel"].shape
        (6, 4)
    """

    def fold(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        node = {str(key): fold(value) for key, value in node.items()}
        if "base" in node and "spectrum" in node and isinstance(node["base"], dict):
            return node["base"]
        return node

    return fold(nnx.state(model, nnx.Param).to_pure_dict())
