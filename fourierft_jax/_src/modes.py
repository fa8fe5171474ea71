"""``make_apply``: the forward pass of any function of the parameters with the active adapters on.

* ``mode="auto"`` (default): per adapted contraction and call, "fused" or "spectral" by ``choose_path`` -- the
  one rule (``bridge``'s), from the measured costs in BENCHMARKS.md: the fused path pays a token-independent
  ``ΔW`` build plus two row FFTs, the spectral path FFTs, gathers and scatters that grow with the number of
  tokens, so many tokens favour "fused" and few favour "spectral".
* ``mode="fused"``: ``x · (W + ΔW)`` with an FFT-based backward (no weight-sized ``xᵀdy``).
* ``mode="spectral"``: ``ΔW`` is never built; cheapest for few tokens (decoding, small batches).
* ``mode="merge"``: the function runs on ``W + ΔW`` parameters: the simplest form and the one for inference
  (``merge_and_unload`` once, then the adapter costs nothing). In training autodiff forms ``xᵀdy`` per layer.

The first three work on any JAX function -- linen ``model.apply``, NNX through ``nnx.split``/``nnx.merge``,
keras' ``stateless_call``, hand-written ``jnp.einsum`` code -- because the function is rewritten at the operator
level (``rewrite.py``): each ``dot_general`` that consumes a view of an adapted kernel (2-D ``Dense``, N-D
``DenseGeneral``/``Einsum``, one layer of a scanned stack) becomes an adapted contraction (``adapted_dot.py``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from bridge._src.auto_rule import choose_path as _choose_path

from .adapter import AdapterSet
from .forward import adapted_call
from .layer import LayerSpec
from .merge import DEFAULT_DELTA_METHOD, merge_params, substitute

MODES = ("auto", "fused", "spectral", "merge")
DEFAULT_MODE = "auto"

# choose_path: "fused" once tokens · (in + out) >= SPECTRAL_MAX_RATIO · in · out, i.e. once the token-proportional
# FFT/gather/scatter work of the spectral path outweighs the fused path's per-step ΔW build (see BENCHMARKS.md,
# "fourierft_jax training step", per-layer breakdown). The rule and its constant are bridge's, shared with torch.


def choose_path(tokens: int, layer: LayerSpec) -> str:
    """``"fused"`` or ``"spectral"``: the path ``mode="auto"`` takes for a call of ``layer`` on ``tokens`` rows.

    Example:
        >>> layer = LayerSpec(("q",), in_features=768, out_features=768, n_frequency=1000, scaling=1.0, seed=0)
        >>> choose_path(8 * 128, layer), choose_path(8, layer)
        ('fused', 'spectral')
    """
    return _choose_path(tokens, layer.out_features, layer.in_features)


def make_apply(
    apply_fn: Callable[..., Any],
    static: AdapterSet,
    *,
    mode: str = DEFAULT_MODE,
    method: str = DEFAULT_DELTA_METHOD,
    shardings: Any = None,
) -> Callable[..., Any]:
    """``f(trainable, variables, *args, **kwargs)``: ``apply_fn(variables, *args, **kwargs)`` with the adapters on.

    ``apply_fn`` is any JAX function whose first argument is the parameter pytree the adapter was built on
    (``model.apply``, a function calling ``nnx.merge``, keras' ``stateless_call``, plain ``jnp`` code).
    ``mode="auto"`` (default) picks "fused" or "spectral" per adapted contraction (``choose_path``); ``"fused"``
    computes it as ``x · (W + ΔW)`` with an FFT-based backward; ``"spectral"`` adds the adapter output computed
    in the spectral domain; ``"merge"`` calls ``apply_fn`` on ``W + ΔW`` parameters. All give the same numbers;
    the function is pure, so ``jax.grad`` over ``trainable`` and ``jax.jit`` work directly.

    ``static`` lists the adapters the function knows; ``trainable`` selects, at every call, which of them run
    (those it holds a state for; ``{}`` runs the base model) -- so pass ``adapter.trainable`` as it is at the
    time of the call, which follows ``set_adapter`` and ``disable_adapter``. A state for an adapter ``static``
    does not hold is an error naming it. ``static.disabled`` (a set taken while disabled) always runs the base.

    On a device mesh pass ``shardings``: the parameters' ``NamedSharding`` tree (structured like ``variables``
    or their ``params`` collection), i.e. what ``jax.jit(in_shardings=...)`` gets for them. Each Dense ``ΔW`` is
    then built shard-locally with its kernel's sharding and the spectrum gradient is reduced as ``n`` floats
    (see ``sharded_delta``); "auto" takes the fused path for sharded layers.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, fourierft_jax
        >>> model, x = nn.Dense(4), jnp.ones((1, 8))
        >>> variables = model.init(jax.random.key(0), x)
        >>> tree = {"params": {"layer": variables["params"]}}  # give the Dense a name to target
        >>> adapter = fourierft_jax.apply(tree, fourierft_jax.FourierFTConfig(n_frequency=3,
        ...                               target_modules=["layer"]), key=jax.random.key(1))
        >>> make_apply(lambda v, x: model.apply({"params": v["params"]["layer"]}, x), adapter.static)(
        ...     adapter.trainable, tree, x).shape
        (1, 4)
    """
    if mode not in MODES:
        raise ValueError(f"fourierft_jax: mode must be one of {MODES}, got {mode!r}")

    # `trainable` selects the adapters at each call (AdapterSet.select): a forward never runs a selection that
    # was current when it was built but is not the one it is given now.
    if mode == "merge":

        def merged_apply(trainable: Mapping[str, Any], variables: Any, *args: Any, **kwargs: Any) -> Any:
            active = static.select(trainable)
            merged = merge_params(variables, trainable, active, method=method, shardings=shardings)
            return apply_fn(merged, *args, **kwargs)

        return merged_apply

    def adapted_apply(trainable: Mapping[str, Any], variables: Any, *args: Any, **kwargs: Any) -> Any:
        active = static.select(trainable)
        variables = substitute(variables, trainable, active)
        if active.disabled or not any(spec.layers for _, spec in active.adapters):
            return apply_fn(variables, *args, **kwargs)
        return adapted_call(apply_fn, variables, args, kwargs, trainable, active, mode, shardings)

    return adapted_apply
