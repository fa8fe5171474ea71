"""``ΔW`` of one layer built shard-locally on a device mesh, with a spectrum gradient reduced as ``n`` floats.

Left to itself, XLA partitions ``irfft2`` of a sharded kernel by all-gathering the kernel-sized half spectrum
(and, in the backward pass, the kernel gradient before its FFT): an FFT cannot run over a sharded axis. Here every
device computes only its own block, with no collective in the forward pass:

``ΔW[r, c] = scaling/(N_r·N_c) · Re Σ_k c_k · e^{2πi a_k r/N_r} · e^{2πi b_k c/N_c}``  (``(a_k, b_k)`` the
positions over the ``(in, out)`` kernel). Along the axis split into the most shards ("phase" axis) the device
evaluates the phases of its own rows directly (integer ``a·r mod N`` first, so they stay exact in float32); along
the other axis it scatters the phased coefficients into a half spectrum and runs one ``irfft`` over the full
axis (slicing its columns out if that axis is sharded too). The backward pass is the adjoint: a local ``rfft`` of
the cotangent block along the FFT axis, a gather at the ``n`` positions, a phase sum over the local rows, then a
``psum`` of ``n`` floats over the mesh axes that shard the block.

The backward pass takes the cotangent sharded over *every* mesh axis it can (the kernel's own axes plus the
others where the shape divides), so that a gradient still summed over the batch axes reaches it through a
reduce-scatter rather than an all-reduce of the whole kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from bridge._src.plans import Fold, HalfScatter, layer_plans

from .delta import delta_kernel_f32
from .layer import LayerSpec
from .tree import get_path, split_collection

DimAxes = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How one param-layout array of ``layer`` is split over ``mesh``: the mesh axes of each dim, in order."""

    layer: LayerSpec
    mesh: jax.sharding.Mesh
    axes: tuple[DimAxes, ...]  # per param dim

    @property
    def kernel_dims(self) -> tuple[int, int]:
        """Param dims of the kernel's ``in`` and ``out`` axes."""
        dims = [d for d in range(len(self.axes)) if d != self.layer.stack_axis]
        return dims[0], dims[1]

    def shards(self, dim: int) -> int:
        return math.prod(self.mesh.shape[a] for a in self.axes[dim])

    def local(self, dim: int) -> int:
        return self.layer.param_shape[dim] // self.shards(dim)

    @property
    def spec(self) -> PartitionSpec:
        return PartitionSpec(*(None if not a else a[0] if len(a) == 1 else a for a in self.axes))

    @property
    def mesh_axes(self) -> tuple[str, ...]:
        return tuple(a for dim in self.axes for a in dim)

    @property
    def phase_on_rows(self) -> bool:
        """Phases along ``in`` unless ``out`` is split into strictly more shards."""
        row, col = self.kernel_dims
        return self.shards(row) >= self.shards(col)

    def offset(self, dim: int) -> jax.Array:
        """This device's first index along ``dim`` (inside ``shard_map``): its block number times the block."""
        index = jnp.zeros((), jnp.int32)
        for name in self.axes[dim]:
            index = index * self.mesh.shape[name] + jax.lax.axis_index(name)
        return index * self.local(dim)


def _dim_axes(spec: PartitionSpec, ndim: int, layer: LayerSpec) -> tuple[DimAxes, ...]:
    entries = tuple(spec) + (None,) * (ndim - len(spec))
    if len(entries) != ndim:
        raise ValueError(f"fourierft_jax: sharding {spec} of layer {layer.name!r} has more entries than its "
                         f"{ndim}-D kernel")
    out = []
    for entry in entries:
        if entry is PartitionSpec.UNCONSTRAINED:
            raise ValueError(f"fourierft_jax: sharding {spec} of layer {layer.name!r} is unconstrained; pass a "
                             "concrete sharding (what jax.jit's in_shardings gets)")
        out.append(() if entry is None else (entry,) if isinstance(entry, str) else tuple(entry))
    return tuple(out)


def _divides(layer: LayerSpec, mesh: jax.sharding.Mesh, axes: tuple[DimAxes, ...]) -> bool:
    return all(size % math.prod(mesh.shape[a] for a in dim) == 0 for size, dim in zip(layer.param_shape, axes))


def _refine(plan: _Plan) -> _Plan:
    """``plan`` with the mesh axes it leaves out added to the dims they divide (phase dim first)."""
    axes = [list(dim) for dim in plan.axes]
    row, col = plan.kernel_dims
    order = (row, col) if plan.phase_on_rows else (col, row)
    if plan.layer.stacked:
        order += (plan.layer.stack_axis,)
    for name in plan.mesh.axis_names:
        if plan.mesh.shape[name] == 1 or name in plan.mesh_axes or any(name in dim for dim in axes):
            continue
        for dim in order:
            trial = [tuple(d) for d in axes]
            trial[dim] = trial[dim] + (name,)
            if _divides(plan.layer, plan.mesh, tuple(trial)):
                axes[dim].append(name)
                break
    return _Plan(plan.layer, plan.mesh, tuple(tuple(d) for d in axes))


