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
