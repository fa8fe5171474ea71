"""``sharded_delta`` against the float64 dense formula (``bridge.delta_weight``), value and spectrum gradient."""

import bridge
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from mesh_models import make_mesh

import fourierft_jax
import fourierft_jax._src
from fourierft_jax._src import LayerSpec
from fourierft_jax._src.sharding import _MAX_PHASE_LENGTH, _delta_fn, _phase


def reference(spectrum, layer):
    """float64 ΔW in the param layout: one dense delta per adapted stack row, zeros elsewhere."""
    def one(c):
        return bridge.delta_weight(np.asarray(c, np.float64), layer.torch_indices, layer.out_features,
                                   layer.in_features, layer.scaling).T
    if not layer.stacked:
        return one(spectrum)
    full = np.zeros((layer.stack_size,) + layer.kernel_shape)
    full[list(layer.stack_ids)] = [one(row) for row in spectrum]
    return np.moveaxis(full, 0, layer.stack_axis)


FLAT = LayerSpec(("q",), in_features=16, out_features=32, n_frequency=20, scaling=1.5, seed=777)
CASES = [
    ("8", FLAT, P("data")),
    ("8", FLAT, P(None, "data")),
    ("4x2", FLAT, P("data", "model")),
    ("4x2", FLAT, P(None, ("model", "data"))),
    ("2x4", FLAT, P("model", "data")),
    ("2x4", FLAT, P(None, "model")),
    ("2x4", FLAT, P()),
]
for axis in (0, 1):
    stack = LayerSpec(("layers", "fc"), 16, 8, 10, 0.7, 3, stack_axis=axis, stack_size=4, stack_ids=(0, 2, 3),
                      stack_depth=1)
    specs = [P(None, None, "model"), P(*(["data"] if axis == 0 else [None, "data"]), ), P("model", "data")]
    CASES += [("2x4", stack, spec) for spec in specs]


@pytest.mark.parametrize("mesh_name,layer,spec", CASES, ids=lambda v: str(v) if not isinstance(v, LayerSpec)
                         else f"{'stack' + str(v.stack_axis) if v.stacked else 'flat'}")
