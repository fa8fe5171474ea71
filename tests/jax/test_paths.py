"""Adapted outputs: merge path, spectral (module-transform) path and NNX path vs bridge's float64 formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bridge
import fourierft_jax
import fourierft_jax._src
from fftjax_models import D_IN, MLP, init_mlp, nnx_twin, numpy_mlp, reference_deltas, rel_err

TARGETS = ["fc1", "fc2", "head"]


def _adapter(params, **overrides):
    fields = dict(n_frequency=37, scaling=25.0, target_modules=TARGETS)
    fields.update(overrides)
    return fourierft_jax.apply(params, fourierft_jax.FourierFTConfig(**fields), key=jax.random.key(7))


@pytest.fixture(scope="module")
def setup():
    params = init_mlp()
    x = jax.random.normal(jax.random.key(3), (5, D_IN))
    return params, x, _adapter(params)


def test_targets_and_state(setup):
    params, _, adapter = setup
    assert adapter.layers() == ["encoder.fc1", "encoder.fc2", "head"]
    spectra = adapter.trainable["default"]["spectra"]
    assert {k: v.shape for k, v in spectra.items()} == {k: (37,) for k in adapter.layers()}
    assert all(v.dtype == jnp.float32 for v in spectra.values())
    # N(0, 1) draws, different per layer
    assert not np.allclose(spectra["encoder.fc1"], spectra["encoder.fc2"])
    assert fourierft_jax.FourierFTConfig is bridge.FourierFTConfig


@pytest.mark.parametrize("mode", ["merge", "spectral"])
def test_outputs_match_float64_reference(setup, mode):
    params, x, adapter = setup
    forward = jax.jit(adapter.make_apply(MLP().apply, mode=mode))
    got = forward(adapter.trainable, params, x)
    reference = numpy_mlp(params, x, reference_deltas(adapter))
    base = numpy_mlp(params, x)
    assert rel_err(got, reference) < 1e-5
    assert rel_err(base, reference) > 1e-2  # the adapter really changes the output


def test_merged_kernels_match_bridge(setup):
    params, _, adapter = setup
    merged = adapter.merge_and_unload(params)
    deltas = reference_deltas(adapter)
    kernel = merged["params"]["encoder"]["fc2"]["kernel"]
    expected = np.asarray(params["params"]["encoder"]["fc2"]["kernel"], np.float64) + deltas["encoder.fc2"].T
    assert rel_err(kernel, expected) < 1e-5
    # untouched leaves are the very same arrays
    assert merged["params"]["encoder"]["fc2"]["bias"] is params["params"]["encoder"]["fc2"]["bias"]


def test_merge_spectral_and_nnx_paths_agree(setup):
    params, x, adapter = setup
    merged_out = MLP().apply(adapter.merge_and_unload(params), x)
    spectral_out = adapter.make_apply(MLP().apply, mode="spectral")(adapter.trainable, params, x)
    model = nnx_twin(params)
    assert rel_err(model(x), MLP().apply(params, x)) < 1e-6  # the twin really is a twin
    config = fourierft_jax.FourierFTConfig(n_frequency=37, scaling=25.0, target_modules=TARGETS)
    fourierft_jax.nnx.apply(model, config, rngs=nnx.Rngs(0))
    for name, spectrum in adapter.trainable["default"]["spectra"].items():
        layer = model
        for key in name.split("."):
            layer = getattr(layer, key)
        layer.spectrum[...] = spectrum
    nnx_out = model(x)
    assert rel_err(spectral_out, merged_out) < 1e-5
    assert rel_err(nnx_out, merged_out) < 1e-5
    for layer in (model.encoder.fc1, model.encoder.fc2, model.head):
        layer.mode = "merge"
    assert rel_err(model(x), merged_out) < 1e-5


def test_bias_and_modules_to_save(setup):
    params, x, _ = setup
    adapter = _adapter(params, target_modules=["fc1", "fc2"], bias="all", modules_to_save=["head"])
    state = adapter.trainable["default"]
    assert sorted(state["bias"]) == ["encoder.fc1", "encoder.fc2"]  # head's bias travels with the saved module
    assert list(state["modules_to_save"]) == ["head"]
    rng = np.random.default_rng(0)
    state["bias"]["encoder.fc1"] = jnp.asarray(rng.standard_normal(state["bias"]["encoder.fc1"].shape), jnp.float32)
    state["modules_to_save"]["head"] = jax.tree.map(lambda a: a * 2.0, state["modules_to_save"]["head"])
    patched = jax.tree.map(np.asarray, params)
    patched["params"]["head"] = jax.tree.map(np.asarray, state["modules_to_save"]["head"])
    reference = numpy_mlp(patched, x, reference_deltas(adapter), biases={"encoder.fc1": state["bias"]["encoder.fc1"]})
    for mode in ("merge", "spectral"):
        got = adapter.make_apply(MLP().apply, mode=mode)(adapter.trainable, params, x)
        assert rel_err(got, reference) < 1e-5, mode


def test_bfloat16_kernels(setup):
    params32, x, adapter = setup
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params32)
    merged = adapter.merge_and_unload(params)
    kernel = merged["params"]["encoder"]["fc1"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    # ΔW is built in float32 and cast at the add
    delta = fourierft_jax._src.delta_kernel(adapter.trainable["default"]["spectra"]["encoder.fc1"],
                                       adapter.specs["default"].layers[0])
    expected = params["params"]["encoder"]["fc1"]["kernel"] + delta.astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(kernel, np.float32), np.asarray(expected, np.float32))
    spectral = adapter.make_apply(MLP().apply)(adapter.trainable, params, x.astype(jnp.bfloat16))
    assert spectral.dtype == jnp.bfloat16
    reference = numpy_mlp(params, x.astype(jnp.bfloat16), reference_deltas(adapter))
    assert rel_err(spectral, reference) < 5e-2
    assert rel_err(MLP().apply(merged, x.astype(jnp.bfloat16)), reference) < 5e-2


def test_init_weights_true_is_the_base_model(setup):
    params, x, _ = setup
    adapter = _adapter(params, init_weights=True)
    got = adapter.make_apply(MLP().apply)(adapter.trainable, params, x)
    np.testing.assert_allclose(got, MLP().apply(params, x), rtol=1e-6, atol=1e-6)


def test_ifft2_and_irfft2_merges_agree(setup):
    params, _, adapter = setup
    a = adapter.merge_and_unload(params, method="irfft2")
    b = adapter.merge_and_unload(params, method="ifft2")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert rel_err(x, y) < 1e-6
