"""The index plans of one layer: every gather and scatter index that the JAX and torch code paths need.

Numpy only. The frameworks turn these arrays into their own tensors and do the arithmetic; the index
mathematics lives here, once.

The layer. A torch ``nn.Linear`` weight is ``(out, in)``; its ``n`` trainable coefficients ``c_k`` sit at
PEFT's positions ``(r_k, s_k)`` over ``(out, in)`` (``spectral_indices``) of a sparse complex spectrum ``S``,
and ``ΔW = scaling · Re(ifft2(S))``. A Flax ``Dense`` kernel is ``(in, out)``: the same positions with rows and
columns swapped ("flax" layout; "torch" is ``(out, in)``).

Two facts about real signals carry every plan:

* The fold. The FFT ``V`` of a real length-``N`` signal is Hermitian, ``V[k] = conj(V[N - k])``, so ``rfft``
  keeps only the bins ``0 … N // 2``: bin ``k`` of the full FFT is ``rfft[k]`` for ``k <= N // 2`` and
  ``conj(rfft[N - k])`` above (``fold``).
* The half scatter. ``Re(ifft(Z)) = ifft(H)`` with ``H = (Z + conj(Z[-k])) / 2``, and ``H`` is Hermitian, so
  ``irfft`` of its kept half gives ``Re(ifft(Z))`` with half the work and no full complex buffer. A value ``z``
  placed at bin ``b`` of ``Z`` contributes ``z/2`` at ``b`` and ``conj(z)/2`` at its partner ``-b``; only the
  entries that land in the kept half are stored (``half_scatter``). A self-partner (``b = 0``, or ``N/2`` for
  even ``N``) receives both halves, i.e. ``Re(z)``.

What follows from them:

* ``ΔW`` (``delta_scatter``): the 2-D half scatter of the real coefficients along the layout's last axis: ``c/2``
  at ``(r, s)`` and ``c/2`` at ``(-r, -s)``, kept where the column is ``<= N_cols // 2``; then
  ``ΔW = scaling · irfft2(H)``.
* The spectral forward ``x ΔWᵀ`` (``forward_plan``), never building ``ΔW``: with ``X̂ = fft(x)`` over ``in``,
  ``(x ΔWᵀ)[p] = scaling/in · Re(ifft_out(Z))[p]``, ``Z[r_k] += c_k · conj(X̂[s_k])``. ``conj(X̂[s])`` is the
  fold of ``s`` conjugated once more, and ``Re(ifft_out(Z))`` is ``irfft`` of the 1-D half scatter of the rows.
* The spectrum gradient (``grad_plan``) of ``L = Σ dy · (x ΔWᵀ)``:
  ``∂L/∂c_k = scaling/(out·in) · Σ_b Re(Ŷ[b, r_k] · X̂[b, s_k])`` with ``Ŷ = fft(dy)`` over ``out``. Both
  factors are folds; ``Re(a·b) = Re a Re b − Im a Im b`` and each conjugated factor flips the sign of ``Im``, so
  the plan is two rfft bins and the sign of the ``Im·Im`` product.

Layers of equal shape, ``n`` and seed have the same positions (PEFT draws them from one seed), so
``layer_plans`` builds them once per ``(out, in, n, seed, layout)`` and every such layer shares the result.
Each plan is a frozen dataclass of read-only arrays, safe to share.

Example:
    >>> plans = layer_plans(4, 6, 5, seed=777)
    >>> plans.indices.shape, plans.delta.half_shape, plans is layer_plans(4, 6, 5, seed=777)
    ((2, 5), (4, 4), True)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import numpy as np

from .positions import spectral_indices

Layout = Literal["torch", "flax"]
LAYOUTS: tuple[str, ...] = ("torch", "flax")


def _readonly(array: np.ndarray) -> np.ndarray:
    # Plans are shared between layers (and cached); a write through one layer must not change another's plan.
    array = np.ascontiguousarray(array)
    array.setflags(write=False)
    return array


def _positions(values: np.ndarray, length: int, what: str) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"plans: {what} must be a 1-D integer array, got {values.dtype} {values.shape}")
    if length <= 0:
        raise ValueError(f"plans: {what} length must be positive, got {length}")
    if values.size and not (0 <= values.min() and values.max() < length):
        raise ValueError(f"plans: {what} must lie in 0..{length - 1}, got {values.min()}..{values.max()}")
    return values.astype(np.int64, copy=False)


@dataclasses.dataclass(frozen=True, eq=False)
class Fold:
    """Where bin ``k`` of a real length-``length`` signal's FFT sits in its ``rfft`` (one entry per position).

    ``fft(v)[k] = rfft(v)[index]``, conjugated where ``conj`` (``k > length // 2``); ``sign`` is the matching
    ``±1`` on the imaginary part (``-1`` where ``conj``).
    """

    length: int
    index: np.ndarray  # int64, into the length // 2 + 1 rfft bins
    conj: np.ndarray  # bool
    sign: np.ndarray  # float64, ±1


def fold(positions: np.ndarray, length: int) -> Fold:
    """The fold of FFT bins ``positions`` of a real length-``length`` signal onto its ``rfft``.

    Example:
        >>> v = np.array([1.0, 2.0, 0.0, -1.0, 3.0])
        >>> f = fold(np.array([1, 4]), 5)
        >>> f.index.tolist(), f.conj.tolist()
        ([1, 1], [False, True])
        >>> picked = np.fft.rfft(v)[f.index]
        >>> bool(np.allclose(np.where(f.conj, picked.conj(), picked), np.fft.fft(v)[[1, 4]]))
        True
    """
    positions = _positions(positions, length, "fold positions")
    conj = positions > length // 2
    # (length - k) for the upper half is in 1 .. (length - 1) // 2, inside the kept bins.
    index = np.where(conj, length - positions, positions)
    return Fold(int(length), _readonly(index), _readonly(conj), _readonly(np.where(conj, -1.0, 1.0)))


@dataclasses.dataclass(frozen=True, eq=False)
class HalfScatter:
    """The 1-D half scatter: value ``source`` adds ``z/2`` (or ``conj(z)/2`` where ``conj``) into half bin ``bins``.

    Scattered with an *adding* scatter (a self-partner gets two entries), then ``irfft(·, n=length)`` gives
    ``Re(ifft(Z))`` of the full spectrum ``Z``.
    """

    length: int
    bins: np.ndarray  # int64, into the length // 2 + 1 kept bins
    source: np.ndarray  # int64, which position's value
    conj: np.ndarray  # bool: the entry is the partner's, conj(z)/2 at -b

    @property
    def half_length(self) -> int:
        """``length // 2 + 1``: the number of kept bins."""
        return self.length // 2 + 1


def half_scatter(positions: np.ndarray, length: int) -> HalfScatter:
    """The half scatter of values at FFT bins ``positions`` (repeats allowed) of a Hermitian length-``length`` spectrum.

    Example:
        >>> z, pos = np.array([1 + 2j, 3 - 1j, 0.5j]), np.array([1, 4, 0])
        >>> plan = half_scatter(pos, 5)
        >>> half = np.zeros(plan.half_length, complex)
        >>> values = 0.5 * z[plan.source]
        >>> np.add.at(half, plan.bins, np.where(plan.conj, values.conj(), values))
        >>> full = np.zeros(5, complex)
        >>> np.add.at(full, pos, z)
        >>> bool(np.allclose(np.fft.irfft(half, n=5), np.fft.ifft(full).real))
        True
    """
    positions = _positions(positions, length, "half-scatter positions")
    partner = (-positions) % length
    keep, keep_partner = positions <= length // 2, partner <= length // 2
    source = np.arange(positions.shape[0], dtype=np.int64)
    bins = np.concatenate([positions[keep], partner[keep_partner]])
    out_source = np.concatenate([source[keep], source[keep_partner]])
    conj = np.concatenate([np.zeros(int(keep.sum()), bool), np.ones(int(keep_partner.sum()), bool)])
    return HalfScatter(int(length), _readonly(bins), _readonly(out_source), _readonly(conj))


@dataclasses.dataclass(frozen=True, eq=False)
class DeltaScatter:
    """Where ``ΔW``'s half spectrum gets which coefficient: ``H[rows, cols] += c[source] / 2`` (adding scatter).

    ``shape`` is the full ``ΔW`` in the plan's layout; ``H`` is ``half_shape``, and
    ``ΔW = scaling · irfft2(H, s=shape)``.
    """

    layout: str
    shape: tuple[int, int]
    rows: np.ndarray  # int64
    cols: np.ndarray  # int64, <= shape[1] // 2
    source: np.ndarray  # int64, into the n coefficients

    @property
    def half_shape(self) -> tuple[int, int]:
        """``(shape[0], shape[1] // 2 + 1)``: the kept half along the last axis."""
        return (self.shape[0], self.shape[1] // 2 + 1)


def delta_scatter(indices: np.ndarray, out_features: int, in_features: int, layout: Layout = "torch") -> DeltaScatter:
    """The 2-D half scatter of ``ΔW`` for positions ``indices`` (``(2, n)`` over torch ``(out, in)``) in ``layout``.

    Example:
        >>> idx = spectral_indices(4, 6, 5, seed=777)
        >>> c = np.arange(1.0, 6.0)
        >>> plan = delta_scatter(idx, 4, 6, "flax")
        >>> half = np.zeros(plan.half_shape, complex)
        >>> np.add.at(half, (plan.rows, plan.cols), 0.5 * c[plan.source])
        >>> dense = np.zeros((4, 6), complex)
        >>> dense[idx[0], idx[1]] = c
        >>> bool(np.allclose(np.fft.irfft2(half, s=plan.shape), np.fft.ifft2(dense).real.T))
        True
    """
    rows, cols = _layer_positions(indices, out_features, in_features)
    shape = _layout_shape(out_features, in_features, layout)
    if layout == "flax":
        rows, cols = cols, rows
    # A real coefficient is its own conjugate, so the 2-D scatter is the 1-D one along the last axis with the row
    # carried along: the entry's own row, or the partner's -row where the entry is the partner's.
    along = half_scatter(cols, shape[1])
    own_rows = rows[along.source]
    target_rows = np.where(along.conj, (-own_rows) % shape[0], own_rows)
    return DeltaScatter(layout, shape, _readonly(target_rows), along.bins, along.source)


@dataclasses.dataclass(frozen=True, eq=False)
class ForwardPlan:
    """The spectral forward ``x ΔWᵀ`` from ``X = rfft(x)`` over ``in`` (see the module docstring).

    Per coefficient: ``u_k = X[gather_k]``, conjugated where ``conj_in``, is ``conj(fft(x)[s_k])``. Then the
    output half scatter along ``out``: ``Z_half[bins] += u[bin_source] · c[bin_source] / 2``, conjugated where
    ``bin_conj``, and ``x ΔWᵀ = scaling/in · irfft(Z_half, n=out)``. ``term_gather`` / ``term_conj`` /
    ``term_sign`` fold the two steps into one per scatter entry: the rfft bin read and whether (``±1`` on the
    imaginary part) it is conjugated in total.
    """

    out_features: int
    in_features: int
    gather: np.ndarray  # int64 (n,), into the in // 2 + 1 bins of rfft(x)
    conj_in: np.ndarray  # bool (n,)
    bins: np.ndarray  # int64 (terms,), into the out // 2 + 1 output bins
    bin_source: np.ndarray  # int64 (terms,), which coefficient
    bin_conj: np.ndarray  # bool (terms,)
    term_gather: np.ndarray  # int64 (terms,) = gather[bin_source]
    term_conj: np.ndarray  # bool (terms,) = conj_in[bin_source] != bin_conj
    term_sign: np.ndarray  # float64 (terms,), -1 where term_conj else 1


def forward_plan(indices: np.ndarray, out_features: int, in_features: int) -> ForwardPlan:
    """The spectral-forward plan for positions ``indices`` (``(2, n)`` over torch ``(out, in)``).

    Example:
        >>> idx = spectral_indices(4, 6, 5, seed=777)
        >>> c, x = np.arange(1.0, 6.0), np.linspace(-1, 1, 12).reshape(2, 6)
        >>> p = forward_plan(idx, 4, 6)
        >>> picked = np.fft.rfft(x)[:, p.term_gather]
        >>> values = 0.5 * c[p.bin_source] * np.where(p.term_conj, picked.conj(), picked)
        >>> half = np.zeros((2, 3), complex)
        >>> np.add.at(half, (slice(None), p.bins), values)
        >>> dense = np.zeros((4, 6), complex)
        >>> dense[idx[0], idx[1]] = c
        >>> bool(np.allclose(np.fft.irfft(half, n=4) / 6, x @ np.fft.ifft2(dense).real.T))
        True
    """
    rows, cols = _layer_positions(indices, out_features, in_features)
    columns = fold(cols, in_features)
    # conj(fft(x)[s]) = conj of the fold: conjugate exactly where the fold does not.
    conj_in = _readonly(~columns.conj)
    out = half_scatter(rows, out_features)
    term_conj = conj_in[out.source] != out.conj
    return ForwardPlan(
        int(out_features), int(in_features), columns.index, conj_in, out.bins, out.source, out.conj,
        _readonly(columns.index[out.source]), _readonly(term_conj), _readonly(np.where(term_conj, -1.0, 1.0)),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class GradPlan:
    """The spectrum gradient from ``X = rfft(x)`` over ``in`` and ``Y = rfft(dy)`` over ``out``.

    ``∂L/∂c_k = scaling/(out·in) · Σ_b (Re Y[b, out_index_k]·Re X[b, in_index_k]
    − sign_k · Im Y[b, out_index_k]·Im X[b, in_index_k])``.
    """

    out_index: np.ndarray  # int64 (n,), into the out // 2 + 1 bins of rfft(dy)
    in_index: np.ndarray  # int64 (n,), into the in // 2 + 1 bins of rfft(x)
    sign: np.ndarray  # float64 (n,), ±1


def grad_plan(indices: np.ndarray, out_features: int, in_features: int) -> GradPlan:
    """The spectrum-gradient plan for positions ``indices`` (``(2, n)`` over torch ``(out, in)``).

    Example:
        >>> plan = grad_plan(np.array([[0, 7], [1, 5]]), 8, 6)
        >>> plan.out_index.tolist(), plan.in_index.tolist(), plan.sign.tolist()
        ([0, 1], [1, 1], [1.0, 1.0])
    """
    rows, cols = _layer_positions(indices, out_features, in_features)
    out_fold, in_fold = fold(rows, out_features), fold(cols, in_features)
    # Re(a·b) = Re a Re b − Im a Im b; each conjugated factor flips its Im, so the product of the two signs.
    return GradPlan(out_fold.index, in_fold.index, _readonly(out_fold.sign * in_fold.sign))


@dataclasses.dataclass(frozen=True, eq=False)
class LayerPlans:
    """Every plan of one layer: its positions and the index arrays built from them.

    ``out_fold`` / ``in_fold`` and ``out_scatter`` / ``in_scatter`` are the 1-D fold and half scatter of the
    positions along the ``out`` axis (torch rows) and the ``in`` axis (torch columns), for code that transforms
    one axis at a time (the device-mesh path). ``forward`` and ``grad`` do not depend on the layout; ``delta`` does.
    """

    out_features: int
    in_features: int
    layout: str
    indices: np.ndarray  # int64 (2, n): rows then columns over torch (out, in)
    out_fold: Fold
    in_fold: Fold
    out_scatter: HalfScatter
    in_scatter: HalfScatter
    delta: DeltaScatter
    forward: ForwardPlan
    grad: GradPlan

    @property
    def n_frequency(self) -> int:
        """The number of coefficients ``n``."""
        return int(self.indices.shape[1])


def build_plans(indices: np.ndarray, out_features: int, in_features: int, layout: Layout = "torch") -> LayerPlans:
    """All plans for arbitrary positions ``indices`` (``(2, n)`` over torch ``(out, in)``); not cached.

    For PEFT's positions of a layer use ``layer_plans``, which builds them once per shape, ``n`` and seed.

    Example:
        >>> build_plans(np.array([[0, 1], [2, 0]]), 2, 3, "flax").delta.shape
        (3, 2)
    """
    rows, cols = _layer_positions(indices, out_features, in_features)
    _layout_shape(out_features, in_features, layout)
    out_fold, in_fold = fold(rows, out_features), fold(cols, in_features)
    stored = _readonly(np.stack([rows, cols]))
    return LayerPlans(
        int(out_features), int(in_features), layout, stored, out_fold, in_fold,
        half_scatter(rows, out_features), half_scatter(cols, in_features),
        delta_scatter(stored, out_features, in_features, layout),
        forward_plan(stored, out_features, in_features), grad_plan(stored, out_features, in_features),
    )


def layer_plans(
    out_features: int, in_features: int, n_frequency: int, seed: int, layout: Layout = "torch"
) -> LayerPlans:
    """The plans of PEFT's positions ``spectral_indices(out, in, n, seed)``, built once per key and shared.

    Example:
        >>> plans = layer_plans(8, 6, 5, seed=777, layout="flax")
        >>> plans.delta.shape, plans.forward.gather.shape
        ((6, 8), (5,))
        >>> plans is layer_plans(8, 6, 5, 777, "flax")
        True
    """
    # Normalised here so that int and numpy ints, positional and keyword calls, all reach one cache entry.
    return _cached_plans(int(out_features), int(in_features), int(n_frequency), int(seed), str(layout))


@functools.lru_cache(maxsize=None)
def _cached_plans(out_features: int, in_features: int, n_frequency: int, seed: int, layout: str) -> LayerPlans:
    _layout_shape(out_features, in_features, layout)  # check the layout before drawing positions
    return build_plans(spectral_indices(out_features, in_features, n_frequency, seed), out_features, in_features,
                       layout)  # type: ignore[arg-type]


def _layout_shape(out_features: int, in_features: int, layout: str) -> tuple[int, int]:
    if layout == "torch":
        return (int(out_features), int(in_features))
    if layout == "flax":
        return (int(in_features), int(out_features))
    raise ValueError(f"plans: layout must be one of {LAYOUTS}, got {layout!r}")


def _layer_positions(indices: np.ndarray, out_features: int, in_features: int) -> tuple[np.ndarray, np.ndarray]:
    indices = np.asarray(indices)
    if indices.ndim != 2 or indices.shape[0] != 2:
        raise ValueError(f"plans: indices must have shape (2, n), got {indices.shape}")
    return (_positions(indices[0], int(out_features), "row positions"),
            _positions(indices[1], int(in_features), "column positions"))
