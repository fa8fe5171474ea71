"""Stacked layers on NNX: an ``nnx.vmap``-made stack run by ``nnx.scan`` against the same model unrolled, the linen
``nn.scan`` twin, the numpy float64 reference, nnx.Optimizer training and save → load → attach."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bridge
import fourierft_jax
import fourierft_jax._src
from fourierft_jax._src.saved import from_nnx
from fourierft_jax._src.saved_nnx import nnx_params_view

L, D_IN, D, H, N_OUT = 3, 12, 16, 24, 6
STACK = "encoder.layer"


# --- linen: the reference stack (nn.scan), whose parameters every NNX model below takes --------------------------

class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, h, _=None):
        a = nn.Dense(H, name="fc1")(h)
        return nn.LayerNorm(name="norm")(h + nn.Dense(D, name="fc2")(nn.gelu(a))), None


class LinenEncoder(nn.Module):
    @nn.compact
    def __call__(self, h):
        stack = nn.scan(LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
        return stack(name="layer")(h, None)[0]


class LinenScanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(N_OUT, name="head")(LinenEncoder(name="encoder")(nn.Dense(D, name="embed")(x)))


# --- NNX: the same model as an nnx.vmap stack run by nnx.scan, and unrolled -----------------------------------------

class Block(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(D, H, rngs=rngs)
        self.fc2 = nnx.Linear(H, D, rngs=rngs)
        self.norm = nnx.LayerNorm(D, rngs=rngs)

    def __call__(self, h):
        return self.norm(h + self.fc2(nnx.gelu(self.fc1(h))))


class StackedEncoder(nnx.Module):
    def __init__(self, rngs):
        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(rngs)

        self.layer = make(rngs)

    def __call__(self, h):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(h, block):
            return block(h)

        return body(h, self.layer)


class UnrolledEncoder(nnx.Module):
    def __init__(self, rngs):
        self.layer = nnx.List([Block(rngs) for _ in range(L)])

    def __call__(self, h):
        for block in self.layer:
            h = block(h)
        return h


class Net(nnx.Module):
    def __init__(self, encoder, rngs):
        self.embed = nnx.Linear(D_IN, D, rngs=rngs)
        self.encoder = encoder(rngs)
        self.head = nnx.Linear(D, N_OUT, rngs=rngs)

    def __call__(self, x):
        return self.head(self.encoder(self.embed(x)))


@pytest.fixture(scope="module")
def linen():
    """Parameters of ``LinenScanned`` (drawn with numpy: a jitted ``init`` of the scan costs seconds) and inputs."""
    rng = np.random.default_rng(0)

    def dense(*shape):
        return {"kernel": rng.normal(0, 0.3, shape), "bias": rng.normal(0, 0.1, shape[:-2] + shape[-1:])}

    norm = {"scale": 1 + rng.normal(0, 0.1, (L, D)), "bias": rng.normal(0, 0.1, (L, D))}
    params = {"embed": dense(D_IN, D), "encoder": {"layer": {"fc1": dense(L, D, H), "fc2": dense(L, H, D),
                                                             "norm": norm}}, "head": dense(D, N_OUT)}
    params = {"params": jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)}
    x = jnp.asarray(rng.normal(size=(4, 5, D_IN)), jnp.float32)
    abstract = jax.eval_shape(LinenScanned().init, jax.random.key(0), x)
    assert jax.tree.map(np.shape, abstract) == jax.tree.map(np.shape, params)
    return params, x


# One compilation per model structure (graphdef), shared by the tests; eager scans would compile on every call.
forward = nnx.jit(lambda model, x: model(x))


@nnx.jit
def outputs_and_grads(model, x):
    def loss(model):
        y = model(x)
        return jnp.sum(y**2), y

    grad_fn = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, fourierft_jax.nnx.FourierFTSpectrum), has_aux=True)
    (_, y), grads = grad_fn(model)
    return y, {".".join(map(str, path[:-1])): v[...] for path, v in nnx.to_flat_state(grads)}


def _nnx(params, unrolled=False):
    """An NNX model holding the linen parameters (the stack's rows become the unrolled blocks 0..L-1)."""
    model = nnx.eval_shape(lambda: Net(UnrolledEncoder if unrolled else StackedEncoder, nnx.Rngs(0)))
    pure = jax.tree.map(jnp.asarray, params["params"])
    if unrolled:
        stack = pure["encoder"]["layer"]
        pure = dict(pure, encoder={"layer": {i: jax.tree.map(lambda a: a[i], stack) for i in range(L)}})
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


def _config(**overrides):
    fields = dict(n_frequency=40, scaling=20.0, target_modules=["fc1", "fc2", "head"])
    fields.update(overrides)
    return fourierft_jax.FourierFTConfig(**fields)


def _adapted_pair(params):
    """The stacked model adapted with N(0, 1) spectra and the unrolled model holding the same spectra."""
    stacked = fourierft_jax.nnx.apply(_nnx(params), _config(), rngs=nnx.Rngs(3), stacked=STACK)
    flat = fourierft_jax.nnx.apply(_nnx(params, unrolled=True), _config(init_weights=True))
    # Row j of a stacked spectrum belongs to the layer named by the stacked layer's j-th torch name.
    for layer in _layers(stacked):
        rows = _module_at(stacked, layer.path).spectrum[...]
        for j, name in enumerate(layer.torch_names):
            _module_at(flat, tuple(name.split("."))).spectrum.set_value(rows[j] if layer.stacked else rows)
    return stacked, flat


def _module_at(model, path):
    node = model
    for key in path:
        node = node[int(key)] if key.isdigit() else getattr(node, key)
    return node


def _layers(model):
    return [m.layer for _, m in nnx.iter_modules(model) if isinstance(m, fourierft_jax.nnx.FourierFTLinear)]


def test_stacked_layers_match_linen_and_unrolled_names(linen):
    params, _ = linen
    stacked, flat = _adapted_pair(params)
    layers = {layer.name: layer for layer in _layers(stacked)}
    linen_layers = fourierft_jax._src.select_layers(params["params"], _config(), stacked=STACK)
    assert layers == {layer.name: layer for layer in linen_layers}
    assert {name: layer.spectrum_shape for name, layer in layers.items()} == {
        "encoder.layer.fc1": (L, 40), "encoder.layer.fc2": (L, 40), "head": (40,)}
    assert sorted(n for layer in layers.values() for n in layer.torch_names) == sorted(
        layer.name for layer in _layers(flat))
    assert type(stacked.encoder.layer.norm) is nnx.LayerNorm


def test_scanned_outputs_and_gradients_equal_unrolled(linen):
    params, x = linen
    stacked, flat = _adapted_pair(params)
    (y_s, g_s), (y_f, g_f) = outputs_and_grads(stacked, x), outputs_and_grads(flat, x)
    np.testing.assert_allclose(y_s, y_f, rtol=1e-5, atol=1e-5)
    for layer in _layers(stacked):
        expected = np.stack([g_f[name] for name in layer.torch_names]) if layer.stacked else g_f[layer.name]
        scale = np.abs(expected).max()
        assert scale > 1e-3  # the spectra do reach the output
        np.testing.assert_allclose(g_s[layer.name], expected, rtol=1e-5, atol=1e-5 * scale)


def test_merged_stack_equals_numpy_reference(linen):
    params, x = linen
    stacked = fourierft_jax.nnx.apply(_nnx(params), _config(target_modules=["fc2"], scaling=7.0, random_loc_seed=5),
                                      rngs=nnx.Rngs(3), stacked=STACK)
    y = forward(stacked, x)
    rows = np.asarray(stacked.encoder.layer.fc2.spectrum[...], np.float64)
    merged = fourierft_jax.nnx.merge_and_unload(stacked)
    assert type(merged.encoder.layer.fc2) is nnx.Linear
    kernel = np.asarray(merged.encoder.layer.fc2.kernel[...], np.float64)
    base = np.asarray(params["params"]["encoder"]["layer"]["fc2"]["kernel"], np.float64)
    positions = bridge.spectral_indices(D, H, 40, 5)
    for i in range(L):
        expected = bridge.delta_weight(rows[i], positions, D, H, 7.0).T
        np.testing.assert_allclose(kernel[i] - base[i], expected, atol=1e-5)
    np.testing.assert_allclose(forward(merged, x), y, rtol=1e-5, atol=1e-5)


def test_optimizer_trains_only_spectra_and_compiles_once(linen):
    params, x = linen
    model = fourierft_jax.nnx.apply(_nnx(params), _config(target_modules=["fc1", "fc2"], bias="fourier_only"),
                                    rngs=nnx.Rngs(4), stacked=STACK)
    target = jnp.sin(jnp.arange(N_OUT, dtype=jnp.float32))
    spectrum = fourierft_jax.nnx.FourierFTSpectrum
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=spectrum)
    frozen_before = jax.tree.map(np.array, nnx.state(model, nnx.Not(spectrum)))
    spectra_before = jax.tree.map(np.array, nnx.state(model, spectrum))
    traces = []

    @nnx.jit
    def step(model, optimizer):
        traces.append(1)

        def loss_fn(model):
            return jnp.mean((model(x) - target) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, spectrum))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(4)]
    assert len(traces) == 1 and losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, nnx.state(model, nnx.Not(spectrum))),
                 frozen_before)
    after = nnx.state(model, spectrum)
    for before, now in zip(jax.tree.leaves(spectra_before), jax.tree.leaves(after)):
        assert now.shape == (L, 40) and (np.abs(np.asarray(now) - before).max(axis=1) > 0).all()


