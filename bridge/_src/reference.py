"""Reference math in numpy float64: the oracle that the JAX and torch implementations are tested against.

Deliberately the plainest form of the method (a dense complex spectrum and a full ``ifft2``), not a fast one.
"""

from __future__ import annotations

import numpy as np


def dense_spectrum(spectrum: np.ndarray, indices: np.ndarray, out_features: int, in_features: int) -> np.ndarray:
    """The ``(out, in)`` complex128 matrix ``S`` holding ``spectrum[k]`` at ``(indices[0, k], indices[1, k])``.

    Example:
        >>> dense_spectrum(np.array([2.0]), np.array([[1], [0]]), 2, 2).real.tolist()
        [[0.0, 0.0], [2.0, 0.0]]
    """
    spectrum = np.asarray(spectrum, dtype=np.float64)
    indices = np.asarray(indices)
    if indices.shape != (2, spectrum.shape[0]):
        raise ValueError(f"indices must have shape (2, {spectrum.shape[0]}), got {indices.shape}")
    matrix = np.zeros((out_features, in_features), dtype=np.complex128)
    matrix[indices[0], indices[1]] = spectrum
    return matrix


def delta_weight(
    spectrum: np.ndarray, indices: np.ndarray, out_features: int, in_features: int, scaling: float
) -> np.ndarray:
    """``ΔW = scaling · Re(ifft2(S))`` in float64, torch layout ``(out, in)``.

    For a Flax ``Dense`` kernel ``(in, out)`` take the transpose. For transformers' ``Conv1D`` the merged delta is
    the transpose too (``fan_in_fan_out``).

    Example:
        >>> dw = delta_weight(np.array([1.0]), np.array([[0], [0]]), 2, 2, scaling=4.0)
        >>> dw.tolist()  # a DC coefficient spreads evenly: 4 * 1 / (2 * 2)
        [[1.0, 1.0], [1.0, 1.0]]
    """
    matrix = dense_spectrum(spectrum, indices, out_features, in_features)
    return float(scaling) * np.fft.ifft2(matrix).real


def adapted_linear(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    spectrum: np.ndarray,
    indices: np.ndarray,
    scaling: float,
) -> np.ndarray:
    """``y = x Wᵀ + b + x ΔWᵀ`` in float64, with ``weight`` in torch layout ``(out, in)``.

    Example:
        >>> adapted_linear(np.ones((1, 2)), np.zeros((2, 2)), None, np.array([1.0]), np.array([[0], [0]]), 4.0)
        array([[2., 2.]])
    """
    weight = np.asarray(weight, dtype=np.float64)
    out_features, in_features = weight.shape
    delta = delta_weight(spectrum, indices, out_features, in_features, scaling)
    y = np.asarray(x, dtype=np.float64) @ (weight + delta).T
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64)
    return y
