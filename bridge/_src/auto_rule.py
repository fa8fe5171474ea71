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
