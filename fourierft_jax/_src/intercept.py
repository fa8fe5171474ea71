"""The linen paths: a method interceptor that adapts each targeted ``Dense`` call, or a merged parameter tree.

``flax.linen.intercept_methods`` sees every module call; at a targeted ``nn.Dense.__call__`` (found by its
module path, which is its path in the ``params`` collection) it either computes the call itself as
``x @ (W + ΔW) + b`` with the hand-written backward of ``fused.py`` ("fused"), or runs the Dense and adds
``spectral_delta(x)`` computed in float32 ("spectral"). Neither forms a weight-sized gradient.

Which path to use:

* ``mode="auto"`` (default): per targeted layer and call, "fused" or "spectral" by ``choose_path`` -- the one
  rule, from the measured costs in BENCHMARKS.md: the fused path pays a token-independent ``ΔW`` build (two
  ``irfft2`` of ``in × out`` per step) plus two row FFTs, the spectral path pays FFTs, gathers and scatters that
  all grow with the number of tokens, so many tokens favour "fused" and few favour "spectral".
* ``mode="fused"``: always the fused form (falls back to "spectral" for a Dense with a custom ``dot_general``).
* ``mode="spectral"``: ``ΔW`` is never built; cheapest for few tokens (decoding, small batches).
* ``mode="merge"``: any function of the parameter tree (non-linen code, custom kernels, ``nn.scan``); the
  simplest form and the one for inference -- ``merge_and_unload`` once, then the adapter costs nothing. In
  training, autodiff forms the ``xᵀ dy`` weight gradient for every adapted layer.

"fused", "spectral" and "auto" need the targeted layers to be ``flax.linen.Dense`` modules called at their
parameter path. A stacked kernel (``stacked=`` in ``apply``) must be called under the ``nn.scan``/``nn.vmap``
that slices its parameters: its spectra ride along in the ``params`` collection, next to the kernel, with the
layer axis where the kernel has it (``inject_stacked``), so the lifted transform hands each layer call its own
row and the call is adapted like any other (no ``xᵀdy``). Stacks used any other way need ``mode="merge"``.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from .adapter import AdapterSet, adapter_state, layer_spectrum
from .fused import fused_dense_multi
from .layer import LayerSpec
from .merge import DEFAULT_DELTA_METHOD, merge_params, substitute
from .sharding import call_sharding
from .spectral import spectral_delta
from .tree import Path, replace_paths, split_collection

MODES = ("auto", "fused", "spectral", "merge")
DEFAULT_MODE = "auto"

# choose_path: "fused" once tokens · (in + out) >= FUSED_MIN_RATIO · in · out, i.e. once the token-proportional
# FFT/gather/scatter work of the spectral path outweighs the fused path's per-step ΔW build (see BENCHMARKS.md,
# "fourierft_jax training step", per-layer breakdown).
FUSED_MIN_RATIO = 0.5


def choose_path(tokens: int, layer: LayerSpec) -> str:
    """``"fused"`` or ``"spectral"``: the path ``mode="auto"`` takes for a call of ``layer`` on ``tokens`` rows.

    Example:
        >>> layer = LayerSpec(("q",), in_features=768, out_features=768, n_frequency=1000, scaling=1.0, seed=0)
        >>> choose_path(8 * 128, layer), choose_path(8, layer)
        ('fused', 'spectral')
    """
    n_in, n_out = layer.in_features, layer.out_features
    return "fused" if tokens * (n_in + n_out) >= FUSED_MIN_RATIO * n_in * n_out else "spectral"


def stacked_key(adapter_name: str) -> str:
    """The ``params`` entry, next to a stacked kernel, that carries adapter ``adapter_name``'s spectra into a scan."""
    return f"__fourierft_spectrum__{adapter_name}"


def inject_stacked(variables: Any, trainable: Mapping[str, Any], static: AdapterSet) -> Any:
    """``variables`` with each stacked layer's spectra placed next to its kernel, the layer axis where it has it.

    Rows of the stack that an adapter leaves alone get zeros, so every scanned call finds a row; their gradient
    is dropped by the scatter.

    Example:
        >>> import numpy as np, jax, fourierft_jax
        >>> params = {"s": {"fc": {"kernel": np.zeros((4, 3, 2), np.float32)}}}
        >>> cfg = fourierft_jax.FourierFTConfig(n_frequency=5, target_modules=["fc"])
        >>> adapter = fourierft_jax.apply(params, cfg, key=jax.random.key(0), stacked={"s": 1})
        >>> inject_stacked(params, adapter.trainable, adapter.static)["s"]["fc"][stacked_key("default")].shape
        (5, 3)
    """
    if static.disabled:
        return variables
    inner, rebuild = split_collection(variables)
    updates: dict[Path, Any] = {}
    for name, spec in static.adapters:
        state = adapter_state(trainable, name)
        for layer in spec.layers:
            if not layer.stacked:
                continue
            rows = layer_spectrum(state, layer, name)
            full = jnp.zeros((layer.stack_size, layer.n_frequency), rows.dtype).at[np.asarray(layer.stack_ids)].set(rows)
            # (L, n) -> n first, then singleton axes up to the layer axis, so the scan slices out an (n, 1...) row.
            shape = [layer.n_frequency] + [1] * max(layer.stack_axis - 1, 0)
            shape.insert(layer.stack_axis, layer.stack_size)
            full = jnp.moveaxis(full, 0, layer.stack_axis) if layer.stack_axis else full
            updates[layer.path + (stacked_key(name),)] = full.reshape(shape)
    return rebuild(replace_paths(inner, updates))


