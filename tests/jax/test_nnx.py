"""NNX surgery: FourierFTLinear swaps, LoRAParam filtering, nnx.Optimizer training, merge/unload."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bridge
import fourierft_jax
from fftjax_models import D_IN, NnxMLP, init_mlp, nnx_twin, rel_err

CONFIG = dict(n_frequency=21, scaling=40.0, target_modules=["fc1", "fc2"])


def _model(**overrides):
    fields = dict(CONFIG)
    fields.update(overrides)
    model = nnx_twin(init_mlp())
    return fourierft_jax.nnx.apply(model, fourierft_jax.FourierFTConfig(**fields), rngs=nnx.Rngs(3))


def test_surgery_and_variable_types():
    model = _model()
    for layer in (model.encoder.fc1, model.encoder.fc2):
        assert isinstance(layer, fourierft_jax.nnx.FourierFTLinear)
        assert isinstance(layer.spectrum, nnx.LoRAParam) and type(layer.spectrum) is fourierft_jax.nnx.FourierFTSpectrum
        assert type(layer.base.kernel) is nnx.Param
        np.testing.assert_array_equal(layer.layer.torch_indices,
                                      bridge.spectral_indices(layer.layer.out_features, layer.layer.in_features, 21, 777))
    assert type(model.head) is nnx.Linear
    trainable = nnx.state(model, nnx.LoRAParam)
    assert sum(v.size for v in jax.tree.leaves(trainable)) == 42


def test_output_matches_delta_formula():
    model = _model()
    x = jax.random.normal(jax.random.key(0), (3, D_IN))
    layer = model.encoder.fc1
    h = np.asarray(x, np.float64)
    dw = bridge.delta_weight(np.asarray(layer.spectrum[...], np.float64), layer.layer.torch_indices,
                             layer.layer.out_features, layer.layer.in_features, 40.0)
    expected = h @ (np.asarray(layer.base.kernel[...], np.float64) + dw.T) + np.asarray(layer.base.bias[...])
    assert rel_err(layer(x), expected) < 1e-5


def test_optimizer_trains_only_spectra_and_jits_once():
    model = _model()
    x = jax.random.normal(jax.random.key(0), (6, D_IN))
    y = jax.random.randint(jax.random.key(1), (6,), 0, 3)
    optimizer = nnx.Optimizer(model, optax.adamw(5e-2), wrt=nnx.LoRAParam)
    frozen_before = jax.tree.map(np.array, nnx.state(model, nnx.Not(nnx.LoRAParam)))
    spectra_before = jax.tree.map(np.array, nnx.state(model, nnx.LoRAParam))
    traces = []

    @nnx.jit
    def step(model, optimizer, x, y):
        traces.append(1)

        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, x, y)) for _ in range(4)]
    assert len(traces) == 1 and losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, nnx.state(model, nnx.Not(nnx.LoRAParam))),
                 frozen_before)
    for before, after in zip(jax.tree.leaves(spectra_before), jax.tree.leaves(nnx.state(model, nnx.LoRAParam))):
        assert not np.array_equal(before, np.asarray(after))


def test_merge_and_unload_and_unload():
    x = jax.random.normal(jax.random.key(0), (3, D_IN))
    base_out = nnx_twin(init_mlp())(x)
    model = _model()
    adapted_out = model(x)
    fourierft_jax.nnx.set_disabled(model, True)
    np.testing.assert_allclose(model(x), base_out, rtol=1e-6, atol=1e-6)
    fourierft_jax.nnx.set_disabled(model, False)
    merged = fourierft_jax.nnx.merge_and_unload(model)
    assert type(merged.encoder.fc1) is nnx.Linear
    assert rel_err(merged(x), adapted_out) < 1e-5
    model = fourierft_jax.nnx.unload(_model())
    assert type(model.encoder.fc2) is nnx.Linear
    np.testing.assert_allclose(model(x), base_out, rtol=1e-6, atol=1e-6)


def test_bias_and_modules_to_save_become_trainable():
    model = _model(bias="fourier_only", modules_to_save=["head"])
    trainable = nnx.state(model, nnx.LoRAParam)
    names = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(trainable)}
    assert names == {"encoder.fc1.spectrum", "encoder.fc2.spectrum", "encoder.fc1.base.bias", "encoder.fc2.base.bias",
                     "head.kernel", "head.bias"}
    fourierft_jax.nnx.unload(model)
    assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))


def test_errors_name_the_module():
    class WithEmbed(nnx.Module):
        def __init__(self, rngs):
            self.emb = nnx.Embed(10, 4, rngs=rngs)
            self.fc = nnx.Linear(4, 4, rngs=rngs)

    with pytest.raises(TypeError, match="'emb'.*Embed"):
        fourierft_jax.nnx.apply(WithEmbed(nnx.Rngs(0)), fourierft_jax.FourierFTConfig(target_modules=["emb"]),
                                rngs=nnx.Rngs(0))
    model = WithEmbed(nnx.Rngs(0))
    with pytest.raises(ValueError, match="'fc'"):
        fourierft_jax.nnx.apply(model, fourierft_jax.FourierFTConfig(n_frequency=17, target_modules=["fc"]),
                                rngs=nnx.Rngs(0))
    assert type(model.fc) is nnx.Linear  # untouched on failure


def test_separate_learning_rates_with_two_optimizers():
    model = _model(bias="fourier_only", modules_to_save=["head"])
    x = jax.random.normal(jax.random.key(0), (6, D_IN))
    y = jax.random.randint(jax.random.key(1), (6,), 0, 3)
    spectra_opt = nnx.Optimizer(model, optax.sgd(1.0), wrt=fourierft_jax.nnx.FourierFTSpectrum)
    head_opt = nnx.Optimizer(model, optax.sgd(0.0), wrt=fourierft_jax.nnx.FourierFTTrainable)
    before_spectra = np.array(model.encoder.fc1.spectrum[...])
    before_head = np.array(model.head.kernel[...])

    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    spectra_opt.update(model, grads)
    head_opt.update(model, grads)
    assert not np.array_equal(before_spectra, model.encoder.fc1.spectrum[...])
    np.testing.assert_array_equal(before_head, model.head.kernel[...])  # lr 0 for the head group
