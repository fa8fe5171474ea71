"""Tiny models of third-party JAX libraries, built in code from random configs, for ``fourierft_jax.apply``.

Each builder returns a ``ThirdPartyModel``: the parameter pytree, a pure ``fn(params, *inputs)``, example inputs,
and the expected adapted layers as *literal* layouts written from each library's documented equations (the tests
also check them against the arrays the library really built). Libraries:

* ``keras_hub`` 0.32.0 (Keras 3.15.1, JAX backend): ``LlamaBackbone``, ``LlamaCausalLM``, ``GemmaBackbone``.
  Params are ``{path segments...: array}`` nested from ``variable.path.split("/")`` of the trainable variables,
  so ``transformer_layer_0/self_attention/query/kernel`` is module ``transformer_layer_0.self_attention.query``;
  ``fn`` is ``model.stateless_call``.
* ``gemma`` 3.3.0 (``gm.nn.Transformer``, flax linen): variables ``{"params": ...}``; attention kernels under
  ``w`` (``layer_0.attn.q_einsum``), MLP kernels bare arrays (``layer_0.mlp.gating_einsum``).
* EasyDeL and MaxText do not install against the pinned jax/flax/transformers/Python; ``lookalike_models``
  reproduces their layouts by hand.

A layout: ``layer_shape`` is one layer's kernel as stored (for a layer stack: without the stack axis),
``in_axes`` the axes the model contracts, ``equation`` the library's contraction. The torch weight is
``(out, in)`` with out = the kept axes flattened in kernel order and in = the contracted axes flattened in kernel
order.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Optional, Sequence

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lookalike_models as look  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Layout:
    """One projection: where its kernel is, one layer's kernel shape, its contracted axes, the library's equation."""

    kernel_path: tuple  # pytree path of the kernel leaf inside ``params``
    layer_shape: tuple[int, ...]
    in_axes: tuple[int, ...]
    equation: str
    stack_axis: Optional[int] = None  # the layer axis of a stacked (scanned) kernel, in the stored array
    stack_size: int = 0

    @property
    def out_axes(self) -> tuple[int, ...]:
        return tuple(a for a in range(len(self.layer_shape)) if a not in self.in_axes)

    @property
    def in_features(self) -> int:
        return math.prod(self.layer_shape[a] for a in self.in_axes)

    @property
    def out_features(self) -> int:
        return math.prod(self.layer_shape[a] for a in self.out_axes)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        if self.stack_axis is None:
            return self.layer_shape
        shape = list(self.layer_shape)
        shape.insert(self.stack_axis, self.stack_size)
        return tuple(shape)

    def kernel_to_torch(self, kernel: np.ndarray) -> np.ndarray:
        """One layer's kernel → the torch ``(out, in)`` weight."""
        kernel = np.asarray(kernel)
        return np.transpose(kernel, self.out_axes + self.in_axes).reshape(self.out_features, self.in_features)

    def torch_to_kernel(self, weight: np.ndarray) -> np.ndarray:
        """A torch ``(out, in)`` weight (or ΔW) → one layer's kernel layout."""
        dims = [self.layer_shape[a] for a in self.out_axes + self.in_axes]
        return np.transpose(np.asarray(weight).reshape(dims), np.argsort(self.out_axes + self.in_axes))


