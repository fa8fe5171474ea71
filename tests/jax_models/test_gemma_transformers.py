"""Google DeepMind's ``gemma`` library (``gm.nn.Transformer``, Gemma 3 architecture) against transformers'
``Gemma3ForCausalLM``: the base models agree once the weights are converted, and an adapter trained in JAX with
``split=GEMMA_SPLIT`` and exported with ``name_map=GEMMA_TO_TRANSFORMERS`` loads in PEFT with the same logits.

Both models are tiny random ones built in code (no download). The Gemma 3 features in play: q/k RMSNorm, post-
attention and post-feed-forward norms, ``1 + scale`` RMSNorms (eps 1e-6), embeddings scaled by ``sqrt(D)``, tied
embedding decode, query scaling ``head_dim ** -0.5`` (transformers' ``query_pre_attn_scalar = head_dim``), a local
(sliding window 4, shorter than the 7-token batch, RoPE base 10k) and a global (RoPE base 1M) layer, tanh-GELU.

gemma params → torch state_dict (D model, N query heads, K kv heads, H head dim, F hidden; per layer ``i``):

====================================================  =============================================  ===========================
gemma ``params`` path                                   transformers key                               conversion
====================================================  =============================================  ===========================
``embedder.input_embedding (V, D)``                     ``model.embed_tokens.weight`` (+ tied head)    as is
``layer_i.attn.q_einsum.w (N, D, H)``                   ``model.layers.i.self_attn.q_proj.weight``     ``.transpose(0, 2, 1)``
                                                                                                        ``.reshape(N·H, D)``
``layer_i.attn.kv_einsum.w (2, K, D, H)``               ``…k_proj`` (``[0]``), ``…v_proj`` (``[1]``)   likewise, ``(K·H, D)``
``layer_i.attn.qkv_einsum.w (3, N, D, H)`` (K == N)     ``…q_proj``, ``…k_proj``, ``…v_proj``           likewise
``layer_i.attn.attn_vec_einsum.w (N, H, D)``            ``…o_proj.weight (D, N·H)``                    ``.reshape(N·H, D).T``
``layer_i.attn._query_norm.scale (H,)``                 ``…self_attn.q_norm.weight``                   as is
``layer_i.attn._key_norm.scale (H,)``                   ``…self_attn.k_norm.weight``                   as is
``layer_i.mlp.gating_einsum (2, F, D)`` / ``(2, D, F)``  ``…mlp.gate_proj`` (``[0]``), ``…up_proj``     as is / ``.T``
``layer_i.mlp.linear (F, D)``                           ``…mlp.down_proj.weight (D, F)``               ``.T``
``layer_i.pre_attention_norm.scale``                    ``…input_layernorm.weight``                    as is
``layer_i.post_attention_norm.scale``                   ``…post_attention_layernorm.weight``           as is
``layer_i.pre_ffw_norm.scale``                          ``…pre_feedforward_layernorm.weight``          as is
``layer_i.post_ffw_norm.scale``                         ``…post_feedforward_layernorm.weight``         as is
``final_norm.scale``                                    ``model.norm.weight``                          as is
====================================================  =============================================  ===========================
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fourierft_jax
import twins

pytest.importorskip("gemma")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

V, D, F, N, H = 64, 32, 48, 4, 8
SLIDING_WINDOW, LOCAL_BASE, GLOBAL_BASE = 4, 10_000, 1_000_000
BATCH, LENGTH = 2, 7
N_FREQUENCY, SCALING, SEED = 12, 50.0, 777
PROJECTIONS = ["q_einsum", "kv_einsum", "qkv_einsum", "attn_vec_einsum", "gating_einsum", "linear"]

# variant → (num_kv_heads, transpose_gating_einsum): GQA with Gemma 3's (2, F, D) gating; MHA's fused qkv_einsum
# with the older (2, D, F) gating.
VARIANTS = {"gqa": (2, True), "mha": (N, False)}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def gm_config(num_kv_heads: int, transpose_gating_einsum: bool):
    from gemma import gm

    local, glob = gm.nn.config.AttentionType.LOCAL_SLIDING, gm.nn.config.AttentionType.GLOBAL
    return gm.nn.config.TransformerConfig(
        num_embed=V, embed_dim=D, hidden_dim=F, num_heads=N, head_dim=H, num_kv_heads=num_kv_heads,
        final_logit_softcap=None, use_post_attn_norm=True, use_post_ffw_norm=True, use_qk_norm=True,
        attention_types=(local, glob),
        query_pre_attn_norm=gm.nn.config.QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_HEAD_DIM,
        attn_logits_soft_cap=None, sliding_window_size=SLIDING_WINDOW,
        transpose_gating_einsum=transpose_gating_einsum,
        local_base_frequency=LOCAL_BASE, global_base_frequency=GLOBAL_BASE,
    )


def hf_config(config):
    """The ``Gemma3TextConfig`` of a gemma ``TransformerConfig``."""
    import transformers
    from gemma import gm

    kinds = {gm.nn.config.AttentionType.LOCAL_SLIDING: "sliding_attention",
             gm.nn.config.AttentionType.GLOBAL: "full_attention"}
    return transformers.Gemma3TextConfig(
        vocab_size=config.num_embed, hidden_size=config.embed_dim, intermediate_size=config.hidden_dim,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6, query_pre_attn_scalar=config.head_dim, sliding_window=config.sliding_window_size,
        layer_types=[kinds[t] for t in config.attention_types],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": float(config.local_base_frequency)},
            "full_attention": {"rope_type": "default", "rope_theta": float(config.global_base_frequency)},
        },
        final_logit_softcapping=config.final_logit_softcap, attn_logit_softcapping=config.attn_logits_soft_cap,
        tie_word_embeddings=True, max_position_embeddings=128, attention_bias=False,
        attn_implementation="eager", dtype="float32",
    )


def torch_state_dict(variables, config) -> dict:
    """gemma ``{"params": ...}`` → ``Gemma3ForCausalLM`` state_dict (numpy float32), by the table above."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float32), variables["params"])
    d, n, h = config.embed_dim, config.num_heads, config.head_dim

    def heads(w):  # (heads, D, H) → (heads·H, D)
        return w.transpose(0, 2, 1).reshape(-1, d)

    sd = {"model.embed_tokens.weight": p["embedder"]["input_embedding"], "model.norm.weight": p["final_norm"]["scale"]}
    for i in range(config.num_layers):
        layer, out = p[f"layer_{i}"], f"model.layers.{i}."
        attn = layer["attn"]
        if "qkv_einsum" in attn:
            q, k, v = attn["qkv_einsum"]["w"]
        else:
            q, (k, v) = attn["q_einsum"]["w"], attn["kv_einsum"]["w"]
        gating = layer["mlp"]["gating_einsum"]
        if not config.transpose_gating_einsum:  # (2, D, F) → (2, F, D)
            gating = gating.transpose(0, 2, 1)
        sd.update({
            out + "self_attn.q_proj.weight": heads(q),
            out + "self_attn.k_proj.weight": heads(k),
            out + "self_attn.v_proj.weight": heads(v),
            out + "self_attn.o_proj.weight": attn["attn_vec_einsum"]["w"].reshape(n * h, d).T,
            out + "self_attn.q_norm.weight": attn["_query_norm"]["scale"],
            out + "self_attn.k_norm.weight": attn["_key_norm"]["scale"],
            out + "mlp.gate_proj.weight": gating[0],
            out + "mlp.up_proj.weight": gating[1],
            out + "mlp.down_proj.weight": layer["mlp"]["linear"].T,
            out + "input_layernorm.weight": layer["pre_attention_norm"]["scale"],
            out + "post_attention_layernorm.weight": layer["post_attention_norm"]["scale"],
            out + "pre_feedforward_layernorm.weight": layer["pre_ffw_norm"]["scale"],
            out + "post_feedforward_layernorm.weight": layer["post_ffw_norm"]["scale"],
        })
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


