"""FourierFT on any JAX function of any parameter pytree: N-D DenseGeneral/Einsum kernels, bare arrays, integer keys,
dataclass models, scanned DenseGeneral stacks -- against a numpy float64 dense reference and the merge path."""

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bridge
import fourierft_jax
import fourierft_jax._src
from fourierft_jax._src.trace import ContractionTraceError

D, N, H, K, F, V = 16, 4, 6, 2, 24, 11


def _matrix_delta(layer, spectrum):
    """ΔW of one layer in the stored kernel layout, from bridge's float64 dense formula (torch (out, in))."""
    torch_delta = bridge.delta_weight(np.asarray(spectrum, np.float64), layer.torch_indices, layer.out_features,
                                      layer.in_features, layer.scaling)
    dims, inside = layer.dims, layer.contracted
    kept = tuple(a for a in range(len(dims)) if a not in inside)
    split = torch_delta.T.reshape(tuple(dims[a] for a in inside) + tuple(dims[a] for a in kept))
    order = inside + kept
    return np.transpose(split, [order.index(a) for a in range(len(dims))])


def _reference_params(params, adapter):
    """``params`` with every adapted kernel replaced by W + ΔW, ΔW from the float64 dense formula."""
    from fourierft_jax._src.tree import get_path, replace_paths, split_collection

    inner, rebuild = split_collection(params)
    updates = {}
    for layer in adapter.specs["default"].layers:
        spectrum = adapter.trainable["default"]["spectra"][layer.name]
        kernel = np.asarray(get_path(inner, layer.kernel_path), np.float64)
        updates[layer.kernel_path] = jnp.asarray(kernel + _matrix_delta(layer, spectrum), jnp.float32)
    return rebuild(replace_paths(inner, updates))


def _reference_spectrum_grads(fn, params, adapter):
    """∂L/∂c from the dense kernel gradient G of the merged model: ∂L/∂c_k = Σ G·∂ΔW/∂c_k, in float64."""
    from fourierft_jax._src.tree import get_path, split_collection

    merged = _reference_params(params, adapter)
    grads, _ = split_collection(jax.grad(fn)(merged))
    out = {}
    for layer in adapter.specs["default"].layers:
        g = np.asarray(get_path(grads, layer.kernel_path), np.float64)
        dims, inside = layer.dims, layer.contracted
        kept = tuple(a for a in range(len(dims)) if a not in inside)
        g_matrix = np.transpose(g, inside + kept).reshape(layer.in_features, layer.out_features).T  # (out, in)
        rows, cols = layer.torch_indices
        p = np.arange(layer.out_features)[:, None]
        q = np.arange(layer.in_features)[None, :]
        basis = np.cos(2 * np.pi * (rows[:, None, None] * p / layer.out_features
                                    + cols[:, None, None] * q / layer.in_features))
        out[layer.name] = layer.scaling / (layer.in_features * layer.out_features) * np.einsum("kpq,pq->k", basis,
                                                                                              g_matrix)
    return out


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


class Attention(nn.Module):
    """DenseGeneral q/k/v (D, N, H) and output (N, H, D), an Einsum, flax's own attention and a Dense MLP."""

    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((N, H), name="query")(x)
        k = nn.DenseGeneral((N, H), name="key")(x)
        v = nn.DenseGeneral((N, H), name="value")(x)
        w = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H), axis=-1)
        h = nn.DenseGeneral(D, axis=(-2, -1), name="out")(jnp.einsum("bnts,bsnh->btnh", w, v))
        h = h + nn.Einsum((N, D, H), "btd,ndh->btnh", name="proj")(x).sum(-1) @ jnp.ones((N, D)) / N
        h = h + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, name="mha")(h)
        return nn.Dense(D, name="mlp")(nn.gelu(h))


@pytest.fixture(scope="module")
def attention():
    model = Attention()
    x = jax.random.normal(jax.random.key(0), (2, 5, D))
    params = model.init(jax.random.key(1), x)
    config = fourierft_jax.FourierFTConfig(n_frequency=30, scaling=20.0, target_modules="all-linear")
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(2), trace=lambda p: model.apply(p, x))
    return model, params, adapter, x


