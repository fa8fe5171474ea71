"""ΔW and the spectral-domain product against bridge's float64 dense formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import bridge
from fourierft_jax._src import LayerSpec
from fourierft_jax._src import delta_kernel as _delta_kernel
from fourierft_jax._src import spectral_delta as _spectral_delta

# One compilation per shape instead of one per eager op keeps these tests fast.
delta_kernel = jax.jit(_delta_kernel, static_argnums=(1, 2))
spectral_delta = jax.jit(_spectral_delta, static_argnums=(2,))
from fftjax_models import rel_err

SHAPES = [  # (in, out, n): odd/even sides, single row/column, full spectrum, Nyquist bins
    (1, 1, 1),
    (6, 4, 5),
    (5, 7, 35),
    (9, 16, 30),
    (12, 20, 240),
    (1, 8, 6),
    (8, 1, 6),
]


def _layer(n_in, n_out, n, seed=777, scaling=37.5):
    return LayerSpec(("blk", "fc"), in_features=n_in, out_features=n_out, n_frequency=n, scaling=scaling, seed=seed)


def _coefficients(n, seed=0):
    return np.random.default_rng(seed).standard_normal(n)


def test_kernel_positions_are_peft_positions_transposed():
    layer = _layer(9, 16, 30)
    torch_rows, torch_cols = bridge.spectral_indices(16, 9, 30, 777)
    np.testing.assert_array_equal(layer.torch_indices, np.stack([torch_rows, torch_cols]))
    np.testing.assert_array_equal(layer.kernel_indices, np.stack([torch_cols, torch_rows]))


@pytest.mark.parametrize("method", ["irfft2", "ifft2"])
@pytest.mark.parametrize("n_in,n_out,n", SHAPES)
def test_delta_kernel_matches_bridge(method, n_in, n_out, n):
    layer, c = _layer(n_in, n_out, n), _coefficients(n)
    reference = bridge.delta_weight(c, layer.torch_indices, n_out, n_in, layer.scaling).T
    got = delta_kernel(jnp.asarray(c, jnp.float32), layer, method)
    assert got.shape == (n_in, n_out) and got.dtype == jnp.float32
    assert rel_err(got, reference) < 1e-5


@pytest.mark.parametrize("n_in,n_out,n", SHAPES)
def test_spectral_delta_matches_dense_product(n_in, n_out, n):
    layer, c = _layer(n_in, n_out, n), _coefficients(n, 1)
    x = np.random.default_rng(2).standard_normal((2, 3, n_in))
    reference = x @ bridge.delta_weight(c, layer.torch_indices, n_out, n_in, layer.scaling).T
    got = spectral_delta(jnp.asarray(x, jnp.float32), jnp.asarray(c, jnp.float32), layer)
    assert got.shape == (2, 3, n_out)
    assert rel_err(got, reference) < 1e-5


@settings(max_examples=8, deadline=None)
@given(
    n_in=st.integers(1, 24),
    n_out=st.integers(1, 24),
    frac=st.floats(0.01, 1.0),
    seed=st.integers(-(2**40), 2**40),
)
def test_random_shapes_and_seeds(n_in, n_out, frac, seed):
    n = max(1, int(frac * n_in * n_out))
    layer, c = _layer(n_in, n_out, n, seed=seed, scaling=3.0), _coefficients(n, 3)
    dense = bridge.delta_weight(c, layer.torch_indices, n_out, n_in, 3.0)
    assert rel_err(delta_kernel(jnp.asarray(c, jnp.float32), layer), dense.T) < 1e-5
    x = np.random.default_rng(4).standard_normal((3, n_in))
    assert rel_err(spectral_delta(jnp.asarray(x, jnp.float32), jnp.asarray(c, jnp.float32), layer), x @ dense.T) < 1e-5


def test_wrong_spectrum_or_input_shape_names_the_layer():
    layer = _layer(6, 4, 5)
    with pytest.raises(ValueError, match="blk.fc"):
        _delta_kernel(jnp.zeros(4), layer)
    with pytest.raises(ValueError, match="blk.fc"):
        _spectral_delta(jnp.zeros((2, 7)), jnp.zeros(5), layer)
