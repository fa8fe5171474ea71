"""Torch twins of the third-party JAX fixtures: transformers models from configs built in code, and the weight
conversion onto the JAX layouts.

keras-hub Llama ← ``transformers.LlamaForCausalLM`` (per layer ``i``; D model, N query heads, K kv heads, H head):

===============================================  =====================================================  ==================
torch state_dict key                              keras-hub variable path                                 conversion
===============================================  =====================================================  ==================
``model.embed_tokens.weight (V, D)``              ``token_embedding/embeddings (V, D)``                   as is
``lm_head.weight (V, D)``                         ``token_embedding/reverse_embeddings (D, V)``           ``.T``
``model.layers.i.self_attn.q_proj.weight``        ``transformer_layer_i/self_attention/query/kernel``      ``W.T.reshape(D, N, H)``
``(N·H, D)``                                      ``(D, N, H)``
``…k_proj.weight``/``…v_proj.weight (K·H, D)``    ``…/key/kernel``/``…/value/kernel (D, K, H)``           ``W.T.reshape(D, K, H)``
``…o_proj.weight (D, N·H)``                       ``…/attention_output/kernel (N, H, D)``                 ``W.T.reshape(N, H, D)``
``…mlp.gate_proj.weight (F, D)``                  ``transformer_layer_i/feedforward_gate_dense/kernel``   ``.T``
``…mlp.up_proj.weight (F, D)``                    ``…/feedforward_intermediate_dense/kernel (D, F)``      ``.T``
``…mlp.down_proj.weight (D, F)``                  ``…/feedforward_output_dense/kernel (F, D)``            ``.T``
``…input_layernorm.weight (D,)``                  ``…/self_attention_layernorm/scale``                    as is
``…post_attention_layernorm.weight (D,)``         ``…/feedforward_layernorm/scale``                       as is
``model.norm.weight (D,)``                        ``sequence_output_layernorm/scale``                     as is
===============================================  =====================================================  ==================

Conventions that must agree: both RoPEs are half-split (``rotate_half``; keras-hub ``RotaryEmbedding`` splits
the head dim in two halves, so no q/k permutation), ``rope_theta = rope_max_wavelength = 10000``, RMSNorm
``eps = layer_norm_epsilon = 1e-6`` computed in float32, SiLU gate, no biases, untied head
(``tie_word_embeddings=False``), ``head_dim = hidden // heads``; keras-hub's ``padding_mask`` of ones = an
all-ones ``attention_mask``.

keras-hub Gemma ← ``transformers.GemmaModel``: ``q_proj (N·H, D)`` = query ``(N, D, H)``
``.transpose(0, 2, 1).reshape(N·H, D)`` (so ``kernel = W.reshape(N, H, D).transpose(0, 2, 1)``), ``k/v_proj``
likewise with K, ``o_proj (D, N·H)`` = ``attention_output (N, H, D)`` ``.reshape(N·H, D).T``, ``gate_proj`` =
``ffw_gating.T``, ``up_proj`` = ``ffw_gating_2.T``, ``down_proj`` = ``ffw_linear.T`` (keras ``intermediate_dim``
is twice transformers' ``intermediate_size``), norms as is (both compute ``x·(1 + w)``), embeddings scaled by
``sqrt(D)`` in both, tanh-GELU.

The EasyDeL look-alike has transformers' names already: ``kernel = weight.T``.
"""

from __future__ import annotations

import re

import numpy as np

import lookalike_models as look
import thirdparty_models as tm


def _torch():
    import torch
    import transformers

    return torch, transformers


def llama_config(keras_config=None):
    """The ``transformers.LlamaConfig`` of ``thirdparty_models.KERAS_LLAMA``."""
    _, transformers = _torch()
    c = dict(tm.KERAS_LLAMA if keras_config is None else keras_config)
    return transformers.LlamaConfig(
        vocab_size=c["vocabulary_size"], hidden_size=c["hidden_dim"], intermediate_size=c["intermediate_dim"],
        num_hidden_layers=c["num_layers"], num_attention_heads=c["num_query_heads"],
        num_key_value_heads=c["num_key_value_heads"], head_dim=c["hidden_dim"] // c["num_query_heads"],
        rms_norm_eps=c["layer_norm_epsilon"], max_position_embeddings=128, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": float(c["rope_max_wavelength"])},
        attention_bias=False, mlp_bias=False, tie_word_embeddings=c["tie_word_embeddings"],
        attn_implementation="eager", torch_dtype="float32",
    )


