"""The FourierFT math in torch: ΔW by ``irfft2``, and the adapter's output without ever building ΔW.

With ``S`` the sparse ``out × in`` spectrum (real coefficients ``c_k`` at ``(row_k, col_k)``) and
``ΔW = scaling · Re(ifft2(S))``:

* ``delta_from_plan``: ``Re(ifft2(S)) = irfft2(H)`` with ``H = (S + S[-r, -c]) / 2`` on the half plane
  ``c ≤ in // 2`` -- no complex ``out × in`` buffer, half the FFT work.
* ``spectral_delta``: ``x ΔWᵀ = scaling / in · Re(ifft_out(Z))`` with ``Z[b, row_k] += c_k · conj(fft(x)[b, col_k])``.
  ``conj(fft(x))`` at ``col > in // 2`` is ``rfft(x)`` at ``in - col``, and ``Re(ifft(Z))`` is ``irfft`` of the
  Hermitian half of ``Z``; so one ``rfft`` per token row, a gather of ``n`` values, a scatter-add into
  ``out // 2 + 1`` bins and one ``irfft``: O(B·d·log d + B·n), and no ``dyᵀx`` weight-gradient matmul.
  Backward is hand-written (same cost as forward) and keeps only the input's ``rfft``.
* ``fused_linear``: ``F.linear(x, W + ΔW, b)``; its backward takes the spectrum gradient as a sampled product of
  the bins-first ``rfft(dy)`` and ``rfft(x)`` (``spectrum_grad``), and ``dy ΔW`` -- the transpose of the spectral
  forward -- from the same ``rfft(dy)`` by one sparse matmul and one ``irfft`` per token row
  (``input_grad_delta``) where bridge's ``choose_input_grad`` finds that cheaper than ``W + ΔW``.

Everything runs in float32 (torch has no half-precision CPU FFTs); callers cast back.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
import weakref

import numpy as np
import torch

import bridge
from bridge._src import plans
from bridge._src.auto_rule import REBUILD, SPECTRAL, choose_input_grad


@dataclasses.dataclass(frozen=True)
class SpectralPlan:
    """Precomputed index maps of one layer's positions (see module docstring).

    ``coef``: which spectrum entry feeds each term; ``src``: the ``rfft`` column read; ``sign``: ``±1`` on the
    imaginary part (conjugation); ``bin``: the half-spectrum output bin; ``half_flat``/``half_coef``: where
    ``delta_from_plan`` adds which coefficient (index of the real part in the flattened ``(out, in//2+1, 2)`` buffer).
    """

    out_features: int
    in_features: int
    coef: torch.Tensor
    src: torch.Tensor
    sign: torch.Tensor
    bin: torch.Tensor
    half_flat: torch.Tensor
    half_coef: torch.Tensor

    def to(self, device: torch.device) -> SpectralPlan:
        tensors = ("coef", "src", "sign", "bin", "half_flat", "half_coef")
        return dataclasses.replace(self, **{name: getattr(self, name).to(device) for name in tensors})


def make_plan(indices: np.ndarray | torch.Tensor, out_features: int, in_features: int) -> SpectralPlan:
    """Bridge's forward and ``ΔW`` plans for positions ``indices`` (``(2, n)``: rows, cols) as torch tensors.

    Example:
        >>> plan = make_plan(bridge.spectral_indices(8, 6, 5, 777), 8, 6)
        >>> plan.coef.shape[0] >= 5
        True
    """
    indices = _numpy_indices(indices)
    forward = plans.forward_plan(indices, out_features, in_features)
    scatter = plans.delta_scatter(indices, out_features, in_features, "torch")
    # delta_from_plan adds into the interleaved (re, im) storage of the (out, in//2+1) half spectrum: the real part
    # of entry (r, c) is element 2·(r·(in//2+1) + c) of the flat float buffer.
    half_flat = (scatter.rows * scatter.half_shape[1] + scatter.cols) * 2
    return SpectralPlan(
        out_features,
        in_features,
        coef=_long(forward.bin_source),
        src=_long(forward.term_gather),
        sign=torch.from_numpy(forward.term_sign.astype(np.float32)),
        bin=_long(forward.bins),
        half_flat=_long(half_flat),
        half_coef=_long(scatter.source),
    )


def _numpy_indices(indices: np.ndarray | torch.Tensor) -> np.ndarray:
    return np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)


def _long(array: np.ndarray) -> torch.Tensor:
    # A writable copy: torch warns on (and must not write through) the plans' read-only numpy arrays.
    return torch.from_numpy(np.array(array, dtype=np.int64))


def delta_from_plan(spectrum: torch.Tensor, plan: SpectralPlan, scaling: float) -> torch.Tensor:
    """``ΔW = scaling · Re(ifft2(S))`` as a float32 ``(out, in)`` tensor, differentiable in ``spectrum``.

    Example:
        >>> idx = bridge.spectral_indices(8, 6, 5, 777)
        >>> c = torch.randn(5, dtype=torch.float64)
        >>> dw = delta_from_plan(c, make_plan(idx, 8, 6), 2.0)
        >>> bool(np.allclose(dw.numpy(), bridge.delta_weight(c.numpy(), idx, 8, 6, 2.0), atol=1e-5))
        True
    """
    out_features, in_features = plan.out_features, plan.in_features
    dtype = torch.float64 if spectrum.dtype == torch.float64 else torch.float32
    # The scaling goes on the n coefficients, not on the out*in result; the buffer is built directly as the
    # interleaved (re, im) storage of the complex half spectrum (no complex() copy, no 2-D index_put).
    values = spectrum.to(dtype).index_select(0, plan.half_coef) * (0.5 * float(scaling))
    half = torch.zeros(out_features * (in_features // 2 + 1) * 2, dtype=dtype, device=spectrum.device)
    half.index_add_(0, plan.half_flat, values)
    half = torch.view_as_complex(half.view(out_features, in_features // 2 + 1, 2))
    return torch.fft.irfft2(half, s=(out_features, in_features))


def _hermitian_weights(n: int, half: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # How often each rfft bin occurs in the full Hermitian spectrum: 1 for DC (and Nyquist when n is even), else 2.
    weights = torch.full((half, 1, 1), 2.0, dtype=dtype, device=device)
    weights[0] = 1.0
    if n % 2 == 0:
        weights[-1] = 1.0
    return weights


class _SpectralDelta(torch.autograd.Function):
    """``x ΔWᵀ`` by the spectral form, with a hand-written backward of the same cost.

    Features-first layout ``(bins, tokens, 2)``: gathering and scatter-adding whole rows is an order of magnitude
    faster in torch than doing it along an inner dimension. Saved for backward: the input's ``rfft`` (about the
    size of the input), never the ``n × tokens`` intermediates.
    """

    @staticmethod
    def forward(ctx, x, weights, plan):  # type: ignore[override]
        # x: (B, in) float; weights: (terms, 2) = coefficient * [1, sign] * scale
        out_features = plan.out_features
        spectrum = torch.view_as_real(torch.fft.rfft(x.t(), dim=0)).contiguous()  # (in//2+1, B, 2)
        terms = spectrum.index_select(0, plan.src) * weights.unsqueeze(1)
        half = torch.zeros(out_features // 2 + 1, x.shape[0], 2, dtype=x.dtype, device=x.device)
        half.index_add_(0, plan.bin, terms)
        ctx.plan = plan
        ctx.save_for_backward(spectrum, weights)
        return torch.fft.irfft(torch.view_as_complex(half), n=out_features, dim=0).t()

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        spectrum, weights = ctx.saved_tensors
        plan = ctx.plan
        out_features, in_features = plan.out_features, plan.in_features
        grad_output = grad_output.to(spectrum.dtype)
        # Adjoint of irfft (1/n normalised): rfft(dy) * multiplicity / n.
        grad_half = torch.view_as_real(torch.fft.rfft(grad_output.t(), dim=0))
        grad_half = grad_half * (
            _hermitian_weights(out_features, grad_half.shape[0], grad_half.dtype, grad_half.device) / out_features
        )
        grad_terms = grad_half.index_select(0, plan.bin)  # (terms, B, 2)
        grad_weights = None
        if ctx.needs_input_grad[1]:
            grad_weights = (grad_terms * spectrum.index_select(0, plan.src)).sum(dim=1)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_spectrum = torch.zeros_like(spectrum).index_add_(0, plan.src, grad_terms * weights.unsqueeze(1))
            # Adjoint of rfft: n * irfft(dR / multiplicity).
            grad_spectrum = grad_spectrum / _hermitian_weights(
                in_features, grad_spectrum.shape[0], grad_spectrum.dtype, grad_spectrum.device
            )
            grad_x = torch.fft.irfft(torch.view_as_complex(grad_spectrum), n=in_features, dim=0).t() * in_features
        return grad_x, grad_weights, None


def spectral_delta(x: torch.Tensor, spectrum: torch.Tensor, plan: SpectralPlan, scaling: float) -> torch.Tensor:
    """``x ΔWᵀ`` (float32, shape ``(..., out)``) without building ΔW; differentiable in ``x`` and ``spectrum``.

    Example:
        >>> idx = bridge.spectral_indices(8, 6, 5, 777)
        >>> plan, c, x = make_plan(idx, 8, 6), torch.randn(5), torch.randn(3, 6)
        >>> torch.allclose(spectral_delta(x, c, plan, 2.0), x @ delta_from_plan(c, plan, 2.0).T, atol=1e-5)
        True
    """
    scale = 0.5 * float(scaling) / plan.in_features
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    coefficients = spectrum.to(dtype).index_select(0, plan.coef) * scale
    weights = torch.stack([coefficients, coefficients * plan.sign], dim=-1)
    leading = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1]).to(dtype)
    return _SpectralDelta.apply(flat, weights, plan).reshape(*leading, plan.out_features)


# torch warns once per process that sparse CSR support is "beta"; the backward uses only two long-standing kernels
# (sampled_addmm, CSR @ dense), so the warning would only alarm users of a training loop. Spend torch's one warning
# here, silenced, instead of changing the process's warning filters.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    torch.sparse_csr_tensor(torch.zeros(2, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0),
                            size=(1, 1), check_invariants=False)


@dataclasses.dataclass(frozen=True)
class GradPlan:
    """Index maps of one adapter's fused backward: the spectrum gradient and the spectral input gradient.

    Spectrum gradient ``∂L/∂c_k = s/(out·in) · Σ_b (Re Y Re X − sign_k · Im Y Im X)`` at ``Y = rfft(dy)[b,
    out_index_k]`` and ``X = rfft(x)[b, in_index_k]`` (bridge's ``grad_plan``): a sampled product of the two
    bins-first spectra, ``Re(Σ_b Y X)`` where ``sign_k > 0`` (complex ``plus_*`` pattern) and the packed real dot
    ``Σ_b (Re Y Re X + Im Y Im X)`` where ``sign_k < 0`` (``minus_*``). Both patterns are CSR over (out bins ×
    ``columns``), each distinct pair once; ``slot[k]`` is where coefficient ``k`` reads its value in the two
    patterns' values concatenated. ``columns``: the distinct ``rfft(x)`` bins read, i.e. the input table's rows.

    Input gradient ``dy ΔW``: the spectral forward of ``ΔWᵀ`` (bridge's ``forward_plan`` of the transposed
    positions) as a sparse ``(2·(in//2+1)) × (out//2+1)`` matrix on ``rfft(dy)``: ``input_rows`` is the ``in``
    half bin, offset by ``in//2+1`` where the term is conjugated; ``input_cols`` the ``rfft(dy)`` bin;
    ``input_source`` the coefficient.
    """

    out_features: int
    in_features: int
    columns: torch.Tensor
    plus_crow: torch.Tensor
    plus_col: torch.Tensor
    minus_crow: torch.Tensor
    minus_col: torch.Tensor
    slot: torch.Tensor
    input_rows: torch.Tensor
    input_cols: torch.Tensor
    input_source: torch.Tensor

    def to(self, device: torch.device) -> GradPlan:
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self) if f.type != "int"}
        )


def make_grad_plan(indices: np.ndarray | torch.Tensor, out_features: int, in_features: int) -> GradPlan:
    """Bridge's gradient plan (and the transposed forward plan) for positions ``indices`` as torch tensors.

    Example:
        >>> plan = make_grad_plan(np.array([[0, 7], [1, 5]]), 8, 6)
        >>> plan.columns.tolist(), plan.slot.tolist()
        ([1], [0, 1])
    """
    indices = _numpy_indices(indices)
    grad = plans.grad_plan(indices, out_features, in_features)
    columns, column_of = np.unique(grad.in_index, return_inverse=True)
    out_bins = out_features // 2 + 1
    patterns, slot = [], np.empty(grad.sign.shape[0], dtype=np.int64)
    offset = 0
    for group in (grad.sign > 0, grad.sign < 0):
        # One CSR entry per distinct (out bin, column): folded partners often share one, and sampled_addmm needs a
        # pattern without repeats.
        keys = grad.out_index[group] * columns.shape[0] + column_of[group]
        unique, inverse = np.unique(keys, return_inverse=True)
        rows = unique // columns.shape[0]
        crow = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=out_bins))])
        patterns += [crow, unique % columns.shape[0]]
        slot[group] = offset + inverse
        offset += unique.shape[0]
    # dy ΔW = dy (ΔWᵀ)ᵀ: the spectral forward of ΔWᵀ, whose positions are the transposed ones.
    transposed = plans.forward_plan(indices[::-1], in_features, out_features)
    input_rows = transposed.bins + (in_features // 2 + 1) * transposed.term_conj
    return GradPlan(
        int(out_features), int(in_features), _long(columns), *(_long(p) for p in patterns), _long(slot),
        _long(input_rows), _long(transposed.term_gather), _long(transposed.bin_source),
    )


def _real_dtype(v: torch.Tensor) -> torch.dtype:
    # torch has no half-precision CPU FFTs: everything spectral runs in float32 (float64 kept for tests).
    return torch.float64 if v.dtype == torch.float64 else torch.float32


def _chunk(v: torch.Tensor, bins: int) -> int:
    # On CPU, FFT and transpose a block of token rows at a time so the transpose reads from cache (a whole-tensor
    # transposed copy is several times slower than the FFT itself at 8k tokens); one block on accelerators.
    if v.device.type != "cpu":
        return max(v.shape[0], 1)
    return max(16, 1 << max((65536 // bins).bit_length() - 1, 0))


def _bins_first(v: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """``rfft`` of each row of ``v`` (``(..., n)``) as a complex ``(n//2+1, tokens)`` tensor (or its ``rows``).

    Bins first, so the sampled products and the sparse matmul read each bin's tokens contiguously.
    """
    flat = v.reshape(-1, v.shape[-1]).to(_real_dtype(v))
    tokens, bins = flat.shape[0], flat.shape[1] // 2 + 1
    complex_dtype = torch.complex128 if flat.dtype == torch.float64 else torch.complex64
    out = torch.empty(bins if rows is None else rows.shape[0], tokens, dtype=complex_dtype, device=flat.device)
    step = _chunk(flat, bins)
    for start in range(0, tokens, step):
        block = torch.fft.rfft(flat[start:start + step], dim=-1).t()
        out[:, start:start + step] = block if rows is None else block.index_select(0, rows)
    return out


def _packed(spectrum: torch.Tensor) -> torch.Tensor:
    # (bins, tokens) complex -> (bins, 2·tokens) real, (re, im) interleaved: the same memory.
    return torch.view_as_real(spectrum).view(spectrum.shape[0], -1)


def _csr(crow: torch.Tensor, col: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    values = torch.zeros(col.shape[0], dtype=dtype, device=col.device)
    return torch.sparse_csr_tensor(crow, col, values, size=shape, check_invariants=False)


def _spectrum_grad(dy_spectrum: torch.Tensor, x_table: torch.Tensor, grad_plan: GradPlan, scale: float) -> torch.Tensor:
    """The ``n`` sampled products (see ``GradPlan``) of ``rfft(dy)`` (bins first) and the input table, times ``scale``.

    ``sampled_addmm`` forms each product as one contiguous dot over the tokens: no ``n × tokens`` gathered copies.
    """
    shape = (dy_spectrum.shape[0], x_table.shape[0])
    values = []
    if grad_plan.plus_col.numel():
        pattern = _csr(grad_plan.plus_crow, grad_plan.plus_col, shape, dy_spectrum.dtype)
        products = torch.sparse.sampled_addmm(pattern, dy_spectrum, x_table.t(), beta=0.0).values()
        values.append(products.clone().real)  # .real of the values view itself trips over the sparse base (torch 2.13)
    if grad_plan.minus_col.numel():
        packed_dy = _packed(dy_spectrum)
        pattern = _csr(grad_plan.minus_crow, grad_plan.minus_col, shape, packed_dy.dtype)
        values.append(torch.sparse.sampled_addmm(pattern, packed_dy, _packed(x_table).t(), beta=0.0).values())
    return torch.cat(values).index_select(0, grad_plan.slot) * scale


def _input_grad_delta(dy_spectrum: torch.Tensor, adapters, spectra) -> torch.Tensor:
    """``dy Σ_a ΔW_a`` (``(tokens, in)``) from ``rfft(dy)`` (bins first): one sparse matmul into the ``in`` half
    bins (conjugated terms in a second block), then one ``irfft`` per token row -- never ``ΔW``.
    """
    grad_plan = adapters[0][1]
    out_features, in_features = grad_plan.out_features, grad_plan.in_features
    in_bins, tokens = in_features // 2 + 1, dy_spectrum.shape[1]
    packed_dy = _packed(dy_spectrum)
    rows, cols, values = [], [], []
    for (_, plan, scaling), spectrum in zip(adapters, spectra):
        rows.append(plan.input_rows)
        cols.append(plan.input_cols)
        # The spectral forward's scale with in and out swapped (see spectral_delta).
        values.append(spectrum.detach().to(packed_dy.dtype).index_select(0, plan.input_source)
                      * (0.5 * float(scaling) / out_features))
    matrix = torch.sparse_coo_tensor(
        torch.stack([torch.cat(rows), torch.cat(cols)]), torch.cat(values), (2 * in_bins, dy_spectrum.shape[0]),
        check_invariants=False,
    ).coalesce().to_sparse_csr()
    half = torch.view_as_complex(torch.sparse.mm(matrix, packed_dy).view(2 * in_bins, tokens, 2))
    out = torch.empty(tokens, in_features, dtype=packed_dy.dtype, device=packed_dy.device)
    step = _chunk(out, in_bins)
    for start in range(0, tokens, step):
        stop = start + step
        block = half[:in_bins, start:stop].t() + half[in_bins:, start:stop].t().conj()
        torch.fft.irfft(block, n=in_features, dim=-1, out=out[start:stop])
    return out


class _InputSpectrumCache(threading.local):
    """The input tables of the last activation: query, key and value read the same one, so it is built once.

    Keyed on the tensor object itself (held weakly, so the activation is never kept alive by the cache) and its
    version counter (an in-place change invalidates it), one table per grad plan (layers of equal shape share
    theirs); the entry is dropped when the activation is freed. One cache per thread, so two models trained in
    two threads never see each other's entry.
    """

    def __init__(self) -> None:
        self._ref: weakref.ref | None = None
        self._version = -1
        self._tables: dict[int, tuple[GradPlan, torch.Tensor]] = {}

    def _clear(self, ref: object = None) -> None:
        # A freed older activation must not clear the entry of the current one.
        if ref is None or ref is self._ref:
            self._ref, self._tables = None, {}

    def get(self, x: torch.Tensor, grad_plan: GradPlan) -> torch.Tensor:
        if self._ref is None or self._ref() is not x or self._version != x._version:
            self._clear()
            try:
                self._ref = weakref.ref(x, self._clear)
            except TypeError:
                return _bins_first(x, grad_plan.columns)
            self._version = x._version
        entry = self._tables.get(id(grad_plan))
        if entry is None or entry[0] is not grad_plan:
            entry = self._tables[id(grad_plan)] = (grad_plan, _bins_first(x, grad_plan.columns))
        return entry[1]


_INPUT_SPECTRA = _InputSpectrumCache()


def spectrum_grad(
    x: torch.Tensor, grad_output: torch.Tensor, grad_plan: GradPlan, scaling: float
) -> torch.Tensor:
    """``∂L/∂spectrum`` for ``y = x (W + ΔW)ᵀ`` given ``dy``: gathered entries of ``fft2(dyᵀx)`` without ``dyᵀx``.

    ``Σ_{p,q} (dyᵀx)[p,q] e^{2πi(r p/out + c q/in)} = Σ_b conj(fft(dy)[b,r]) conj(fft(x)[b,c])``, so two row FFTs
    and an ``n × tokens`` sampled product replace the ``tokens·out·in`` weight-gradient matmul.

    Example:
        >>> idx = bridge.spectral_indices(8, 6, 5, 777)
        >>> x, dy, c = torch.randn(4, 6), torch.randn(4, 8), torch.randn(5, requires_grad=True)
        >>> (x @ delta_from_plan(c, make_plan(idx, 8, 6), 3.0).T * dy).sum().backward()
        >>> torch.allclose(spectrum_grad(x, dy, make_grad_plan(idx, 8, 6), 3.0), c.grad, atol=1e-5)
        True
    """
    scale = float(scaling) / (grad_plan.out_features * grad_plan.in_features)
    return _spectrum_grad(_bins_first(grad_output), _bins_first(x, grad_plan.columns), grad_plan, scale)


def input_grad_delta(
    grad_output: torch.Tensor, adapters: list[tuple[SpectralPlan, GradPlan, float]], spectra: list[torch.Tensor]
) -> torch.Tensor:
    """``dy Σ_a ΔW_a`` (float32, shape ``(..., in)``) from ``rfft(dy)``, without building ΔW.

    Example:
        >>> idx = bridge.spectral_indices(8, 6, 5, 777)
        >>> plans = [(make_plan(idx, 8, 6), make_grad_plan(idx, 8, 6), 2.0)]
        >>> dy, c = torch.randn(3, 8), torch.randn(5)
        >>> torch.allclose(input_grad_delta(dy, plans, [c]), dy @ delta_from_plan(c, plans[0][0], 2.0), atol=1e-5)
        True
    """
    delta = _input_grad_delta(_bins_first(grad_output), tuple(adapters), spectra)
    return delta.reshape(*grad_output.shape[:-1], delta.shape[-1])


class _FusedLinear(torch.autograd.Function):
    """``F.linear(x, W + Σ ΔW_a, b)`` whose backward never forms the ``dyᵀx`` matmul.

    ΔW is built once, in forward. The input gradient ``dy (W + ΔW)`` takes one of two forms (``input_grad``,
    bridge's ``choose_input_grad``): ``"spectral"`` adds ``dy ΔW`` from ``rfft(dy)`` -- computed anyway for the
    spectrum gradient -- to ``dy W`` (work in proportion to the tokens, nothing weight-sized kept);
    ``"rebuild"`` multiplies by ``W + ΔW``, kept from forward (``keep_delta``: one weight-sized buffer per layer)
    or rebuilt by one more ``irfft2``. Residuals: the input table (``rfft(x)`` at the columns the spectrum
    gradient reads, shared by layers reading the same activation) when it is smaller than ``x`` and the spectra
    need a gradient, else ``x``; ``x`` too if the frozen weight requires grad (its gradient is then computed).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, adapters, keep_delta, input_grad, table_now, *spectra):  # type: ignore[override]
        with torch.no_grad():
            effective = _effective_weight(weight, adapters, spectra)
            out = torch.nn.functional.linear(x, effective, bias)
        ctx.adapters = adapters
        ctx.has_bias = bias is not None
        ctx.input_grad = input_grad
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        tables = [_INPUT_SPECTRA.get(x, grad_plan) for _, grad_plan, _ in adapters] if table_now else []
        ctx.n_tables = len(tables)
        keep = keep_delta and input_grad == REBUILD
        ctx.save_for_backward(None if table_now else x, weight, effective if keep else None, *tables, *spectra)
        return out

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        x, weight, effective, *rest = ctx.saved_tensors
        tables, spectra = rest[:ctx.n_tables], rest[ctx.n_tables:]
        adapters, needs = ctx.adapters, ctx.needs_input_grad
        flat_dy = grad_output.reshape(-1, grad_output.shape[-1])
        spectral = needs[0] and ctx.input_grad == SPECTRAL
        wanted = [needs[7 + index] for index in range(len(spectra))]
        dy_spectrum = _bins_first(flat_dy) if spectral or any(wanted) else None
        grad_x = grad_weight = grad_bias = None
        if spectral:
            delta = _input_grad_delta(dy_spectrum, adapters, spectra)
            if flat_dy.dtype == delta.dtype == weight.dtype:
                grad_x = delta.addmm_(flat_dy, weight)  # dy W added inside the GEMM
            else:
                grad_x = delta.add_(flat_dy.matmul(weight.to(flat_dy.dtype)))
            grad_x = grad_x.to(ctx.x_dtype).reshape(ctx.x_shape)
        elif needs[0]:
            if effective is None:
                with torch.no_grad():
                    effective = _effective_weight(weight, adapters, spectra)
            grad_x = grad_output.matmul(effective.to(grad_output.dtype)).to(ctx.x_dtype)
        del effective
        if needs[1]:
            grad_weight = flat_dy.t().matmul(x.reshape(-1, x.shape[-1]).to(flat_dy.dtype)).to(weight.dtype)
        if needs[2] and ctx.has_bias:
            grad_bias = flat_dy.sum(0)
        grad_spectra = []
        out_features, in_features = weight.shape
        for index, ((_, grad_plan, scaling), spectrum) in enumerate(zip(adapters, spectra)):
            if wanted[index]:
                table = tables[index] if tables else _INPUT_SPECTRA.get(x, grad_plan)
                scale = float(scaling) / (out_features * in_features)
                grad_spectra.append(_spectrum_grad(dy_spectrum, table, grad_plan, scale).to(spectrum.dtype))
            else:
                grad_spectra.append(None)
        return (grad_x, grad_weight, grad_bias, None, None, None, None, *grad_spectra)


def _effective_weight(weight: torch.Tensor, adapters, spectra) -> torch.Tensor:
    delta = None
    for (plan, _, scaling), spectrum in zip(adapters, spectra):
        term = delta_from_plan(spectrum, plan, scaling)
        delta = term if delta is None else delta.add_(term)
    return weight + delta.to(weight.dtype)


def _table_bytes(tokens: int, adapters, dtype: torch.dtype) -> int:
    # Complex entries of the real dtype the spectra run in; one table per distinct grad plan (shared plans share).
    distinct = {id(grad_plan): grad_plan.columns.shape[0] for _, grad_plan, _ in adapters}
    return sum(distinct.values()) * tokens * 2 * torch.empty((), dtype=dtype).element_size()


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    adapters: list[tuple[SpectralPlan, GradPlan, float]],
    spectra: list[torch.Tensor],
    keep_delta: bool = False,
    input_grad: str | None = None,
) -> torch.Tensor:
    """``F.linear(x, W + Σ_a ΔW_a, b)`` with ``weight`` in ``(out, in)`` layout; gradients for x, W, b and spectra.

    ``input_grad``: how backward forms ``dy ΔW`` (see ``_FusedLinear``): ``"spectral"``, ``"rebuild"`` or ``None``
    for bridge's ``choose_input_grad`` rule. ``keep_delta``: with ``"rebuild"``, keep ``W + ΔW`` from forward
    instead of rebuilding it.

    Example:
        >>> idx = bridge.spectral_indices(8, 6, 5, 777)
        >>> plans = [(make_plan(idx, 8, 6), make_grad_plan(idx, 8, 6), 2.0)]
        >>> x, w, c = torch.randn(3, 6), torch.randn(8, 6), torch.randn(5)
        >>> torch.allclose(fused_linear(x, w, None, plans, [c]), x @ (w + delta_from_plan(c, plans[0][0], 2.0)).T, atol=1e-5)
        True
    """
    out_features, in_features = weight.shape
    tokens = x.numel() // max(in_features, 1)
    if input_grad is None:
        input_grad = choose_input_grad(tokens, out_features, in_features)
    elif input_grad not in (SPECTRAL, REBUILD):
        raise ValueError(f"fused_linear: input_grad must be {SPECTRAL!r}, {REBUILD!r} or None, got {input_grad!r}")
    adapters = tuple(adapters)
    # Build the input table in forward (and keep it instead of x) only when a backward will read it, nothing else
    # needs x, and it is the smaller of the two.
    table_now = (
        torch.is_grad_enabled()
        and any(spectrum.requires_grad for spectrum in spectra)
        and not weight.requires_grad
        and _table_bytes(tokens, adapters, _real_dtype(x)) < x.numel() * x.element_size()
    )
    return _FusedLinear.apply(x, weight, bias, adapters, bool(keep_delta), input_grad, table_now, *spectra)