@dataclasses.dataclass
class ThirdPartyModel:
    """A tiny model and what FourierFT should find in it."""

    name: str
    params: Any
    fn: Callable[..., Any]
    inputs: tuple
    layouts: dict[str, Layout]  # module name → layout: exactly what target_modules="all-linear" selects
    never: tuple[str, ...]  # module names (embeddings, norms; named by the rule above) that nothing selects
    output_layer: Optional[str] = None  # the LM head, which "all-linear" leaves out (PEFT's rule)
    stacked: Any = None  # the ``stacked=`` argument for ``fourierft_jax.apply``
    make_fn64: Optional[Callable[[], Callable]] = None  # under jax.enable_x64: a float64 twin of ``fn``
    to_torch: Optional[list[tuple[str, str]]] = None  # NameMap(to_torch=...) rules onto the torch twin
    targets: tuple[str, ...] = ()  # a target_modules list ("query"/"value"-like) and what it selects:
    selected_by_targets: tuple[str, ...] = ()

    def trace(self, params):
        return self.fn(params, *self.inputs)

    @functools.cached_property
    def jit_fn(self) -> Callable[..., Any]:
        """``jax.jit(fn)``, made once: every call on same-shaped params reuses its compilation."""
        return jax.jit(self.fn)

    @functools.cached_property
    def _vjp64(self):
        fn64 = self.make_fn64()

        def run(p64, inputs, probe):
            out, pull = jax.vjp(lambda p: fn64(p, *inputs), p64)
            return out, pull(probe.astype(out.dtype))[0]

        return jax.jit(run)

    def run64_vjp(self, params, probe) -> tuple[np.ndarray, Any]:
        """``fn`` in float64 on the example inputs, and d sum(out · probe) / d params: one compilation per model."""
        with jax.enable_x64(True):
            p64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), params)
            out, grads = self._vjp64(p64, tuple(jnp.asarray(x) for x in self.inputs),
                                     jnp.asarray(np.asarray(probe, np.float64)))
            return np.asarray(out), jax.tree.map(np.asarray, grads)

    def run64(self, params, *inputs) -> np.ndarray:
        """``fn`` in float64 (params and float inputs cast) on ``inputs`` (default: the example inputs)."""
        inputs = inputs or self.inputs
        with jax.enable_x64(True):
            fn64 = self.make_fn64()
            p64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), params)
            return np.asarray(jax.jit(fn64)(p64, *[jnp.asarray(x) for x in inputs]))


def get_path(tree, path: Sequence):
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree, path: Sequence, value):
    """A copy of nested dicts ``tree`` with the leaf at ``path`` replaced."""
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = set_path(tree[path[0]], path[1:], value)
    return out


def _tokens(batch=2, length=7, vocab=64, seed=0):
    return np.random.default_rng(seed).integers(1, vocab, (batch, length)).astype(np.int32)


# -- keras-hub (one decoder layer: its layouts are per layer) --------------------------------------------------------
KERAS_LLAMA = dict(vocabulary_size=64, num_layers=1, num_query_heads=4, hidden_dim=32, intermediate_dim=64,
                   num_key_value_heads=2, layer_norm_epsilon=1e-6, rope_max_wavelength=10000.0,
                   tie_word_embeddings=False)
KERAS_GEMMA = dict(vocabulary_size=64, num_layers=1, num_query_heads=4, num_key_value_heads=2, hidden_dim=32,
                   intermediate_dim=96, head_dim=6, layer_norm_epsilon=1e-6)

# keras-hub Llama module names → transformers LlamaForCausalLM module names (the twin in twins.py).
KERAS_LLAMA_TO_TORCH = [
    (r"^transformer_layer_(\d+)\.", r"model.layers.\1."),
    (r"\.self_attention\.query$", ".self_attn.q_proj"),
    (r"\.self_attention\.key$", ".self_attn.k_proj"),
    (r"\.self_attention\.value$", ".self_attn.v_proj"),
    (r"\.self_attention\.attention_output$", ".self_attn.o_proj"),
    (r"\.feedforward_gate_dense$", ".mlp.gate_proj"),
    (r"\.feedforward_intermediate_dense$", ".mlp.up_proj"),
    (r"\.feedforward_output_dense$", ".mlp.down_proj"),
    (r"^token_embedding\.reverse_embeddings$", "lm_head"),
]


def _keras():
    import keras

    if keras.backend.backend() != "jax":
        raise RuntimeError(f"keras runs on {keras.backend.backend()!r}: set KERAS_BACKEND=jax before importing it")
    import keras_hub

    return keras, keras_hub


