"""``ΔW`` of one layer in the Flax kernel layout ``(in, out)`` (a stack: the stored layout), built in float32.

``ΔWᵀ = scaling · Re(ifft2(Sᵀ))`` (SPEC §1, §3). The default builds it with ``irfft2`` of the
Hermitian-symmetrised half spectrum (half the FFT work, no complex ``in × out`` buffer); ``method="ifft2"`` is
the plain form, kept as a cross-check.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .layer import LayerSpec

METHODS = ("irfft2", "ifft2")


@functools.lru_cache(maxsize=None)
def _half_spectrum_scatter(layer: LayerSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Coefficient k at (a, b) of the (in, out) spectrum contributes c/2 at (a, b) and c/2 at its Hermitian
    # partner (-a, -b); only the entries landing in the kept half (column <= out // 2) are stored.
    rows, cols = (np.asarray(i, dtype=np.int64) for i in layer.kernel_indices)
    n_rows, n_cols = layer.kernel_shape
    half = n_cols // 2
    partner_rows, partner_cols = (-rows) % n_rows, (-cols) % n_cols
    source = np.arange(rows.shape[0])
    keep, keep_partner = cols <= half, partner_cols <= half
    out_rows = np.concatenate([rows[keep], partner_rows[keep_partner]])
    out_cols = np.concatenate([cols[keep], partner_cols[keep_partner]])
    out_source = np.concatenate([source[keep], source[keep_partner]])
    for array in (out_rows, out_cols, out_source):
        array.setflags(write=False)
    return out_rows, out_cols, out_source


def delta_kernel(spectrum: jax.Array, layer: LayerSpec, method: str = "irfft2") -> jax.Array:
    """The float32 kernel delta of ``layer`` for coefficients ``spectrum`` (shape ``layer.spectrum_shape``).

    The result has ``layer.param_shape``: ``(in, out)``, or for a stacked kernel the whole stack at once (one
    batched ``irfft2``), with zeros at the stack rows the adapter leaves alone.

    Example:
        >>> import numpy as np, bridge
        >>> layer = LayerSpec(("q",), in_features=6, out_features=4, n_frequency=5, scaling=3.0, seed=777)
        >>> c = np.arange(1.0, 6.0)
        >>> ref = bridge.delta_weight(c, layer.torch_indices, 4, 6, 3.0).T
        >>> bool(np.allclose(delta_kernel(jnp.asarray(c, jnp.float32), layer), ref, atol=1e-6))
        True
    """
    if method not in METHODS:
        raise ValueError(f"delta_kernel: method must be one of {METHODS}, got {method!r}")
    spectrum = jnp.asarray(spectrum, jnp.float32)
    layer.check_spectrum(spectrum.shape)
    return _delta_kernel(spectrum, layer, method)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _delta_kernel(spectrum: jax.Array, layer: LayerSpec, method: str) -> jax.Array:
    # Jitted so that eager merges compile once per layer shape rather than once per op.
    if not layer.stacked:
        return _one_delta(spectrum, layer, method)
    return stack_rows(jax.vmap(lambda row: _one_delta(row, layer.unstacked, method))(spectrum), layer)


def stack_rows(rows: jax.Array, layer: LayerSpec) -> jax.Array:
    """Per-row ``(len(stack_ids), in, out)`` deltas in the stored layout ``layer.param_shape`` (zeros elsewhere).

    Example:
        >>> layer = LayerSpec(("s", "fc"), 2, 3, 1, 1.0, 0, stack_axis=1, stack_size=4, stack_ids=(1, 3),
        ...                   stack_depth=1)
        >>> stack_rows(jnp.ones((2, 2, 3)), layer).sum(axis=(0, 2)).tolist()
        [0.0, 6.0, 0.0, 6.0]
    """
    if len(layer.stack_ids) != layer.stack_size:
        full = jnp.zeros((layer.stack_size,) + rows.shape[1:], rows.dtype)
        rows = full.at[np.asarray(layer.stack_ids)].set(rows)
    return jnp.moveaxis(rows, 0, layer.stack_axis)


def _one_delta(spectrum: jax.Array, layer: LayerSpec, method: str) -> jax.Array:
    n_rows, n_cols = layer.kernel_shape
    if method == "ifft2":
        rows, cols = layer.kernel_indices
        dense = jnp.zeros((n_rows, n_cols), jnp.float32).at[rows, cols].add(spectrum)
        return layer.scaling * jnp.fft.ifft2(dense).real
    rows, cols, source = _half_spectrum_scatter(layer)
    half = jnp.zeros((n_rows, n_cols // 2 + 1), jnp.float32).at[rows, cols].add(0.5 * spectrum[source])
    return layer.scaling * jnp.fft.irfft2(half.astype(jnp.complex64), s=(n_rows, n_cols))


def delta_kernel_f32(spectrum: jax.Array, layer: LayerSpec) -> jax.Array:
    """``delta_kernel`` without argument checks, for callers that have validated ``spectrum`` (float32, ``(n,)``).

    Example:
        >>> layer = LayerSpec(("q",), in_features=6, out_features=4, n_frequency=5, scaling=3.0, seed=777)
        >>> delta_kernel_f32(jnp.ones(5), layer).shape
        (6, 4)
    """
    return _delta_kernel(spectrum, layer, "irfft2")
