"""Ready rules for real JAX model libraries: how their kernels map onto transformers' torch layers.

Google DeepMind's ``gemma`` library (``gm.nn.Transformer``) stores each decoder layer ``layer_<i>`` as ``Einsum``
modules and bare arrays: ``attn.q_einsum`` ``(N, D, H)``, ``attn.kv_einsum`` ``(2, K, D, H)`` (keys and values
side by side; ``attn.qkv_einsum`` ``(3, N, D, H)`` when ``K == N``), ``attn.attn_vec_einsum`` ``(N, H, D)``,
``mlp.gating_einsum`` ``(2, F, D)`` (gate and up) and ``mlp.linear`` ``(F, D)``. Adapted with
``split=GEMMA_SPLIT`` and exported with ``name_map=GEMMA_TO_TRANSFORMERS``, each becomes the ``nn.Linear`` of
transformers' Gemma 3 (``Gemma3ForCausalLM``, ``model.layers.<i>.self_attn.q_proj`` ...) with PEFT's positions
for that layer's own ``(out, in)`` shape.

Example:
    >>> GEMMA_TO_TRANSFORMERS.to_torch_names(["layer_3.attn.kv_einsum.1"])
    {'layer_3.attn.kv_einsum.1': 'model.layers.3.self_attn.v_proj'}
"""

from __future__ import annotations

from bridge import NameMap

GEMMA_SPLIT = {"kv_einsum": 0, "qkv_einsum": 0, "gating_einsum": 0}

_LAYER = r"^layer_(\d+)\."
_TORCH = r"model.layers.\1."
GEMMA_TO_TRANSFORMERS = NameMap(to_torch=[
    (_LAYER + r"attn\.q_einsum$", _TORCH + "self_attn.q_proj"),
    (_LAYER + r"attn\.kv_einsum\.0$", _TORCH + "self_attn.k_proj"),
    (_LAYER + r"attn\.kv_einsum\.1$", _TORCH + "self_attn.v_proj"),
    (_LAYER + r"attn\.qkv_einsum\.0$", _TORCH + "self_attn.q_proj"),
    (_LAYER + r"attn\.qkv_einsum\.1$", _TORCH + "self_attn.k_proj"),
    (_LAYER + r"attn\.qkv_einsum\.2$", _TORCH + "self_attn.v_proj"),
    (_LAYER + r"attn\.attn_vec_einsum$", _TORCH + "self_attn.o_proj"),
    (_LAYER + r"mlp\.gating_einsum\.0$", _TORCH + "mlp.gate_proj"),
    (_LAYER + r"mlp\.gating_einsum\.1$", _TORCH + "mlp.up_proj"),
    (_LAYER + r"mlp\.linear$", _TORCH + "mlp.down_proj"),
], unused_rules="ignore")  # a Gemma model has either kv_einsum or qkv_einsum: some rules never apply
