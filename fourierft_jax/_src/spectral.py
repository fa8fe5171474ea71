"""A layer's adapter output ``x ΔWᵀ`` computed in the spectral domain, never building ``ΔW``.

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

from bridge._src.plans import forward_plan, layer_plans

from .layer import LayerSpec


def _plan(layer: LayerSpec) -> tuple[np.ndarray, ...]:
    """``(gather, conj_in, bins, bin_source, bin_conj)`` of bridge's ``ForwardPlan`` (shared by equal layers).

    ``rfft(x)[gather]``, conjugated where ``conj_in``, is ``conj(X̂[col_k])``; the products scatter into the output
    half bins ``bins`` (conjugated where ``bin_conj``).
    """
    plan = layer_plans(layer.out_features, layer.in_features, layer.n_frequency, layer.seed, "flax").forward
    return plan.gather, plan.conj_in, plan.bins, plan.bin_source, plan.bin_conj


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


# -- frequency-major tables and row loops (the fused backward) ---------------------------------------------------
#
# XLA:CPU lowers a gather or scatter element by element (about 1 GB/s measured for whole 64 KiB rows), while a
# loop of dynamic slices over whole rows copies at memory speed: for 8192 tokens × 1000 coefficients at 768×768
# the gather-multiply-sum went from 131 ms to 19 ms, at 1024 tokens from 4.0 to 1.0 ms. So the tables are
# frequency-major ``(bins, re/im, tokens)`` -- one contiguous row per bin -- and every gather, scatter and
# gather-sum below walks the plan's terms in a ``fori_loop`` of row slices, in an order sorted by the row it
# writes (then reads), so that consecutive steps touch the same rows while they are in cache.


def frequency_table(flat: jax.Array) -> jax.Array:
    """``(length // 2 + 1, 2, tokens)`` float32: the real and imaginary parts of ``rfft(flat)`` along its last
    axis, one row per frequency bin (``flat`` is ``(tokens, length)``).

    Example:
        >>> frequency_table(jnp.ones((3, 4))).shape
        (3, 2, 3)
    """
    spectrum = jnp.fft.rfft(flat.astype(jnp.float32), axis=-1)
    return jnp.stack([spectrum.real.T, spectrum.imag.T], axis=1)


def take_rows(table: jax.Array, rows: np.ndarray) -> jax.Array:
    """``table[rows]`` for static ``rows`` by a loop of row slices (XLA:CPU's gather is element by element)."""
    rows = np.asarray(rows, np.int32)
    if rows.size == table.shape[0] and np.array_equal(rows, np.arange(rows.size)):
        return table
    index = jnp.asarray(rows)

    def body(i, out):
        row = jax.lax.dynamic_index_in_dim(table, index[i], 0, keepdims=True)
        return jax.lax.dynamic_update_slice_in_dim(out, row, i, 0)

    return jax.lax.fori_loop(0, rows.size, body, jnp.zeros((rows.size,) + table.shape[1:], table.dtype))


@functools.lru_cache(maxsize=None)
def transposed_terms(layer: LayerSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(gather, bins, source, sign)`` of ``dy ΔW`` -- the input gradient's adapter term -- as int32/float32
    arrays sorted by output bin (then by the bin read).

    ``ΔW`` maps ``in → out``; ``dy ↦ dy ΔW`` is the spectral forward of the transposed layer, whose positions are
    PEFT's with rows and columns swapped (``(in, out)`` over torch ``(out', in')``): bridge's ``forward_plan`` of
    those positions gives the plan (``gather`` into ``rfft(dy)``'s ``out // 2 + 1`` bins, ``bins`` into the
    ``in // 2 + 1`` bins of the result). The scale is ``scaling / out``.
    """
    plans = layer_plans(layer.out_features, layer.in_features, layer.n_frequency, layer.seed, "flax")
    plan = forward_plan(plans.indices[::-1], layer.in_features, layer.out_features)
    return _sorted_terms(plan)


def _sorted_terms(plan) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    order = np.lexsort((plan.term_gather, plan.bins))
    return (plan.term_gather[order].astype(np.int32), plan.bins[order].astype(np.int32),
            plan.bin_source[order].astype(np.int32), plan.term_sign[order].astype(np.float32))


def scatter_terms(acc: jax.Array, table: jax.Array, spectrum: jax.Array,
                  terms: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], scale: float) -> jax.Array:
    """``acc`` (``(half_bins, 2, tokens)``) plus the plan's terms: ``acc[bins] += scale·c[source]/2 · table[gather]``,
    the imaginary part times ``sign`` (a conjugated term).

    Then ``irfft`` of ``acc`` (``half_to_rows``) is the spectral forward of the plan's layer.
    """
    gather, bins, source, sign = terms
    half = 0.5 * scale * spectrum.astype(jnp.float32)[source]
    weights = jnp.stack([half, half * sign], axis=-1)[:, :, None]  # (terms, 2, 1)
    gather, bins = jnp.asarray(gather), jnp.asarray(bins)

    def body(i, acc):
        row = jax.lax.dynamic_index_in_dim(table, gather[i], 0, keepdims=True) * weights[i]
        target = jax.lax.dynamic_index_in_dim(acc, bins[i], 0, keepdims=True)
        return jax.lax.dynamic_update_slice_in_dim(acc, target + row, bins[i], 0)

    return jax.lax.fori_loop(0, gather.shape[0], body, acc)


def half_to_rows(acc: jax.Array, length: int) -> jax.Array:
    """``(tokens, length)``: ``irfft`` of the frequency-major half spectrum ``acc`` (``(length // 2 + 1, 2, tokens)``).

    Example:
        >>> x = jnp.arange(8.0).reshape(2, 4)
        >>> bool(jnp.allclose(half_to_rows(frequency_table(x), 4), x, atol=1e-5))
        True
    """
    return jnp.fft.irfft(jax.lax.complex(acc[:, 0].T, acc[:, 1].T), n=length, axis=-1)


def input_grad_delta(y_tables, spectra, layers) -> jax.Array:
    """``Σ_a dy_a ΔW_a`` as ``(tokens, in)`` float32 from ``y_tables[a] = frequency_table(dy_a)``, without ``ΔW``
    (``layers``: one ``(in, out)`` layer each, all of one ``in``).

    Example:
        >>> import numpy as np, bridge
        >>> layer = LayerSpec(("q",), in_features=6, out_features=4, n_frequency=5, scaling=3.0, seed=777)
        >>> c, dy = np.arange(1.0, 6.0), np.linspace(-1, 1, 8).reshape(2, 4)
        >>> ref = dy @ bridge.delta_weight(c, layer.torch_indices, 4, 6, 3.0)
        >>> got = input_grad_delta((frequency_table(jnp.asarray(dy, jnp.float32)),), (jnp.asarray(c),), (layer,))
        >>> bool(np.allclose(got, ref, atol=1e-5))
        True
    """
    n_in = layers[0].in_features
    acc = jnp.zeros((n_in // 2 + 1,) + y_tables[0].shape[1:], jnp.float32)
    for y_table, spectrum, layer in zip(y_tables, spectra, layers, strict=True):
        acc = scatter_terms(acc, y_table, spectrum, transposed_terms(layer), layer.scaling / layer.out_features)
    return half_to_rows(acc, n_in)
