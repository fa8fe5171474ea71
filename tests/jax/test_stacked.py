"""Stacked (scanned) layers on linen: an ``nn.scan`` model against the same model unrolled, and the numpy reference."""

import functools
import warnings

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

import bridge
import fourierft_jax

L, D, H = 3, 16, 24


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _=None):
        a = nn.Dense(H, name="fc1")(h)
        out = nn.LayerNorm(name="norm")(h + nn.Dense(D, name="fc2")(nn.gelu(a)))
        return out, None


class ScannedEncoder(nn.Module):
    axis: int = 0

    @nn.compact
    def __call__(self, h):
        stack = nn.scan(Block, variable_axes={"params": self.axis}, split_rngs={"params": True}, length=L)
        return stack(name="layer")(h, None)[0]


class Scanned(nn.Module):
    axis: int = 0

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(D, name="embed")(x)
        return nn.Dense(6, name="head")(ScannedEncoder(self.axis, name="encoder")(h))


class Unrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(D, name="embed")(x)

        class Layers(nn.Module):
            @nn.compact
            def __call__(self, h):
                for i in range(L):
                    h, _ = Block(name=str(i))(h)
                return h

        class Encoder(nn.Module):
            @nn.compact
            def __call__(self, h):
                return Layers(name="layer")(h)

        return nn.Dense(6, name="head")(Encoder(name="encoder")(h))


def _unroll(params, axis):
    stacked = params["params"]["encoder"]["layer"]
    layers = {str(i): jax.tree.map(lambda a: jnp.take(a, i, axis=axis), stacked) for i in range(L)}
    return {"params": dict(params["params"], encoder={"layer": layers})}


@functools.lru_cache(maxsize=None)
def _models(axis):
    x = jax.random.normal(jax.random.key(0), (4, 5, 12))
    scanned = Scanned(axis)
    params = scanned.init(jax.random.key(1), x)
    return axis, scanned, params, _unroll(params, axis), x


@pytest.fixture(scope="module", params=[0, 1], ids=["axis0", "axis1"])
def models(request):
    return _models(request.param)


def _pair(models, **config_kwargs):
    axis, scanned, params, unrolled_params, x = models
    config = fourierft_jax.FourierFTConfig(n_frequency=40, scaling=20.0, **config_kwargs)
    stacked = fourierft_jax.apply(params, config, key=jax.random.key(2), stacked={"encoder.layer": axis})
    flat = fourierft_jax.apply(unrolled_params, config, key=jax.random.key(3))
    # The unrolled adapter takes the stacked adapter's spectra, row by row (torch names identify the rows).
    spectra = dict(flat.trainable["default"]["spectra"])
    for layer in stacked.specs["default"].layers:
        rows = stacked.trainable["default"]["spectra"][layer.name]
        if not layer.stacked:
            spectra[layer.name] = rows
            continue
        for j, torch_name in enumerate(layer.torch_names):
            spectra[torch_name] = rows[j]
    flat.set_trainable({"default": dict(flat.trainable["default"], spectra=spectra)})
    return stacked, flat


def test_stacked_names_match_unrolled(models):
    stacked, flat = _pair(models, target_modules=["fc1", "fc2"])
    torch_names = sorted(n for layer in stacked.specs["default"].layers for n in layer.torch_names)
    assert torch_names == sorted(flat.layers())
    assert {layer.name: layer.spectrum_shape for layer in stacked.specs["default"].layers} == {
        "encoder.layer.fc1": (L, 40), "encoder.layer.fc2": (L, 40)}