# -- the shard-local math ---------------------------------------------------------------------------------------


def _fft_axis(plan: _Plan) -> tuple[HalfScatter, Fold]:
    """Bridge's half scatter and fold of the positions along the FFT axis (the ``out`` axis when phasing rows)."""
    layer = plan.layer
    plans = layer_plans(layer.out_features, layer.in_features, layer.n_frequency, layer.seed, "flax")
    # The kernel is (in, out): with the phase along its rows (in), the FFT runs along out, over PEFT's rows.
    return (plans.out_scatter, plans.out_fold) if plan.phase_on_rows else (plans.in_scatter, plans.in_fold)


# jax has no 64-bit integers unless x64 is on, so _phase reduces p·i mod N in uint32 by Horner steps that keep
# m·2^c + p·(2^c - 1) below 2^32 for residues m, p < N; past this length not even a 1-bit step fits.
_MAX_PHASE_LENGTH = (2**32 - 1) // 3 + 1


def _chunk_bits(length: int) -> int:
    """The largest ``c`` with ``(length - 1)·(2^(c+1) - 1) < 2^32``: bits of ``i`` one uint32 Horner step takes."""
    if not 0 < length <= _MAX_PHASE_LENGTH:
        raise ValueError(f"fourierft_jax: a layer dimension of {length} is outside 1 … {_MAX_PHASE_LENGTH}, the "
                         "lengths whose phases are computed exactly in uint32")
    bits = 1
    while bits < 32 and (length - 1) * (2 ** (bits + 2) - 1) < 2**32:
        bits += 1
    return bits