def test_sharded_delta_value_and_gradient(mesh_name, layer, spec):
    sharding = NamedSharding(make_mesh(mesh_name), spec)
    rng = np.random.default_rng(0)
    spectrum = rng.standard_normal(layer.spectrum_shape).astype(np.float32)
    cotangent = rng.standard_normal(layer.param_shape).astype(np.float32)

    delta, pull = jax.vjp(lambda c: fourierft_jax._src.sharded_delta(c, layer, sharding), jnp.asarray(spectrum))
    want = reference(spectrum, layer)
    assert delta.shape == layer.param_shape and delta.sharding.is_equivalent_to(sharding, len(layer.param_shape))
    np.testing.assert_allclose(np.asarray(delta), want, rtol=0, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(np.asarray(delta), np.asarray(fourierft_jax._src.delta_kernel(spectrum, layer)),
                               rtol=0, atol=1e-5 * np.abs(want).max())

    # ΔW is linear in the spectrum: ∂<G, ΔW>/∂c_k = <G, ΔW(e_k)>.
    basis = np.eye(int(np.prod(layer.spectrum_shape))).reshape((-1,) + layer.spectrum_shape)
    grad_want = np.array([np.sum(cotangent * reference(e, layer)) for e in basis]).reshape(layer.spectrum_shape)
    (grad,) = pull(jnp.asarray(cotangent))
    np.testing.assert_allclose(np.asarray(grad), grad_want, rtol=0, atol=1e-5 * np.abs(grad_want).max())


def test_sharded_delta_checks_the_spectrum_shape():
    with pytest.raises(ValueError, match="'q'"):
        fourierft_jax._src.sharded_delta(jnp.zeros(3), FLAT, NamedSharding(make_mesh("8"), P("data")))


# -- long axes: the phases p·i mod N past 2^20, where a plain uint32 product p·i wraps -----------------------------

@pytest.mark.parametrize("length", [6, 2**20 + 8, 2**24 + 3, 3 * 2**28 + 1, _MAX_PHASE_LENGTH])
def test_phase_is_exact_on_long_axes(length):
    rng = np.random.default_rng(length)
    positions = np.concatenate([[0, 1, length - 1], rng.integers(0, length, 13)])
    count = min(length, 64)
    start = length - count  # the far end, where p·i is largest
    cos, sin = _phase(positions, length, jnp.asarray(start, jnp.int32), count)
    rows = np.arange(start, start + count, dtype=np.int64)[:, None]
    angle = 2 * np.pi * ((positions.astype(np.int64)[None, :] * rows) % length) / length  # exact in int64
    np.testing.assert_allclose(np.asarray(cos), np.cos(angle), rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.asarray(sin), np.sin(angle), rtol=0, atol=2e-6)


def test_phase_refuses_a_length_it_cannot_reduce_exactly():
    layer = LayerSpec(("huge",), in_features=2, out_features=_MAX_PHASE_LENGTH + 2, n_frequency=1, scaling=1.0,
                      seed=0)
    with pytest.raises(ValueError, match=r"'huge'.*out_features=%d" % (_MAX_PHASE_LENGTH + 2)):
        _delta_fn(layer, NamedSharding(make_mesh("8"), P(None, "data")))


# 2^21 + 8 rows: past 2^20 a plain uint32 p·i wraps for most positions (the old bound of _phase). Thin (4 wide)
# so that the float64 references stay around a second.
LONG = LayerSpec(("tall",), in_features=4, out_features=2**21 + 8, n_frequency=16, scaling=2.5, seed=11)


@pytest.fixture(scope="module")
def long_case():
    """Spectrum, cotangent, float64 ΔW and float64 spectrum gradient of ``LONG`` (shared by both meshes)."""
    rng = np.random.default_rng(5)
    spectrum = rng.standard_normal(LONG.spectrum_shape).astype(np.float32)
    cotangent = rng.standard_normal(LONG.param_shape).astype(np.float32)
    rows, cols = LONG.torch_indices  # (out, in) positions
    # ∂<G, ΔW>/∂c_k = scaling/(N_out·N_in) · Re Σ G^T[r, c]·e^{+2πi(a_k r/N_out + b_k c/N_in)}
    #              = scaling/(N_out·N_in) · Re fft2(G^T)[a_k, b_k]   (G real: the sign of the exponent drops out).
    grad = LONG.scaling / (LONG.out_features * LONG.in_features) * np.fft.fft2(
        cotangent.T.astype(np.float64))[rows, cols].real
    return spectrum, cotangent, reference(spectrum, LONG), grad


@pytest.mark.parametrize("mesh_name,spec", [("8", P(None, "data")), ("4x2", P("data", "model"))],
                         ids=["phase-on-long-axis", "fft-on-long-sharded-axis"])
def test_sharded_delta_on_a_long_axis(mesh_name, spec, long_case):
    """A thin ``4 × (2^21 + 8)`` kernel: ΔW and its spectrum gradient against numpy float64 FFTs."""
    spectrum, cotangent, want, grad_want = long_case
    assert (LONG.torch_indices[0] >= 2**20).sum() >= LONG.n_frequency // 3  # positions far down the long axis
    sharding = NamedSharding(make_mesh(mesh_name), spec)
    delta, pull = jax.vjp(lambda c: fourierft_jax._src.sharded_delta(c, LONG, sharding), jnp.asarray(spectrum))
    np.testing.assert_allclose(np.asarray(delta), want, rtol=0, atol=1e-5 * np.abs(want).max())
    (grad,) = pull(jnp.asarray(cotangent))
    np.testing.assert_allclose(np.asarray(grad), grad_want, rtol=0, atol=1e-5 * np.abs(grad_want).max())