def test_linen_and_nnx_stacks_agree(linen):
    params, x = linen
    config = _config(bias="fourier_only")
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(5), stacked=STACK)
    # Merge mode here (the spectral mode is checked against the unrolled model above).
    model = fourierft_jax.nnx.apply(_nnx(params), _config(bias="fourier_only", init_weights=True), stacked=STACK,
                                    mode="merge")
    state = adapter.trainable["default"]
    for layer in _layers(model):
        _module_at(model, layer.path).spectrum.set_value(state["spectra"][layer.name])
    y_linen = jax.jit(adapter.make_apply(LinenScanned().apply))(adapter.trainable, params, x)
    np.testing.assert_allclose(forward(model, x), y_linen, rtol=1e-5, atol=1e-5)
    saved = from_nnx(model, config)
    assert saved.spec == adapter.specs["default"]
    assert jax.tree.map(np.shape, saved.state) == jax.tree.map(np.shape, state)
    assert saved.state["bias"]["encoder.layer.fc1"].shape == (L, H)


def test_save_load_attach_round_trip(linen, tmp_path):
    params, x = linen
    config = _config(bias="fourier_only")
    model = fourierft_jax.nnx.apply(_nnx(params), config, rngs=nnx.Rngs(6), stacked=STACK)
    model.encoder.layer.fc1.base.bias.set_value(model.encoder.layer.fc1.base.bias[...] + 0.5)  # a trained bias
    y = forward(model, x)
    folder = fourierft_jax.save_adapter(str(tmp_path / "ckpt"), model, config=config)
    loaded = fourierft_jax.load_adapter(folder)
    (fc1,) = [layer for layer in loaded.spec.layers if layer.name == "encoder.layer.fc1"]
    assert fc1 == model.encoder.layer.fc1.layer and loaded.state["spectra"][fc1.name].shape == (L, 40)
    fresh = fourierft_jax.attach(loaded, _nnx(params))
    assert fresh.encoder.layer.fc2.layer.stack_size == L
    np.testing.assert_array_equal(fresh.encoder.layer.fc1.spectrum[...], model.encoder.layer.fc1.spectrum[...])
    np.testing.assert_allclose(forward(fresh, x), y, rtol=1e-6, atol=1e-6)
    # Through PEFT's format (one tensor per layer, ``encoder.layer.<i>.…``) and back onto a fresh stacked model.
    peft_dir = fourierft_jax.export_peft(model, str(tmp_path / "peft"), config=config)
    back = fourierft_jax.attach(fourierft_jax.read_peft(peft_dir, nnx_params_view(model), stacked=STACK), _nnx(params))
    for name in ("fc1", "fc2"):
        want, got = getattr(model.encoder.layer, name), getattr(back.encoder.layer, name)
        np.testing.assert_array_equal(got.spectrum[...], want.spectrum[...])
        np.testing.assert_array_equal(got.base.bias[...], want.base.bias[...])
    # The same file on the linen twin: the stacked layers and arrays the linen adapter of the same config has
    # (that the two then compute the same is test_linen_and_nnx_stacks_agree).
    linen_adapter = fourierft_jax.attach(loaded, params)
    assert linen_adapter.specs["default"] == fourierft_jax.apply(params, config, key=jax.random.key(0),
                                                                 stacked=STACK).specs["default"]
    jax.tree.map(np.testing.assert_array_equal, linen_adapter.trainable["default"], from_nnx(model, config).state)


