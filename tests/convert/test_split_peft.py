"""Split kernels: gemma's fused ``kv_einsum`` / ``gating_einsum`` adapted as separate torch layers (``split=``),
exported with the shipped gemma -> transformers rules, loaded by PEFT on a torch twin with the same numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch

import bridge
import fourierft_jax

D, N, H, K, F, V, LAYERS = 16, 4, 6, 2, 24, 11, 2


def gemma_params(seed=0):
    keys = iter(jax.random.split(jax.random.key(seed), 32))
    r = lambda *shape: 0.3 * jax.random.normal(next(keys), shape)  # noqa: E731
    params = {"embedder": {"input_embedding": r(V, D)}}
    for i in range(LAYERS):
        params[f"layer_{i}"] = {
            "attn": {"q_einsum": {"w": r(N, D, H)}, "kv_einsum": {"w": r(2, K, D, H)},
                     "attn_vec_einsum": {"w": r(N, H, D)}},
            "mlp": {"gating_einsum": r(2, F, D), "linear": r(F, D)},
        }
    return params


def gemma_fn(params, tokens):
    h = params["embedder"]["input_embedding"][tokens]
    for i in range(LAYERS):
        p = params[f"layer_{i}"]
        q = jnp.einsum("BTD,NDH->BTNH", h, p["attn"]["q_einsum"]["w"])
        k, v = jnp.einsum("BSD,CKDH->CBSKH", h, p["attn"]["kv_einsum"]["w"])
        k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
        w = jax.nn.softmax(jnp.einsum("BTNH,BSNH->BNTS", q, k), axis=-1)
        h = h + jnp.einsum("BTNH,NHD->BTD", jnp.einsum("BNTS,BSNH->BTNH", w, v), p["attn"]["attn_vec_einsum"]["w"])
        gate, up = jnp.einsum("BTD,CFD->CBTF", h, p["mlp"]["gating_einsum"])
        h = h + jnp.einsum("BTF,FD->BTD", jax.nn.gelu(gate) * up, p["mlp"]["linear"])
    return h @ params["embedder"]["input_embedding"].T


class TorchLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = torch.nn.Module()
        for name, (o, i) in {"q_proj": (N * H, D), "k_proj": (K * H, D), "v_proj": (K * H, D),
                             "o_proj": (D, N * H)}.items():
            setattr(self.self_attn, name, torch.nn.Linear(i, o, bias=False))
        self.mlp = torch.nn.Module()
        for name, (o, i) in {"gate_proj": (F, D), "up_proj": (F, D), "down_proj": (D, F)}.items():
            setattr(self.mlp, name, torch.nn.Linear(i, o, bias=False))

    def forward(self, h):
        b, t, _ = h.shape
        a = self.self_attn
        q = a.q_proj(h).view(b, t, N, H)
        k = a.k_proj(h).view(b, t, K, H).repeat_interleave(N // K, dim=2)
        v = a.v_proj(h).view(b, t, K, H).repeat_interleave(N // K, dim=2)
        w = torch.softmax(torch.einsum("btnh,bsnh->bnts", q, k), dim=-1)
        h = h + a.o_proj(torch.einsum("bnts,bsnh->btnh", w, v).reshape(b, t, N * H))
        m = self.mlp
        return h + m.down_proj(torch.nn.functional.gelu(m.gate_proj(h), approximate="tanh") * m.up_proj(h))


class TorchTwin(torch.nn.Module):
    """The same network with transformers Gemma 3's module names (``model.layers.<i>.self_attn.q_proj`` ...)."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(V, D)
        self.model.layers = torch.nn.ModuleList([TorchLayer() for _ in range(LAYERS)])

    def forward(self, tokens):
        h = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            h = layer(h)
        return h @ self.model.embed_tokens.weight.T


