"""``ΔW`` of one layer in the Flax kernel layout ``(in, out)`` (a stack: the stored layout), built in float32.

``ΔWᵀ = scaling · Re(ifft2(Sᵀ))``. The default builds it with ``irfft2`` of the Hermitian-symmetrised half
spectrum (half the FFT work, no complex ``in × out`` buffer; the scatter indices are bridge's
``plans.delta_scatter``); ``method="ifft2"`` is the plain form, kept as a cross-check.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bridge._src.plans import layer_plans

from .layer import LayerSpec

METHODS = ("irfft2", "ifft2")


def _half_spectrum_scatter(layer: LayerSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, columns (``<= out // 2``) and source coefficient of ``ΔWᵀ``'s half spectrum (bridge's plan, shared)."""
    scatter = layer_plans(layer.out_features, layer.in_features, layer.n_frequency, layer.seed, "flax").delta
    return scatter.rows, scatter.cols, scatter.source


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
        return matrix_to_dims(_one_delta(spectrum, layer.flat, method), layer)
    one = layer.unstacked
    return stack_rows(jax.vmap(lambda row: matrix_to_dims(_one_delta(row, one.flat, method), one))(spectrum), layer)


def matrix_to_dims(matrix: jax.Array, layer: LayerSpec) -> jax.Array:
    """An ``(in, out)`` matrix of ``layer``'s 2-D view laid out as its stored kernel ``layer.dims``.

    The matrix's ``in`` is the contracted axes flattened in kernel order, ``out`` the kept ones; this puts every
    axis back where the kernel has it.

    Example:
        >>> layer = LayerSpec(("q",), 2, 12, 1, 1.0, 0, kernel_dims=(3, 2, 4), in_axes=(1,))
        >>> matrix_to_dims(jnp.arange(24.0).reshape(2, 12), layer)[:, 1, 0].tolist()
        [12.0, 16.0, 20.0]
    """
    if layer.is_matrix:
        return matrix
    dims, inside, kept = layer.dims, layer.contracted, layer.out_axes
    split = matrix.reshape(tuple(dims[a] for a in inside) + tuple(dims[a] for a in kept))
    order = inside + kept
    return jnp.transpose(split, tuple(order.index(a) for a in range(len(dims))))


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
