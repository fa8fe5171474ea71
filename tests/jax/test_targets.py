"""Target selection on linen trees: same layers as bridge/PEFT pick on the transformers torch twin; clear errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bridge
import fourierft_jax
import fourierft_jax._src
from fftjax_models import MLP, init_mlp

HIDDEN, INTER, LAYERS, VOCAB = 32, 48, 3, 50


class SelfAttention(nn.Module):
    @nn.compact
    def __call__(self, h):
        q, k, v = (nn.Dense(HIDDEN, name=n)(h) for n in ("query", "key", "value"))
        weights = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / np.sqrt(HIDDEN), axis=-1)
        return weights @ v


class DenseLN(nn.Module):  # BertSelfOutput / BertOutput
    features: int

    @nn.compact
    def __call__(self, h, residual):
        return nn.LayerNorm(epsilon=1e-12, name="LayerNorm")(nn.Dense(self.features, name="dense")(h) + residual)


class Attention(nn.Module):
    @nn.compact
    def __call__(self, h):
        return DenseLN(HIDDEN, name="output")(SelfAttention(name="self")(h), h)


class Intermediate(nn.Module):
    @nn.compact
    def __call__(self, h):
        return nn.gelu(nn.Dense(INTER, name="dense")(h), approximate=False)


class Layer(nn.Module):
    @nn.compact
    def __call__(self, h):
        a = Attention(name="attention")(h)
        return DenseLN(HIDDEN, name="output")(Intermediate(name="intermediate")(a), a)


class LayerStack(nn.Module):
    @nn.compact
    def __call__(self, h):
        for i in range(LAYERS):
            h = Layer(name=str(i))(h)
        return h


class Encoder(nn.Module):
    @nn.compact
    def __call__(self, h):
        return LayerStack(name="layer")(h)


class Embeddings(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(VOCAB, HIDDEN, name="word_embeddings")(ids)
        h = h + nn.Embed(16, HIDDEN, name="position_embeddings")(jnp.arange(ids.shape[-1]))
        h = h + nn.Embed(2, HIDDEN, name="token_type_embeddings")(jnp.zeros_like(ids))
        return nn.LayerNorm(epsilon=1e-12, name="LayerNorm")(h)


class Pooler(nn.Module):
    @nn.compact
    def __call__(self, h):
        return jnp.tanh(nn.Dense(HIDDEN, name="dense")(h[:, 0]))


class TinyBert(nn.Module):
    """Transformers' BertModel module names, as the Flax BERT port used them."""

    @nn.compact
    def __call__(self, ids):
        h = Encoder(name="encoder")(Embeddings(name="embeddings")(ids))
        return h, Pooler(name="pooler")(h)


@pytest.fixture(scope="module")
def trees():
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
        intermediate_size=INTER, max_position_embeddings=16,
    )
    torch_model = transformers.BertModel(config)
    torch_infos = [
        bridge.ModuleInfo(name, bridge.LINEAR, tuple(m.weight.shape))
        if isinstance(m, torch.nn.Linear)
        else bridge.ModuleInfo(name, type(m).__name__)
        for name, m in torch_model.named_modules()
    ]
    shapes = jax.eval_shape(TinyBert().init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    return torch_infos, shapes


CONFIGS = [
    dict(target_modules=["query", "value"]),
    dict(target_modules=None),  # PEFT's default for bert
    dict(target_modules="all-linear"),
    dict(target_modules=["query", "key", "value", "dense"]),
    dict(target_modules=r".*\.(key|intermediate\.dense)"),
    dict(target_modules=["dense"], layers_to_transform=[0, 2], layers_pattern="layer"),
    dict(target_modules=["dense"], exclude_modules=["pooler.dense"], n_frequency_pattern={"output.dense": 7}),
    dict(target_modules=["attention.output.dense"], layers_to_transform=1),
]


@pytest.mark.parametrize("fields", CONFIGS)
def test_targets_match_bridge_on_torch_twin(trees, fields):
    torch_infos, shapes = trees
    config = fourierft_jax.FourierFTConfig(n_frequency=16, **fields)
    expected = bridge.select_targets(config, torch_infos, model_type="bert")
    got = fourierft_jax._src.select_layers(shapes["params"], config, model_type="bert")
    assert sorted((t.name, t.out_features, t.in_features, t.n_frequency) for t in expected) == sorted(
        (l.name, l.out_features, l.in_features, l.n_frequency) for l in got
    )
    assert got  # every config above selects something


def test_targeting_a_non_dense_module_names_it(trees):
    _, shapes = trees
    for target, kind in (("word_embeddings", "Embed"), ("attention", "module")):
        config = fourierft_jax.FourierFTConfig(n_frequency=4, target_modules=[target])
        with pytest.raises(TypeError, match=rf"{target}.*{kind}"):
            fourierft_jax._src.select_layers(shapes["params"], config)


def test_general_kernel_is_rejected_with_its_path():
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral((2, 4), name="proj")(nn.Conv(3, (3,), name="conv")(x))

    params = jax.eval_shape(Model().init, jax.random.key(0), jnp.ones((1, 5, 2)))
    for target in ("proj", "conv"):
        with pytest.raises(TypeError, match=rf"'{target}'.*3-D kernel"):
            fourierft_jax.apply(params, fourierft_jax.FourierFTConfig(n_frequency=4, target_modules=[target]),
                                key=jax.random.key(0))


def test_nothing_matched_and_too_many_frequencies():
    params = init_mlp()
    with pytest.raises(bridge.NoTargetError, match="encoder.fc1"):
        fourierft_jax.apply(params, fourierft_jax.FourierFTConfig(target_modules=["nope"]), key=jax.random.key(0))
    with pytest.raises(ValueError, match="head"):  # head is 16x3 = 48 entries
        fourierft_jax.apply(params, fourierft_jax.FourierFTConfig(n_frequency=49, target_modules=["head"]),
                            key=jax.random.key(0))
    with pytest.raises(ValueError, match="key"):
        fourierft_jax.apply(params, fourierft_jax.FourierFTConfig(n_frequency=4, target_modules=["head"]))


def test_params_tree_that_does_not_match_the_adapter():
    params = init_mlp()
    adapter = fourierft_jax.apply(params, fourierft_jax.FourierFTConfig(n_frequency=8, target_modules=["fc2"]),
                                  key=jax.random.key(0))
    x = jnp.ones((2, 12))
    other = jax.tree.map(lambda a: a, params)
    other["params"]["encoder"]["fc2"]["kernel"] = jnp.zeros((20, 17))
    for mode in ("merge", "spectral"):
        with pytest.raises(ValueError, match="encoder.fc2"):
            adapter.make_apply(MLP().apply, mode=mode)(adapter.trainable, other, x)
    missing = {"params": {"encoder": {"fc1": params["params"]["encoder"]["fc1"]}, "head": params["params"]["head"]}}
    with pytest.raises(KeyError, match="encoder.fc2"):
        adapter.merge_and_unload(missing)
    with pytest.raises(ValueError, match=r"holds adapter\(s\) \['other'\].*built for \['default'\]"):
        adapter.make_apply(MLP().apply)({"other": adapter.trainable["default"]}, params, x)