def torch_twin(params):
    """Gemma's kernels as torch ``(out, in)`` weights: out = kept axes, in = contracted axes, in kernel order."""
    twin = TorchTwin()
    t = lambda a: torch.tensor(np.asarray(a, np.float32))  # noqa: E731
    with torch.no_grad():
        twin.model.embed_tokens.weight.copy_(t(params["embedder"]["input_embedding"]))
        for i, layer in enumerate(twin.model.layers):
            p = params[f"layer_{i}"]
            kv = np.asarray(p["attn"]["kv_einsum"]["w"])
            layer.self_attn.q_proj.weight.copy_(t(np.transpose(p["attn"]["q_einsum"]["w"], (0, 2, 1)).reshape(N * H, D)))
            layer.self_attn.k_proj.weight.copy_(t(np.transpose(kv[0], (0, 2, 1)).reshape(K * H, D)))
            layer.self_attn.v_proj.weight.copy_(t(np.transpose(kv[1], (0, 2, 1)).reshape(K * H, D)))
            layer.self_attn.o_proj.weight.copy_(t(np.reshape(p["attn"]["attn_vec_einsum"]["w"], (N * H, D)).T))
            layer.mlp.gate_proj.weight.copy_(t(p["mlp"]["gating_einsum"][0]))
            layer.mlp.up_proj.weight.copy_(t(p["mlp"]["gating_einsum"][1]))
            layer.mlp.down_proj.weight.copy_(t(np.asarray(p["mlp"]["linear"]).T))
    return twin.eval()


TOKENS = np.array([[1, 4, 2, 9], [3, 0, 7, 5]])


def test_the_twin_is_the_jax_model():
    params = gemma_params()
    want = np.asarray(gemma_fn(params, TOKENS))
    with torch.no_grad():
        got = torch_twin(params)(torch.tensor(TOKENS)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def trained():
    params = gemma_params()
    config = fourierft_jax.FourierFTConfig(n_frequency=20, scaling=4.0, target_modules="all-linear",
                                           random_loc_seed=5)
    trace = lambda p: gemma_fn(p, TOKENS)  # noqa: E731
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(1), trace=trace,
                                  split=fourierft_jax.GEMMA_SPLIT)
    forward = adapter.make_apply(gemma_fn)
    tx = optax.adam(1e-2)
    state, opt = adapter.trainable, tx.init(adapter.trainable)
    @jax.jit
    def step(state, opt):
        loss, grads = jax.value_and_grad(lambda s: jnp.mean((forward(s, params, TOKENS) - 1.0) ** 2))(state)
        updates, opt = tx.update(grads, opt, state)
        return optax.apply_updates(state, updates), opt, loss

    for _ in range(3):
        state, opt, _ = step(state, opt)
    adapter.set_trainable(state)
    return params, adapter, trace


def test_split_kernels_are_separate_layers(trained):
    _, adapter, _ = trained
    layers = {layer.name: layer for layer in adapter.specs["default"].layers}
    kv = layers["layer_0.attn.kv_einsum"]
    assert kv.torch_names == ("layer_0.attn.kv_einsum.0", "layer_0.attn.kv_einsum.1")
    assert (kv.stack_axis, kv.out_features, kv.in_features, kv.dims) == (0, K * H, D, (K, D, H))
    assert adapter.trainable["default"]["spectra"]["layer_0.attn.kv_einsum"].shape == (2, 20)
    gating = layers["layer_1.mlp.gating_einsum"]
    assert (gating.out_features, gating.in_features, gating.kernel_leaf) == (F, D, "")
    # each part has PEFT's positions for its own (out, in) shape
    np.testing.assert_array_equal(kv.torch_indices, bridge.spectral_indices(K * H, D, 20, 5))


def test_split_forward_equals_the_merge_and_the_dense_reference(trained):
    params, adapter, _ = trained
    merged = adapter.merge_and_unload(params)
    # merge_and_unload's kv kernel = each part's own ΔW (float64 formula) in its slice
    spectra = adapter.trainable["default"]["spectra"]["layer_0.attn.kv_einsum"]
    layer = next(l for l in adapter.specs["default"].layers if l.name == "layer_0.attn.kv_einsum")
    for part in range(2):
        delta = bridge.delta_weight(np.asarray(spectra[part], np.float64), layer.torch_indices, K * H, D, 4.0)
        want = np.asarray(params["layer_0"]["attn"]["kv_einsum"]["w"][part], np.float64) + np.transpose(
            delta.reshape(K, H, D), (0, 2, 1))
        np.testing.assert_allclose(merged["layer_0"]["attn"]["kv_einsum"]["w"][part], want, rtol=1e-5, atol=1e-6)
    want = gemma_fn(merged, TOKENS)
    for mode in ("auto", "fused", "spectral"):
        got = adapter.make_apply(gemma_fn, mode=mode)(adapter.trainable, params, TOKENS)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    g = lambda mode: jax.grad(lambda t: jnp.sum(adapter.make_apply(gemma_fn, mode=mode)(t, params, TOKENS) ** 2))(  # noqa: E731
        adapter.trainable)
    for a, b in zip(jax.tree.leaves(g("fused")), jax.tree.leaves(g("merge"))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))