def _stacked_row(module: nn.Module, layer: LayerSpec, adapter_name: str) -> Any:
    """This call's row of a stacked layer's spectra, checking that the call sees one layer, not the stack."""
    kernel = module.get_variable("params", "kernel")
    row = module.get_variable("params", stacked_key(adapter_name))
    shape = tuple(np.shape(nn.meta.unbox(kernel))) if kernel is not None else None
    if row is None or shape != layer.kernel_shape:
        raise ValueError(
            f"fourierft_jax: the stacked layer {layer.name!r} was called with kernel shape {shape} instead of one "
            f"layer's {layer.kernel_shape}: it is not under the nn.scan/nn.vmap that slices its stack; use "
            "mode='merge' for this model"
        )
    return jnp.reshape(row, (layer.n_frequency,))


def _fused_call(module: nn.Dense, x: Any, entries: list, sharding: Any = None) -> Any:
    """``module(x)`` with ``W + ΔW`` as the kernel, or None where the Dense is not a plain one we can replay."""
    if getattr(module, "dot_general", None) is not None or getattr(module, "dot_general_cls", None) is not None:
        return None
    kernel = module.get_variable("params", "kernel")
    bias = module.get_variable("params", "bias") if module.use_bias else None
    if kernel is None or (module.use_bias and bias is None):
        return None
    kernel, bias = nn.meta.unbox(kernel), nn.meta.unbox(bias)
    promote = getattr(module, "promote_dtype", None) or nn.dtypes.promote_dtype
    x, kernel, bias = promote(x, kernel, bias, dtype=module.dtype)
    layers = tuple(layer for layer, _ in entries)
    y = fused_dense_multi(x, kernel, tuple(spectrum for _, spectrum in entries), layers, precision=module.precision,
                          sharding=sharding)
    if bias is not None:
        y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


@contextlib.contextmanager
def spectral_interceptor(
    trainable: Mapping[str, Any], static: AdapterSet, mode: str = "spectral", *, shardings: Any = None
) -> Iterator[set[Path]]:
    """Within this context, every targeted linen ``Dense`` call includes the active adapters' output.

    ``mode`` is "spectral" (run the Dense, add ``spectral_delta``), "fused" (``x @ (W + ΔW) + b`` with the
    FFT-based backward) or "auto" (``choose_path`` per layer and call). With ``shardings`` (the parameters'
    ``NamedSharding`` tree) the fused path builds ``ΔW`` shard-locally and reduces its gradient as ``n`` floats,
    and "auto" takes it for every sharded layer (XLA all-gathers the operand of the spectral path's FFTs).

    Yields the set of layer paths that were reached, so callers can tell a model whose Dense modules do not sit
    at their parameter paths. Biases, ``modules_to_save`` and stacked spectra are not handled here: pass
    ``inject_stacked(substitute(params, trainable, static), trainable, static)`` to ``model.apply``
    (``make_apply`` does all of it).

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
    if mode not in ("auto", "fused", "spectral"):
        raise ValueError(f"fourierft_jax: interceptor mode must be 'auto', 'fused' or 'spectral', got {mode!r}")
    table: dict[Path, list] = {}
    placement: dict[Path, Any] = {}
    if not static.disabled:
        for name, spec in static.adapters:
            state = adapter_state(trainable, name)
            for layer in spec.layers:
                # A stacked layer's row is read from the (scan-sliced) parameters at call time: see inject_stacked.
                spectrum = name if layer.stacked else layer_spectrum(state, layer, name)
                table.setdefault(tuple(layer.path), []).append((layer, spectrum))
                placement.setdefault(tuple(layer.path), call_sharding(shardings, layer))
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
        x = args[0] if args else kwargs["inputs"]
        entries = [
            (layer.unstacked, _stacked_row(module, layer, spectrum)) if layer.stacked else (layer, spectrum)
            for layer, spectrum in entries
        ]
        path_mode = mode
        if mode == "auto":
            path_mode = choose_path(int(np.prod(np.shape(x)[:-1], dtype=np.int64)), entries[0][0])
            if placement[path] is not None:
                path_mode = "fused"
        if path_mode == "fused":
            y = _fused_call(module, x, entries, placement[path])
            if y is not None:
                reached.add(path)
                return y
        y = next_fun(*args, **kwargs)
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
    shardings: Any = None,
) -> Callable[..., Any]:
    """``f(trainable, variables, *args, **kwargs)``: ``apply_fn`` (e.g. ``model.apply``) with the adapters on.

    ``mode="auto"`` (default) picks "fused" or "spectral" per targeted Dense call (``choose_path``);
    ``"fused"`` computes the call as ``x @ (W + ΔW) + b`` with an FFT-based backward; ``"spectral"`` adds the
    adapter output computed in the spectral domain; ``"merge"`` calls ``apply_fn`` on ``W + ΔW`` parameters.
    All give the same numbers; the function is pure, so ``jax.grad`` over ``trainable`` and ``jax.jit`` work
    directly.

    On a device mesh pass ``shardings``: the parameters' ``NamedSharding`` tree (structured like ``variables``
    or their ``params`` collection), i.e. what ``jax.jit(in_shardings=...)`` gets for them. Each ``ΔW`` is then
    built shard-locally with its kernel's sharding and the spectrum gradient is reduced as ``n`` floats (see
    ``sharded_delta``); "auto" takes the fused path for sharded layers.

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
            merged = merge_params(variables, trainable, static, method=method, shardings=shardings)
            return apply_fn(merged, *args, **kwargs)

        return merged_apply

    def spectral_apply(trainable: Mapping[str, Any], variables: Any, *args: Any, **kwargs: Any) -> Any:
        variables = inject_stacked(substitute(variables, trainable, static), trainable, static)
        with spectral_interceptor(trainable, static, mode, shardings=shardings) as reached:
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
