"""A forward built by ``make_apply`` follows the adapter state it is given at each call (issue 14, item 1).

The documented pattern, ``with adapter.disable_adapter(): forward(adapter.trainable, params, x)``, must give
the base model's outputs (the base function on the original parameters), and after ``set_adapter`` the new
adapter's outputs (the dense formula ``W + ΔW`` in float64 numpy, ΔW from its own ``ifft2``) -- with the
forward built before the change, eager and under ``jax.jit``; where it cannot, it raises a clear error.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import bridge
import fourierft_jax
from fftjax_models import D_IN, MLP, init_mlp, numpy_mlp, rel_err

CONFIGS = {
    "a": dict(n_frequency=11, scaling=30.0, target_modules=["fc1", "fc2"]),
    "b": dict(n_frequency=19, scaling=15.0, random_loc_seed=5, target_modules=["fc2", "head"]),
}


@pytest.fixture()
def setup():
    params = init_mlp()
    adapter = fourierft_jax.apply(params, fourierft_jax.FourierFTConfig(**CONFIGS["a"]), key=jax.random.key(0),
                                  adapter_name="a")
    adapter.add_adapter("b", fourierft_jax.FourierFTConfig(**CONFIGS["b"]), params, key=jax.random.key(1))
    x = np.asarray(jax.random.normal(jax.random.key(2), (4, D_IN)))
    return params, adapter, x


def dense_deltas(adapter, name, config=None):
    """Torch-layout ΔW of each layer: the PEFT formula, ``scaling · Re(ifft2(dense spectrum))``, in float64."""
    config = config or CONFIGS[name]
    out = {}
    for layer, spectrum in adapter.state[name]["spectra"].items():
        kernel = _kernel(init_mlp(), layer)
        rows, cols = kernel.shape[1], kernel.shape[0]  # torch (out, in); flax stores (in, out)
        dense = np.zeros((rows, cols), np.complex128)
        positions = bridge.spectral_indices(rows, cols, config["n_frequency"], config.get("random_loc_seed", 777))
        dense[positions[0], positions[1]] = np.asarray(spectrum, np.float64)
        out[layer] = np.fft.ifft2(dense).real * config["scaling"]
    return out


def _kernel(params, dotted):
    node = params["params"]
    for part in dotted.split("."):
        node = node[part]
    return np.asarray(node["kernel"])


def _summed(*deltas):
    out = {}
    for delta in deltas:
        for layer, dw in delta.items():
            out[layer] = out.get(layer, 0) + dw
    return out


MODES = ["auto", "merge"]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("mode", MODES)
def test_disable_adapter_takes_effect_on_an_existing_forward(setup, mode, jit):
    params, adapter, x = setup
    forward = adapter.make_apply(MLP().apply, mode=mode)
    forward = jax.jit(forward) if jit else forward
    base_fn = jax.jit(MLP().apply) if jit else MLP().apply
    base = np.asarray(base_fn(params, x))
    adapted = np.asarray(forward(adapter.trainable, params, x))  # traced (under jit) with the adapter on
    assert rel_err(adapted, numpy_mlp(params, x, dense_deltas(adapter, "a"))) < 1e-5
    assert np.max(np.abs(adapted - base)) > 1e-2  # the adapter does change the output
    with adapter.disable_adapter():
        np.testing.assert_array_equal(np.asarray(forward(adapter.trainable, params, x)), base)
    adapter.disable_adapters()
    np.testing.assert_array_equal(np.asarray(forward(adapter.trainable, params, x)), base)
    adapter.enable_adapters()
    np.testing.assert_array_equal(np.asarray(forward(adapter.trainable, params, x)), adapted)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("mode", MODES)
def test_set_adapter_takes_effect_on_an_existing_forward(setup, mode, jit):
    params, adapter, x = setup
    forward = adapter.make_apply(MLP().apply, mode=mode)
    forward = jax.jit(forward) if jit else forward
    da, db = dense_deltas(adapter, "a"), dense_deltas(adapter, "b")
    assert rel_err(forward(adapter.trainable, params, x), numpy_mlp(params, x, da)) < 1e-5
    adapter.set_adapter("b")
    assert rel_err(forward(adapter.trainable, params, x), numpy_mlp(params, x, db)) < 1e-5
    adapter.set_adapter(["b", "a"])
    assert rel_err(forward(adapter.trainable, params, x), numpy_mlp(params, x, _summed(da, db))) < 1e-5
    with adapter.disable_adapter():
        np.testing.assert_allclose(forward(adapter.trainable, params, x), MLP().apply(params, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_a_stale_copy_of_the_state_inside_disable_adapter_raises(setup, jit):
    params, adapter, x = setup
    forward = adapter.make_apply(MLP().apply)
    forward = jax.jit(forward) if jit else forward
    trainable = adapter.trainable  # taken before disabling: it holds adapter "a"
    with adapter.disable_adapter():
        with pytest.raises(ValueError, match=r"adapters are disabled.*\['a'\].*adapter.trainable"):
            forward(trainable, params, x)


def test_a_forward_from_the_functional_api_knows_only_its_adapters(setup):
    params, adapter, x = setup
    forward = jax.jit(fourierft_jax.make_apply(MLP().apply, adapter.static))  # adapter "a" only
    with adapter.disable_adapter():
        np.testing.assert_allclose(forward(adapter.trainable, params, x), MLP().apply(params, x), rtol=1e-6, atol=1e-6)
    adapter.set_adapter("b")
    with pytest.raises(ValueError, match=r"holds adapter\(s\) \['b'\].*built for \['a'\]"):
        forward(adapter.trainable, params, x)
    with pytest.raises(ValueError, match="one adapter's state"):
        forward(adapter.state["a"], params, x)


def test_adapters_added_or_replaced_after_the_forward_raise(setup):
    params, adapter, x = setup
    forward = adapter.make_apply(MLP().apply)
    adapter.add_adapter("c", fourierft_jax.FourierFTConfig(n_frequency=5, target_modules=["head"]), params,
                        key=jax.random.key(3))
    adapter.set_adapter("c")
    with pytest.raises(ValueError, match=r"\['c'\].*build the forward again"):
        forward(adapter.trainable, params, x)
    adapter.set_adapter("a")
    adapter.delete_adapter("b")
    moved = dict(CONFIGS["b"], random_loc_seed=6)
    adapter.add_adapter("b", fourierft_jax.FourierFTConfig(**moved), params, key=jax.random.key(1))
    adapter.set_adapter("b")  # same name and shapes, other positions: the old forward must not run them
    with pytest.raises(ValueError, match="'b' was deleted or replaced"):
        forward(adapter.trainable, params, x)
    fresh = adapter.make_apply(MLP().apply)
    assert rel_err(fresh(adapter.trainable, params, x), numpy_mlp(params, x, dense_deltas(adapter, "b", moved))) < 1e-5


def test_gradients_follow_the_selection(setup):
    # Training inside disable_adapter gets no adapter at all (nothing to differentiate), not adapter "a".
    params, adapter, x = setup
    forward = jax.jit(adapter.make_apply(MLP().apply))
    loss = lambda t: (forward(t, params, x) ** 2).sum()  # noqa: E731
    assert set(jax.grad(loss)(adapter.trainable)) == {"a"}
    adapter.set_adapter("b")
    assert set(jax.grad(loss)(adapter.trainable)) == {"b"}
    with adapter.disable_adapter():
        assert jax.grad(loss)(adapter.trainable) == {}
