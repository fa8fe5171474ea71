"""The fused path: ``y = x @ (W + ΔW)`` with a hand-written backward that never forms the weight gradient.

Autodiff of ``x @ (W + ΔW(c))`` computes ``∂L/∂(W + ΔW) = xᵀ dy`` (a full ``tokens × in × out`` matmul, as
large as the forward one) and then gathers ``n`` entries of its 2-D FFT. The spectrum gradient needs only those
``n`` entries, and with ``X̂ = fft(x)`` over ``in`` and ``Ŷ = fft(dy)`` over ``out``:

``∂L/∂c_k = scaling/(out·in) · Σ_b Re(Ŷ[b, row_k] · X̂[b, col_k])``

(``(row_k, col_k)`` PEFT's positions over ``(out, in)``) -- two row FFTs and a ``tokens × n`` gather-multiply-sum.
The input gradient is ``dy @ (W + ΔW)ᵀ``, the same matmul the frozen base layer needs anyway, with ``ΔW``
rebuilt in the backward pass ("rebuild"; inside one jitted step XLA merges that build with the forward's), or
``dy Wᵀ + dy ΔWᵀ`` with ``dy ΔWᵀ`` from the ``rfft(dy)`` table the spectrum gradient uses ("spectral", no ``ΔW``;
``spectral.input_grad_delta``); bridge's ``choose_input_grad`` picks one per call (``adapted_dot``). The gathers
and the gather-sum walk frequency-major tables in a loop of row slices (``spectral.frequency_table``): XLA:CPU
lowers a gather element by element. The kernel gradient ``xᵀ dy`` is still returned, so that differentiating the
frozen parameters stays correct, but under ``jax.jit`` it is dead code unless asked for.

On a device mesh (``sharding`` = the kernel's ``NamedSharding``) ``ΔW`` is built shard-locally
(``sharded_delta``), and the spectrum gradient runs under ``shard_map`` -- XLA does not partition an FFT, it
all-gathers the operand, even along a batch axis. ``x`` and ``dy`` enter with their features split like the
kernel's ``in``/``out`` axes (Megatron's layout, so tensor-parallel activations stay where they are) and their
tokens split over the other mesh axes. Each device transforms its feature block (a zero-padded ``rfft`` times
the phase of its offset); the gradient is linear in each factor and the two blocks come from different mesh
axes, so the per-device products summed over all devices are the whole sum: ``n`` floats are reduced instead of
gathering activations or kernels.

A kernel split along a mesh axis that also splits the batch (FSDP: ``BATCH_AXIS_NAMES``) is another case:
moving the activations to that layout costs about ``tokens·(in + out)`` floats, gathering the kernel for the
matmul (what FSDP does) ``in·out``. When the activations are the larger, they keep whole features and stay split
by tokens there, and XLA gathers ``W + ΔW`` as it gathers ``W`` for the frozen model; otherwise the Megatron
layout above moves the (smaller) activations instead. (Measured: a BERT-shaped step on an (8,) FSDP mesh moved
29 MiB per device per step with the Megatron layout, 11 MiB with the FSDP one; the frozen model 6 MiB.)
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import NamedSharding, PartitionSpec, Sharding

from bridge._src.plans import fold, layer_plans

from .layer import LayerSpec
from .sharding import _dim_axes, _divides, _phase
from .spectral import frequency_table


def _grad_plan(layer: LayerSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """``(col_half, row_half, sign, scale)``: bridge's ``GradPlan`` of ``layer`` as the int32/float32 arrays used here.

    ``∂L/∂c_k = scale · Σ_b (Re Ŷ Re X̂ − sign_k · Im Ŷ Im X̂)`` with ``X̂ = rfft(x)[:, col_half]`` and
    ``Ŷ = rfft(dy)[:, row_half]``.
    """
    plan = layer_plans(layer.out_features, layer.in_features, layer.n_frequency, layer.seed, "flax").grad
    scale = float(layer.scaling) / (layer.in_features * layer.out_features)
    return plan.in_index.astype(np.int32), plan.out_index.astype(np.int32), plan.sign.astype(np.float32), scale


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
    x: jax.Array,
    kernel: jax.Array,
    spectrum: jax.Array,
    layer: LayerSpec,
    *,
    precision: Any = None,
    sharding: Optional[Sharding] = None,
) -> jax.Array:
    """``x @ (kernel + ΔW_kernel)`` for one adapted layer, differentiable in all three arrays.

    The forward pass is one matmul on the merged kernel; the backward pass computes the spectrum gradient from
    the FFTs of ``x`` and ``dy`` instead of the ``xᵀ dy`` weight gradient (see the module docstring). With
    ``sharding`` (the kernel's ``NamedSharding`` on a device mesh) ``ΔW`` is built shard-locally and the
    spectrum gradient is reduced as ``n`` floats.

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
    return fused_dense_multi(x, kernel, (spectrum,), (layer,), precision=precision, sharding=sharding)


def fused_dense_multi(
    x: jax.Array,
    kernel: jax.Array,
    spectra: Sequence[jax.Array],
    layers: Sequence[LayerSpec],
    *,
    precision: Any = None,
    sharding: Optional[Sharding] = None,
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
    for layer in layers:
        if layer.stacked:
            raise ValueError(f"fourierft_jax: the fused path adapts one Dense call; layer {layer.name!r} is a stack")
    # One implementation of the fused contraction: this is the plain Dense case of adapted_dot's.
    from .adapted_dot import DotPlan, adapted_dot
    from .kernel_view import KernelView

    plan = DotPlan(1, (((x.ndim - 1,), (0,)), ((), ())), precision, None, KernelView.identity(kernel.shape), x.ndim)
    return adapted_dot(x, kernel, spectra, layers, plan, "fused", sharding=sharding)


def spectrum_grads(flat_x: jax.Array, flat_dy: jax.Array, layers: tuple, sharding: Optional[Sharding] = None
                   ) -> list[jax.Array]:
    """``∂L/∂c`` of each layer (its ``(in, out)`` matrix) from the ``(tokens, in)`` input and ``(tokens, out)``
    cotangent; with ``sharding`` (the matrix's ``NamedSharding``) under ``shard_map``, reduced as ``n`` floats."""
    axes = _feature_axes(layers[0], sharding, flat_x.shape[0]) if sharding is not None else None
    if axes is None or sharding.mesh.size == 1:
        return _spectrum_grads(flat_x, flat_dy, layers)
    return _sharded_spectrum_grads(flat_x, flat_dy, layers, sharding.mesh, *axes)


def _spectrum_grads(flat_x: jax.Array, flat_dy: jax.Array, layers: tuple) -> list[jax.Array]:
    """``∂L/∂c`` of each layer from whole feature rows (one device, or features not sharded)."""
    x_table, y_table = frequency_table(flat_x), frequency_table(flat_dy)
    return [gather_sum(x_table, y_table, layer) for layer in layers]


def input_bins(layers: Sequence[LayerSpec]) -> np.ndarray:
    """The distinct ``rfft(x)`` bins the spectrum gradients of ``layers`` (one kernel's adapters) read, sorted.

    Example:
        >>> layer = LayerSpec(("q",), in_features=3072, out_features=768, n_frequency=1000, scaling=1.0, seed=0)
        >>> int(input_bins([layer]).size) < 3072 // 2 + 1
        True
    """
    return np.unique(np.concatenate([_grad_plan(layer)[0] for layer in layers])).astype(np.int32)


@functools.lru_cache(maxsize=None)
def _sorted_grad_plan(layer: LayerSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    # Walk the coefficients by (dy bin, x bin): consecutive steps then reread rows that are still in cache.
    col_half, row_half, sign, scale = _grad_plan(layer)
    order = np.lexsort((col_half, row_half))
    return np.argsort(order).astype(np.int32), col_half[order], row_half[order], sign[order], scale


def gather_sum(x_table: jax.Array, y_table: jax.Array, layer: LayerSpec,
               x_bins: Optional[np.ndarray] = None) -> jax.Array:
    """``∂L/∂c`` of ``layer`` from the frequency-major tables of ``x`` and ``dy`` (``spectral.frequency_table``):
    ``scale · Σ_b (Re Ŷ Re X̂ − sign·Im Ŷ Im X̂)`` at the positions' bins, a loop of row slices.

    ``x_bins`` (sorted, static) names the ``rfft(x)`` bins ``x_table``'s rows hold, where it holds only those
    (``input_bins``); None: all of them.

    Example:
        >>> import numpy as np
        >>> layer = LayerSpec(("q",), in_features=6, out_features=4, n_frequency=5, scaling=3.0, seed=777)
        >>> x, dy = jnp.ones((2, 6)), jnp.ones((2, 4))
        >>> g = gather_sum(frequency_table(x), frequency_table(dy), layer)
        >>> bool(jnp.allclose(g, _spectrum_grads(x, dy, (layer,))[0]))
        True
    """
    inverse, cols, rows, sign, scale = _sorted_grad_plan(layer)
    if x_bins is not None:
        cols = np.searchsorted(x_bins, cols).astype(np.int32)
    cols, rows = jnp.asarray(cols), jnp.asarray(rows)

    def body(i, acc):
        a = jax.lax.dynamic_index_in_dim(y_table, rows[i], 0, keepdims=False)
        b = jax.lax.dynamic_index_in_dim(x_table, cols[i], 0, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(acc, jnp.sum(a * b, axis=-1), i, 0)

    products = jax.lax.fori_loop(0, inverse.size, body, jnp.zeros((inverse.size, 2), jnp.float32))
    return (scale * (products[:, 0] - sign * products[:, 1]))[inverse]


# Mesh axes by these names split the batch (data parallel / FSDP); a kernel axis split along one of them is
# gathered for the matmul (FSDP), not tensor-parallel, so the spectrum gradient splits tokens there.
BATCH_AXIS_NAMES = frozenset({"data", "batch", "dp", "fsdp", "replica"})


def _feature_axes(
    layer: LayerSpec, sharding: Optional[Sharding], tokens: int
) -> Optional[tuple[tuple[str, ...], tuple[str, ...]]]:
    """The mesh axes splitting the activations' ``in`` and ``out`` features in the gradient, or None off a mesh."""
    if not isinstance(sharding, NamedSharding):
        return None
    mesh = sharding.mesh
    n_in, n_out = layer.kernel_shape
    fsdp = tokens * (n_in + n_out) >= n_in * n_out  # activations outweigh the kernel: gather it, as FSDP does
    axes = tuple(
        tuple(a for a in dim if mesh.shape[a] > 1 and not (fsdp and a in BATCH_AXIS_NAMES))
        for dim in _dim_axes(sharding.spec, 2, layer)
    )
    return axes if _divides(layer, mesh, axes) else None


def _token_axes(mesh: jax.sharding.Mesh, used: tuple[str, ...], tokens: int) -> tuple[str, ...]:
    """The other mesh axes (in mesh order) that split ``tokens`` evenly."""
    axes: tuple[str, ...] = ()
    for name in mesh.axis_names:
        size = math.prod(mesh.shape[a] for a in axes + (name,))
        if name not in used and mesh.shape[name] > 1 and tokens % size == 0:
            axes += (name,)
    return axes


def _sharded_spectrum_grads(
    flat_x: jax.Array,
    flat_dy: jax.Array,
    layers: tuple,
    mesh: jax.sharding.Mesh,
    in_axes: tuple[str, ...],
    out_axes: tuple[str, ...],
) -> list[jax.Array]:
    # XLA does not partition an FFT along a batch axis (it all-gathers the operand), so every FFT here runs on
    # this device's own (tokens, features) block under a fully manual shard_map.
    token_axes = _token_axes(mesh, in_axes + out_axes, flat_x.shape[0])
    entry = lambda axes: None if not axes else axes[0] if len(axes) == 1 else axes  # noqa: E731
    used = tuple(a for a in mesh.axis_names if a in token_axes + in_axes + out_axes)

    def local(x_block: jax.Array, dy_block: jax.Array) -> list[jax.Array]:
        x_re, x_im = _block_spectrum(x_block, in_axes, mesh, [l.torch_indices[1] for l in layers],
                                     layers[0].in_features)
        y_re, y_im = _block_spectrum(dy_block, out_axes, mesh, [l.torch_indices[0] for l in layers],
                                     layers[0].out_features)
        grads = []
        for layer, xr, xi, yr, yi in zip(layers, x_re, x_im, y_re, y_im):
            # Re(Ŷ·X̂) over this device's tokens and feature blocks; the other devices hold the other terms.
            scale = np.float32(layer.scaling / (layer.in_features * layer.out_features))
            partial = jnp.sum(yr * xr - yi * xi, axis=0) * scale
            grads.append(jax.lax.psum(partial, used) if used else partial)
        return grads

    in_specs = (PartitionSpec(entry(token_axes), entry(in_axes)), PartitionSpec(entry(token_axes), entry(out_axes)))
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=[PartitionSpec()] * len(layers))(
        flat_x, flat_dy
    )


def _block_spectrum(
    block: jax.Array, axes: tuple[str, ...], mesh: jax.sharding.Mesh, positions: list, length: int
) -> tuple[list, list]:
    """Real and imaginary parts of ``Σ_i block[:, i]·e^{-2πi p (i0 + i)/length}`` at each layer's positions."""
    spectrum = jnp.fft.rfft(block.astype(jnp.float32), n=length, axis=-1)
    start = jnp.zeros((), jnp.int32)
    for name in axes:
        start = start * mesh.shape[name] + jax.lax.axis_index(name)
    start = start * block.shape[-1]
    re_out, im_out = [], []
    for pos in positions:
        pos = np.asarray(pos, np.int64)
        folded = fold(pos, length)  # bin p of the real block's FFT, read from its rfft
        picked = spectrum[:, folded.index.astype(np.int32)]
        re, im = picked.real, folded.sign.astype(np.float32) * picked.imag
        if axes:
            # The block starts at i0: multiply by e^{-2πi p i0/length}.
            cos, sin = _phase(pos, length, start, 1)
            re, im = re * cos[0] + im * sin[0], im * cos[0] - re * sin[0]
        re_out.append(re)
        im_out.append(im)
    return re_out, im_out