def test_stack_errors_name_the_problem(linen):
    params, x = linen
    model = _nnx(params)
    partial = _config(target_modules=["fc1"], layers_to_transform=[0, 2], layers_pattern="layer")
    with pytest.raises(ValueError, match=r"only layers \[0, 2\] of the 3 in stack 'encoder.layer'"):
        fourierft_jax.nnx.apply(model, partial, rngs=nnx.Rngs(0), stacked=STACK)
    with pytest.raises(ValueError, match="layer axis first"):
        fourierft_jax.nnx.apply(model, _config(), rngs=nnx.Rngs(0), stacked={STACK: 1})
    with pytest.raises(TypeError, match="encoder.layer.0.norm.*LayerNorm"):
        fourierft_jax.nnx.apply(model, _config(target_modules=["norm"]), rngs=nnx.Rngs(0), stacked=STACK)
    with pytest.raises(TypeError, match=r"encoder.layer.fc1.*3-D kernel \(3, 16, 24\).*stacked="):
        fourierft_jax.nnx.apply(model, _config(), rngs=nnx.Rngs(0))
    assert type(model.encoder.layer.fc1) is nnx.Linear  # untouched on failure
    fourierft_jax.nnx.apply(model, _config(), rngs=nnx.Rngs(0), stacked=STACK)
    with pytest.raises(ValueError, match="'encoder.layer.fc1' holds a stack of 3 layers.*nnx.scan"):
        model.encoder.layer.fc1(jnp.ones((2, D)))
