"""Training: gradients vs the dense formula, optax steps touch only the trainable state, one trace per step fn."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bridge
import fourierft_jax
import fourierft_jax._src
from fftjax_models import D_HID, D_IN, MLP, init_mlp, rel_err


@pytest.fixture(scope="module")
def setup():
    params = init_mlp()
    config = fourierft_jax.FourierFTConfig(n_frequency=23, scaling=20.0, target_modules=["fc1", "fc2"])
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (6, D_IN))
    y = jax.random.randint(jax.random.key(3), (6,), 0, 3)
    return params, adapter, x, y


def test_layer_gradients_match_dense_formula():
    layer = fourierft_jax._src.LayerSpec(("fc",), in_features=10, out_features=14, n_frequency=17, scaling=9.0, seed=5)
    rng = np.random.default_rng(0)
    c, x, g = rng.standard_normal(17), rng.standard_normal((4, 10)), rng.standard_normal((4, 14))

    def loss(c, x):
        return jnp.sum(fourierft_jax._src.spectral_delta(x, c, layer) * g)

    grad_c, grad_x = jax.grad(loss, argnums=(0, 1))(jnp.asarray(c, jnp.float32), jnp.asarray(x, jnp.float32))
    # ΔW is linear in c: dL/dc_k = Σ g ⊙ (x ΔW(e_k)ᵀ); dL/dx = g ΔW(c).
    basis = [bridge.delta_weight(e, layer.torch_indices, 14, 10, 9.0) for e in np.eye(17)]
    expected_c = np.array([np.sum(g * (x @ dw.T)) for dw in basis])
    expected_x = g @ bridge.delta_weight(c, layer.torch_indices, 14, 10, 9.0)
    assert rel_err(grad_c, expected_c) < 1e-5
    assert rel_err(grad_x, expected_x) < 1e-5
    # the merge path's gradient through irfft2 agrees too
    grad_merge = jax.grad(lambda c: jnp.sum((x @ fourierft_jax._src.delta_kernel(c, layer)) * g))(jnp.asarray(c, jnp.float32))
    assert rel_err(grad_merge, expected_c) < 1e-5


def test_model_gradients_agree_between_paths(setup):
    params, adapter, x, y = setup

    def loss(mode):
        forward = adapter.make_apply(MLP().apply, mode=mode)
        return lambda t: optax.softmax_cross_entropy_with_integer_labels(forward(t, params, x), y).mean()

    g_spectral = jax.grad(loss("spectral"))(adapter.trainable)
    g_merge = jax.grad(loss("merge"))(adapter.trainable)
    for a, b in zip(jax.tree.leaves(g_spectral), jax.tree.leaves(g_merge)):
        assert rel_err(a, b) < 1e-4
    assert all(float(jnp.abs(a).max()) > 0 for a in jax.tree.leaves(g_spectral))


def _shapes(jaxpr):
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield tuple(getattr(var.aval, "shape", ()))
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from _shapes(inner)


@pytest.mark.parametrize("mode,expect_kernel_grad", [("spectral", False), ("merge", True)])
def test_spectral_path_forms_no_kernel_sized_values(setup, mode, expect_kernel_grad):
    params, adapter, x, y = setup
    forward = adapter.make_apply(MLP().apply, mode=mode)
    grad_fn = jax.grad(lambda t: forward(t, params, x).sum())
    shapes = set(_shapes(jax.make_jaxpr(grad_fn)(adapter.trainable).jaxpr))
    # fc1's kernel is (12, 20): the merge path builds ΔW and its gradient at that shape, the spectral path never.
    assert ((D_IN, D_HID) in shapes) == expect_kernel_grad


@pytest.mark.parametrize("mode", ["spectral", "merge"])
def test_optax_steps_change_only_trainable_state_and_trace_once(mode):
    params = init_mlp()
    config = fourierft_jax.FourierFTConfig(
        n_frequency=23, scaling=20.0, target_modules=["fc1", "fc2"], bias="fourier_only", modules_to_save=["head"]
    )
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (6, D_IN))
    y = jax.random.randint(jax.random.key(3), (6,), 0, 3)
    forward = adapter.make_apply(MLP().apply, mode=mode)
    tx = fourierft_jax.multi_lr(5e-2, 5e-3)
    trainable = adapter.trainable
    opt_state = tx.init(trainable)
    frozen_before = jax.tree.map(np.array, params)
    trainable_before = jax.tree.map(np.array, trainable)
    traces = []

    @jax.jit
    def step(trainable, opt_state, params, x, y):
        traces.append(1)

        def loss_fn(trainable):
            logits = forward(trainable, params, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    losses = []
    for _ in range(4):
        trainable, opt_state, loss = step(trainable, opt_state, params, x, y)
        losses.append(float(loss))
    assert len(traces) == 1
    assert losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, params), frozen_before)
    for before, after in zip(jax.tree.leaves(trainable_before), jax.tree.leaves(trainable)):
        assert not np.array_equal(before, np.asarray(after))
    adapter.set_trainable(trainable)
    merged = adapter.merge_and_unload(params)
    np.testing.assert_allclose(MLP().apply(merged, x), forward(trainable, params, x), rtol=1e-5, atol=1e-5)


def test_multi_lr_uses_separate_rates():
    tx = fourierft_jax.multi_lr(1.0, 0.01, make=lambda lr, weight_decay: optax.sgd(lr))
    trainable = {"default": {"spectra": {"a": jnp.zeros(2)}, "bias": {"b": jnp.zeros(2)}, "modules_to_save": {}}}
    grads = jax.tree.map(jnp.ones_like, trainable)
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    np.testing.assert_allclose(updates["default"]["spectra"]["a"], -1.0)
    np.testing.assert_allclose(updates["default"]["bias"]["b"], -0.01)


def test_static_is_a_hashable_jit_argument(setup):
    params, adapter, _, _ = setup
    traces = []

    def merged_kernel(params, trainable, static):
        traces.append(1)
        return fourierft_jax._src.merge_params(params, trainable, static)["params"]["encoder"]["fc1"]["kernel"]

    merge = jax.jit(merged_kernel, static_argnums=2)
    first = merge(params, adapter.trainable, adapter.static)
    twin = fourierft_jax.apply(params, adapter.configs["default"], key=jax.random.key(9))
    assert twin.static == adapter.static and hash(twin.static) == hash(adapter.static)
    second = merge(params, twin.trainable, twin.static)
    assert len(traces) == 1  # equal statics share the compiled function
    assert not np.allclose(first, second)  # ... while the spectra are arguments
