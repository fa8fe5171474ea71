"""``bridge.delta_weight`` / ``adapted_linear`` against PEFT's layer and against the sum-of-cosines formula."""

from __future__ import annotations

import numpy as np
import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import bridge
from bridge._src.reference import adapted_linear, dense_spectrum


def cosine_sum(spectrum, rows, cols, out_features, in_features, scaling):
    """ΔW[p, q] = scaling / (out·in) · Σ_k c_k cos(2π (r_k p / out + s_k q / in)), in float64, no FFT."""
    p = np.arange(out_features, dtype=np.float64)[:, None, None]
    q = np.arange(in_features, dtype=np.float64)[None, :, None]
    phase = 2 * np.pi * (np.asarray(rows) * p / out_features + np.asarray(cols) * q / in_features)
    return scaling / (out_features * in_features) * (np.asarray(spectrum, dtype=np.float64) * np.cos(phase)).sum(-1)


@pytest.mark.parametrize(
    "out_features,in_features,n,seed,scaling",
    [(12, 20, 30, 777, 150.0), (7, 5, 35, 0, 1.0), (1, 9, 4, -1, 3.5), (16, 1, 16, 2**40, 300.0), (33, 17, 100, 5, 29.0)],
)
def test_delta_weight_equals_cosine_sum(out_features, in_features, n, seed, scaling):
    rng = np.random.default_rng(seed & 0xFFFF)
    spectrum = rng.standard_normal(n)
    indices = bridge.spectral_indices(out_features, in_features, n, seed)
    ours = bridge.delta_weight(spectrum, indices, out_features, in_features, scaling)
    assert ours.dtype == np.float64 and ours.shape == (out_features, in_features)
    expected = cosine_sum(spectrum, indices[0], indices[1], out_features, in_features, scaling)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12 * max(1.0, np.abs(expected).max()))


def test_delta_weight_hand_placed_positions():
    # Positions chosen by hand (including row 0 / column 0 and the Nyquist bins) rather than by the seed.
    rows, cols = np.array([0, 3, 2, 5, 0]), np.array([0, 4, 7, 1, 4])
    spectrum = np.array([1.0, -2.0, 0.5, 3.0, 0.25])
    ours = bridge.delta_weight(spectrum, np.stack([rows, cols]), 6, 8, 2.0)
    np.testing.assert_allclose(ours, cosine_sum(spectrum, rows, cols, 6, 8, 2.0), atol=1e-13)


def test_dense_spectrum_rejects_mismatched_indices():
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        dense_spectrum(np.zeros(3), np.zeros((2, 4), dtype=int), 4, 4)


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer


def _peft_layer(kind, out_features, in_features, n, seed, scaling):
    torch.manual_seed(seed & 0xFFFF)
    base = nn.Linear(in_features, out_features) if kind == "linear" else Conv1D(out_features, in_features)
    if kind == "conv1d":
        nn.init.normal_(base.bias)
    config = peft.FourierFTConfig(
        target_modules=["layer"], n_frequency=n, random_loc_seed=seed, scaling=scaling,
        fan_in_fan_out=kind == "conv1d",
    )
    return peft.get_peft_model(_Holder(base), config).base_model.model.layer


@pytest.mark.parametrize(
    "kind,out_features,in_features,n,seed,scaling",
    [("linear", 24, 40, 200, 777, 150.0), ("linear", 64, 64, 1000, -5, 300.0), ("conv1d", 48, 16, 300, 3, 29.0),
     ("conv1d", 9, 30, 270, 2**33, 1.0)],
)
def test_matches_peft_delta_weight_merge_and_forward(kind, out_features, in_features, n, seed, scaling):
    layer = _peft_layer(kind, out_features, in_features, n, seed, scaling)
    spectrum = layer.fourierft_spectrum["default"].detach().double().numpy()
    ours = bridge.delta_weight(spectrum, bridge.spectral_indices(out_features, in_features, n, seed),
                               out_features, in_features, scaling)
    # PEFT computes in float32; the float64 oracle bounds its rounding error.
    tolerance = 1e-5 * np.abs(ours).max()
    peft_delta = layer.get_delta_weight("default").detach().double().numpy()
    assert peft_delta.shape == (out_features, in_features)  # (out, in) for Conv1D too
    np.testing.assert_allclose(peft_delta, ours, rtol=0, atol=tolerance)

    # Merging adds ΔW in the base layer's storage layout: transposed for Conv1D (fan_in_fan_out).
    base = layer.get_base_layer()
    before = base.weight.detach().double().numpy().copy()
    bias = base.bias.detach().double().numpy().copy()
    x = np.random.default_rng(0).standard_normal((5, in_features)).astype(np.float32)
    weight = before if kind == "linear" else before.T
    expected_y = adapted_linear(x, weight, bias, spectrum, layer.indices["default"].numpy(), scaling)
    with torch.no_grad():
        peft_y = layer(torch.from_numpy(x)).double().numpy()
    np.testing.assert_allclose(peft_y, expected_y, rtol=0, atol=1e-4 * np.abs(expected_y).max())

    layer.merge()
    merged_delta = base.weight.detach().double().numpy() - before
    np.testing.assert_allclose(merged_delta, ours if kind == "linear" else ours.T, rtol=0, atol=tolerance)


def test_adapted_linear_is_base_plus_delta():
    rng = np.random.default_rng(1)
    x, weight, bias = rng.standard_normal((3, 6)), rng.standard_normal((4, 6)), rng.standard_normal(4)
    spectrum, indices = rng.standard_normal(5), bridge.spectral_indices(4, 6, 5, 11)
    delta = cosine_sum(spectrum, indices[0], indices[1], 4, 6, 7.0)
    np.testing.assert_allclose(adapted_linear(x, weight, bias, spectrum, indices, 7.0),
                               x @ weight.T + bias + x @ delta.T, atol=1e-12)
    np.testing.assert_allclose(adapted_linear(x, weight, None, spectrum, indices, 7.0),
                               x @ (weight + delta).T, atol=1e-12)
