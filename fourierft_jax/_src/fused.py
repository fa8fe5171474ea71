"""The fused path: ``y = x @ (W + ΔW)`` with a hand-written backward that never forms the weight gradient.

Autodiff of ``x @ (W + ΔW(c))`` computes ``∂L/∂(W + ΔW) = xᵀ dy`` (a full ``tokens × in × out`` matmul, as
large as the forward one) and then gathers ``n`` entries of its 2-D FFT. The spectrum gradient needs only those
``n`` entries, and with ``X̂ = fft(x)`` over ``in`` and ``Ŷ = fft(dy)`` over ``out``:

``∂L/∂c_k = scaling/(out·in) · Σ_b Re(Ŷ[b, row_k] · X̂[b, col_k])``

(``(row_k, col_k)`` PEFT's positions over ``(out, in)``) -- two row FFTs and a ``tokens × n`` gather-multiply-sum.
The input gradient is ``dy @ (W + ΔW)ᵀ``, the same matmul the frozen base layer needs anyway; ``ΔW`` is rebuilt
in the backward pass (one ``irfft2``) rather than kept alive between the passes, so the step holds no extra
weight-sized buffer per layer. The kernel gradient ``xᵀ dy`` is still returned, so that differentiating the
frozen parameters stays correct, but under ``jax.jit`` it is dead code unless asked for.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .delta import delta_kernel_f32
from .layer import LayerSpec


@functools.lru_cache(maxsize=None)
def _grad_plan(layer: LayerSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    # X̂[col] of a real signal is rfft[col] for col <= in//2, else conj(rfft[in - col]); the same for Ŷ[row].
    rows, cols = (np.asarray(i, dtype=np.int64) for i in layer.torch_indices)
    n_in, n_out = layer.in_features, layer.out_features
    col_low, row_low = cols <= n_in // 2, rows <= n_out // 2
    col_half = np.where(col_low, cols, n_in - cols).astype(np.int32)
    row_half = np.where(row_low, rows, n_out - rows).astype(np.int32)
    # Re(a·b) = Re a Re b − Im a Im b; one conjugated factor flips the sign of the second product.
    sign = np.where(col_low == row_low, 1.0, -1.0).astype(np.float32)
    for array in (col_half, row_half, sign):
        array.setflags(write=False)
    return col_half, row_half, sign, float(layer.scaling) / (n_in * n_out)


def _check(x: jax.Array, kernel: jax.Array, spectra: Sequence[jax.Array], layers: Sequence[LayerSpec]) -> None:
    for spectrum, layer in zip(spectra, layers, strict=True):
        if tuple(kernel.shape) != layer.kernel_shape:
            raise ValueError(
                f"fourierft_jax: kernel of layer {layer.name!r} has shape {tuple(kernel.shape)}, expected "
                f"{layer.kernel_shape}"
            )
        layer.check_input(x.shape)
        layer.check_spectrum(jnp.shape(spectrum))


def fused_dense(
    x: jax.Array, kernel: jax.Array, spectrum: jax.Array, layer: LayerSpec, *, precision: Any = None
) -> jax.Array:
    """``x @ (kernel + ΔW_kernel)`` for one adapted layer, differentiable in all three arrays.

    The forward pass is one matmul on the merged kernel; the backward pass computes the spectrum gradient from
    the FFTs of ``x`` and ``dy`` instead of the ``xᵀ dy`` weight gradient (see the module docstring).

    Example:
        >>> import numpy as np, bridge
        >>> layer = LayerSpec(("q",), in_features=6, out_features=4, n_frequency=5, scaling=3.0, seed=777)
        >>> c, x, w = np.arange(1.0, 6.0), np.linspace(-1, 1, 12).reshape(2, 6), np.ones((6, 4))
        >>> ref = x @ (w + bridge.delta_weight(c, layer.torch_indices, 4, 6, 3.0).T)
        >>> y = fused_dense(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(c, jnp.float32),
        ...                 layer)
        >>> bool(np.allclose(y, ref, atol=1e-4))
        True
    """
    return fused_dense_multi(x, kernel, (spectrum,), (layer,), precision=precision)


def fused_dense_multi(
    x: jax.Array,
    kernel: jax.Array,
    spectra: Sequence[jax.Array],
    layers: Sequence[LayerSpec],
    *,
    precision: Any = None,
) -> jax.Array:
    """``x @ (kernel + Σ_a ΔW_a)`` for several adapters on one kernel (``fused_dense`` with tuples).

    Example:
        >>> layer = LayerSpec(("q",), in_features=6, out_features=4, n_frequency=5, scaling=3.0, seed=777)
        >>> c, x, w = jnp.ones(5), jnp.ones((2, 6)), jnp.zeros((6, 4))
        >>> two = fused_dense_multi(x, w, (c, c), (layer, layer))
        >>> bool(jnp.allclose(two, 2 * fused_dense(x, w, c, layer), atol=1e-5))
        True
    """
    spectra, layers = tuple(spectra), tuple(layers)
    _check(x, kernel, spectra, layers)
    return _fused(x, kernel, spectra, layers, precision)


def _effective_kernel(kernel: jax.Array, spectra: tuple, layers: tuple) -> jax.Array:
    delta = None
    for spectrum, layer in zip(spectra, layers):
        term = delta_kernel_f32(spectrum.astype(jnp.float32), layer)
        delta = term if delta is None else delta + term
    return kernel + delta.astype(kernel.dtype)


def _matmul(x: jax.Array, kernel: jax.Array, precision: Any) -> jax.Array:
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


# Measurement switch (benchmarks only): keep W + ΔW alive between the passes instead of rebuilding it.
KEEP_EFFECTIVE = False


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused(x: jax.Array, kernel: jax.Array, spectra: tuple, layers: tuple, precision: Any) -> jax.Array:
    return _matmul(x, _effective_kernel(kernel, spectra, layers), precision)


def _fused_fwd(x, kernel, spectra, layers, precision):
    effective = _effective_kernel(kernel, spectra, layers)
    kept = effective if KEEP_EFFECTIVE else None
    return _matmul(x, effective, precision), (x, kernel, spectra, kept)


def _fused_bwd(layers, precision, residuals, dy):
    x, kernel, spectra, effective = residuals
    if effective is None:
        effective = _effective_kernel(kernel, spectra, layers)
    # dx = dy @ (W + ΔW)ᵀ, contracting the output features.
    dx = jax.lax.dot_general(dy, effective.astype(dy.dtype), (((dy.ndim - 1,), (1,)), ((), ())),
                             precision=precision).astype(x.dtype)
    flat_x = x.reshape(-1, x.shape[-1])
    flat_dy = dy.reshape(-1, dy.shape[-1])
    dkernel = jax.lax.dot_general(flat_x, flat_dy.astype(flat_x.dtype), (((0,), (0,)), ((), ())),
                                  precision=precision).astype(kernel.dtype)
    # Frequency-major (bins, re/im, tokens) tables: the gathers below then copy whole contiguous rows, which
    # XLA:CPU does about twice as fast as gathering columns of the (tokens, bins) spectra.
    x_hat = jnp.fft.rfft(flat_x.astype(jnp.float32), axis=-1)
    y_hat = jnp.fft.rfft(flat_dy.astype(jnp.float32), axis=-1)
    x_table = jnp.stack([x_hat.real.T, x_hat.imag.T], axis=1)
    y_table = jnp.stack([y_hat.real.T, y_hat.imag.T], axis=1)
    dspectra = []
    for spectrum, layer in zip(spectra, layers):
        col_half, row_half, sign, scale = _grad_plan(layer)
        products = jnp.sum(y_table[row_half] * x_table[col_half], axis=2)
        dspectra.append((scale * (products[:, 0] - sign * products[:, 1])).astype(spectrum.dtype))
    return dx, dkernel, tuple(dspectra)


_fused.defvjp(_fused_fwd, _fused_bwd)