def test_trace_reads_each_kernels_contraction(attention):
    _, _, adapter, _ = attention
    got = {layer.name: (layer.dims, layer.contracted, layer.out_features, layer.in_features)
           for layer in adapter.specs["default"].layers}
    assert got["query"] == ((D, N, H), (0,), N * H, D)
    assert got["out"] == ((N, H, D), (0, 1), D, N * H)
    assert got["proj"] == ((N, D, H), (1,), N * H, D)
    assert got["mha.query"] == ((D, 2, 4), (0,), 8, D)
    assert got["mha.out"] == ((2, 4, D), (0, 1), D, 8)
    assert got["mlp"] == ((D, D), (0,), D, D)
    assert len(got) == 10  # query, key, value, out, proj, mha.{query,key,value,out}, mlp


@pytest.mark.parametrize("mode", ["auto", "fused", "spectral", "merge"])
def test_outputs_and_gradients_match_the_dense_reference(attention, mode):
    model, params, adapter, x = attention
    forward = adapter.make_apply(model.apply, mode=mode)
    weights = jax.random.normal(jax.random.key(3), (2, 5, D))
    loss = lambda t: jnp.sum(forward(t, params, x) * weights)  # noqa: E731
    want = model.apply(_reference_params(params, adapter), x)
    assert rel(forward(adapter.trainable, params, x), want) < 1e-5
    grads = jax.grad(loss)(adapter.trainable)["default"]["spectra"]
    ref = _reference_spectrum_grads(lambda p: jnp.sum(model.apply(p, x) * weights), params, adapter)
    for name, g in ref.items():
        assert rel(grads[name], g) < 1e-4, name


def test_init_weights_true_is_the_base_model_exactly(attention):
    model, params, _, x = attention
    config = fourierft_jax.FourierFTConfig(n_frequency=30, target_modules="all-linear", init_weights=True)
    adapter = fourierft_jax.apply(params, config, trace=lambda p: model.apply(p, x))
    base = np.asarray(model.apply(params, x))
    for mode in ("fused", "spectral"):
        np.testing.assert_array_equal(np.asarray(adapter.make_apply(model.apply, mode=mode)(adapter.trainable,
                                                                                            params, x)), base)


def _kernel_grad_dots(hlo, layers):
    shapes = set()
    for layer in layers:
        shapes.add(",".join(map(str, layer.dims)))
        shapes.add(f"{layer.in_features},{layer.out_features}")
        shapes.add(f"{layer.out_features},{layer.in_features}")
    return [s for s in shapes if re.search(rf"f32\[{s}\]\{{[0-9,]*\}} dot\(", hlo)]


@pytest.mark.parametrize("mode,expect", [("fused", False), ("merge", True)])
def test_compiled_step_has_no_kernel_gradient_dot(attention, mode, expect):
    model, params, adapter, x = attention
    forward = adapter.make_apply(model.apply, mode=mode)
    hlo = jax.jit(jax.grad(lambda t: forward(t, params, x).sum())).lower(adapter.trainable).compile().as_text()
    found = _kernel_grad_dots(hlo, adapter.specs["default"].layers)
    assert bool(found) == expect, found


def test_merge_and_unload_equals_the_adapted_forward(attention):
    model, params, adapter, x = attention
    merged = adapter.merge_and_unload(params)
    assert rel(model.apply(merged, x), adapter.make_apply(model.apply)(adapter.trainable, params, x)) < 1e-5


# -- a gemma-style hand-written model: bare arrays, Einsum `w` params, an embedding table, integer keys ---------


def _gemma_like(seed=0):
    keys = iter(jax.random.split(jax.random.key(seed), 16))
    r = lambda *shape: 0.3 * jax.random.normal(next(keys), shape)  # noqa: E731
    layers = {i: {"attn": {"q_einsum": {"w": r(N, D, H)}, "kv_einsum": {"w": r(2, K, D, H)},
                           "attn_vec_einsum": {"w": r(N, H, D)}},
                  "mlp": {"gating_einsum": r(2, F, D), "linear": r(F, D)}, "pre_norm": {"scale": r(D)}}
              for i in range(2)}
    return {"embedder": {"input_embedding": r(V, D)}, "layers": layers}