def keras_params(model) -> dict:
    """The trainable variables as nested dicts keyed by the segments of ``variable.path``."""
    tree: dict = {}
    for variable in model.trainable_variables:
        *parents, leaf = variable.path.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = jnp.asarray(variable.value)
    return tree


def keras_fn(model, output=None):
    """``fn(params, token_ids, padding_mask)`` = ``model.stateless_call`` with the variables taken from ``params``."""
    paths = [v.path.split("/") for v in model.trainable_variables]
    frozen = [v.value for v in model.non_trainable_variables]

    def fn(params, token_ids, padding_mask):
        values = [get_path(params, p) for p in paths]
        out, _ = model.stateless_call(values, frozen, {"token_ids": token_ids, "padding_mask": padding_mask})
        return out if output is None else output(out)

    return fn


@functools.lru_cache(maxsize=None)
def _keras_backbone(cls_name: str, seed: int, dtype: str = "float32"):
    """A keras-hub backbone built once per (class, seed, dtype): ``LlamaBackbone`` serves both Llama fixtures."""
    keras, keras_hub = _keras()
    config = {"LlamaBackbone": KERAS_LLAMA, "GemmaBackbone": KERAS_GEMMA}[cls_name]
    keras.utils.set_random_seed(seed)
    return getattr(keras_hub.models, cls_name)(**config, dtype=dtype)


def _keras_fn64(cls_name, wrap=None):
    """A factory of the float64 ``fn`` of a keras-hub model (its float64 backbone is built once, under x64)."""
    state = {}

    def make():
        if "fn" not in state:
            backbone = _keras_backbone(cls_name, 0, "float64")
            state["fn"] = keras_fn(wrap(backbone) if wrap else backbone)
        return state["fn"]

    return make


def _keras_llama_layouts(c) -> dict[str, Layout]:
    d, n, k, f = c["hidden_dim"], c["num_query_heads"], c["num_key_value_heads"], c["intermediate_dim"]
    h = d // n
    out = {}
    for i in range(c["num_layers"]):
        p = f"transformer_layer_{i}"
        att = (p, "self_attention")
        out.update({
            f"{p}.self_attention.query": Layout(att + ("query", "kernel"), (d, n, h), (0,), "bqm,muh->bquh"),
            f"{p}.self_attention.key": Layout(att + ("key", "kernel"), (d, k, h), (0,), "bkm,mvh->bkvh"),
            f"{p}.self_attention.value": Layout(att + ("value", "kernel"), (d, k, h), (0,), "bkm,mvh->bkvh"),
            f"{p}.self_attention.attention_output": Layout(att + ("attention_output", "kernel"), (n, h, d), (0, 1),
                                                           "bquh,uhm->bqm"),
            f"{p}.feedforward_gate_dense": Layout((p, "feedforward_gate_dense", "kernel"), (d, f), (0,),
                                                  "Dense: x @ kernel"),
            f"{p}.feedforward_intermediate_dense": Layout((p, "feedforward_intermediate_dense", "kernel"), (d, f),
                                                          (0,), "Dense: x @ kernel"),
            f"{p}.feedforward_output_dense": Layout((p, "feedforward_output_dense", "kernel"), (f, d), (0,),
                                                    "Dense: x @ kernel"),
        })
    return out


def _norms(prefixes: Sequence[str], names: Sequence[str], extra: Sequence[str]) -> tuple[str, ...]:
    return tuple(f"{p}.{n}" for p in prefixes for n in names) + tuple(extra)