def gemma_config():
    """The ``transformers.GemmaConfig`` of ``thirdparty_models.KERAS_GEMMA``."""
    _, transformers = _torch()
    c = tm.KERAS_GEMMA
    return transformers.GemmaConfig(
        vocab_size=c["vocabulary_size"], hidden_size=c["hidden_dim"], intermediate_size=c["intermediate_dim"] // 2,
        num_hidden_layers=c["num_layers"], num_attention_heads=c["num_query_heads"],
        num_key_value_heads=c["num_key_value_heads"], head_dim=c["head_dim"], rms_norm_eps=c["layer_norm_epsilon"],
        max_position_embeddings=128, hidden_activation="gelu_pytorch_tanh", attention_bias=False,
        attn_implementation="eager", torch_dtype="float32",
    )


def _randomize(model, seed):
    """Non-trivial weights: the default init leaves RMSNorm weights at 1 (Gemma: 0) and tiny projections."""
    torch, _ = _torch()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if "gemma" not in type(model).__name__.lower() else 0.0)
                        + 0.2 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    return model.eval()


def torch_llama(seed: int = 0, config=None):
    """A tiny ``LlamaForCausalLM`` with random weights, float32, eager attention."""
    _, transformers = _torch()
    return _randomize(transformers.LlamaForCausalLM(config or llama_config()), seed)


def torch_gemma(seed: int = 0):
    _, transformers = _torch()
    return _randomize(transformers.GemmaModel(gemma_config()), seed)


def _np(t):
    return t.detach().cpu().numpy().astype(np.float32)


# (torch key regex, keras-hub path template, conversion(weight, config) → keras array)
KERAS_LLAMA_FROM_TORCH = [
    (r"model\.embed_tokens\.weight", "token_embedding/embeddings", lambda w, c: w),
    (r"lm_head\.weight", "token_embedding/reverse_embeddings", lambda w, c: w.T),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", r"transformer_layer_\1/self_attention/query/kernel",
     lambda w, c: w.T.reshape(c["hidden_dim"], c["num_query_heads"], -1)),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", r"transformer_layer_\1/self_attention/key/kernel",
     lambda w, c: w.T.reshape(c["hidden_dim"], c["num_key_value_heads"], -1)),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", r"transformer_layer_\1/self_attention/value/kernel",
     lambda w, c: w.T.reshape(c["hidden_dim"], c["num_key_value_heads"], -1)),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"transformer_layer_\1/self_attention/attention_output/kernel",
     lambda w, c: w.T.reshape(c["num_query_heads"], -1, c["hidden_dim"])),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"transformer_layer_\1/feedforward_gate_dense/kernel",
     lambda w, c: w.T),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"transformer_layer_\1/feedforward_intermediate_dense/kernel",
     lambda w, c: w.T),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"transformer_layer_\1/feedforward_output_dense/kernel",
     lambda w, c: w.T),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"transformer_layer_\1/self_attention_layernorm/scale",
     lambda w, c: w),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"transformer_layer_\1/feedforward_layernorm/scale",
     lambda w, c: w),
    (r"model\.norm\.weight", "sequence_output_layernorm/scale", lambda w, c: w),
]

