"""NNX building blocks: the spectrum variable types and ``FourierFTLinear``, a drop-in for ``nnx.Linear``.

The spectrum is a ``FourierFTSpectrum``, a subclass of ``nnx.LoRAParam``, so ``nnx.Optimizer(model, tx,
wrt=nnx.LoRAParam)`` (or ``nnx.DiffState(0, nnx.LoRAParam)``) trains only adapter parameters while the base
kernel stays an ``nnx.Param``. The positions are static (a hashable ``LayerSpec`` attribute), never a Variable.

A *stacked* ``FourierFTLinear`` wraps an ``nnx.Linear`` made by ``nnx.vmap`` (kernel ``(L, in, out)``) and holds
one spectrum row per layer, ``(L, n)``: ``nnx.scan``/``nnx.vmap`` over the stack slice every Variable along
axis 0, so each call sees its own ``(in, out)`` kernel and ``(n,)`` row and computes with ``layer.unstacked``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .delta import delta_kernel
from .layer import LayerSpec
from .spectral import spectral_delta

MODES = ("spectral", "merge")


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


class FourierFTLinear(nnx.Module):
    """``nnx.Linear`` plus a FourierFT adapter: ``y = base(x) + x ΔW`` with ``ΔW`` never built (spectral mode).

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
        base: nnx.Linear,
        layer: LayerSpec,
        *,
        rngs: nnx.Rngs | None = None,
        init_weights: bool = False,
        mode: str = "spectral",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"FourierFTLinear: mode must be one of {MODES}, got {mode!r}")
        if tuple(base.kernel.shape) != layer.param_shape:
            raise ValueError(
                f"FourierFTLinear: kernel of {layer.name!r} has shape {tuple(base.kernel.shape)}, expected "
                f"{layer.param_shape}"
            )
        if layer.stacked and (layer.stack_axis != 0 or len(layer.stack_ids) != layer.stack_size):
            raise ValueError(
                f"FourierFTLinear: stacked layer {layer.name!r} must adapt every row of its stack along axis 0 "
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
                raise ValueError("FourierFTLinear: init_weights=False draws N(0, 1) spectra; pass rngs=nnx.Rngs(...)")
            value = jax.random.normal(rngs.params(), layer.spectrum_shape, jnp.float32)
        self.spectrum = FourierFTSpectrum(value)

    def delta_kernel(self) -> jax.Array:
        """This layer's float32 kernel delta in the kernel's layout: ``(in, out)``, or ``(L, in, out)`` for a stack
        (inside ``nnx.scan`` over the stack: the current layer's ``(in, out)``).

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

    def __call__(self, x: jax.Array) -> jax.Array:
        spectrum = self.spectrum[...]
        layer = self._layer_for(spectrum.shape)
        if layer.stacked:
            raise ValueError(
                f"FourierFTLinear {layer.name!r} holds a stack of {layer.stack_size} layers (spectrum "
                f"{tuple(spectrum.shape)}); call it inside nnx.scan or nnx.vmap over the stack, which gives each "
                "call one layer"
            )
        y = self.base(x)
        if self.disabled:
            return y
        if self.mode == "merge":
            delta = jnp.matmul(x.astype(jnp.float32), delta_kernel(spectrum, layer))
        else:
            delta = spectral_delta(x, spectrum, layer)
        return y + delta.astype(y.dtype)