@functools.lru_cache(maxsize=None)
def keras_llama_backbone(seed: int = 0) -> ThirdPartyModel:
    """keras-hub ``LlamaBackbone`` (hidden states after the final norm)."""
    model = _keras_backbone("LlamaBackbone", seed)
    tokens = _tokens(vocab=KERAS_LLAMA["vocabulary_size"], seed=seed)
    layers = [f"transformer_layer_{i}" for i in range(KERAS_LLAMA["num_layers"])]
    return ThirdPartyModel(
        name="keras_hub.LlamaBackbone",
        params=keras_params(model),
        fn=keras_fn(model),
        inputs=(tokens, np.ones_like(tokens)),
        layouts=_keras_llama_layouts(KERAS_LLAMA),
        never=_norms(layers, ["self_attention_layernorm.scale", "feedforward_layernorm.scale"],
                     ["token_embedding.embeddings", "token_embedding.reverse_embeddings",
                      "sequence_output_layernorm.scale"]),
        make_fn64=_keras_fn64("LlamaBackbone"),
        to_torch=KERAS_LLAMA_TO_TORCH,
        targets=("query", "value"),
        selected_by_targets=tuple(f"{p}.self_attention.{m}" for p in layers for m in ("query", "value")),
    )


def _causal_lm(backbone):
    _, keras_hub = _keras()
    return keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)


@functools.lru_cache(maxsize=None)
def keras_llama_causal_lm(seed: int = 0) -> ThirdPartyModel:
    """keras-hub ``LlamaCausalLM`` (logits through the untied ``token_embedding.reverse_embeddings (D, V)``)."""
    model = _causal_lm(_keras_backbone("LlamaBackbone", seed))
    tokens = _tokens(vocab=KERAS_LLAMA["vocabulary_size"], seed=seed)
    layers = [f"transformer_layer_{i}" for i in range(KERAS_LLAMA["num_layers"])]
    return ThirdPartyModel(
        name="keras_hub.LlamaCausalLM",
        params=keras_params(model),
        fn=keras_fn(model),
        inputs=(tokens, np.ones_like(tokens)),
        layouts=_keras_llama_layouts(KERAS_LLAMA),
        never=_norms(layers, ["self_attention_layernorm.scale", "feedforward_layernorm.scale"],
                     ["token_embedding.embeddings", "sequence_output_layernorm.scale"]),
        output_layer="token_embedding.reverse_embeddings",
        make_fn64=_keras_fn64("LlamaBackbone", wrap=_causal_lm),
        to_torch=KERAS_LLAMA_TO_TORCH,
        targets=("query", "value"),
        selected_by_targets=tuple(f"{p}.self_attention.{m}" for p in layers for m in ("query", "value")),
    )


@functools.lru_cache(maxsize=None)
def keras_gemma_backbone(seed: int = 0) -> ThirdPartyModel:
    """keras-hub ``GemmaBackbone``: heads-first attention kernels; the MLP is ``intermediate_dim // 2`` wide."""
    c = KERAS_GEMMA
    model = _keras_backbone("GemmaBackbone", seed)
    d, n, k, h, f = c["hidden_dim"], c["num_query_heads"], c["num_key_value_heads"], c["head_dim"], \
        c["intermediate_dim"] // 2
    layouts = {}
    prefixes = [f"decoder_block_{i}" for i in range(c["num_layers"])]
    for p in prefixes:
        att = (p, "attention")
        layouts.update({
            f"{p}.attention.query": Layout(att + ("query", "kernel"), (n, d, h), (1,), "btd,ndh->btnh"),
            f"{p}.attention.key": Layout(att + ("key", "kernel"), (k, d, h), (1,), "bsd,kdh->bskh"),
            f"{p}.attention.value": Layout(att + ("value", "kernel"), (k, d, h), (1,), "bsd,kdh->bskh"),
            f"{p}.attention.attention_output": Layout(att + ("attention_output", "kernel"), (n, h, d), (0, 1),
                                                      "btnh,nhd->btd"),
            f"{p}.ffw_gating": Layout((p, "ffw_gating", "kernel"), (d, f), (0,), "btd,df->btf"),
            f"{p}.ffw_gating_2": Layout((p, "ffw_gating_2", "kernel"), (d, f), (0,), "btd,df->btf"),
            f"{p}.ffw_linear": Layout((p, "ffw_linear", "kernel"), (f, d), (0,), "btf,fd->btd"),
        })
    tokens = _tokens(vocab=c["vocabulary_size"], seed=seed)
    return ThirdPartyModel(
        name="keras_hub.GemmaBackbone",
        params=keras_params(model),
        fn=keras_fn(model),
        inputs=(tokens, np.ones_like(tokens)),
        layouts=layouts,
        never=_norms(prefixes, ["pre_attention_norm.scale", "pre_ffw_norm.scale"],
                     ["token_embedding.embeddings", "final_normalization.scale"]),
        make_fn64=_keras_fn64("GemmaBackbone"),
        targets=("query", "value"),
        selected_by_targets=tuple(f"{p}.attention.{m}" for p in prefixes for m in ("query", "value")),
    )


