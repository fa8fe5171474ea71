"""A layer's adapter output ``x ΔWᵀ`` computed in the spectral domain, never building ``ΔW`` (SPEC §4).

With ``X̂ = fft(x)`` over the ``in`` features and PEFT's positions ``(row_k, col_k)`` over ``(out, in)``:
``(x ΔWᵀ)[p] = scaling/in · Re(ifft_out(Σ_k c_k · conj(X̂[col_k]) · e_{row_k}))[p]``.
Only the real input's half spectrum (``rfft``) is taken, and the output is one ``irfft`` of the
Hermitian-symmetrised half of the scattered bins; the cost is O(B·d·log d + B·n) and autodiff gives the
gradients for ``c`` and ``x`` through FFT, gather and scatter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from .layer import LayerSpec


@functools.lru_cache(maxsize=None)
def _plan(layer: LayerSpec) -> tuple[np.ndarray, ...]:
    rows, cols = (np.asarray(i, dtype=np.int64) for i in layer.torch_indices)
    n_in, n_out = layer.in_features, layer.out_features
    # conj(X̂[col]) of a real signal: conj(rfft[col]) for col <= in//2, else rfft[in - col].
    low = cols <= n_in // 2
    gather = np.where(low, cols, n_in - cols)
    conj_in = low
    # Bin row (value z) feeds half bin row (z/2) when row <= out//2 and its partner out-row (conj(z)/2) when that
    # is <= out//2; self-conjugate bins (0, out/2) get both halves, i.e. Re(z).
    partner = (-rows) % n_out
    keep, keep_partner = rows <= n_out // 2, partner <= n_out // 2
    source = np.arange(rows.shape[0])
    bins = np.concatenate([rows[keep], partner[keep_partner]])
    bin_source = np.concatenate([source[keep], source[keep_partner]])
    bin_conj = np.concatenate([np.zeros(int(keep.sum()), bool), np.ones(int(keep_partner.sum()), bool)])
    plan = (gather, conj_in, bins, bin_source, bin_conj)
    for array in plan:
        array.setflags(write=False)
    return plan


def spectral_delta(x: jax.Array, spectrum: jax.Array, layer: LayerSpec) -> jax.Array:
    """``x @ ΔW_kernel`` (``x`` of shape ``(..., in)``) in float32, computed without ``ΔW``.

    Example:
        >>> import numpy as np, bridge
        >>> layer = LayerSpec(("q",), in_features=6, out_features=4, n_frequency=5, scaling=3.0, seed=777)
        >>> c, x = np.arange(1.0, 6.0), np.linspace(-1, 1, 12).reshape(2, 6)
        >>> ref = x @ bridge.delta_weight(c, layer.torch_indices, 4, 6, 3.0).T
        >>> y = spectral_delta(jnp.asarray(x, jnp.float32), jnp.asarray(c, jnp.float32), layer)
        >>> bool(np.allclose(y, ref, atol=1e-5))
        True
    """
    layer.check_input(x.shape)
    spectrum = jnp.asarray(spectrum, jnp.float32)
    layer.check_spectrum(spectrum.shape)
    return _spectral_delta(x, spectrum, layer)


def _spectral_delta_impl(x: jax.Array, spectrum: jax.Array, layer: LayerSpec) -> jax.Array:
    gather, conj_in, bins, bin_source, bin_conj = _plan(layer)
    x_hat = jnp.fft.rfft(x.astype(jnp.float32), axis=-1)
    # checkpoint_name takes real arrays only; the two halves are what the backward pass keeps.
    x_hat = jax.lax.complex(checkpoint_name(x_hat.real, _SAVED), checkpoint_name(x_hat.imag, _SAVED))
    picked = x_hat[..., gather]
    picked = jnp.where(conj_in, jnp.conj(picked), picked) * spectrum
    values = 0.5 * picked[..., bin_source]
    values = jnp.where(bin_conj, jnp.conj(values), values)
    n_out = layer.out_features
    half = jnp.zeros(x.shape[:-1] + (n_out // 2 + 1,), jnp.complex64).at[..., bins].add(values)
    return (layer.scaling / layer.in_features) * jnp.fft.irfft(half, n=n_out, axis=-1)


# For the backward pass keep only the input's half spectrum (about the size of x) and recompute the gathered
# (tokens x n) products, instead of storing several (tokens x n) complex buffers per adapted layer.
_SAVED = "fourierft_x_hat"
_spectral_delta = jax.jit(
    jax.checkpoint(
        _spectral_delta_impl, static_argnums=(2,), policy=jax.checkpoint_policies.save_only_these_names(_SAVED)
    ),
    static_argnums=(2,),
)
