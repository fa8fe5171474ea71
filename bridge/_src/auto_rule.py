"""The ``"auto"`` rule of both frameworks: per adapted layer and call, the fused or the spectral path.

The spectral path (``x ΔWᵀ`` from the FFT of every token row, no ``ΔW``) costs work proportional to the token
count; the fused path (``x (W + ΔW)ᵀ``) pays a token-independent ``irfft2`` of the ``out × in`` ``ΔW`` and
rides on the matmul the frozen layer does anyway. So the spectral path wins below a token count proportional to
``in·out / (in + out)``; ``SPECTRAL_MAX_RATIO`` is the measured constant of that proportionality (JAX and torch
benchmarks, BENCHMARKS.md: crossovers between about 0.4 and 1.1 across BERT-base shapes, near 0.5 for
4096×4096, and near the crossover the two paths cost about the same).

The boundary: ``"spectral"`` iff ``tokens · (in + out) < SPECTRAL_MAX_RATIO · in · out``, ``"fused"`` otherwise
(at exact equality too), compared exactly in rationals so no rounding moves a call across it.
"""

from __future__ import annotations

from fractions import Fraction

# Below this many tokens per unit of in·out/(in + out) a call takes the spectral path.
SPECTRAL_MAX_RATIO = 0.5

FUSED = "fused"
SPECTRAL = "spectral"


def choose_path(tokens: int, out_features: int, in_features: int) -> str:
    """``"spectral"`` iff ``tokens·(in + out) < SPECTRAL_MAX_RATIO·in·out``, else ``"fused"``.

    Example:
        >>> choose_path(8, 768, 768), choose_path(8 * 128, 768, 768)
        ('spectral', 'fused')
        >>> choose_path(191, 768, 768), choose_path(192, 768, 768)  # 192 · 1536 = 0.5 · 768²: the boundary
        ('spectral', 'fused')
    """
    tokens, out_features, in_features = int(tokens), int(out_features), int(in_features)
    if tokens < 0 or out_features <= 0 or in_features <= 0:
        raise ValueError(f"choose_path: need tokens >= 0 and a positive layer shape, got {tokens}, "
                         f"({out_features}, {in_features})")
    # Fraction(0.5) is exactly 1/2: integer products compared without float rounding.
    spectral = tokens * (in_features + out_features) < Fraction(SPECTRAL_MAX_RATIO) * in_features * out_features
    return SPECTRAL if spectral else FUSED


# The fused path's input gradient ``dx = dy (W + ΔW)ᵀ``: either rebuild ``ΔW`` (a token-independent ``irfft2``)
# and ride on the frozen matmul, or add ``dy ΔWᵀ`` from ``rfft(dy)`` -- already computed for the spectrum
# gradient -- by a gather, a scatter into the ``in`` bins and one ``irfft`` per token row (work proportional to
# the tokens). The spectral form wins below a token count proportional to ``out``; ``INPUT_GRAD_MAX_RATIO`` is the
# measured constant (fourierft_jax, XLA:CPU, BERT-base shapes, n = 1000, 2026-12-01, a loaded 2-core machine):
#
# * inside one jitted step XLA merges the backward's rebuild with the forward's identical ΔW build, so there
#   "rebuild" costs no FFT and was the faster form at every measured size: the spectral form added (ms, jitted
#   forward + backward of one layer, interleaved, best of 3) 768×768: +3.8/+4.0/+39 at 256/1024/4096 tokens;
#   768×3072: +1.0/+5.3/+48; 3072×768: +11/+37/+85; and at 8192 tokens it raised a 2-layer step's compiled temp
#   memory (2051 vs 1666 MiB) -- its token-sized transients outweigh the ΔW it does not hold;
# * where the rebuild is a real ``irfft2`` (a scanned stack: forward and backward are separate loops; eager
#   torch) it costs 2.2 ms (768×768) or 12 ms (768↔3072) per layer, so the spectral form wins below about
#   2000 tokens at 768×3072 and not at all at 768×768 or 3072×768 once the fused path is taken.
# * fourierft_torch (eager, 1 thread, same shapes): against a rebuilt ΔW the spectral form wins below about
#   0.4-0.9·out tokens; against ``keep_delta`` (ΔW kept from forward: no FFT, one weight-sized buffer) it never
#   wins on time, only on memory.
#
# 0.25 keeps both: the spectral form only for wide-output layers at few tokens (768×3072 below 768 tokens,
# where it costs at most ~1-3 ms in one jitted step and saves 12 ms in a scan); at 768×768 and 3072×768 its
# boundary (192 tokens) is below where ``choose_path`` takes the fused path at all.
INPUT_GRAD_MAX_RATIO = 0.25

REBUILD = "rebuild"


def choose_input_grad(tokens: int, out_features: int, in_features: int) -> str:
    """``"spectral"`` iff ``tokens < INPUT_GRAD_MAX_RATIO · out``, else ``"rebuild"``: how the fused path's
    backward forms ``dy ΔWᵀ``.

    Example:
        >>> choose_input_grad(512, 3072, 768), choose_input_grad(1024, 3072, 768), choose_input_grad(1024, 768, 768)
        ('spectral', 'rebuild', 'rebuild')
    """
    tokens, out_features, in_features = int(tokens), int(out_features), int(in_features)
    if tokens < 0 or out_features <= 0 or in_features <= 0:
        raise ValueError(f"choose_input_grad: need tokens >= 0 and a positive layer shape, got {tokens}, "
                         f"({out_features}, {in_features})")
    return SPECTRAL if tokens < Fraction(INPUT_GRAD_MAX_RATIO) * out_features else REBUILD
