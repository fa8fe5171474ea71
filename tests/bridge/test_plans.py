"""bridge's index plans against the dense complex formulas in numpy float64, and the one auto rule of both frameworks.

Every reference here is built from the definition -- a dense ``(out, in)`` complex spectrum ``S`` and full
``ifft2``/``fft`` -- never from the plans' own output, so a wrong index, partner or sign fails.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from bridge import spectral_indices
from bridge._src import plans
from bridge._src.auto_rule import SPECTRAL_MAX_RATIO, choose_path

SHAPES = [(4, 6), (5, 7), (6, 5), (1, 8), (8, 1), (2, 2), (1, 1), (3, 3)]
SCALING = 37.5


def _cases():
    """(out, in, indices): PEFT positions (some, all), and hand-placed Hermitian self-partners."""
    for out_features, in_features in SHAPES:
        total = out_features * in_features
        for n in sorted({1, max(1, total // 3), total}):
            yield f"{out_features}x{in_features}-n{n}", out_features, in_features, spectral_indices(
                out_features, in_features, n, seed=777
            )
    for out_features, in_features in [(4, 6), (6, 4), (2, 2), (4, 5), (5, 4)]:
        # (0, 0) and the Nyquist row/column where the side is even: each is its own partner (-r, -c).
        rows = [0] + ([out_features // 2] if out_features % 2 == 0 else []) + [1]
        cols = [0] + ([in_features // 2] if in_features % 2 == 0 else []) + [1 % in_features]
        pairs = sorted(set(itertools.product(rows, cols)))
        yield f"self-partners-{out_features}x{in_features}", out_features, in_features, np.array(pairs).T


CASES = list(_cases())
IDS = [case[0] for case in CASES]


def _dense_delta(c, indices, out_features, in_features):
    """``ΔW = scaling · Re(ifft2(S))``, ``(out, in)``, with ``S`` holding ``c`` at the positions."""
    spectrum = np.zeros((out_features, in_features), np.complex128)
    spectrum[indices[0], indices[1]] = c
    return SCALING * np.fft.ifft2(spectrum).real


def _coefficients(n, seed=0):
    return np.random.default_rng(seed).standard_normal(n)


@pytest.mark.parametrize("layout", plans.LAYOUTS)
@pytest.mark.parametrize("name,out_features,in_features,indices", CASES, ids=IDS)
def test_delta_scatter_irfft2_is_the_dense_delta(name, out_features, in_features, indices, layout):
    c = _coefficients(indices.shape[1])
    expected = _dense_delta(c, indices, out_features, in_features)
    if layout == "flax":
        expected = expected.T
    plan = plans.delta_scatter(indices, out_features, in_features, layout)
    assert plan.shape == expected.shape and plan.half_shape == (expected.shape[0], expected.shape[1] // 2 + 1)
    assert (plan.cols <= expected.shape[1] // 2).all()
    half = np.zeros(plan.half_shape, np.complex128)
    np.add.at(half, (plan.rows, plan.cols), 0.5 * c[plan.source])
    got = SCALING * np.fft.irfft2(half, s=plan.shape)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("name,out_features,in_features,indices", CASES, ids=IDS)
def test_forward_plan_gives_x_times_delta_transposed(name, out_features, in_features, indices):
    c = _coefficients(indices.shape[1], 1)
    x = np.random.default_rng(2).standard_normal((3, in_features))
    expected = x @ _dense_delta(c, indices, out_features, in_features).T
    plan = plans.forward_plan(indices, out_features, in_features)
    x_hat = np.fft.rfft(x, axis=-1)

    def scattered(values):  # the output half scatter (adding), then irfft over out
        half = np.zeros((x.shape[0], out_features // 2 + 1), np.complex128)
        np.add.at(half, (slice(None), plan.bins), values)
        return SCALING / in_features * np.fft.irfft(half, n=out_features, axis=-1)

    # Two steps: conj(X̂[col_k]) per coefficient, then the output half scatter.
    picked = x_hat[:, plan.gather]
    picked = np.where(plan.conj_in, picked.conj(), picked) * c
    values = 0.5 * picked[:, plan.bin_source]
    values = np.where(plan.bin_conj, values.conj(), values)
    np.testing.assert_allclose(scattered(values), expected, rtol=0, atol=1e-12 * max(1.0, np.abs(expected).max()))

    # One step per scatter entry (what torch uses): the total conjugation and its sign on the imaginary part.
    picked = x_hat[:, plan.term_gather]
    np.testing.assert_array_equal(plan.term_sign, np.where(plan.term_conj, -1.0, 1.0))
    values = 0.5 * c[plan.bin_source] * (picked.real + 1j * plan.term_sign * picked.imag)
    np.testing.assert_allclose(scattered(values), expected, rtol=0, atol=1e-12 * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("name,out_features,in_features,indices", CASES, ids=IDS)
def test_grad_plan_gives_the_dense_spectrum_gradient(name, out_features, in_features, indices):
    rng = np.random.default_rng(3)
    x, dy = rng.standard_normal((4, in_features)), rng.standard_normal((4, out_features))
    # L = Σ dy · (x ΔWᵀ) is linear in c: ∂L/∂c_k = Σ_{p,q} (dyᵀx)[p, q] · ΔW_k[p, q], ΔW_k the delta of a unit c_k.
    weight_grad = dy.T @ x
    n = indices.shape[1]
    expected = np.array([(weight_grad * _dense_delta(np.eye(n)[k], indices, out_features, in_features)).sum()
                         for k in range(n)])
    plan = plans.grad_plan(indices, out_features, in_features)
    x_hat = np.fft.rfft(x, axis=-1)[:, plan.in_index]
    y_hat = np.fft.rfft(dy, axis=-1)[:, plan.out_index]
    got = SCALING / (out_features * in_features) * (
        (y_hat.real * x_hat.real).sum(0) - plan.sign * (y_hat.imag * x_hat.imag).sum(0)
    )
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("length", range(1, 10))
def test_fold_reads_every_fft_bin_from_the_rfft(length):
    v = np.random.default_rng(length).standard_normal(length)
    positions = np.arange(length)
    plan = plans.fold(positions, length)
    picked = np.fft.rfft(v)[plan.index]
    np.testing.assert_allclose(np.where(plan.conj, picked.conj(), picked), np.fft.fft(v), atol=1e-12)
    np.testing.assert_allclose(picked.real + 1j * plan.sign * picked.imag, np.fft.fft(v), atol=1e-12)
    assert (plan.index <= length // 2).all()


@pytest.mark.parametrize("length", range(1, 10))
def test_half_scatter_irfft_is_the_real_part_of_ifft(length):
    rng = np.random.default_rng(length)
    positions = np.concatenate([np.arange(length), rng.integers(0, length, 7)])  # every bin, and repeats
    z = rng.standard_normal(positions.shape[0]) + 1j * rng.standard_normal(positions.shape[0])
    full = np.zeros(length, np.complex128)
    np.add.at(full, positions, z)
    plan = plans.half_scatter(positions, length)
    assert plan.half_length == length // 2 + 1 and (plan.bins < plan.half_length).all()
    values = 0.5 * z[plan.source]
    half = np.zeros(plan.half_length, np.complex128)
    np.add.at(half, plan.bins, np.where(plan.conj, values.conj(), values))
    np.testing.assert_allclose(np.fft.irfft(half, n=length), np.fft.ifft(full).real, atol=1e-12)


def test_layer_plans_are_cached_shared_and_read_only():
    first = plans.layer_plans(6, 5, 7, 777)
    assert plans.layer_plans(np.int64(6), 5, n_frequency=7, seed=777, layout="torch") is first
    assert plans.layer_plans(6, 5, 7, 777, "flax") is not first
    np.testing.assert_array_equal(first.indices, spectral_indices(6, 5, 7, 777))
    assert first.n_frequency == 7 and first.delta.shape == (6, 5)
    assert plans.layer_plans(6, 5, 7, 777, "flax").delta.shape == (5, 6)
    arrays = [first.indices, first.delta.rows, first.delta.cols, first.delta.source, first.forward.gather,
              first.forward.conj_in, first.forward.bins, first.forward.term_sign, first.grad.sign,
              first.out_fold.index, first.in_scatter.bins]
    for array in arrays:
        with pytest.raises(ValueError):
            array[...] = 0


def test_layer_plans_axis_helpers_are_the_per_axis_plans():
    layer = plans.layer_plans(6, 10, 20, 3)
    rows, cols = layer.indices
    np.testing.assert_array_equal(layer.out_scatter.bins, plans.half_scatter(rows, 6).bins)
    np.testing.assert_array_equal(layer.in_scatter.source, plans.half_scatter(cols, 10).source)
    np.testing.assert_array_equal(layer.out_fold.index, plans.fold(rows, 6).index)
    np.testing.assert_array_equal(layer.in_fold.conj, plans.fold(cols, 10).conj)


def test_plans_reject_bad_input():
    with pytest.raises(ValueError, match="layout"):
        plans.layer_plans(4, 4, 2, 0, "jax")
    with pytest.raises(ValueError, match=r"\(2, n\)"):
        plans.build_plans(np.zeros((3, 2), np.int64), 4, 4)
    with pytest.raises(ValueError, match="column"):
        plans.delta_scatter(np.array([[0], [4]]), 4, 4)
    with pytest.raises(ValueError, match="integer"):
        plans.fold(np.array([0.5]), 4)


# -- the auto rule ---------------------------------------------------------------------------------------------


def _expected_path(tokens, out_features, in_features):
    # The documented rule, in exact integers: spectral iff tokens·(in+out) < 0.5·in·out.
    assert SPECTRAL_MAX_RATIO == 0.5
    return "spectral" if 2 * tokens * (in_features + out_features) < in_features * out_features else "fused"


def _boundary_tokens(out_features, in_features):
    exact = SPECTRAL_MAX_RATIO * in_features * out_features / (in_features + out_features)
    base = int(exact)
    return sorted({max(0, base + d) for d in (-1, 0, 1, 2)})


AUTO_SHAPES = [(768, 768), (3072, 768), (768, 3072), (4, 4), (3, 6), (6, 3), (1, 1), (20, 12), (16, 20), (4096, 4096)]


def test_both_frameworks_make_the_same_auto_choice():
    from fourierft_jax._src.modes import choose_path as jax_choose_path
    from fourierft_jax._src.layer import LayerSpec
    from fourierft_torch._layer import choose_mode

    checked_boundary = 0
    for out_features, in_features in AUTO_SHAPES:
        layer = LayerSpec(("q",), in_features=in_features, out_features=out_features, n_frequency=1, scaling=1.0,
                          seed=0)
        tokens_grid = sorted(set(_boundary_tokens(out_features, in_features) + [1, 2, 7, 16, 128, 1024, 8192]))
        for tokens in tokens_grid:
            expected = _expected_path(tokens, out_features, in_features)
            assert choose_path(tokens, out_features, in_features) == expected, (tokens, out_features, in_features)
            assert jax_choose_path(tokens, layer) == expected, (tokens, out_features, in_features)
            assert choose_mode(tokens, out_features, in_features) == expected, (tokens, out_features, in_features)
            checked_boundary += 2 * tokens * (in_features + out_features) == in_features * out_features
    assert checked_boundary >= 3  # (768, 768) at 192 tokens, (4, 4) at 1, (3, 6) and (6, 3) at 1


def test_auto_rule_at_the_exact_boundary_is_fused():
    # 192 · (768 + 768) = 0.5 · 768 · 768 exactly.
    assert choose_path(191, 768, 768) == "spectral"
    assert choose_path(192, 768, 768) == "fused"
    from fourierft_torch._layer import SPECTRAL_RATIO

    assert SPECTRAL_RATIO == SPECTRAL_MAX_RATIO
