"""Every ``FourierFTAdapter`` method that raises leaves the adapter exactly as it was (issue 13, part 3).

Compared before and after each provoked failure: every array of ``state`` bit for bit with its pytree structure,
``configs``, ``specs`` (value and identity), ``active_adapters``, ``disabled`` and ``trainable``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bridge
import fourierft_jax
from fftjax_models import D_IN, MLP, init_mlp


@pytest.fixture()
def setup():
    params = init_mlp()
    adapter = fourierft_jax.apply(
        params, fourierft_jax.FourierFTConfig(n_frequency=11, target_modules=["fc1", "fc2"], bias="all",
                                              modules_to_save=["head"]),
        key=jax.random.key(0), adapter_name="a")
    adapter.add_adapter("b", fourierft_jax.FourierFTConfig(n_frequency=7, random_loc_seed=5, target_modules=["fc2"]),
                        params, key=jax.random.key(1))
    return params, adapter


def _tree_bits(tree):
    leaves, structure = jax.tree.flatten(tree)
    return str(structure), [(str(np.asarray(a).dtype), np.asarray(a).shape, np.asarray(a).tobytes()) for a in leaves]


def snapshot(adapter) -> dict:
    return {
        "state": _tree_bits(adapter.state),
        "trainable": _tree_bits(adapter.trainable),
        "configs": {name: dataclasses.asdict(c) for name, c in adapter.configs.items()},
        "specs": dict(adapter.specs),
        "spec_ids": {name: id(spec) for name, spec in adapter.specs.items()},
        "active_adapters": list(adapter.active_adapters),
        "disabled": adapter.disabled,
        "attributes": sorted(vars(adapter)),
    }


def _fails(adapter, call, error, match):
    before = snapshot(adapter)
    with pytest.raises(error, match=match):
        call()
    after = snapshot(adapter)
    for part in before:
        assert after[part] == before[part], f"{part} changed by a call that raised"


def _cfg(**kwargs):
    return fourierft_jax.FourierFTConfig(**kwargs)


ADD_FAILURES = {
    "empty name": (lambda a, p: a.add_adapter("", _cfg(n_frequency=3, target_modules=["head"]), p, key=jax.random.key(2)),
                   ValueError, "non-empty"),
    "duplicate name": (lambda a, p: a.add_adapter("b", _cfg(n_frequency=3, target_modules=["head"]), p,
                                                  key=jax.random.key(2)), ValueError, "already exists"),
    "not a config": (lambda a, p: a.add_adapter("c", {"n_frequency": 3}, p), TypeError, "FourierFTConfig"),
    "no target": (lambda a, p: a.add_adapter("c", _cfg(n_frequency=3, target_modules=["nope"]), p, key=jax.random.key(2)),
                  bridge.NoTargetError, "nope"),
    "n_frequency above in*out": (lambda a, p: a.add_adapter("c", _cfg(n_frequency=100, target_modules=["head"]), p,
                                                            key=jax.random.key(2)), ValueError, "head"),
    "second adapter with bias": (lambda a, p: a.add_adapter("c", _cfg(n_frequency=3, target_modules=["head"], bias="all"),
                                                            p, key=jax.random.key(2)), ValueError, "bias"),
    "modules_to_save matching nothing": (
        lambda a, p: a.add_adapter("c", _cfg(n_frequency=3, target_modules=["head"], modules_to_save=["nope"]), p,
                                   key=jax.random.key(2)), ValueError, "nope"),
    "random init without a key": (lambda a, p: a.add_adapter("c", _cfg(n_frequency=3, target_modules=["head"]), p),
                                  ValueError, "key="),
}


@pytest.mark.parametrize("case", list(ADD_FAILURES))
def test_add_adapter_failure_changes_nothing(setup, case):
    params, adapter = setup
    call, error, match = ADD_FAILURES[case]
    _fails(adapter, lambda: call(adapter, params), error, match)


@pytest.mark.parametrize("names", ["nope", ["a", "nope"], []])
def test_set_adapter_failure_changes_nothing(setup, names):
    _, adapter = setup
    _fails(adapter, lambda: adapter.set_adapter(names), (KeyError, ValueError), "nope|at least one")


def test_delete_adapter_failures_change_nothing(setup):
    _, adapter = setup
    _fails(adapter, lambda: adapter.delete_adapter("nope"), KeyError, "nope")
    adapter.delete_adapter("a")
    adapter.delete_adapter("b")  # the last one goes too, as in PEFT
    assert adapter.active_adapters == [] and adapter.active_adapter is None and adapter.trainable == {}
    _fails(adapter, lambda: adapter.delete_adapter("b"), KeyError, "'b'")
    _fails(adapter, adapter.layers, KeyError, "no adapter is left")


def test_set_trainable_checks_every_adapter_before_storing_any(setup):
    _, adapter = setup
    adapter.set_adapter(["a", "b"])
    good = jax.tree.map(lambda v: v + 1, adapter.trainable["a"])
    bad = {"spectra": {}}
    _fails(adapter, lambda: adapter.set_trainable({"a": good, "b": bad}), ValueError, "'b'")
    _fails(adapter, lambda: adapter.set_trainable({"a": good, "nope": bad}), KeyError, "nope")


def test_merge_failures_change_nothing(setup):
    params, adapter = setup
    adapter.state["b"]["spectra"]["encoder.fc2"] = adapter.state["b"]["spectra"]["encoder.fc2"].at[1].set(jnp.nan)
    _fails(adapter, lambda: adapter.merge_and_unload(params, adapter_names=["a", "b"], safe_merge=True), ValueError,
           "encoder.fc2")
    _fails(adapter, lambda: adapter.merge_and_unload(params, adapter_names=["nope"]), KeyError, "nope")


def test_disable_adapter_exited_by_an_exception_restores_everything(setup):
    params, adapter = setup
    x = jnp.ones((2, D_IN))
    forward = adapter.make_apply(MLP().apply)

    def inside():
        with adapter.disable_adapter():
            forward(adapter.trainable, params, x)
            raise RuntimeError("inside")

    _fails(adapter, inside, RuntimeError, "inside")
    adapter.disable_adapters()
    _fails(adapter, inside, RuntimeError, "inside")  # stays disabled: the context restores, not enables
    assert adapter.disabled


def test_merge_and_unload_merges_disabled_adapters_as_peft_does(setup):
    # PEFT's merge_and_unload merges the active adapters whether or not the layers are disabled
    # (tuners_utils.BaseTuner._unload_and_optionally_merge calls layer.merge, which does not read the flag).
    params, adapter = setup
    x = jnp.ones((2, D_IN))
    merged = adapter.merge_and_unload(params)
    with adapter.disable_adapter():
        np.testing.assert_array_equal(MLP().apply(adapter.merge_and_unload(params), x), MLP().apply(merged, x))


def test_nnx_merge_and_unload_merges_disabled_layers_and_refuses_nan_atomically():
    from flax import nnx

    from fftjax_models import nnx_twin

    def adapted():
        return fourierft_jax.nnx.apply(nnx_twin(init_mlp()), _cfg(n_frequency=9, target_modules=["fc1", "fc2"]),
                                       rngs=nnx.Rngs(3))

    x = jnp.ones((2, D_IN))
    want = fourierft_jax.nnx.merge_and_unload(adapted())(x)
    model = adapted()
    fourierft_jax.nnx.set_disabled(model)
    np.testing.assert_array_equal(fourierft_jax.nnx.merge_and_unload(model)(x), want)

    model = adapted()
    spectrum = model.encoder.fc2.spectrum
    spectrum[...] = spectrum[...].at[0].set(jnp.nan)
    before = jax.tree.map(np.asarray, nnx.state(model))
    types = [(path, type(m).__name__) for path, m in nnx.iter_modules(model)]
    with pytest.raises(ValueError, match="encoder.fc2"):
        fourierft_jax.nnx.merge_and_unload(model, safe_merge=True)
    assert [(path, type(m).__name__) for path, m in nnx.iter_modules(model)] == types
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), nnx.state(model), before)