class Pair:
    """The gemma model, its random variables and example tokens, and the transformers twin with those weights."""

    def __init__(self, num_kv_heads: int, transpose_gating_einsum: bool, seed: int = 0):
        import torch
        import transformers
        from gemma import gm

        self.config = gm_config(num_kv_heads, transpose_gating_einsum)
        self.model = gm.nn.Transformer(config=self.config, dtype=jnp.float32)
        rng = np.random.default_rng(seed)
        self.tokens = rng.integers(1, V, (BATCH, LENGTH)).astype(np.int32)  # 0 is gemma's padding id
        # The library's own tree (names, shapes), without compiling its init: random values drawn here. Norm
        # scales are 0.3·N(0, 1) (gemma's RMSNorm multiplies by 1 + scale; its init is 0), the rest 0.5·N(0, 1).
        shapes = jax.eval_shape(self.model.init, jax.random.key(seed), self.tokens)
        self.variables = jax.tree.map(
            lambda s: jnp.asarray((0.3 if len(s.shape) == 1 else 0.5) * rng.standard_normal(s.shape), s.dtype),
            shapes)
        self.logits_fn = lambda v, tokens: self.model.apply(v, tokens).logits
        self.jax_logits = np.asarray(jax.jit(self.logits_fn)(self.variables, self.tokens))

        self.torch_model = transformers.Gemma3ForCausalLM(hf_config(self.config)).eval()
        state = {k: torch.tensor(v) for k, v in torch_state_dict(self.variables, self.config).items()}
        missing, unexpected = self.torch_model.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        assert self.torch_model.lm_head.weight.data_ptr() == self.torch_model.model.embed_tokens.weight.data_ptr()
        self.torch_logits = twins.torch_outputs(self.torch_model, self.tokens)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request) -> Pair:
    return Pair(*VARIANTS[request.param])


