"""``bridge.spectral_indices`` against the two oracles: ``torch.randperm`` and the indices PEFT stores on a layer."""

from __future__ import annotations

import numpy as np
import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import bridge
from bridge._src import positions
from bridge._src.positions import randperm_prefix

THRESHOLD = 0xFFFFFFFF // 20  # torch's switch to the inside-out shuffle, from torch's randperm kernel


def torch_positions(out_features: int, in_features: int, n: int, seed: int) -> np.ndarray:
    """PEFT's rule written with torch itself (the formula of ``FourierFTLayer.update_layer``)."""
    flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([flat // in_features, flat % in_features]).numpy()


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer


def peft_positions(kind: str, out_features: int, in_features: int, n: int, seed: int) -> np.ndarray:
    """``layer.indices["default"]`` of a real PEFT FourierFT layer wrapping an ``(out, in)`` Linear or Conv1D."""
    if kind == "linear":
        layer = nn.utils.skip_init(nn.Linear, in_features, out_features, bias=False)
    else:
        layer = Conv1D(out_features, in_features)  # weight stored (in, out); PEFT reads `in, out = weight.shape`
        assert tuple(layer.weight.shape) == (in_features, out_features)
    config = peft.FourierFTConfig(
        target_modules=["layer"], n_frequency=n, random_loc_seed=seed, init_weights=True,
        fan_in_fan_out=kind == "conv1d",
    )
    model = peft.get_peft_model(_Holder(layer), config)
    adapted = model.base_model.model.layer
    assert (adapted.out_features, adapted.in_features) == (out_features, in_features)
    return adapted.indices["default"].numpy()


# (kind, out, in, n, seed): small and real shapes, both shuffle paths of the prefix code (dense: out*in <= 4n,
# sparse otherwise), n == out*in, n == out*in - 1, seed 0, negative seeds, seeds >= 2**32 and near 2**64.
CASES = [
    ("linear", 8, 8, 64, 777),
    ("linear", 4, 3, 12, 0),
    ("linear", 1, 1, 1, 777),
    ("linear", 1, 1000, 1000, 42),
    ("linear", 1000, 1, 999, 42),
    ("linear", 768, 768, 1000, 777),
    ("linear", 3072, 768, 1000, 777),
    ("linear", 2048, 1536, 1000, 777),
    ("linear", 1024, 4096, 20000, 123),
    ("linear", 100, 100, 2500, 5),
    ("linear", 100, 100, 2499, 5),
    ("linear", 16, 64, 100, -1),
    ("linear", 64, 16, 100, -777),
    ("linear", 33, 17, 50, 2**32),
    ("linear", 17, 33, 50, 2**32 + 777),
    ("linear", 128, 128, 5000, 2**63 + 5),
    ("linear", 50, 40, 1999, -(2**63)),
    ("linear", 50, 40, 2000, 2**64 - 1),
    ("conv1d", 2304, 768, 1000, 777),
    ("conv1d", 768, 3072, 1000, 0),
    ("conv1d", 32, 16, 512, -1),
    ("conv1d", 96, 32, 3072, 2**40),
    ("conv1d", 7, 5, 3, 2**64 - 1),
    ("conv1d", 5, 7, 35, -12345),
]


@pytest.mark.parametrize("kind,out_features,in_features,n,seed", CASES)
def test_matches_torch_randperm_and_peft(kind, out_features, in_features, n, seed):
    ours = bridge.spectral_indices(out_features, in_features, n, seed)
    assert ours.dtype == np.int64 and ours.shape == (2, n)
    np.testing.assert_array_equal(ours, torch_positions(out_features, in_features, n, seed))
    np.testing.assert_array_equal(ours, peft_positions(kind, out_features, in_features, n, seed))


@pytest.mark.slow
def test_SLOW_inside_out_branch_matches_torch_randperm():
    """The one case at torch's threshold (214,748,364 = 0xFFFFFFFF // 20): ~40 s and ~1.7 GB for torch itself."""
    total, n, seed = THRESHOLD, 1000, 777
    assert positions.INSIDE_OUT_THRESHOLD == THRESHOLD
    expected = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].numpy()
    # A 4 x 53,687,091 layer: out*in is exactly the threshold.
    rows, cols = bridge.spectral_indices(4, total // 4, n, seed)
    np.testing.assert_array_equal(rows * (total // 4) + cols, expected)


def _inside_out_reference(total: int, seed: int) -> np.ndarray:
    """torch's inside-out randperm for n >= threshold, as a plain loop over the MT19937 stream (docs/positions.md)."""
    key = np.random.RandomState(seed & 0xFFFFFFFF).get_state()[1]
    generator = np.random.MT19937()
    generator.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": 624}}
    raw = [int(v) for v in generator.random_raw(2 * total)]
    perm = [0] * total
    for i in range(total):
        z = ((raw[2 * i] << 32) | raw[2 * i + 1]) % (i + 1)
        perm[i] = perm[z]
        perm[z] = i
    return np.asarray(perm)


@pytest.mark.parametrize("total,count,seed,chunk", [(1000, 10, 777, 64), (777, 777, -3, 100), (5000, 1, 2**33, 4096),
                                                    (300, 150, 0, 7)])
def test_inside_out_prefix_small(monkeypatch, total, count, seed, chunk):
    # Lower the threshold (and the chunk) so the streamed branch runs on small sizes, against a full plain loop.
    monkeypatch.setattr(positions, "INSIDE_OUT_THRESHOLD", 1)
    monkeypatch.setattr(positions, "_CHUNK", chunk)
    np.testing.assert_array_equal(randperm_prefix(total, count, seed), _inside_out_reference(total, seed)[:count])


@pytest.mark.parametrize(
    "args,match",
    [((0, 4, 1, 0), "shape"), ((4, -1, 1, 0), "shape"), ((4, 4, 0, 0), "n_frequency"), ((4, 4, 17, 0), "1..16"),
     ((3, 5, -2, 0), "3x5"), ((4, 4, 2, 2**64), "64 bits"), ((4, 4, 2, -(2**63) - 1), "64 bits")],
)
def test_invalid_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        bridge.spectral_indices(*args)


# --- properties ------------------------------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 48), st.integers(1, 48))
seeds = st.integers(-(2**63), 2**64 - 1)


@st.composite
def layer_cases(draw):
    out_features, in_features = draw(shapes)
    n = draw(st.integers(1, out_features * in_features))
    return out_features, in_features, n, draw(seeds)


@settings(max_examples=60, deadline=None, database=None)
@given(layer_cases())
def test_in_range_distinct_deterministic(case):
    out_features, in_features, n, seed = case
    rows, cols = bridge.spectral_indices(out_features, in_features, n, seed)
    assert ((0 <= rows) & (rows < out_features)).all() and ((0 <= cols) & (cols < in_features)).all()
    assert len(set(zip(rows.tolist(), cols.tolist()))) == n
    np.testing.assert_array_equal(bridge.spectral_indices(out_features, in_features, n, seed), np.stack([rows, cols]))


@settings(max_examples=60, deadline=None, database=None)
@given(layer_cases(), st.data())
def test_prefix_property_and_flat_reconstruction(case, data):
    out_features, in_features, n, seed = case
    more = data.draw(st.integers(n, out_features * in_features))
    short = bridge.spectral_indices(out_features, in_features, n, seed)
    long = bridge.spectral_indices(out_features, in_features, more, seed)
    np.testing.assert_array_equal(long[:, :n], short)
    flat = long[0] * in_features + long[1]
    np.testing.assert_array_equal(flat, randperm_prefix(out_features * in_features, more, seed))


@settings(max_examples=40, deadline=None, database=None)
@given(layer_cases())
def test_property_matches_torch(case):
    np.testing.assert_array_equal(bridge.spectral_indices(*case), torch_positions(*case))
