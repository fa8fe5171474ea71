"""Hand-written tiny JAX Llamas with the parameter layouts of libraries that do not install here.

Written from the libraries' documented layouts (no code taken from them), as plain functions over a parameter
pytree, so they run in float32 and float64 alike:

* ``easydel`` (EasyDeL 0.3.0 needs ``flax==0.12.3``, ``transformers~=5.5.0`` and ``uvloop==0.21.0``, against our
  pins ``flax==0.12.8``/``transformers==5.24.0``/``uvloop==0.23.0``): an NNX model whose ``nnx.state`` mirrors
  transformers' names, ``model.layers.<i>.self_attn.q_proj.kernel`` ``(in, out)``; ``ParallelLinear`` computes
  ``jnp.einsum("...ik,...kj->...ij", x, kernel)``; ``Embed`` keeps ``embedding (V, D)`` looked up with
  ``jnp.take``; norms keep ``kernel (D,)``; the causal-LM head is ``lm_head.kernel (D, V)``. Layers of an
  ``nnx.List`` are integer keys of the state.
* ``maxtext`` (needs Python >= 3.12; this venv is 3.11): a linen tree with ``scan_layers=True`` and
  ``param_scan_axis=1``, so every per-layer parameter carries the layer axis at position 1:
  ``decoder.layers.self_attention.query.kernel (D, L, N, H)``, ``key``/``value (D, L, K, H)``,
  ``out (N, L, H, D)``, ``mlp.wi_0``/``wi_1 (D, L, F)``, ``mlp.wo (F, L, D)``, norms ``scale (D, L)``;
  ``token_embedder.embedding (V, D)``, ``decoder.decoder_norm.scale (D,)``, ``decoder.logits_dense.kernel
  (D, V)``. ``DenseGeneral`` contracts the kernel's leading ``len(axis)`` axes with ``lax.dot_general``.

Both use half-split RoPE (``rotate_half``, as transformers' Llama) so the EasyDeL look-alike is an exact twin of
``transformers.LlamaForCausalLM`` with ``kernel = weight.T``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# One tiny shape for both look-alikes: D model, N query heads, K kv heads, H head dim, F mlp, V vocab, L layers.
D, N, K, H, F, V, L = 32, 4, 2, 6, 48, 64, 2
EPS = 1e-6
ROPE_THETA = 10000.0


def _rms(x, scale):
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    return (x32 * lax.rsqrt(var + EPS)).astype(x.dtype) * scale


def _rope(x, positions):
    """Half-split rotary embedding of ``x (B, S, heads, H)`` at integer ``positions (S,)``."""
    half = x.shape[-1] // 2
    inv = 1.0 / (ROPE_THETA ** (np.arange(0, x.shape[-1], 2, dtype=np.float64) / x.shape[-1]))
    angles = positions[:, None].astype(x.dtype) * jnp.asarray(inv, x.dtype)[None, :]  # (S, H/2)
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[None, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[None, :, None, :]
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _attention(q, k, v):
    """Causal grouped-query attention: ``q (B, S, N, H)``, ``k``/``v (B, S, K, H)`` → ``(B, S, N, H)``."""
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    logits = jnp.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(q.shape[-1]).astype(q.dtype)
    s = q.shape[1]
    causal = np.tril(np.ones((s, s), bool))
    logits = jnp.where(causal[None, None], logits, jnp.finfo(logits.dtype).min)
    return jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(logits, axis=-1), v)


def _normal(rng, shape, scale=0.2):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# -- EasyDeL layout --------------------------------------------------------------------------------------------
def init_easydel_llama(seed: int = 0) -> dict:
    """``nnx.state(LlamaForCausalLM)`` as EasyDeL 0.3.0 lays it out (integer layer keys), float32 numpy."""
    rng = np.random.default_rng(seed)
    layers = {}
    for i in range(L):
        layers[i] = {
            "self_attn": {
                "q_proj": {"kernel": _normal(rng, (D, N * H))},
                "k_proj": {"kernel": _normal(rng, (D, K * H))},
                "v_proj": {"kernel": _normal(rng, (D, K * H))},
                "o_proj": {"kernel": _normal(rng, (N * H, D))},
            },
            "mlp": {
                "gate_proj": {"kernel": _normal(rng, (D, F))},
                "up_proj": {"kernel": _normal(rng, (D, F))},
                "down_proj": {"kernel": _normal(rng, (F, D))},
            },
            "input_layernorm": {"kernel": (1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32)},
            "post_attention_layernorm": {"kernel": (1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32)},
        }
    return {
        "model": {
            "embed_tokens": {"embedding": _normal(rng, (V, D), 1.0)},
            "layers": layers,
            "norm": {"kernel": (1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32)},
        },
        "lm_head": {"kernel": _normal(rng, (D, V))},
    }


def _linear(x, p):
    return jnp.einsum("...ik,...kj->...ij", x, p["kernel"])  # EasyDeL's ParallelLinear equation


def easydel_llama_hidden(params, token_ids):
    """``LlamaModel``: hidden states after the final norm, ``(B, S, D)``."""
    m = params["model"]
    x = jnp.take(m["embed_tokens"]["embedding"], token_ids, axis=0)
    b, s = token_ids.shape
    positions = jnp.arange(s)
    for i in range(len(m["layers"])):
        p = m["layers"][i]
        h = _rms(x, p["input_layernorm"]["kernel"])
        q = _linear(h, p["self_attn"]["q_proj"]).reshape(b, s, -1, H)
        k = _linear(h, p["self_attn"]["k_proj"]).reshape(b, s, -1, H)
        v = _linear(h, p["self_attn"]["v_proj"]).reshape(b, s, -1, H)
        a = _attention(_rope(q, positions), _rope(k, positions), v).reshape(b, s, -1)
        x = x + _linear(a, p["self_attn"]["o_proj"])
        h = _rms(x, p["post_attention_layernorm"]["kernel"])
        x = x + _linear(jax.nn.silu(_linear(h, p["mlp"]["gate_proj"])) * _linear(h, p["mlp"]["up_proj"]),
                        p["mlp"]["down_proj"])
    return _rms(x, m["norm"]["kernel"])


def easydel_llama_logits(params, token_ids):
    """``LlamaForCausalLM``: logits ``(B, S, V)``."""
    return _linear(easydel_llama_hidden(params, token_ids), params["lm_head"])


# -- MaxText layout --------------------------------------------------------------------------------------------
PARAM_SCAN_AXIS = 1


def init_maxtext_llama(seed: int = 0) -> dict:
    """MaxText's ``decoder_block=llama2`` linen variables with ``scan_layers=True, param_scan_axis=1``."""
    rng = np.random.default_rng(seed)
    norm = lambda: (1.0 + 0.1 * rng.standard_normal((D, L))).astype(np.float32)  # noqa: E731
    return {
        "params": {
            "token_embedder": {"embedding": _normal(rng, (V, D), 1.0)},
            "decoder": {
                "layers": {
                    "pre_self_attention_layer_norm": {"scale": norm()},
                    "self_attention": {
                        "query": {"kernel": _normal(rng, (D, L, N, H))},
                        "key": {"kernel": _normal(rng, (D, L, K, H))},
                        "value": {"kernel": _normal(rng, (D, L, K, H))},
                        "out": {"kernel": _normal(rng, (N, L, H, D))},
                    },
                    "post_self_attention_layer_norm": {"scale": norm()},
                    "mlp": {
                        "wi_0": {"kernel": _normal(rng, (D, L, F))},
                        "wi_1": {"kernel": _normal(rng, (D, L, F))},
                        "wo": {"kernel": _normal(rng, (F, L, D))},
                    },
                },
                "decoder_norm": {"scale": (1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32)},
                "logits_dense": {"kernel": _normal(rng, (D, V))},
            },
        }
    }