def _module_names(variables) -> dict[str, tuple]:
    """Dotted module path (``params`` and a ``w`` leaf dropped, fourierft_jax's naming) → kernel shape."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
        keys = [k.key for k in path]
        if keys[-1] == "w":
            keys = keys[:-1]
        out[".".join(keys)] = tuple(leaf.shape)
    return out


def test_gemma_params_are_named_as_the_presets_expect(pair):
    c = pair.config
    names = _module_names(pair.variables)
    k, fused = c.num_kv_heads, c.num_kv_heads == c.num_heads
    gating = (2, F, D) if c.transpose_gating_einsum else (2, D, F)
    for i in range(c.num_layers):
        p = f"layer_{i}."
        want = {p + "attn.attn_vec_einsum": (N, H, D), p + "mlp.gating_einsum": gating, p + "mlp.linear": (F, D),
                p + "attn._query_norm.scale": (H,), p + "attn._key_norm.scale": (H,)}
        want.update({p + "attn.qkv_einsum": (3, N, D, H)} if fused else
                    {p + "attn.q_einsum": (N, D, H), p + "attn.kv_einsum": (2, k, D, H)})
        for norm in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"):
            want[p + norm + ".scale"] = (D,)
        assert {n: s for n, s in names.items() if n.startswith(p)} == want
    assert names["embedder.input_embedding"] == (V, D) and names["final_norm.scale"] == (D,)
    assert len(names) == 2 + c.num_layers * (10 if fused else 11)


def test_base_models_agree(pair):
    assert pair.jax_logits.shape == pair.torch_logits.shape == (BATCH, LENGTH, V)
    assert np.all(np.isfinite(pair.jax_logits))
    assert rel_err(pair.jax_logits, pair.torch_logits) < 1e-5  # measured ~1.5e-7


def test_sliding_window_is_in_play(pair):
    """The local layer's window (4) is shorter than the batch (7): a window ≥ 7 would change the logits."""
    wide = pair.model.clone(config=dataclasses.replace(pair.config, sliding_window_size=LENGTH))
    wide_logits = np.asarray(jax.jit(lambda v, t: wide.apply(v, t).logits)(pair.variables, pair.tokens))
    assert rel_err(wide_logits, pair.jax_logits) > 1e-3