def gemma_fn(params, tokens):
    h = params["embedder"]["input_embedding"][tokens]
    for i in sorted(params["layers"], key=int):
        p = params["layers"][i]
        x = h * (1 + p["pre_norm"]["scale"])
        q = jnp.einsum("BTD,NDH->BTNH", x, p["attn"]["q_einsum"]["w"])
        k, v = jnp.einsum("BSD,CKDH->CBSKH", x, p["attn"]["kv_einsum"]["w"])
        k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
        w = jax.nn.softmax(jnp.einsum("BTNH,BSNH->BNTS", q, k), axis=-1)
        h = h + jnp.einsum("BTNH,NHD->BTD", jnp.einsum("BNTS,BSNH->BTNH", w, v), p["attn"]["attn_vec_einsum"]["w"])
        gate, up = jnp.einsum("BTD,CFD->CBTF", h, p["mlp"]["gating_einsum"])
        h = h + jnp.einsum("BTF,FD->BTD", jax.nn.gelu(gate) * up, p["mlp"]["linear"])
    return h @ params["embedder"]["input_embedding"].T  # tied decoding


def test_gemma_layout_all_linear_never_takes_the_embedding_and_matches_the_reference():
    params, tokens = _gemma_like(), jnp.array([[1, 4, 2], [3, 0, 7]])
    config = fourierft_jax.FourierFTConfig(n_frequency=25, scaling=30.0, target_modules="all-linear")
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(4), trace=lambda p: gemma_fn(p, tokens))
    got = {layer.name: (layer.dims, layer.contracted) for layer in adapter.specs["default"].layers}
    assert got["layers.0.attn.q_einsum"] == ((N, D, H), (1,))
    assert got["layers.1.attn.kv_einsum"] == ((2, K, D, H), (2,))
    assert got["layers.0.attn.attn_vec_einsum"] == ((N, H, D), (0, 1))
    assert got["layers.0.mlp.gating_einsum"] == ((2, F, D), (2,))
    assert got["layers.1.mlp.linear"] == ((F, D), (0,))
    assert len(got) == 10 and not any("embed" in name for name in got)
    forward = adapter.make_apply(gemma_fn)
    want = gemma_fn(_reference_params(params, adapter), tokens)
    assert rel(forward(adapter.trainable, params, tokens), want) < 1e-5
    grads = jax.grad(lambda t: jnp.sum(forward(t, params, tokens) ** 2))(adapter.trainable)["default"]["spectra"]
    ref = _reference_spectrum_grads(lambda p: jnp.sum(gemma_fn(p, tokens) ** 2), params, adapter)
    for name, g in ref.items():
        assert rel(grads[name], g) < 1e-4, name
    merged = adapter.merge_and_unload(params)
    assert set(merged["layers"]) == {0, 1}  # integer keys kept
    assert rel(gemma_fn(merged, tokens), want) < 1e-5


def test_errors_name_the_path():
    params = _gemma_like()
    config = fourierft_jax.FourierFTConfig(n_frequency=5, target_modules=["q_einsum"])
    with pytest.raises(TypeError, match="layers.0.attn.q_einsum.*trace="):
        fourierft_jax.apply(params, config, key=jax.random.key(0))

    def broken(p):
        raise RuntimeError("model code failed")

    with pytest.raises(ContractionTraceError, match="model code failed"):
        fourierft_jax.apply(params, config, key=jax.random.key(0), trace=broken)

    def twice(p):  # the same kernel contracted on D and on H
        w = p["layers"][0]["attn"]["q_einsum"]["w"]
        return jnp.einsum("bd,ndh->bnh", jnp.ones((1, D)), w).sum() + jnp.einsum("bh,ndh->bnd", jnp.ones((1, H)),
                                                                                   w).sum()

    with pytest.raises(TypeError, match="layers.0.attn.q_einsum.*two different ways"):
        fourierft_jax.apply(params, config, key=jax.random.key(0), trace=twice)
    # declared contractions work without a trace
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(0),
                                  contracting={"layers.0.attn.q_einsum": [1], "layers.1.attn.q_einsum": [1]})
    assert [layer.in_axes for layer in adapter.specs["default"].layers] == [(1,), (1,)]


