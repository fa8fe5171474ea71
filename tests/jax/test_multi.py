"""Several named adapters: add, set (one or several), disable, delete, merge selected ones, unload."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fourierft_jax
from fftjax_models import D_IN, MLP, init_mlp, numpy_mlp, reference_deltas, rel_err


@pytest.fixture()
def setup():
    params = init_mlp()
    a = fourierft_jax.FourierFTConfig(n_frequency=11, scaling=30.0, target_modules=["fc1", "fc2"])
    b = fourierft_jax.FourierFTConfig(n_frequency=19, scaling=15.0, random_loc_seed=5, target_modules=["fc2", "head"])
    adapter = fourierft_jax.apply(params, a, key=jax.random.key(0), adapter_name="a")
    adapter.add_adapter("b", b, params, key=jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (4, D_IN))
    return params, adapter, x


def _summed(*deltas):
    out = {}
    for delta in deltas:
        for name, dw in delta.items():
            out[name] = out.get(name, 0) + dw
    return out


def _run(adapter, params, x, mode):
    return adapter.make_apply(MLP().apply, mode=mode)(adapter.trainable, params, x)


@pytest.mark.parametrize("mode", ["spectral", "merge"])
def test_active_adapters_select_the_output(setup, mode):
    params, adapter, x = setup
    da, db = reference_deltas(adapter, "a"), reference_deltas(adapter, "b")
    assert adapter.active_adapters == ["a"]
    assert rel_err(_run(adapter, params, x, mode), numpy_mlp(params, x, da)) < 1e-5
    adapter.set_adapter("b")
    assert list(adapter.trainable) == ["b"]
    assert rel_err(_run(adapter, params, x, mode), numpy_mlp(params, x, db)) < 1e-5
    adapter.set_adapter(["a", "b"])
    assert rel_err(_run(adapter, params, x, mode), numpy_mlp(params, x, _summed(da, db))) < 1e-5
    with adapter.disable_adapter():
        np.testing.assert_array_equal(_run(adapter, params, x, mode), MLP().apply(params, x))
    adapter.disable_adapters()
    np.testing.assert_array_equal(_run(adapter, params, x, mode), MLP().apply(params, x))
    adapter.enable_adapters()
    assert rel_err(_run(adapter, params, x, mode), numpy_mlp(params, x, _summed(da, db))) < 1e-5


def test_merge_selected_delete_and_unload(setup):
    params, adapter, x = setup
    da, db = reference_deltas(adapter, "a"), reference_deltas(adapter, "b")
    merged_b = adapter.merge_and_unload(params, adapter_names=["b"])
    assert rel_err(MLP().apply(merged_b, x), numpy_mlp(params, x, db)) < 1e-5
    merged_ab = adapter.merge_and_unload(params, adapter_names=["a", "b"])
    assert rel_err(MLP().apply(merged_ab, x), numpy_mlp(params, x, _summed(da, db))) < 1e-5
    assert adapter.unload(params)["params"]["encoder"]["fc1"]["kernel"] is params["params"]["encoder"]["fc1"]["kernel"]
    adapter.delete_adapter("a")
    assert adapter.active_adapters == ["b"] and list(adapter.state) == ["b"]
    with pytest.raises(KeyError, match="'a'"):
        adapter.set_adapter("a")
    with pytest.raises(ValueError, match="already exists"):
        adapter.add_adapter("b", adapter.configs["b"], params, key=jax.random.key(0))


def test_safe_merge_refuses_non_finite(setup):
    params, adapter, _ = setup
    state = adapter.state["a"]
    state["spectra"]["encoder.fc1"] = state["spectra"]["encoder.fc1"].at[0].set(jnp.nan)
    with pytest.raises(ValueError, match="encoder.fc1"):
        adapter.merge_and_unload(params, safe_merge=True)


def test_only_one_adapter_may_train_biases(setup):
    params, adapter, _ = setup
    adapter.add_adapter("c", fourierft_jax.FourierFTConfig(n_frequency=4, target_modules=["fc1"], bias="all"), params,
                        key=jax.random.key(0))
    with pytest.raises(ValueError, match="only one adapter"):
        adapter.add_adapter("d", fourierft_jax.FourierFTConfig(n_frequency=4, target_modules=["fc1"], bias="all"),
                            params, key=jax.random.key(0))
    assert "d" not in adapter.state  # nothing half-added
