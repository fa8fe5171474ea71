"""Parameters for a plain ``model.apply``: trained biases/modules put in place and, for merging, ``W + ΔW``.

Pure functions of (params, trainable state, static ``AdapterSet``): jit-safe, and differentiable in the
trainable state only.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .adapter import BIAS, MODULES_TO_SAVE, AdapterSet, adapter_state, layer_spectrum
from .delta import delta_kernel
from .sharding import kernel_sharding, sharded_delta
from .tree import Path, dotted, get_path, replace_paths, split_collection

DEFAULT_DELTA_METHOD = "irfft2"


def _full_updates(inner: Mapping[str, Any], trainable: Mapping[str, Any], static: AdapterSet) -> dict[Path, Any]:
    updates: dict[Path, Any] = {}
    for name, spec in static.adapters:
        state = adapter_state(trainable, name)
        for path in spec.save_paths:
            get_path(inner, path, "module_to_save")
            updates[path] = _entry(state, MODULES_TO_SAVE, dotted(path), name)
        for path in spec.bias_paths:
            old = get_path(inner, path + ("bias",), "bias")
            new = _entry(state, BIAS, dotted(path), name)
            if tuple(new.shape) != tuple(old.shape):
                raise ValueError(
                    f"fourierft_jax: bias of {dotted(path)!r} has shape {tuple(old.shape)} in the parameter tree "
                    f"but {tuple(new.shape)} in adapter {name!r}"
                )
            rows_of = spec.trained_bias_rows(path)
            if rows_of is not None:
                # Rows of a partly adapted stack keep the base bias (and so get no gradient), as in PEFT.
                mask = np.zeros(rows_of.stack_size, bool)
                mask[list(rows_of.stack_ids)] = True
                shape = [1] * len(old.shape)
                shape[rows_of.stack_axis] = rows_of.stack_size
                new = jnp.where(mask.reshape(shape), new, jnp.asarray(old, new.dtype))
            updates[path + ("bias",)] = new
    return updates


def _entry(state: Mapping[str, Any], group: str, key: str, adapter: str) -> Any:
    if key not in state.get(group, {}):
        raise KeyError(f"fourierft_jax: adapter {adapter!r} has no {group} entry {key!r} in its trainable state")
    return state[group][key]


def check_kernel(inner: Mapping[str, Any], path: Path, shape: tuple[int, ...]) -> jax.Array:
    """The kernel at ``path`` (a ``LayerSpec.kernel_path``), required to have the shape the adapter was built for
    (``LayerSpec.param_shape``)."""
    kernel = get_path(inner, path, "kernel")
    if tuple(kernel.shape) != tuple(shape):
        raise ValueError(
            f"fourierft_jax: kernel of {dotted(path)!r} has shape {tuple(kernel.shape)}, but the adapter was built "
            f"for {tuple(shape)}; this parameter tree does not match the adapter"
        )
    return kernel


def substitute(params: Mapping[str, Any], trainable: Mapping[str, Any], static: AdapterSet) -> Any:
    """``params`` with the active adapters' trained biases and ``modules_to_save`` in place (no ``ΔW``).

    Example:
        >>> import numpy as np, fourierft_jax
        >>> params = {"q": {"kernel": np.ones((4, 3), np.float32), "bias": np.zeros(3, np.float32)}}
        >>> cfg = fourierft_jax.FourierFTConfig(n_frequency=2, target_modules=["q"], bias="all", init_weights=True)
        >>> adapter = fourierft_jax.apply(params, cfg)
        >>> trainable = {"default": dict(adapter.trainable["default"], bias={"q": np.ones(3, np.float32)})}
        >>> substitute(params, trainable, adapter.static)["q"]["bias"].tolist()
        [1.0, 1.0, 1.0]
    """
    if static.disabled:
        return params
    inner, rebuild = split_collection(params)
    for _, spec in static.adapters:
        for layer in spec.layers:
            check_kernel(inner, layer.kernel_path, layer.param_shape)
    return rebuild(replace_paths(inner, _full_updates(inner, trainable, static)))


def merge_params(
    params: Mapping[str, Any],
    trainable: Mapping[str, Any],
    static: AdapterSet,
    *,
    method: str = DEFAULT_DELTA_METHOD,
    shardings: Any = None,
) -> Any:
    """``params`` with every adapted kernel replaced by ``W + ΔW`` (ΔW in float32, cast to the kernel dtype).

    Accepts a variables dict (``{"params": ...}``) or the ``params`` collection and returns the same structure.
    A stacked kernel gets the ΔW of the whole stack at once. ``shardings`` (a tree like ``params`` or its
    ``params`` collection, ``NamedSharding`` leaves, e.g. what ``jax.jit(in_shardings=...)`` gets) builds each
    ``ΔW`` shard-locally with its kernel's sharding (``sharded_delta``; ``method`` is then not used).

    Example:
        >>> import numpy as np, bridge
        >>> from fourierft_jax._src.adapter import build_spec, init_state
        >>> tree = {"q": {"kernel": np.zeros((8, 4), np.float32)}}
        >>> spec = build_spec(tree, bridge.FourierFTConfig(n_frequency=3, target_modules=["q"]))
        >>> state = {"default": init_state(tree, spec, init_weights=False, key=jax.random.key(0))}
        >>> merged = merge_params(tree, state, AdapterSet((("default", spec),)))
        >>> merged["q"]["kernel"].shape
        (8, 4)
    """
    if static.disabled:
        return params
    inner, rebuild = split_collection(params)
    updates = _full_updates(inner, trainable, static)
    for name, spec in static.adapters:
        state = adapter_state(trainable, name)
        for layer in spec.layers:
            path = layer.kernel_path
            kernel = updates[path] if path in updates else check_kernel(inner, path, layer.param_shape)
            spectrum = layer_spectrum(state, layer, name)
            sharding = kernel_sharding(shardings, layer.path, layer.kernel_leaf)
            if sharding is None:
                delta = delta_kernel(spectrum, layer, method)
            elif not layer.unstacked.is_matrix:
                # N-D kernels: XLA places the plain build (correct; the shard-local build is for matrices).
                delta = jax.lax.with_sharding_constraint(delta_kernel(spectrum, layer, method), sharding)
            else:
                delta = sharded_delta(spectrum, layer, sharding)
            kernel = jnp.asarray(kernel)
            updates[path] = kernel + delta.astype(kernel.dtype)
    return rebuild(replace_paths(inner, updates))
