"""NNX building blocks: the spectrum variable types, ``FourierFTLinear`` (a drop-in for ``nnx.Linear``) and
``FourierFTGeneral`` (for ``nnx.LinearGeneral`` / ``nnx.Einsum``, e.g. what ``nnx.MultiHeadAttention`` holds).

The spectrum is a ``FourierFTSpectrum``, a subclass of ``nnx.LoRAParam``, so ``nnx.Optimizer(model, tx,
wrt=nnx.LoRAParam)`` (or ``nnx.DiffState(0, nnx.LoRAParam)``) trains only adapter parameters while the base
kernel stays an ``nnx.Param``. The positions are static (a hashable ``LayerSpec`` attribute), never a Variable.

Modes: ``"spectral"`` adds the adapter's output computed from the input's spectrum (``ΔW`` never built);
``"fused"`` runs ``x · (W + ΔW)`` with an FFT-based backward; ``"auto"`` picks one of the two per call
(``choose_path``); ``"merge"`` runs the module on ``W + ΔW`` (plain autodiff: a weight-sized gradient). The first
three never form the weight-sized ``xᵀdy`` in training. An N-D kernel (``FourierFTGeneral``) and the
``"fused"``/``"auto"`` modes run the wrapped module's own call through the operator-level rewriter
(``rewrite.run_with``) on the module's kernel, so its contraction -- whatever layout, dtype promotion or
``dot_general`` it uses -- becomes an adapted contraction (``adapted_dot``) on the kernel's ``(in, out)`` matrix.

A *stacked* layer wraps a module made by ``nnx.vmap`` (kernel ``(L, ...)``) and holds one spectrum row per layer,
``(L, n)``: ``nnx.scan``/``nnx.vmap`` over the stack slice every Variable along axis 0, so each call sees its own
kernel and ``(n,)`` row and computes with ``layer.unstacked``.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .delta import delta_kernel
from .forward import _Adapters
from .layer import LayerSpec
from .rewrite import run_with
from .spectral import spectral_delta
from .tree import dotted, leaf_paths

MODES = ("auto", "fused", "spectral", "merge")


class FourierFTSpectrum(nnx.LoRAParam):
    """The trainable float32 coefficients of one FourierFT layer (an ``nnx.LoRAParam``).

    Example:
        >>> import jax.numpy as jnp
        >>> isinstance(FourierFTSpectrum(jnp.zeros(3)), nnx.LoRAParam)
        True
    """


class FourierFTTrainable(nnx.LoRAParam):
    """A base parameter FourierFT trains in full: biases (``bias`` config) and ``modules_to_save`` parameters.

    Example:
        >>> import jax.numpy as jnp
        >>> isinstance(FourierFTTrainable(jnp.zeros(3)), nnx.LoRAParam)
        True
    """


def _kernel_index(base: nnx.Module, state: Any, layer: LayerSpec) -> int:
    paths = leaf_paths(state)
    if ("kernel",) not in paths:
        raise ValueError(f"fourierft_jax.nnx: layer {layer.name!r}: the wrapped {type(base).__name__} has no "
                         "`kernel` parameter")
    return paths.index(("kernel",))


def merged_module_call(base: nnx.Module, layer: LayerSpec, spectrum: jax.Array, args: tuple, kwargs: dict) -> Any:
    """``base(*args, **kwargs)`` with its kernel replaced by ``W + ΔW`` (``layer`` unstacked), base untouched.

    Example:
        >>> layer = LayerSpec(("fc",), in_features=8, out_features=4, n_frequency=6, scaling=1.0, seed=777)
        >>> base = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
        >>> y = merged_module_call(base, layer, jnp.zeros(6), (jnp.ones((2, 8)),), {})
        >>> bool(jnp.allclose(y, base(jnp.ones((2, 8)))))
        True
    """
    graphdef, state = nnx.split(base)
    index = _kernel_index(base, state, layer)
    leaves, treedef = jax.tree.flatten(state)
    kernel = leaves[index]
    leaves[index] = kernel + delta_kernel(spectrum, layer).astype(kernel.dtype)
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))(*args, **kwargs)


def adapted_module_call(base: nnx.Module, layer: LayerSpec, spectrum: jax.Array, mode: str, args: tuple,
                        kwargs: dict) -> Any:
    """``base(*args, **kwargs)`` with ``base.kernel`` adapted by ``spectrum`` at the operator level.

    The module's call is traced (``nnx.split``/``nnx.merge``) and rewritten (``rewrite.run_with``): the
    ``dot_general`` that contracts the kernel becomes an adapted contraction in ``mode`` (``"auto"``,
    ``"fused"`` or ``"spectral"``), checked against ``layer``'s contracted axes (``ContractionError`` naming the
    layer otherwise). A kernel used some other way runs merged there, with a warning.

    Example:
        >>> import numpy as np, bridge
        >>> base = nnx.LinearGeneral(6, (2, 4), use_bias=False, rngs=nnx.Rngs(0))
        >>> layer = LayerSpec(("q",), 6, 8, 5, 3.0, 777, kernel_dims=(6, 2, 4), in_axes=(0,))
        >>> c, x = jnp.arange(1.0, 6.0), jnp.ones((3, 6))
        >>> y = adapted_module_call(base, layer, c, "fused", (x,), {})
        >>> dw = bridge.delta_weight(np.arange(1.0, 6.0), layer.torch_indices, 8, 6, 3.0).T.reshape(6, 2, 4)
        >>> bool(np.allclose(y, np.einsum("bd,dnh->bnh", np.ones((3, 6)), np.asarray(base.kernel[...]) + dw),
        ...                  atol=1e-4))
        True
    """
    graphdef, state = nnx.split(base)
    index = _kernel_index(base, state, layer)
    key = layer.kernel_path
    handler = _Adapters({key: [(layer, spectrum)]}, mode, None)
    out = run_with(lambda s, *a, **kw: nnx.merge(graphdef, s)(*a, **kw), state, tuple(args), dict(kwargs),
                   {index: key}, handler)
    if key not in handler.reached:
        warnings.warn(f"fourierft_jax.nnx: layer {layer.name!r}: the wrapped {type(base).__name__} did not use its "
                      "kernel in this call; the adapter has no effect and its spectrum gets no gradient",
                      UserWarning, stacklevel=3)
    for why in handler.merged.values():
        warnings.warn(f"fourierft_jax.nnx: layer {dotted(layer.path)!r} is used by {why}; that use runs on the "
                      "merged kernel W + ΔW (correct, but its gradient is weight-sized)", UserWarning, stacklevel=3)
    return out


class FourierFTLinear(nnx.Module):
    """``nnx.Linear`` plus a FourierFT adapter: ``y = base(x) + x ΔW`` with ``ΔW`` never built (spectral mode).

    ``mode`` is ``"spectral"`` (default), ``"fused"``, ``"auto"`` or ``"merge"`` (see the module docstring).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> base = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
        >>> layer = LayerSpec(("fc",), in_features=8, out_features=4, n_frequency=6, scaling=10.0, seed=777)
        >>> adapted = FourierFTLinear(base, layer, rngs=nnx.Rngs(1))
        >>> adapted(jnp.ones((2, 8))).shape
        (2, 4)
    """

    def __init__(
        self,
        base: nnx.Module,
        layer: LayerSpec,
        *,
        rngs: nnx.Rngs | None = None,
        init_weights: bool = False,
        mode: str = "spectral",
    ) -> None:
        kind = type(self).__name__
        if mode not in MODES:
            raise ValueError(f"{kind}: mode must be one of {MODES}, got {mode!r}")
        kernel = getattr(base, "kernel", None)
        if not isinstance(kernel, nnx.Variable):
            raise ValueError(f"{kind}: the module at {layer.name!r} ({type(base).__name__}) has no kernel parameter")
        if tuple(kernel.shape) != layer.param_shape:
            raise ValueError(
                f"{kind}: kernel of {layer.name!r} has shape {tuple(kernel.shape)}, expected {layer.param_shape}"
            )
        if layer.stacked and (layer.stack_axis != 0 or len(layer.stack_ids) != layer.stack_size):
            raise ValueError(
                f"{kind}: stacked layer {layer.name!r} must adapt every row of its stack along axis 0 "
                f"(nnx.scan slices all its Variables alike); got stack_axis={layer.stack_axis}, rows "
                f"{list(layer.stack_ids)} of {layer.stack_size}"
            )
        self.base = base
        self.layer = layer
        self.mode = mode
        self.disabled = False
        if init_weights:
            value = jnp.zeros(layer.spectrum_shape, jnp.float32)
        else:
            if rngs is None:
                raise ValueError(f"{kind}: init_weights=False draws N(0, 1) spectra; pass rngs=nnx.Rngs(...)")
            value = jax.random.normal(rngs.params(), layer.spectrum_shape, jnp.float32)
        self.spectrum = FourierFTSpectrum(value)

    def delta_kernel(self) -> jax.Array:
        """This layer's float32 kernel delta in the kernel's layout: ``(in, out)`` (an N-D kernel: its stored
        layout), or ``(L, ...)`` for a stack (inside ``nnx.scan`` over the stack: the current layer's).

        Example:
            >>> layer = LayerSpec(("fc",), in_features=8, out_features=4, n_frequency=6, scaling=1.0, seed=777)
            >>> FourierFTLinear(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), layer, init_weights=True).delta_kernel().shape
            (8, 4)
        """
        spectrum = self.spectrum[...]
        return delta_kernel(spectrum, self._layer_for(spectrum.shape))

    def _layer_for(self, spectrum_shape: tuple[int, ...]) -> LayerSpec:
        # A stack is either whole (merging, saving) or sliced to one layer by nnx.scan/nnx.vmap (a forward pass).
        layer = self.layer
        if layer.stacked and tuple(spectrum_shape) == (layer.n_frequency,):
            return layer.unstacked
        return layer

    def _call_layer(self) -> tuple[jax.Array, LayerSpec]:
        spectrum = self.spectrum[...]
        layer = self._layer_for(spectrum.shape)
        if layer.stacked:
            raise ValueError(
                f"{type(self).__name__} {layer.name!r} holds a stack of {layer.stack_size} layers (spectrum "
                f"{tuple(spectrum.shape)}); call it inside nnx.scan or nnx.vmap over the stack, which gives each "
                "call one layer"
            )
        return spectrum, layer

    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        spectrum, layer = self._call_layer()
        if self.disabled:
            return self.base(x, *args, **kwargs)
        if self.mode in ("auto", "fused"):
            return adapted_module_call(self.base, layer, spectrum, self.mode, (x,) + args, kwargs)
        y = self.base(x, *args, **kwargs)
        if self.mode == "merge":
            delta = jnp.matmul(x.astype(jnp.float32), delta_kernel(spectrum, layer))
        else:
            delta = spectral_delta(x, spectrum, layer)
        return y + delta.astype(y.dtype)


class FourierFTGeneral(FourierFTLinear):
    """An ``nnx.LinearGeneral`` or ``nnx.Einsum`` (any module with a ``kernel`` it contracts) plus a FourierFT
    adapter on its kernel's ``(in, out)`` matrix view (``layer.kernel_dims``/``layer.in_axes``).

    The call is the wrapped module's own (same arguments, dtype promotion, bias), with the kernel's contraction
    adapted: ``"spectral"``, ``"fused"`` and ``"auto"`` through the operator-level rewriter (no weight-sized
    gradient), ``"merge"`` on ``W + ΔW``.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> base = nnx.LinearGeneral(8, (2, 3), rngs=nnx.Rngs(0))          # kernel (8, 2, 3)
        >>> layer = LayerSpec(("q",), 8, 6, 5, 10.0, 777, kernel_dims=(8, 2, 3), in_axes=(0,))
        >>> adapted = FourierFTGeneral(base, layer, rngs=nnx.Rngs(1))
        >>> adapted(jnp.ones((4, 8))).shape, adapted.delta_kernel().shape
        ((4, 2, 3), (8, 2, 3))
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        spectrum, layer = self._call_layer()
        if self.disabled:
            return self.base(*args, **kwargs)
        if self.mode == "merge":
            return merged_module_call(self.base, layer, spectrum, args, kwargs)
        return adapted_module_call(self.base, layer, spectrum, self.mode, args, kwargs)