def _phase(positions: np.ndarray, length: int, start: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
    """cos and sin of ``2π·(p_k·i mod length)/length`` for ``i = start … start+count-1``: ``(count, n)`` each.

    The residue ``p_k·i mod length`` is exact for every length up to ``_MAX_PHASE_LENGTH``; only the float32
    angle made from it rounds, so the last row of a long axis is as accurate as the first.
    """
    chunk = _chunk_bits(length)
    p = jnp.asarray(np.asarray(positions, np.uint32))[None, :]
    i = (start.astype(jnp.uint32) + jnp.arange(count, dtype=jnp.uint32))[:, None]
    n = jnp.uint32(length)
    # Horner over the bits of i, top chunk first: m <- (m·2^c + p·digit) mod N. Axes below 2^16 take one step
    # (p·i mod N), 2^20 + 8 two, the longest 31.
    top = max(1, (length - 1).bit_length())
    shifts = range(((top - 1) // chunk) * chunk, -1, -chunk)
    m = None
    for shift in shifts:
        digit = (i >> jnp.uint32(shift)) & jnp.uint32(2**chunk - 1) if len(shifts) > 1 else i
        m = p * digit % n if m is None else (m * jnp.uint32(2**chunk) + p * digit) % n
    angle = m.astype(jnp.float32) * np.float32(2 * np.pi / length)
    return jnp.cos(angle), jnp.sin(angle)


def _axis_phase(plan: _Plan) -> tuple[np.ndarray, np.ndarray, int, int, int, int]:
    """Positions, lengths and dims along the phase axis and the FFT axis."""
    rows, cols = plan.layer.kernel_indices
    row, col = plan.kernel_dims
    if plan.phase_on_rows:
        return rows, cols, row, col, plan.layer.in_features, plan.layer.out_features
    return cols, rows, col, row, plan.layer.out_features, plan.layer.in_features


def _local_forward(coef: jax.Array, plan: _Plan) -> jax.Array:
    """This device's block of ``ΔW`` for coefficients ``coef`` ``(..., n)``: ``(..., phase_local, fft_local)``."""
    p_pos, f_pos, p_dim, f_dim, p_len, f_len = _axis_phase(plan)
    cos, sin = _phase(p_pos, p_len, plan.offset(p_dim), plan.local(p_dim))
    re, im = coef[..., None, :] * cos, coef[..., None, :] * sin
    scatter, _ = _fft_axis(plan)
    bins, source = scatter.bins.astype(np.int32), scatter.source.astype(np.int32)
    values = jax.lax.complex(0.5 * re[..., source], jnp.where(scatter.conj, -0.5, 0.5) * im[..., source])
    half = jnp.zeros(values.shape[:-1] + (f_len // 2 + 1,), jnp.complex64).at[..., bins].add(values)
    block = jnp.fft.irfft(half, n=f_len, axis=-1) * np.float32(plan.layer.scaling / p_len)
    if plan.local(f_dim) != f_len:
        block = jax.lax.dynamic_slice_in_dim(block, plan.offset(f_dim), plan.local(f_dim), axis=-1)
    return block


def _local_backward(grad: jax.Array, plan: _Plan) -> jax.Array:
    """The adjoint of ``_local_forward``: ``(..., phase_local, fft_local)`` cotangent → ``(..., n)`` partial."""
    p_pos, f_pos, p_dim, f_dim, p_len, f_len = _axis_phase(plan)
    # Σ_j g[j]·e^{+2πi b j/N} of a real block is conj(fft(g)[b]): the fold of b, conjugated once more.
    spectrum = jnp.fft.rfft(grad.astype(jnp.float32), n=f_len, axis=-1)
    _, folded = _fft_axis(plan)
    picked = spectrum[..., folded.index.astype(np.int32)]
    re, im = picked.real, -folded.sign.astype(np.float32) * picked.imag
    if plan.local(f_dim) != f_len:
        # The block starts at j0: multiply by e^{2πi b j0/N}.
        cos0, sin0 = _phase(f_pos, f_len, plan.offset(f_dim), 1)
        re, im = re * cos0[0] - im * sin0[0], re * sin0[0] + im * cos0[0]
    cos, sin = _phase(p_pos, p_len, plan.offset(p_dim), plan.local(p_dim))
    total = jnp.sum(cos * re - sin * im, axis=-2)
    return total * np.float32(plan.layer.scaling / (p_len * f_len))


def _to_canonical(block: jax.Array, plan: _Plan) -> jax.Array:
    """Param-layout block → ``(stack?, phase, fft)``."""
    _, _, p_dim, f_dim, _, _ = _axis_phase(plan)
    order = ((plan.layer.stack_axis,) if plan.layer.stacked else ()) + (p_dim, f_dim)
    return jnp.transpose(block, order)


def _from_canonical(block: jax.Array, plan: _Plan) -> jax.Array:
    _, _, p_dim, f_dim, _, _ = _axis_phase(plan)
    order = ((plan.layer.stack_axis,) if plan.layer.stacked else ()) + (p_dim, f_dim)
    return jnp.transpose(block, np.argsort(order))


def _stack_slots(plan: _Plan) -> tuple[jax.Array, int]:
    """Spectrum row of each local stack entry (``len(stack_ids)`` = the appended zero row) and the row count."""
    layer = plan.layer
    slots = np.full(layer.stack_size, len(layer.stack_ids), np.int32)
    slots[list(layer.stack_ids)] = np.arange(len(layer.stack_ids), dtype=np.int32)
    local = plan.local(layer.stack_axis)
    return jax.lax.dynamic_slice_in_dim(jnp.asarray(slots), plan.offset(layer.stack_axis), local), local


def _shard_forward(spectrum: jax.Array, plan: _Plan) -> jax.Array:
    coef = spectrum
    if plan.layer.stacked:
        slots, _ = _stack_slots(plan)
        coef = jnp.concatenate([spectrum, jnp.zeros((1,) + spectrum.shape[1:], spectrum.dtype)])[slots]
    return _from_canonical(_local_forward(coef, plan), plan)


def _shard_backward(grad: jax.Array, plan: _Plan) -> jax.Array:
    partial = _local_backward(_to_canonical(grad, plan), plan)
    if plan.layer.stacked:
        slots, _ = _stack_slots(plan)
        rows = len(plan.layer.stack_ids)
        partial = jnp.zeros((rows + 1, partial.shape[-1]), partial.dtype).at[slots].add(partial)[:rows]
    axes = tuple(a for a in plan.mesh_axes if plan.mesh.shape[a] > 1)
    return jax.lax.psum(partial, axes) if axes else partial


# -- the public function ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _delta_fn(layer: LayerSpec, sharding: Sharding) -> Callable[[jax.Array], jax.Array]:
    ndim = len(layer.param_shape)
    if not isinstance(sharding, NamedSharding):
        if sharding.is_fully_replicated:
            return jax.jit(lambda spectrum: delta_kernel_f32(spectrum, layer))
        raise TypeError(
            f"fourierft_jax: layer {layer.name!r} needs a jax.sharding.NamedSharding (mesh + PartitionSpec), got "
            f"{type(sharding).__name__}"
        )
    mesh = sharding.mesh
    plan = _Plan(layer, mesh, _dim_axes(sharding.spec, ndim, layer))
    for what, length in (("in_features", layer.in_features), ("out_features", layer.out_features)):
        if length > _MAX_PHASE_LENGTH:
            raise ValueError(f"fourierft_jax: layer {layer.name!r} has {what}={length}; a sharded ΔW supports "
                             f"dimensions up to {_MAX_PHASE_LENGTH} (exact uint32 phases)")
    if not _divides(layer, mesh, plan.axes):
        # Uneven blocks cannot go through shard_map; let XLA place the plain build (correct, may communicate).
        return jax.jit(lambda spectrum: jax.lax.with_sharding_constraint(delta_kernel_f32(spectrum, layer),
                                                                         sharding))
    back = _refine(plan)
    replicated = NamedSharding(mesh, PartitionSpec())

    def forward(spectrum: jax.Array) -> jax.Array:
        if not any(plan.shards(d) > 1 for d in range(ndim)):
            return jax.lax.with_sharding_constraint(delta_kernel_f32(spectrum, layer), sharding)
        local = jax.shard_map(functools.partial(_shard_forward, plan=plan), mesh=mesh, in_specs=PartitionSpec(),
                              out_specs=plan.spec)
        return local(jax.lax.with_sharding_constraint(spectrum, replicated))

    def backward(grad: jax.Array) -> jax.Array:
        local = jax.shard_map(functools.partial(_shard_backward, plan=back), mesh=mesh, in_specs=back.spec,
                              out_specs=PartitionSpec())
        return local(grad.astype(jnp.float32))

    @jax.custom_vjp
    def delta(spectrum: jax.Array) -> jax.Array:
        return forward(spectrum)

    delta.defvjp(lambda spectrum: (forward(spectrum), None), lambda _, grad: (backward(grad),))
    return jax.jit(delta)


def sharded_delta(spectrum: jax.Array, layer: LayerSpec, sharding: Sharding) -> jax.Array:
    """``ΔW`` of ``layer`` in its parameter layout (``layer.param_shape``), float32, placed with ``sharding``.

    Each device computes only its own block of ``ΔW`` (no collective), and the gradient with respect to
    ``spectrum`` is computed block-locally and summed as ``n`` floats. Numerically it is ``delta_kernel``
    (for a stacked layer: one delta per adapted stack row, zeros for the other rows). ``sharding`` is the
    kernel's ``NamedSharding``, as given to ``jax.jit(in_shardings=...)``.

    Example:
        >>> import numpy as np, jax
        >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        >>> from fourierft_jax._src.delta import delta_kernel
        >>> mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
        >>> layer = LayerSpec(("q",), in_features=8, out_features=6, n_frequency=5, scaling=2.0, seed=0)
        >>> c = jnp.arange(1.0, 6.0)
        >>> delta = sharded_delta(c, layer, NamedSharding(mesh, P(None, "model")))
        >>> bool(jnp.allclose(delta, delta_kernel(c, layer), atol=1e-6))
        True
    """
    spectrum = jnp.asarray(spectrum, jnp.float32)
    layer.check_spectrum(spectrum.shape)
    return _delta_fn(layer, sharding)(spectrum)


def kernel_sharding(shardings: object, path: tuple[str, ...], leaf: str = "kernel") -> Optional[Sharding]:
    """The sharding at ``path + ("kernel",)`` of a ``shardings`` tree shaped like the params (or variables).

    Returns None when ``shardings`` is None; raises ``KeyError`` naming the path when the entry is missing.

    Example:
        >>> kernel_sharding({"params": {"q": {"kernel": "S"}}}, ("q",))
        'S'
    """
    if shardings is None:
        return None
    inner, _ = split_collection(shardings)
    return get_path(inner, tuple(path) + ((leaf,) if leaf else ()), "sharding (in `shardings`) for the kernel")


def call_sharding(shardings: object, layer: LayerSpec) -> Optional[Sharding]:
    """The sharding of the ``(in, out)`` kernel one call of ``layer`` sees (a scanned stack: one row of it).

    None without ``shardings``, for a non-named sharding, or where the layer axis itself is split (a scan then
    sees a kernel that is not one block of the mesh).

    Example:
        >>> import numpy as np, jax
        >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        >>> mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
        >>> layer = LayerSpec(("s", "q"), 8, 4, 3, 1.0, 0, stack_axis=0, stack_size=2, stack_ids=(0, 1),
        ...                   stack_depth=1)
        >>> call_sharding({"s": {"q": {"kernel": NamedSharding(mesh, P(None, "model"))}}}, layer).spec
        P('model', None)
    """
    sharding = kernel_sharding(shardings, layer.path, layer.kernel_leaf)
    if not isinstance(sharding, NamedSharding) or not layer.stacked:
        return sharding
    entries = list(sharding.spec) + [None] * (len(layer.param_shape) - len(sharding.spec))
    layer_axis = entries.pop(layer.stack_axis)
    if layer_axis is not None and math.prod(sharding.mesh.shape[a] for a in _dim_axes(PartitionSpec(layer_axis), 1,
                                                                                       layer)[0]) > 1:
        return None
    return NamedSharding(sharding.mesh, PartitionSpec(*entries))