@pytest.mark.parametrize("axis, mode", [(0, "merge"), (0, "spectral"), (1, "auto"), (1, "fused")])
def test_scanned_outputs_and_gradients_equal_unrolled(axis, mode):
    models = _models(axis)
    _, scanned, params, unrolled_params, x = models
    stacked, flat = _pair(models, target_modules=["fc1", "fc2", "head"])
    f_stacked = stacked.make_apply(scanned.apply, mode=mode)
    f_flat = flat.make_apply(Unrolled().apply, mode="merge")
    y_s = jax.jit(f_stacked)(stacked.trainable, params, x)
    y_f = jax.jit(f_flat)(flat.trainable, unrolled_params, x)
    np.testing.assert_allclose(y_s, y_f, rtol=1e-5, atol=1e-5)

    loss_s = lambda t: jnp.sum(f_stacked(t, params, x) ** 2)
    loss_f = lambda t: jnp.sum(f_flat(t, unrolled_params, x) ** 2)
    g_s = jax.jit(jax.grad(loss_s))(stacked.trainable)["default"]["spectra"]
    g_f = jax.jit(jax.grad(loss_f))(flat.trainable)["default"]["spectra"]
    for layer in stacked.specs["default"].layers:
        expected = np.stack([g_f[name] for name in layer.torch_names])
        expected = expected if layer.stacked else expected[0]
        np.testing.assert_allclose(g_s[layer.name], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(g_s["head"], g_f["head"], rtol=1e-4, atol=1e-5 * np.abs(g_f["head"]).max())


def test_merged_stack_equals_numpy_reference_with_layer_subset(models):
    axis, _, params, _, _ = models
    config = fourierft_jax.FourierFTConfig(n_frequency=30, scaling=7.0, target_modules=["fc2"],
                                           layers_to_transform=[0, 2], random_loc_seed=5)
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(4), stacked={"encoder.layer": axis})
    (layer,) = adapter.specs["default"].layers
    assert layer.stack_ids == (0, 2) and layer.torch_names == ("encoder.layer.0.fc2", "encoder.layer.2.fc2")
    merged = adapter.merge_and_unload(params)["params"]["encoder"]["layer"]["fc2"]["kernel"]
    base = params["params"]["encoder"]["layer"]["fc2"]["kernel"]
    rows = np.asarray(adapter.trainable["default"]["spectra"]["encoder.layer.fc2"], np.float64)
    for i in range(L):
        got = np.take(np.asarray(merged, np.float64), i, axis=axis) - np.take(np.asarray(base, np.float64), i, axis)
        if i in layer.stack_ids:
            positions = bridge.spectral_indices(D, H, 30, 5)
            expected = bridge.delta_weight(rows[layer.stack_ids.index(i)], positions, D, H, 7.0).T
        else:
            expected = np.zeros_like(got)
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_one_compilation_for_several_steps(models):
    import optax

    _, scanned, params, _, x = models
    stacked, _ = _pair(models, target_modules=["fc1"])
    forward = stacked.make_apply(scanned.apply)
    optimizer = optax.adam(1e-2)
    traces = []

    @jax.jit
    def step(trainable, opt_state):
        traces.append(1)
        loss, grads = jax.value_and_grad(lambda t: jnp.mean(forward(t, params, x) ** 2))(trainable)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(trainable, updates), opt_state, loss

    trainable, opt_state = stacked.trainable, optimizer.init(stacked.trainable)
    losses = []
    for _ in range(4):
        trainable, opt_state, loss = step(trainable, opt_state)
        losses.append(float(loss))
    assert len(traces) == 1 and losses[-1] < losses[0]


def test_stack_errors_name_the_problem():
    params = {"layer": {"fc": {"kernel": np.zeros((3, 8, 4), np.float32)}, "n": {"scale": np.zeros((2, 4))}}}
    config = fourierft_jax.FourierFTConfig(n_frequency=4, target_modules=["fc"])
    with pytest.raises(ValueError, match="disagree on the number of layers"):
        fourierft_jax.apply(params, config, key=jax.random.key(0), stacked="layer")
    with pytest.raises(KeyError, match="encoder"):
        fourierft_jax.apply(params, config, key=jax.random.key(0), stacked="encoder.layer")
    good = {"layer": {"fc": {"kernel": np.zeros((3, 8, 4), np.float32)}}}
    pattern = fourierft_jax.FourierFTConfig(n_frequency=4, target_modules=["fc"], n_frequency_pattern={"layer.1.fc": 6})
    with pytest.raises(ValueError, match="n_frequency"):
        fourierft_jax.apply(good, pattern, key=jax.random.key(0), stacked="layer")
    # Without `stacked`, a 3-D kernel is refused with the DenseGeneral explanation, naming the path.
    with pytest.raises(TypeError, match="layer.fc"):
        fourierft_jax.apply(good, config, key=jax.random.key(0))