# -- gemma (Google DeepMind) ----------------------------------------------------------------------------------
def _gm_config(num_kv_heads: int, transpose_gating_einsum: bool):
    from gemma import gm

    return gm.nn.config.TransformerConfig(
        num_embed=64, embed_dim=32, hidden_dim=48, num_heads=4, head_dim=6, num_kv_heads=num_kv_heads,
        final_logit_softcap=None, use_post_attn_norm=True, use_post_ffw_norm=True,
        attention_types=(gm.nn.config.AttentionType.LOCAL_SLIDING, gm.nn.config.AttentionType.GLOBAL),
        sliding_window_size=4, transpose_gating_einsum=transpose_gating_einsum,
    )


@functools.lru_cache(maxsize=None)
def gemma_transformer(num_kv_heads: int = 2, transpose_gating_einsum: bool = True, seed: int = 0) -> ThirdPartyModel:
    """``gm.nn.Transformer`` from a tiny ``TransformerConfig``; ``fn`` returns the logits (tied embedding decode).

    ``num_kv_heads < num_heads``: separate ``q_einsum (N, D, H)`` and ``kv_einsum (2, K, D, H)``;
    ``num_kv_heads == num_heads``: one fused ``qkv_einsum (3, N, D, H)``. ``transpose_gating_einsum``: the
    gating kernel is ``(2, F, D)`` (Gemma 2/3 checkpoints), else ``(2, D, F)``.
    """
    from gemma import gm

    config = _gm_config(num_kv_heads, transpose_gating_einsum)
    model = gm.nn.Transformer(config=config, dtype=jnp.float32)
    model64 = gm.nn.Transformer(config=config, dtype=jnp.float64)
    tokens = _tokens(vocab=config.num_embed, seed=seed)
    variables = model.init(jax.random.key(seed), tokens)
    rng = np.random.default_rng(seed)  # the norm scales start at 0 (gemma's RMSNorm multiplies by 1 + scale)
    variables = jax.tree.map(lambda a: a + jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype)
                             if a.ndim == 1 else a, variables)
    d, n, k, h, f = config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim, config.hidden_dim
    layouts = {}
    prefixes = [f"layer_{i}" for i in range(config.num_layers)]
    for p in prefixes:
        att = ("params", p, "attn")
        if k == n:
            layouts[f"{p}.attn.qkv_einsum"] = Layout(att + ("qkv_einsum", "w"), (3, n, d, h), (2,),
                                                     "BTD,SNDH->SBTNH")
        else:
            layouts[f"{p}.attn.q_einsum"] = Layout(att + ("q_einsum", "w"), (n, d, h), (1,), "BTD,NDH->BTNH")
            layouts[f"{p}.attn.kv_einsum"] = Layout(att + ("kv_einsum", "w"), (2, k, d, h), (2,), "BSD,CKDH->CBSKH")
        layouts[f"{p}.attn.attn_vec_einsum"] = Layout(att + ("attn_vec_einsum", "w"), (n, h, d), (0, 1),
                                                      "BTNH,NHD->BTD")
        if transpose_gating_einsum:
            layouts[f"{p}.mlp.gating_einsum"] = Layout(("params", p, "mlp", "gating_einsum"), (2, f, d), (2,),
                                                       "...F,NHF->...NH")
        else:
            layouts[f"{p}.mlp.gating_einsum"] = Layout(("params", p, "mlp", "gating_einsum"), (2, d, f), (1,),
                                                       "...F,NFH->...NH")
        layouts[f"{p}.mlp.linear"] = Layout(("params", p, "mlp", "linear"), (f, d), (0,), "...H,HF->...F")
    first = "qkv_einsum" if k == n else "q_einsum"
    return ThirdPartyModel(
        name=f"gemma.gm.nn.Transformer(kv_heads={k}, transpose_gating={transpose_gating_einsum})",
        params=variables,
        fn=lambda v, tokens: model.apply(v, tokens).logits,
        inputs=(tokens,),
        layouts=layouts,
        never=_norms(prefixes, ["pre_attention_norm.scale", "post_attention_norm.scale", "pre_ffw_norm.scale",
                                "post_ffw_norm.scale"],
                     ["embedder.input_embedding", "final_norm.scale"]),
        make_fn64=functools.lru_cache(maxsize=None)(lambda: (lambda v, tokens: model64.apply(v, tokens).logits)),
        targets=(first, "attn_vec_einsum"),
        selected_by_targets=tuple(f"{p}.attn.{m}" for p in prefixes for m in (first, "attn_vec_einsum")),
    )


