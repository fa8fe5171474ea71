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

Everything runs in float32 (torch has no half-precision CPU FFTs); callers cast back.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref

import numpy as np
import torch

import bridge
from bridge._src import plans


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


@dataclasses.dataclass(frozen=True)
class GradPlan:
    """Index maps for the spectrum gradient ``∂L/∂c_k = s/(out·in) · Re(Σ_b fft(dy)[b, row_k] · fft(x)[b, col_k])``."""

    rows: torch.Tensor
    cols: torch.Tensor
    sign: torch.Tensor
    table_rows: torch.Tensor

    def to(self, device: torch.device) -> GradPlan:
        return GradPlan(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def make_grad_plan(indices: np.ndarray | torch.Tensor, out_features: int, in_features: int) -> GradPlan:
    """Bridge's gradient plan for positions ``indices`` of an ``out × in`` layer, as torch tensors.

    Example:
        >>> make_grad_plan(np.array([[0, 7], [1, 5]]), 8, 6).rows.tolist()
        [0, 1]
    """
    plan = plans.grad_plan(_numpy_indices(indices), out_features, in_features)
    # _input_table stacks x's spectrum over its conjugate: a plain dot product with dy's spectrum then gives
    # Re(Ŷ·X̂) when the conjugate row (offset in//2+1) is read, i.e. where the Im·Im product keeps its minus.
    table_rows = plan.in_index + np.where(plan.sign > 0, in_features // 2 + 1, 0)
    return GradPlan(
        _long(plan.out_index), _long(plan.in_index), torch.from_numpy(plan.sign.astype(np.float32)), _long(table_rows)
    )


def _bins_first_spectrum(v: torch.Tensor) -> torch.Tensor:
    """``rfft`` of each row of ``v`` (``(..., n)``), laid out ``(n//2+1, tokens)`` with (re, im) packed in 64 bits.

    The FFT runs along the contiguous axis (its fastest layout); the 64-bit view makes the transpose and the row
    gathers that follow move one element per complex value, and row gathers are the fast kind in torch.
    """
    dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    spectrum = torch.view_as_real(torch.fft.rfft(v.reshape(-1, v.shape[-1]).to(dtype), dim=-1))
    packed = spectrum.reshape(spectrum.shape[0], -1).view(torch.complex128 if dtype == torch.float64 else torch.float64)
    return packed.t().contiguous()


def _input_table(x: torch.Tensor) -> torch.Tensor:
    # Rows [0, bins): x's spectrum; rows [bins, 2*bins): its conjugate. Gathering row `col + bins*[sign > 0]` gives
    # the factor whose plain dot product with dy's spectrum is ``Re(...)`` with the right conjugations.
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    spectrum = torch.view_as_real(torch.fft.rfft(x.reshape(-1, x.shape[-1]).to(dtype), dim=-1))
    packed = spectrum.reshape(spectrum.shape[0], -1).view(torch.complex128 if dtype == torch.float64 else torch.float64)
    bins = packed.shape[1]
    table = torch.empty(2 * bins, packed.shape[0], dtype=packed.dtype, device=packed.device)
    table[:bins].copy_(packed.t())
    table[bins:].copy_(table[:bins])
    table = _as_float(table)
    table[bins:].view(bins, -1, 2)[:, :, 1].neg_()
    return table


def _as_float(packed: torch.Tensor) -> torch.Tensor:
    return packed.view(torch.float64 if packed.dtype == torch.complex128 else torch.float32)


class _InputSpectrumCache(threading.local):
    """The last input's spectrum table: query, key and value read the same activation, so backward builds it once.

    Keyed on the tensor object itself (held weakly, so the activation is never kept alive by the cache) and its
    version counter (an in-place change invalidates it); the entry is dropped when the activation is freed. One
    cache per thread, so two models trained in two threads never see each other's entry.
    """

    def __init__(self) -> None:
        self._ref: weakref.ref | None = None
        self._version = -1
        self._value: torch.Tensor | None = None

    def _clear(self, _ref: object = None) -> None:
        self._ref, self._value = None, None

    def get(self, x: torch.Tensor) -> torch.Tensor:
        if self._ref is not None and self._ref() is x and self._version == x._version:
            return self._value  # type: ignore[return-value]
        value = _input_table(x)
        try:
            self._ref = weakref.ref(x, self._clear)
        except TypeError:
            self._clear()
            return value
        self._version, self._value = x._version, value
        return value


_INPUT_SPECTRA = _InputSpectrumCache()


def _spectrum_grad(x_table: torch.Tensor, grad_output: torch.Tensor, grad_plan: GradPlan, scale: float) -> torch.Tensor:
    products = _as_float(_bins_first_spectrum(grad_output).index_select(0, grad_plan.rows))  # (n, 2·tokens)
    products.mul_(x_table.index_select(0, grad_plan.table_rows))
    return products.sum(1) * scale


def spectrum_grad(
    x: torch.Tensor, grad_output: torch.Tensor, grad_plan: GradPlan, scaling: float
) -> torch.Tensor:
    """``∂L/∂spectrum`` for ``y = x (W + ΔW)ᵀ`` given ``dy``: gathered entries of ``fft2(dyᵀx)`` without ``dyᵀx``.

    ``Σ_{p,q} (dyᵀx)[p,q] e^{2πi(r p/out + c q/in)} = Σ_b conj(fft(dy)[b,r]) conj(fft(x)[b,c])``, so two row FFTs
    and an ``n × tokens`` gather-multiply-sum replace the ``tokens·out·in`` weight-gradient matmul.

    Example:
        >>> idx = bridge.spectral_indices(8, 6, 5, 777)
        >>> x, dy, c = torch.randn(4, 6), torch.randn(4, 8), torch.randn(5, requires_grad=True)
        >>> (x @ delta_from_plan(c, make_plan(idx, 8, 6), 3.0).T * dy).sum().backward()
        >>> torch.allclose(spectrum_grad(x, dy, make_grad_plan(idx, 8, 6), 3.0), c.grad, atol=1e-5)
        True
    """
    out_features, in_features = grad_output.shape[-1], x.shape[-1]
    return _spectrum_grad(_input_table(x), grad_output, grad_plan, float(scaling) / (out_features * in_features))


class _FusedLinear(torch.autograd.Function):
    """``F.linear(x, W + Σ ΔW_a, b)`` whose backward never forms the ``dyᵀx`` matmul.

    ΔW is built in forward; backward needs ``W + ΔW`` again for the input gradient. ``keep_delta=False`` rebuilds
    it (one more ``irfft2``, about a fifth of one forward matmul at BERT-base shapes); ``True`` keeps the
    ``out × in`` effective weight alive between the passes (faster, one weight-sized buffer per layer). The frozen
    weight's own gradient is only computed if the weight requires grad.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, adapters, keep_delta, *spectra):  # type: ignore[override]
        with torch.no_grad():
            effective = _effective_weight(weight, adapters, spectra)
            out = torch.nn.functional.linear(x, effective, bias)
        ctx.adapters = adapters
        ctx.has_bias = bias is not None
        ctx.keep_delta = keep_delta
        ctx.save_for_backward(x, weight, effective if keep_delta else None, *spectra)
        return out

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        x, weight, effective, *spectra = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x = grad_weight = grad_bias = None
        if needs[0]:
            if effective is None:
                with torch.no_grad():
                    effective = _effective_weight(weight, ctx.adapters, spectra)
            grad_x = grad_output.matmul(effective.to(grad_output.dtype)).to(x.dtype)
        del effective
        if needs[1]:
            flat_dy = grad_output.reshape(-1, grad_output.shape[-1])
            grad_weight = flat_dy.t().matmul(x.reshape(-1, x.shape[-1]).to(flat_dy.dtype)).to(weight.dtype)
        if needs[2] and ctx.has_bias:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
        grad_spectra = []
        x_table = None
        out_features, in_features = weight.shape
        for index, ((_, grad_plan, scaling), spectrum) in enumerate(zip(ctx.adapters, spectra)):
            if needs[5 + index]:
                if x_table is None:
                    x_table = _INPUT_SPECTRA.get(x)
                scale = float(scaling) / (out_features * in_features)
                grad_spectra.append(_spectrum_grad(x_table, grad_output, grad_plan, scale).to(spectrum.dtype))
            else:
                grad_spectra.append(None)
        return (grad_x, grad_weight, grad_bias, None, None, *grad_spectra)


def _effective_weight(weight: torch.Tensor, adapters, spectra) -> torch.Tensor:
    delta = None
    for (plan, _, scaling), spectrum in zip(adapters, spectra):
        term = delta_from_plan(spectrum, plan, scaling)
        delta = term if delta is None else delta.add_(term)
    return weight + delta.to(weight.dtype)


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    adapters: list[tuple[SpectralPlan, GradPlan, float]],
    spectra: list[torch.Tensor],
    keep_delta: bool = False,
) -> torch.Tensor:
    """``F.linear(x, W + Σ_a ΔW_a, b)`` with ``weight`` in ``(out, in)`` layout; gradients for x, W, b and spectra.

    ``keep_delta``: keep ``W + ΔW`` for backward instead of rebuilding it (see ``_FusedLinear``).

    Example:
        >>> idx = bridge.spectral_indices(8, 6, 5, 777)
        >>> plans = [(make_plan(idx, 8, 6), make_grad_plan(idx, 8, 6), 2.0)]
        >>> x, w, c = torch.randn(3, 6), torch.randn(8, 6), torch.randn(5)
        >>> torch.allclose(fused_linear(x, w, None, plans, [c]), x @ (w + delta_from_plan(c, plans[0][0], 2.0)).T, atol=1e-5)
        True
    """
    return _FusedLinear.apply(x, weight, bias, tuple(adapters), bool(keep_delta), *spectra)