def test_stack_used_whole_takes_the_per_layer_fast_path(models):
    # A function that contracts the whole stack at once, the layer axis kept (no scan slices it): each slice is
    # still its own layer, so the fast path applies per slice; the numbers are the merge's, no weight gradient.
    axis, _, params, _, x = models
    config = fourierft_jax.FourierFTConfig(n_frequency=10, target_modules=["fc1"], layers_to_transform=[0, 2],
                                           layers_pattern="layer")
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(0), stacked={"encoder.layer": axis})
    h = jnp.ones((2, D))

    def every_layer(variables, h):  # (L, tokens, H): each layer's fc1 on the same input
        kernel = variables["params"]["encoder"]["layer"]["fc1"]["kernel"]
        return jnp.einsum("bd,ldh->lbh" if axis == 0 else "bd,dlh->lbh", h, kernel)

    want = adapter.make_apply(every_layer, mode="merge")(adapter.trainable, params, h)
    for mode in ("fused", "spectral"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no merged fallback
            got = adapter.make_apply(every_layer, mode=mode)(adapter.trainable, params, h)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    grad = lambda mode: jax.grad(lambda t: jnp.sum(adapter.make_apply(every_layer, mode=mode)(t, params, h) ** 2))(  # noqa: E731
        adapter.trainable)["default"]["spectra"]
    for name, g in grad("merge").items():
        np.testing.assert_allclose(grad("fused")[name], g, rtol=1e-4, atol=1e-5)
    # a contraction over the layer axis itself has no per-layer form: it runs on the merged stack and says so
    summed = lambda v, h: jnp.einsum(  # noqa: E731
        "bd,ldh->bh" if axis == 0 else "bd,dlh->bh", h, v["params"]["encoder"]["layer"]["fc1"]["kernel"])
    with pytest.warns(UserWarning, match="encoder.layer.fc1.*merged kernel"):
        got = adapter.make_apply(summed)(adapter.trainable, params, h)
    np.testing.assert_allclose(got, adapter.make_apply(summed, mode="merge")(adapter.trainable, params, h),
                               rtol=1e-5, atol=1e-5)


def test_fourier_only_bias_trains_the_adapted_rows_of_a_stack_only(models):
    axis, scanned, params, _, x = models
    config = fourierft_jax.FourierFTConfig(n_frequency=10, target_modules=["fc1"], layers_to_transform=[1],
                                           bias="fourier_only")
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(0), stacked={"encoder.layer": axis})
    forward = adapter.make_apply(scanned.apply)
    grads = jax.grad(lambda t: jnp.sum(forward(t, params, x) ** 2))(adapter.trainable)
    bias_grad = np.moveaxis(np.asarray(grads["default"]["bias"]["encoder.layer.fc1"]), axis, 0)
    assert np.abs(bias_grad[1]).max() > 0 and not bias_grad[[0, 2]].any()
    # Changing the state of an unadapted row changes nothing: the model keeps the base bias there.
    state = adapter.trainable["default"]
    shifted = dict(state, bias={"encoder.layer.fc1": state["bias"]["encoder.layer.fc1"] + 1.0})
    base_row = np.take(np.asarray(params["params"]["encoder"]["layer"]["fc1"]["bias"]), 0, axis=axis)
    merged = adapter.make_apply(lambda v: v, mode="merge")({"default": shifted}, params)
    np.testing.assert_array_equal(np.take(np.asarray(merged["params"]["encoder"]["layer"]["fc1"]["bias"]), 0, axis=axis),
                                  base_row)