def test_a_2d_kernel_contracted_otherwise_than_built_is_refused():
    params = {"proj": {"weight": jnp.ones((6, 4))}}  # used as x @ weight.T: contracted on axis 1
    config = fourierft_jax.FourierFTConfig(n_frequency=5, target_modules=["proj"])
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(0))  # no trace: (in, out) assumed
    fn = lambda p, x: x @ p["proj"]["weight"].T  # noqa: E731
    with pytest.raises(ValueError, match="proj.*contracts axes \\[1\\]"):
        adapter.make_apply(fn)(adapter.trainable, params, jnp.ones((2, 4)))
    traced = fourierft_jax.apply(params, config, key=jax.random.key(0), trace=lambda p: fn(p, jnp.ones((2, 4))))
    layer = traced.specs["default"].layers[0]
    assert (layer.out_features, layer.in_features) == (6, 4)  # torch's (out, in): the weight as stored
    want = fn(_reference_params(params, traced), jnp.ones((2, 4)))
    assert rel(traced.make_apply(fn)(traced.trainable, params, jnp.ones((2, 4))), want) < 1e-5


# -- a dataclass pytree model (equinox/penzai style) ----------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Linear:
    weight: jax.Array
    bias: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Mlp:
    up: Linear
    down: Linear


def mlp_fn(model, x):
    return jax.nn.relu(x @ model.up.weight + model.up.bias) @ model.down.weight + model.down.bias


def test_dataclass_model_keeps_its_type_and_matches_the_reference():
    keys = jax.random.split(jax.random.key(5), 2)
    model = Mlp(Linear(jax.random.normal(keys[0], (D, F)), jnp.zeros(F)),
                Linear(jax.random.normal(keys[1], (F, D)), jnp.zeros(D)))
    x = jax.random.normal(jax.random.key(6), (3, D))
    config = fourierft_jax.FourierFTConfig(n_frequency=20, scaling=5.0, target_modules=["up", "down"], bias="all")
    adapter = fourierft_jax.apply(model, config, key=jax.random.key(7), trace=lambda m: mlp_fn(m, x))
    assert adapter.layers() == ["up", "down"]
    assert sorted(adapter.trainable["default"]["bias"]) == ["down", "up"]
    got = adapter.make_apply(mlp_fn)(adapter.trainable, model, x)
    assert rel(got, mlp_fn(_reference_params(model, adapter), x)) < 1e-5
    merged = adapter.merge_and_unload(model)
    assert isinstance(merged, Mlp) and isinstance(merged.up, Linear)
    assert rel(mlp_fn(merged, x), got) < 1e-5


# -- MaxText-style: DenseGeneral under nn.scan with the layer axis at 1 --------------------------------------


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        q = nn.DenseGeneral((N, H), name="query")(h)
        return h + nn.DenseGeneral(D, axis=(-2, -1), name="out")(q), None


class Decoder(nn.Module):
    @nn.compact
    def __call__(self, x):
        layers = nn.scan(Block, variable_axes={"params": 1}, split_rngs={"params": True}, length=3)
        return layers(name="layers")(x, None)[0]


def test_scanned_densegeneral_stack_with_layer_axis_1():
    model, x = Decoder(), jax.random.normal(jax.random.key(8), (2, 4, D))
    params = model.init(jax.random.key(9), x)
    assert params["params"]["layers"]["query"]["kernel"].shape == (D, 3, N, H)
    config = fourierft_jax.FourierFTConfig(n_frequency=15, scaling=10.0, target_modules=["query", "out"],
                                           layers_to_transform=[0, 2], layers_pattern="layers")
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(10), stacked={"layers": 1},
                                  trace=lambda p: model.apply(p, x))
    layers = {layer.name: layer for layer in adapter.specs["default"].layers}
    assert layers["layers.query"].dims == (D, N, H) and layers["layers.query"].contracted == (0,)
    assert layers["layers.out"].contracted == (0, 1) and layers["layers.out"].stack_ids == (0, 2)
    want = adapter.make_apply(model.apply, mode="merge")
    got = adapter.make_apply(model.apply)
    g = lambda f: jax.grad(lambda t: jnp.sum(f(t, params, x) ** 2))(adapter.trainable)  # noqa: E731
    assert rel(got(adapter.trainable, params, x), want(adapter.trainable, params, x)) < 1e-5
    for a, b in zip(jax.tree.leaves(g(got)), jax.tree.leaves(g(want))):
        assert rel(a, b) < 1e-4
    hlo = jax.jit(jax.grad(lambda t: got(t, params, x).sum())).lower(adapter.trainable).compile().as_text()
    assert not _kernel_grad_dots(hlo, [layer.unstacked for layer in layers.values()])