# -- look-alikes of libraries that do not install -------------------------------------------------------------
EASYDEL_TO_TORCH: list[tuple[str, str]] = []  # the same names as transformers' LlamaForCausalLM: the default map


@functools.lru_cache(maxsize=None)
def easydel_llama(seed: int = 0) -> ThirdPartyModel:
    """EasyDeL-style ``LlamaForCausalLM`` state (see ``lookalike_models``): 2-D ``(in, out)`` kernels, int keys."""
    params = jax.tree.map(jnp.asarray, look.init_easydel_llama(seed))
    d, f, q, kv = look.D, look.F, look.N * look.H, look.K * look.H
    layouts = {}
    for i in range(look.L):
        p = f"model.layers.{i}"
        for name, shape in (("self_attn.q_proj", (d, q)), ("self_attn.k_proj", (d, kv)),
                            ("self_attn.v_proj", (d, kv)), ("self_attn.o_proj", (q, d)),
                            ("mlp.gate_proj", (d, f)), ("mlp.up_proj", (d, f)), ("mlp.down_proj", (f, d))):
            path = ("model", "layers", i) + tuple(name.split(".")) + ("kernel",)
            layouts[f"{p}.{name}"] = Layout(path, shape, (0,), "...ik,...kj->...ij")
    prefixes = [f"model.layers.{i}" for i in range(look.L)]
    return ThirdPartyModel(
        name="easydel-lookalike.LlamaForCausalLM",
        params=params,
        fn=look.easydel_llama_logits,
        inputs=(_tokens(vocab=look.V, seed=seed),),
        layouts=layouts,
        never=_norms(prefixes, ["input_layernorm", "post_attention_layernorm"],
                     ["model.embed_tokens.embedding", "model.norm"]),
        output_layer="lm_head",
        make_fn64=lambda: look.easydel_llama_logits,
        to_torch=EASYDEL_TO_TORCH,
        targets=("q_proj", "v_proj"),
        selected_by_targets=tuple(f"{p}.self_attn.{m}" for p in prefixes for m in ("q_proj", "v_proj")),
    )


# MaxText scanned decoder names → transformers LlamaForCausalLM names (layer i of the stack "decoder.layers").
MAXTEXT_TO_TORCH = [
    (r"^decoder\.layers\.(\d+)\.self_attention\.query$", r"model.layers.\1.self_attn.q_proj"),
    (r"^decoder\.layers\.(\d+)\.self_attention\.key$", r"model.layers.\1.self_attn.k_proj"),
    (r"^decoder\.layers\.(\d+)\.self_attention\.value$", r"model.layers.\1.self_attn.v_proj"),
    (r"^decoder\.layers\.(\d+)\.self_attention\.out$", r"model.layers.\1.self_attn.o_proj"),
    (r"^decoder\.layers\.(\d+)\.mlp\.wi_0$", r"model.layers.\1.mlp.gate_proj"),
    (r"^decoder\.layers\.(\d+)\.mlp\.wi_1$", r"model.layers.\1.mlp.up_proj"),
    (r"^decoder\.layers\.(\d+)\.mlp\.wo$", r"model.layers.\1.mlp.down_proj"),
    (r"^decoder\.logits_dense$", "lm_head"),
]


