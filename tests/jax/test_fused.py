"""The fused path (x @ (W + ΔW) with an FFT-based backward) and mode="auto" against independent references.

References: bridge's float64 ΔW, the dense gradient formula ∂L/∂c_k = Σ_{p,q} (dyᵀx)[p,q] · ∂ΔW[p,q]/∂c_k
evaluated in numpy float64, and the other two paths (merge: plain autodiff; spectral).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bridge
import fourierft_jax
import fourierft_jax._src
from fourierft_jax._src import LayerSpec
from fourierft_jax._src.fused import fused_dense, fused_dense_multi
from fourierft_jax._src.modes import choose_path
from fftjax_models import D_HID, D_IN, MLP, init_mlp, numpy_mlp, reference_deltas, rel_err

SHAPES = [(1, 1, 1), (6, 4, 5), (5, 7, 35), (9, 16, 30), (12, 20, 240), (1, 8, 6), (8, 1, 6), (7, 10, 3)]
MODES = ["merge", "spectral", "fused", "auto"]


def _dense_reference(layer, c, x, w, g):
    """float64 (y, dx, dw, dc) of sum(g * (x @ (w + ΔWᵀ))) by the dense formula."""
    n_out, n_in = layer.out_features, layer.in_features
    delta = bridge.delta_weight(c, layer.torch_indices, n_out, n_in, layer.scaling)  # (out, in)
    flat_x, flat_g = x.reshape(-1, n_in), g.reshape(-1, n_out)
    weight_grad = flat_g.T @ flat_x  # (out, in)
    unit = np.eye(layer.n_frequency)
    dc = np.array([
        np.sum(weight_grad * bridge.delta_weight(unit[k], layer.torch_indices, n_out, n_in, layer.scaling))
        for k in range(layer.n_frequency)
    ])
    return x @ (w + delta.T), g @ (w + delta.T).T, weight_grad.T, dc


@pytest.mark.parametrize("n_in,n_out,n", SHAPES)
def test_fused_value_and_gradients_match_dense_formula(n_in, n_out, n):
    layer = LayerSpec(("blk", "fc"), n_in, n_out, n, 37.5, 777)
    rng = np.random.default_rng(n_in * 100 + n_out)
    c, x = rng.standard_normal(n), rng.standard_normal((2, 3, n_in))
    w, g = rng.standard_normal((n_in, n_out)), rng.standard_normal((2, 3, n_out))
    y_ref, dx_ref, dw_ref, dc_ref = _dense_reference(layer, c, x, w, g)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731

    @jax.jit
    def value_and_grads(x, w, c):
        y, pull = jax.vjp(lambda x, w, c: fused_dense(x, w, c, layer), x, w, c)
        return (y, *pull(f32(g)))

    y, dx, dw, dc = value_and_grads(f32(x), f32(w), f32(c))
    assert y.shape == (2, 3, n_out) and dc.dtype == jnp.float32
    for got, ref in ((y, y_ref), (dx, dx_ref), (dw, dw_ref), (dc, dc_ref)):
        assert rel_err(got, ref) < 1e-5


def test_fused_with_two_adapters_sums_deltas_and_splits_gradients():
    layer = LayerSpec(("fc",), 9, 16, 30, 3.0, 777)
    other = LayerSpec(("fc",), 9, 16, 12, 5.0, 1234)
    rng = np.random.default_rng(0)
    ca, cb, x, w = rng.standard_normal(30), rng.standard_normal(12), rng.standard_normal((4, 9)), np.zeros((9, 16))
    g = rng.standard_normal((4, 16))
    _, _, _, dca = _dense_reference(layer, ca, x, w, g)
    _, _, _, dcb = _dense_reference(other, cb, x, w, g)
    loss = lambda cs: jnp.sum(fused_dense_multi(jnp.asarray(x, jnp.float32), jnp.zeros((9, 16)), cs,  # noqa: E731
                                                (layer, other)) * g)
    got = jax.grad(loss)((jnp.asarray(ca, jnp.float32), jnp.asarray(cb, jnp.float32)))
    assert rel_err(got[0], dca) < 1e-5 and rel_err(got[1], dcb) < 1e-5


def test_fused_shape_errors_name_the_layer():
    layer = LayerSpec(("blk", "fc"), 6, 4, 5, 1.0, 777)
    with pytest.raises(ValueError, match="blk.fc"):
        fused_dense(jnp.zeros((2, 6)), jnp.zeros((6, 5)), jnp.zeros(5), layer)
    with pytest.raises(ValueError, match="blk.fc"):
        fused_dense(jnp.zeros((2, 7)), jnp.zeros((6, 4)), jnp.zeros(5), layer)
    with pytest.raises(ValueError, match="blk.fc"):
        fused_dense(jnp.zeros((2, 6)), jnp.zeros((6, 4)), jnp.zeros(4), layer)


def test_choose_path_rule():
    square = LayerSpec(("q",), 768, 768, 1000, 1.0, 0)
    wide = LayerSpec(("i",), 768, 3072, 1000, 1.0, 0)
    assert choose_path(8 * 128, square) == "fused" and choose_path(8 * 128, wide) == "fused"
    assert choose_path(16, square) == "spectral" and choose_path(16, wide) == "spectral"
    # The switch sits where tokens · (in + out) reaches SPECTRAL_MAX_RATIO · in · out, and is monotone in tokens.
    picks = [choose_path(t, wide) for t in range(1, 2000, 7)]
    assert picks == sorted(picks, key=lambda p: p == "fused")


@pytest.fixture(scope="module")
def setup():
    params = init_mlp()
    config = fourierft_jax.FourierFTConfig(n_frequency=37, scaling=25.0, target_modules=["fc1", "fc2", "head"],
                                           bias="fourier_only")
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(7))
    # 4 tokens: auto takes "fused" for fc1 (12→20) and head but "spectral" for fc2 (20→16).
    x = jax.random.normal(jax.random.key(3), (2, 2, D_IN))
    return params, adapter, x


def test_auto_mixes_paths_at_these_sizes(setup):
    _, adapter, _ = setup
    picks = {layer.name: choose_path(4, layer) for layer in adapter.specs["default"].layers}
    assert picks == {"encoder.fc1": "fused", "encoder.fc2": "spectral", "head": "fused"}


@pytest.mark.parametrize("mode", MODES)
def test_modes_match_float64_reference_and_each_other(setup, mode):
    params, adapter, x = setup
    got = jax.jit(adapter.make_apply(MLP().apply, mode=mode))(adapter.trainable, params, x)
    reference = numpy_mlp(params, np.asarray(x), reference_deltas(adapter))
    assert rel_err(got, reference) < 1e-5
    merged = MLP().apply(adapter.merge_and_unload(params), x)
    assert rel_err(got, merged) < 1e-5


def _numpy_spectrum_grads(params, adapter, x, g):
    """float64 ∂sum(g · MLP(x))/∂c per layer: backprop through the numpy MLP, then the dense formula."""
    p, deltas = params["params"], reference_deltas(adapter)
    spec = {layer.name: layer for layer in adapter.specs["default"].layers}

    def kernel(name, tree):
        return np.asarray(tree["kernel"], np.float64) + deltas[name].T

    names = ["encoder.fc1", "encoder.fc2", "head"]
    trees = [p["encoder"]["fc1"], p["encoder"]["fc2"], p["head"]]
    h0 = np.asarray(x, np.float64).reshape(-1, D_IN)
    z1 = h0 @ kernel(names[0], trees[0]) + np.asarray(trees[0]["bias"], np.float64)
    h1 = np.tanh(z1)
    z2 = h1 @ kernel(names[1], trees[1]) + np.asarray(trees[1]["bias"], np.float64)
    h2 = np.tanh(z2)
    dz3 = g.reshape(h2.shape[0], -1)
    dz2 = (dz3 @ kernel(names[2], trees[2]).T) * (1 - h2**2)
    dz1 = (dz2 @ kernel(names[1], trees[1]).T) * (1 - h1**2)
    grads = {}
    for name, inp, dz in zip(names, (h0, h1, h2), (dz1, dz2, dz3)):
        layer = spec[name]
        unit = np.eye(layer.n_frequency)
        weight_grad = dz.T @ inp
        grads[name] = np.array([
            np.sum(weight_grad * bridge.delta_weight(unit[k], layer.torch_indices, layer.out_features,
                                                     layer.in_features, layer.scaling))
            for k in range(layer.n_frequency)
        ])
    return grads


@pytest.mark.parametrize("mode", MODES)
def test_model_gradients_match_dense_formula(setup, mode):
    params, adapter, x = setup
    g = np.random.default_rng(5).standard_normal((2, 2, 3))
    forward = adapter.make_apply(MLP().apply, mode=mode)
    grads = jax.jit(jax.grad(lambda t: jnp.sum(forward(t, params, x) * g)))(adapter.trainable)
    expected = _numpy_spectrum_grads(params, adapter, x, g)
    for name, ref in expected.items():
        assert rel_err(grads["default"]["spectra"][name], ref) < 1e-5, name
    # the trained biases get the same gradient on every path
    merge_grads = jax.grad(lambda t: jnp.sum(adapter.make_apply(MLP().apply, mode="merge")(t, params, x) * g))(
        adapter.trainable)
    for a, b in zip(jax.tree.leaves(grads["default"]["bias"]), jax.tree.leaves(merge_grads["default"]["bias"])):
        assert rel_err(a, b) < 1e-5


def _weight_grad_dots(hlo: str) -> int:
    # Optimised HLO dots whose result has fc1's kernel shape (12, 20): only a weight gradient xᵀdy has it.
    return len(re.findall(rf"f32\[{D_IN},{D_HID}\]\{{[0-9,]*\}} dot\(", hlo))


@pytest.mark.parametrize("mode,expect", [("fused", 0), ("merge", 1)])
def test_compiled_step_has_no_weight_gradient_matmul(setup, mode, expect):
    params, adapter, x = setup
    forward = adapter.make_apply(MLP().apply, mode=mode)
    grad_fn = jax.jit(jax.grad(lambda t: forward(t, params, x).sum()))
    hlo = grad_fn.lower(adapter.trainable).compile().as_text()
    assert (_weight_grad_dots(hlo) >= 1) == bool(expect)


def test_frozen_kernel_gradient_is_still_correct_on_the_fused_path(setup):
    params, adapter, x = setup
    grad = lambda mode: jax.grad(  # noqa: E731
        lambda p: jnp.sum(adapter.make_apply(MLP().apply, mode=mode)(adapter.trainable, p, x) ** 2))(params)
    fused, merged = grad("fused"), grad("merge")
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(merged)):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("mode", ["fused", "auto"])
def test_optax_steps_trace_once_and_learn(mode):
    params = init_mlp()
    config = fourierft_jax.FourierFTConfig(n_frequency=23, scaling=20.0, target_modules=["fc1", "fc2"])
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (6, D_IN))
    y = jax.random.randint(jax.random.key(3), (6,), 0, 3)
    forward = adapter.make_apply(MLP().apply, mode=mode)
    tx = optax.adamw(5e-2)
    trainable, traces = adapter.trainable, []
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state):
        traces.append(1)
        loss, grads = jax.value_and_grad(
            lambda t: optax.softmax_cross_entropy_with_integer_labels(forward(t, params, x), y).mean())(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    losses = []
    for _ in range(4):
        trainable, opt_state, loss = step(trainable, opt_state)
        losses.append(float(loss))
    assert len(traces) == 1 and losses[-1] < losses[0]
    assert jax.tree.structure(trainable) == jax.tree.structure(adapter.trainable)


def test_fused_bfloat16_model_keeps_dtypes():
    params = init_mlp(dtype=jnp.bfloat16)
    adapter = fourierft_jax.apply(params, fourierft_jax.FourierFTConfig(n_frequency=9, target_modules=["fc1"]),
                                  key=jax.random.key(0))
    x = jnp.ones((3, D_IN), jnp.bfloat16)
    out = {m: adapter.make_apply(MLP().apply, mode=m)(adapter.trainable, params, x) for m in ("fused", "merge")}
    assert out["fused"].dtype == out["merge"].dtype
    assert rel_err(out["fused"], out["merge"]) < 2e-2  # bfloat16 rounding of the merged kernel
    grads = jax.grad(lambda t: jnp.sum(adapter.make_apply(MLP().apply, mode="fused")(t, params, x)
                                       .astype(jnp.float32)))(adapter.trainable)
    assert grads["default"]["spectra"]["encoder.fc1"].dtype == jnp.float32