def _dense_general(x, kernel, n_contract):
    """MaxText ``DenseGeneral``: the last ``n_contract`` input axes against the kernel's leading ones."""
    axes = tuple(range(x.ndim - n_contract, x.ndim))
    return lax.dot_general(x, kernel, ((axes, tuple(range(n_contract))), ((), ())))


def _maxtext_layer(x, p, positions):
    h = _rms(x, p["pre_self_attention_layer_norm"]["scale"])
    att = p["self_attention"]
    q = _rope(_dense_general(h, att["query"]["kernel"], 1), positions)  # (B,S,D)·(D,N,H) → (B,S,N,H)
    k = _rope(_dense_general(h, att["key"]["kernel"], 1), positions)
    v = _dense_general(h, att["value"]["kernel"], 1)
    x = x + _dense_general(_attention(q, k, v), att["out"]["kernel"], 2)  # (B,S,N,H)·(N,H,D) → (B,S,D)
    h = _rms(x, p["post_self_attention_layer_norm"]["scale"])
    mlp = p["mlp"]
    gate = jax.nn.silu(_dense_general(h, mlp["wi_0"]["kernel"], 1))
    return x + _dense_general(gate * _dense_general(h, mlp["wi_1"]["kernel"], 1), mlp["wo"]["kernel"], 1)


def maxtext_llama_logits(variables, token_ids):
    """``Transformer.apply``: logits ``(B, S, V)``; the decoder layers run under ``lax.scan`` over axis 1."""
    p = variables["params"]
    x = jnp.take(p["token_embedder"]["embedding"], token_ids, axis=0)
    positions = jnp.arange(token_ids.shape[1])
    stacked = jax.tree.map(lambda a: jnp.moveaxis(a, PARAM_SCAN_AXIS, 0), p["decoder"]["layers"])
    x, _ = lax.scan(lambda carry, layer: (_maxtext_layer(carry, layer, positions), None), x, stacked)
    x = _rms(x, p["decoder"]["decoder_norm"]["scale"])
    return _dense_general(x, p["decoder"]["logits_dense"]["kernel"], 1)