KERAS_GEMMA_FROM_TORCH = [
    (r"embed_tokens\.weight", "token_embedding/embeddings", lambda w, c: w),
    (r"layers\.(\d+)\.self_attn\.q_proj\.weight", r"decoder_block_\1/attention/query/kernel",
     lambda w, c: w.reshape(c["num_query_heads"], c["head_dim"], -1).transpose(0, 2, 1)),
    (r"layers\.(\d+)\.self_attn\.k_proj\.weight", r"decoder_block_\1/attention/key/kernel",
     lambda w, c: w.reshape(c["num_key_value_heads"], c["head_dim"], -1).transpose(0, 2, 1)),
    (r"layers\.(\d+)\.self_attn\.v_proj\.weight", r"decoder_block_\1/attention/value/kernel",
     lambda w, c: w.reshape(c["num_key_value_heads"], c["head_dim"], -1).transpose(0, 2, 1)),
    (r"layers\.(\d+)\.self_attn\.o_proj\.weight", r"decoder_block_\1/attention/attention_output/kernel",
     lambda w, c: w.T.reshape(c["num_query_heads"], c["head_dim"], -1)),
    (r"layers\.(\d+)\.mlp\.gate_proj\.weight", r"decoder_block_\1/ffw_gating/kernel", lambda w, c: w.T),
    (r"layers\.(\d+)\.mlp\.up_proj\.weight", r"decoder_block_\1/ffw_gating_2/kernel", lambda w, c: w.T),
    (r"layers\.(\d+)\.mlp\.down_proj\.weight", r"decoder_block_\1/ffw_linear/kernel", lambda w, c: w.T),
    (r"layers\.(\d+)\.input_layernorm\.weight", r"decoder_block_\1/pre_attention_norm/scale", lambda w, c: w),
    (r"layers\.(\d+)\.post_attention_layernorm\.weight", r"decoder_block_\1/pre_ffw_norm/scale", lambda w, c: w),
    (r"norm\.weight", "final_normalization/scale", lambda w, c: w),
]

# keras-hub Gemma module names → transformers GemmaForCausalLM module names.
KERAS_GEMMA_TO_TORCH = [
    (r"^decoder_block_(\d+)\.", r"model.layers.\1."),
    (r"\.attention\.query$", ".self_attn.q_proj"),
    (r"\.attention\.key$", ".self_attn.k_proj"),
    (r"\.attention\.value$", ".self_attn.v_proj"),
    (r"\.attention\.attention_output$", ".self_attn.o_proj"),
    (r"\.ffw_gating$", ".mlp.gate_proj"),
    (r"\.ffw_gating_2$", ".mlp.up_proj"),
    (r"\.ffw_linear$", ".mlp.down_proj"),
]


def convert(state_dict, rules, config) -> dict:
    """A torch state_dict → nested ``{path segment: float32 array}``; every key must match exactly one rule."""
    tree: dict = {}
    for key, tensor in state_dict.items():
        hits = [(p, t, f) for p, t, f in rules if re.fullmatch(p, key)]
        if len(hits) != 1:
            raise KeyError(f"torch key {key!r} matches {len(hits)} conversion rules")
        pattern, template, fn = hits[0]
        path = re.sub(pattern, template, key)
        *parents, leaf = path.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = np.ascontiguousarray(fn(_np(tensor), config))
    return tree


def keras_llama_params_from_torch(torch_model) -> dict:
    """keras-hub ``LlamaCausalLM`` params (the ``thirdparty_models.keras_params`` tree) from a torch Llama."""
    return convert(torch_model.state_dict(), KERAS_LLAMA_FROM_TORCH, tm.KERAS_LLAMA)


def keras_gemma_params_from_torch(torch_model) -> dict:
    return convert(torch_model.state_dict(), KERAS_GEMMA_FROM_TORCH, tm.KERAS_GEMMA)


def easydel_params_from_torch(torch_model) -> dict:
    """The EasyDeL look-alike's tree from a torch ``LlamaForCausalLM`` (``kernel = weight.T``)."""
    tree: dict = {}
    for key, tensor in torch_model.state_dict().items():
        parts = key.split(".")
        module, leaf = parts[:-1], parts[-1]
        value = _np(tensor)
        if leaf == "weight" and module[-1] == "embed_tokens":
            leaf_name = "embedding"
        else:
            leaf_name = "kernel"
            value = value.T if value.ndim == 2 else value
        node = tree
        for part in module:
            part = int(part) if part.isdigit() else part
            node = node.setdefault(part, {})
        node[leaf_name] = np.ascontiguousarray(value)
    return tree


EASYDEL_CONFIG = dict(vocabulary_size=look.V, num_layers=look.L, num_query_heads=look.N, hidden_dim=look.D,
                      intermediate_dim=look.F, num_key_value_heads=look.K, layer_norm_epsilon=look.EPS,
                      rope_max_wavelength=look.ROPE_THETA, tie_word_embeddings=False)


