"""The spectral path for linen: a method interceptor that adds each targeted ``Dense``'s adapter output.

``flax.linen.intercept_methods`` sees every module call; at a targeted ``nn.Dense.__call__`` (found by its
module path, which is its path in the ``params`` collection) it adds ``spectral_delta(x)`` computed in float32
and cast to the layer's output dtype. ``ΔW`` is never built and no gradient is formed for the frozen kernel.

Which path to use:

* ``mode="spectral"`` (default, for training): no ``out × in`` delta per layer, no weight-sized gradient, and
  the backward pass keeps only the input's half spectrum. Needs the targeted layers to be ``flax.linen.Dense``
  modules called at their parameter path (not under ``nn.scan``/``nn.vmap`` with stacked kernels).
* ``mode="merge"``: any function of the parameter tree (non-linen code, custom kernels, ``nn.scan``); the
  simplest form and the one for inference -- ``merge_and_unload`` once, then the adapter costs nothing.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn

from .adapter import AdapterSet, adapter_state, layer_spectrum
from .merge import DEFAULT_DELTA_METHOD, merge_params, substitute
from .spectral import spectral_delta
from .tree import Path

MODES = ("spectral", "merge")
DEFAULT_MODE = "spectral"


@contextlib.contextmanager
def spectral_interceptor(trainable: Mapping[str, Any], static: AdapterSet) -> Iterator[set[Path]]:
    """Within this context, every targeted linen ``Dense`` call adds the active adapters' output.

    Yields the set of layer paths that were reached, so callers can tell a model whose Dense modules do not sit
    at their parameter paths (e.g. under ``nn.scan``). Biases and ``modules_to_save`` are not handled here: pass
    ``substitute(params, trainable, static)`` to ``model.apply`` (``make_apply`` does both).

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, fourierft_jax
        >>> class Net(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         return nn.Dense(3, name="q")(x)
        >>> variables = Net().init(jax.random.key(0), jnp.ones((1, 4)))
        >>> adapter = fourierft_jax.apply(variables, fourierft_jax.FourierFTConfig(n_frequency=2,
        ...                               target_modules=["q"]), key=jax.random.key(1))
        >>> with spectral_interceptor(adapter.trainable, adapter.static) as reached:
        ...     y = Net().apply(variables, jnp.ones((1, 4)))
        >>> sorted(reached)
        [('q',)]
    """
    table: dict[Path, list] = {}
    if not static.disabled:
        for name, spec in static.adapters:
            state = adapter_state(trainable, name)
            for layer in spec.layers:
                table.setdefault(tuple(layer.path), []).append((layer, layer_spectrum(state, layer, name)))
    reached: set[Path] = set()

    def interceptor(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if not table or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        module = context.module
        try:
            path = tuple(str(key) for key in module.path)
        except Exception:  # an unbound module has no path and cannot be a targeted layer
            return next_fun(*args, **kwargs)
        entries = table.get(path)
        if entries is None:
            return next_fun(*args, **kwargs)
        if type(module) is not nn.Dense:
            raise TypeError(
                f"fourierft_jax: the adapted layer {entries[0][0].name!r} is a {type(module).__name__}, not a "
                f"flax.linen.Dense; the spectral path only adapts Dense calls (use mode='merge')"
            )
        y = next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        reached.add(path)
        for layer, spectrum in entries:
            y = y + spectral_delta(x, spectrum, layer).astype(y.dtype)
        return y

    with nn.intercept_methods(interceptor):
        yield reached


def make_apply(
    apply_fn: Callable[..., Any],
    static: AdapterSet,
    *,
    mode: str = DEFAULT_MODE,
    method: str = DEFAULT_DELTA_METHOD,
) -> Callable[..., Any]:
    """``f(trainable, variables, *args, **kwargs)``: ``apply_fn`` (e.g. ``model.apply``) with the adapters on.

    ``mode="spectral"`` (default) computes each targeted Dense's adapter output in the spectral domain during
    the call; ``mode="merge"`` calls ``apply_fn`` on ``W + ΔW`` parameters. Both give the same numbers; the
    function is pure, so ``jax.grad`` over ``trainable`` and ``jax.jit`` work directly.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, fourierft_jax
        >>> model, x = nn.Dense(4), jnp.ones((1, 8))
        >>> variables = model.init(jax.random.key(0), x)
        >>> tree = {"params": {"layer": variables["params"]}}  # give the Dense a name to target
        >>> adapter = fourierft_jax.apply(tree, fourierft_jax.FourierFTConfig(n_frequency=3,
        ...                               target_modules=["layer"]), key=jax.random.key(1))
        >>> make_apply(model.apply, adapter.static, mode="merge")  # doctest: +ELLIPSIS
        <function ...>
    """
    if mode not in MODES:
        raise ValueError(f"fourierft_jax: mode must be one of {MODES}, got {mode!r}")

    if mode == "merge":

        def merged_apply(trainable: Mapping[str, Any], variables: Any, *args: Any, **kwargs: Any) -> Any:
            return apply_fn(merge_params(variables, trainable, static, method=method), *args, **kwargs)

        return merged_apply

    def spectral_apply(trainable: Mapping[str, Any], variables: Any, *args: Any, **kwargs: Any) -> Any:
        variables = substitute(variables, trainable, static)
        with spectral_interceptor(trainable, static) as reached:
            out = apply_fn(variables, *args, **kwargs)
        expected = {tuple(layer.path) for _, spec in static.adapters for layer in spec.layers}
        missing = expected - reached if not static.disabled else set()
        if missing and missing == expected:
            raise ValueError(
                "fourierft_jax: no adapted layer was called as a flax.linen.Dense at its parameter path (e.g. "
                f"{'.'.join(sorted(missing)[0])!r}); use mode='merge' for this model"
            )
        if missing:
            warnings.warn(
                f"fourierft_jax: adapted layers {sorted('.'.join(p) for p in missing)} were not called in this "
                "forward pass; their spectra get no gradient",
                UserWarning,
                stacklevel=2,
            )
        return out

    return spectral_apply