def _train(pair, config, steps=3):
    """A few adam steps in the default mode; returns the trained adapter and its logits."""
    adapter = fourierft_jax.apply(pair.variables, config, key=jax.random.key(1),
                                  trace=lambda v: pair.logits_fn(v, pair.tokens), split=fourierft_jax.GEMMA_SPLIT)
    forward = adapter.make_apply(pair.logits_fn)
    labels = jnp.asarray(np.random.default_rng(5).integers(0, V, pair.tokens.shape))
    trainable, logits = twins.train_default_mode(forward, pair.variables, (pair.tokens,), labels, adapter.trainable,
                                                 steps)
    adapter.set_trainable(trainable)
    return adapter, logits


def _expected_torch_layers(config) -> list[str]:
    out = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        out += [p + f"self_attn.{m}_proj" for m in "qkvo"] + [p + f"mlp.{m}_proj" for m in ("gate", "up", "down")]
    return sorted(out)


def _adapted_torch_names(adapter) -> list[str]:
    named = fourierft_jax.GEMMA_TO_TRANSFORMERS.to_torch_names(
        [name for layer in adapter.specs["default"].layers for name in layer.torch_names])
    return sorted(named.values())


def _config(target_modules):
    return fourierft_jax.FourierFTConfig(n_frequency=N_FREQUENCY, scaling=SCALING, random_loc_seed=SEED,
                                         target_modules=target_modules)


def test_jax_trained_adapter_loads_in_peft_on_gemma3(pair, tmp_path):
    adapter, want = _train(pair, _config("all-linear"))
    fused = pair.config.num_kv_heads == pair.config.num_heads
    parts = ["attn.qkv_einsum.0", "attn.qkv_einsum.1", "attn.qkv_einsum.2"] if fused else [
        "attn.q_einsum", "attn.kv_einsum.0", "attn.kv_einsum.1"]
    assert sorted(name for layer in adapter.specs["default"].layers for name in layer.torch_names) == sorted(
        f"layer_{i}.{m}" for i in range(pair.config.num_layers)
        for m in parts + ["attn.attn_vec_einsum", "mlp.gating_einsum.0", "mlp.gating_einsum.1", "mlp.linear"])
    assert _adapted_torch_names(adapter) == _expected_torch_layers(pair.config)
    assert rel_err(pair.torch_logits, want) > 1e-3  # the adapter matters
    folder = fourierft_jax.export_peft(adapter, tmp_path / "peft", name_map=fourierft_jax.GEMMA_TO_TRANSFORMERS)
    loaded = peft.PeftModel.from_pretrained(pair.torch_model, str(folder)).eval()
    try:
        peft_layers = sorted(n.removeprefix("base_model.model.") for n, m in loaded.named_modules()
                             if isinstance(m, peft.tuners.fourierft.FourierFTLayer))
        assert peft_layers == _expected_torch_layers(pair.config)
        assert rel_err(twins.torch_outputs(loaded, pair.tokens), want) <= 1e-5
    finally:
        loaded.unload()  # the twin is shared by the module's tests: put its nn.Linear layers back
    assert rel_err(twins.torch_outputs(pair.torch_model, pair.tokens), pair.torch_logits) == 0.0


def test_explicit_target_list_selects_the_same_layers(pair):
    """``target_modules`` naming gemma's modules (a split kernel by its whole name) = ``"all-linear"``."""
    trace = lambda v: pair.logits_fn(v, pair.tokens)  # noqa: E731
    adapter = fourierft_jax.apply(pair.variables, _config(PROJECTIONS), key=jax.random.key(1), trace=trace,
                                  split=fourierft_jax.GEMMA_SPLIT)
    assert _adapted_torch_names(adapter) == _expected_torch_layers(pair.config)
    only_kv = fourierft_jax.apply(pair.variables, _config(["kv_einsum", "qkv_einsum"]), key=jax.random.key(1),
                                  trace=trace, split=fourierft_jax.GEMMA_SPLIT)
    want = [f"model.layers.{i}.self_attn.{m}_proj" for i in range(pair.config.num_layers)
            for m in ("qkv" if pair.config.num_kv_heads == pair.config.num_heads else "kv")]
    assert _adapted_torch_names(only_kv) == sorted(want)