@functools.lru_cache(maxsize=None)
def maxtext_llama(seed: int = 0) -> ThirdPartyModel:
    """MaxText-style scanned Llama (see ``lookalike_models``): layer axis 1 of every ``decoder.layers`` array."""
    params = jax.tree.map(jnp.asarray, look.init_maxtext_llama(seed))
    d, n, k, h, f, nl = look.D, look.N, look.K, look.H, look.F, look.L
    ax = look.PARAM_SCAN_AXIS
    stack = ("params", "decoder", "layers")
    layouts = {
        "decoder.layers.self_attention.query": Layout(stack + ("self_attention", "query", "kernel"), (d, n, h), (0,),
                                                      "dot_general(x BSD, k DNH, ((2,), (0,)))", ax, nl),
        "decoder.layers.self_attention.key": Layout(stack + ("self_attention", "key", "kernel"), (d, k, h), (0,),
                                                    "dot_general(x BSD, k DKH, ((2,), (0,)))", ax, nl),
        "decoder.layers.self_attention.value": Layout(stack + ("self_attention", "value", "kernel"), (d, k, h), (0,),
                                                      "dot_general(x BSD, k DKH, ((2,), (0,)))", ax, nl),
        "decoder.layers.self_attention.out": Layout(stack + ("self_attention", "out", "kernel"), (n, h, d), (0, 1),
                                                    "dot_general(x BSNH, k NHD, ((2, 3), (0, 1)))", ax, nl),
        "decoder.layers.mlp.wi_0": Layout(stack + ("mlp", "wi_0", "kernel"), (d, f), (0,),
                                          "dot_general(x BSD, k DF, ((2,), (0,)))", ax, nl),
        "decoder.layers.mlp.wi_1": Layout(stack + ("mlp", "wi_1", "kernel"), (d, f), (0,),
                                          "dot_general(x BSD, k DF, ((2,), (0,)))", ax, nl),
        "decoder.layers.mlp.wo": Layout(stack + ("mlp", "wo", "kernel"), (f, d), (0,),
                                        "dot_general(x BSF, k FD, ((2,), (0,)))", ax, nl),
    }
    return ThirdPartyModel(
        name="maxtext-lookalike.llama2(scan_layers, param_scan_axis=1)",
        params=params,
        fn=look.maxtext_llama_logits,
        inputs=(_tokens(vocab=look.V, seed=seed),),
        layouts=layouts,
        never=("token_embedder.embedding", "decoder.decoder_norm.scale",
               "decoder.layers.pre_self_attention_layer_norm.scale",
               "decoder.layers.post_self_attention_layer_norm.scale"),
        output_layer="decoder.logits_dense",
        stacked={"decoder.layers": ax},
        make_fn64=lambda: look.maxtext_llama_logits,
        to_torch=MAXTEXT_TO_TORCH,
        targets=("query", "value"),
        selected_by_targets=("decoder.layers.self_attention.query", "decoder.layers.self_attention.value"),
    )


# Every fixture, by test id. The keras-hub and gemma builders import their library on first call.
MODELS: dict[str, Callable[[], ThirdPartyModel]] = {
    "keras_llama": keras_llama_backbone,
    "keras_llama_lm": keras_llama_causal_lm,
    "keras_gemma": keras_gemma_backbone,
    "gemma_gqa": lambda: gemma_transformer(num_kv_heads=2, transpose_gating_einsum=True),
    "gemma_mha": lambda: gemma_transformer(num_kv_heads=4, transpose_gating_einsum=False),
    "easydel_llama": easydel_llama,
    "maxtext_llama": maxtext_llama,
}