def easydel_torch_config():
    """``LlamaConfig`` of the EasyDeL look-alike (head_dim = H, not D // N)."""
    config = llama_config(EASYDEL_CONFIG)
    config.head_dim = look.H
    return config


def torch_outputs(model, token_ids: np.ndarray, hidden: bool = False) -> np.ndarray:
    """Logits of a ``*ForCausalLM`` (``hidden=True``, or a bare model: the final-norm hidden states), float32."""
    torch, _ = _torch()
    with torch.no_grad():
        ids = torch.from_numpy(np.asarray(token_ids, np.int64))
        if hidden and hasattr(model, "lm_head"):
            model = model.model
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return (out.last_hidden_state if hidden or not hasattr(out, "logits") else out.logits).numpy()


def maxtext_params_from_torch(torch_model) -> dict:
    """The MaxText look-alike's scanned tree (layer axis 1) from a torch ``LlamaForCausalLM`` with its shapes."""
    sd = {k: _np(v) for k, v in torch_model.state_dict().items()}
    d, n, k, h = look.D, look.N, look.K, look.H
    layers = range(look.L)

    def stack(fn):
        return np.ascontiguousarray(np.stack([fn(i) for i in layers], axis=look.PARAM_SCAN_AXIS))

    w = lambda i, name: sd[f"model.layers.{i}.{name}.weight"]  # noqa: E731
    return {"params": {
        "token_embedder": {"embedding": sd["model.embed_tokens.weight"]},
        "decoder": {
            "layers": {
                "pre_self_attention_layer_norm": {"scale": stack(lambda i: w(i, "input_layernorm"))},
                "self_attention": {
                    "query": {"kernel": stack(lambda i: w(i, "self_attn.q_proj").T.reshape(d, n, h))},
                    "key": {"kernel": stack(lambda i: w(i, "self_attn.k_proj").T.reshape(d, k, h))},
                    "value": {"kernel": stack(lambda i: w(i, "self_attn.v_proj").T.reshape(d, k, h))},
                    "out": {"kernel": stack(lambda i: w(i, "self_attn.o_proj").T.reshape(n, h, d))},
                },
                "post_self_attention_layer_norm": {"scale": stack(lambda i: w(i, "post_attention_layernorm"))},
                "mlp": {
                    "wi_0": {"kernel": stack(lambda i: w(i, "mlp.gate_proj").T)},
                    "wi_1": {"kernel": stack(lambda i: w(i, "mlp.up_proj").T)},
                    "wo": {"kernel": stack(lambda i: w(i, "mlp.down_proj").T)},
                },
            },
            "decoder_norm": {"scale": sd["model.norm.weight"]},
            "logits_dense": {"kernel": np.ascontiguousarray(sd["lm_head.weight"].T)},
        },
    }}


# Which twin each exportable fixture has: fixture id → (torch model builder(seed), params from the torch model).
TORCH_TWINS = {
    "keras_llama_lm": (lambda seed: torch_llama(seed), keras_llama_params_from_torch),
    "easydel_llama": (lambda seed: torch_llama(seed, config=easydel_torch_config()), easydel_params_from_torch),
    "maxtext_llama": (lambda seed: torch_llama(seed, config=easydel_torch_config()), maxtext_params_from_torch),
}


def train_default_mode(forward, params, inputs, labels, trainable, steps):
    """``steps`` adam steps (lr 1e-2, cross-entropy on ``labels``) of ``forward(trainable, params, *inputs)``
    in one compiled step; one more call gives the trained adapter's logits (its update is dropped).

    Returns the trained state and its logits; asserts that the loss went down.
    """
    import jax
    import optax

    optimizer = optax.adam(1e-2)

    def loss_fn(state):
        logits = forward(state, params, *inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    @jax.jit
    def step(state, opt_state):
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state)
        updates, opt_state = optimizer.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss, logits

    opt_state, losses = optimizer.init(trainable), []
    for _ in range(steps + 1):
        new_state, opt_state, loss, logits = step(trainable, opt_state)
        losses.append(float(loss))
        if len(losses) <= steps:
            trainable = new_state
    assert losses[-1] < losses[0]
    return trainable, np.asarray(logits)