def test_exported_split_adapter_gives_peft_the_same_logits(trained, tmp_path):
    params, adapter, trace = trained
    folder = tmp_path / "peft"
    fourierft_jax.export_peft(adapter, folder, name_map=fourierft_jax.GEMMA_TO_TRANSFORMERS)
    keys = set(bridge.read_adapter(folder)[1])
    assert "base_model.model.model.layers.1.self_attn.v_proj.fourierft_spectrum" in keys
    assert "base_model.model.model.layers.0.mlp.up_proj.fourierft_spectrum" in keys
    model = peft.PeftModel.from_pretrained(torch_twin(params), str(folder))
    with torch.no_grad():
        got = model(torch.tensor(TOKENS)).numpy()
    want = np.asarray(adapter.make_apply(gemma_fn)(adapter.trainable, params, TOKENS))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    # and back: PEFT's file onto the JAX model gives the same adapter
    back = fourierft_jax.import_peft(folder, params, trace=trace, split=fourierft_jax.GEMMA_SPLIT,
                                     name_map=fourierft_jax.GEMMA_TO_TRANSFORMERS)
    again = back.make_apply(gemma_fn)(back.trainable, params, TOKENS)
    np.testing.assert_allclose(again, want, rtol=1e-6, atol=1e-6)


def test_densegeneral_biases_are_torch_vectors_and_peft_agrees(tmp_path):
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral(8, axis=(-2, -1), name="o")(nn.DenseGeneral((2, 4), name="q")(x))

    class TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.o = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.o(self.q(x))

    model, x = Net(), jax.random.normal(jax.random.key(0), (3, 8))
    params = model.init(jax.random.key(1), x)
    params = jax.tree.map(lambda a: a + 0.1, params)  # non-zero biases
    config = fourierft_jax.FourierFTConfig(n_frequency=6, scaling=3.0, target_modules=["q", "o"], bias="fourier_only")
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(2), trace=lambda p: model.apply(p, x))
    trained = adapter.trainable["default"]
    adapter.set_trainable({"default": dict(trained, bias=jax.tree.map(lambda b: b + 0.5, trained["bias"]))})
    fourierft_jax.export_peft(adapter, tmp_path / "peft")
    tensors = bridge.read_adapter(tmp_path / "peft")[1]
    assert tensors["base_model.model.q.base_layer.bias"].shape == (8,)
    twin = TorchNet()
    p = params["params"]
    with torch.no_grad():
        twin.q.weight.copy_(torch.tensor(np.asarray(p["q"]["kernel"]).reshape(8, 8).T))
        twin.q.bias.copy_(torch.tensor(np.asarray(p["q"]["bias"]).reshape(8)))
        twin.o.weight.copy_(torch.tensor(np.asarray(p["o"]["kernel"]).reshape(8, 8).T))
        twin.o.bias.copy_(torch.tensor(np.asarray(p["o"]["bias"])))
        got = peft.PeftModel.from_pretrained(twin, str(tmp_path / "peft"))(torch.tensor(np.asarray(x))).numpy()
    want = np.asarray(adapter.make_apply(model.apply)(adapter.trainable, params, x))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    back = fourierft_jax.import_peft(tmp_path / "peft", params, trace=lambda p: model.apply(p, x))
    assert back.trainable["default"]["bias"]["q"].shape == (2, 4)
    np.testing.assert_allclose(back.make_apply(model.apply)(back.trainable, params, x), want, rtol=1e-6, atol=1e-6)
