"""NNX N-D kernels: ``nnx.LinearGeneral``, ``nnx.Einsum`` and what ``nnx.MultiHeadAttention`` holds, adapted by
``fourierft_jax.nnx.apply`` (``FourierFTGeneral``) and by the functional route (``nnx.split`` + ``fourierft_jax.apply``
+ ``make_apply``).

References are independent of the package: the model is re-implemented in numpy float64 with each kernel
``W + ΔW``, where ``ΔW`` is bridge's torch-layout ``(out, in)`` matrix transposed to ``(in, out)`` and put into the
kernel's layout by the contracted axes written down here by hand; spectrum gradients are float64 central finite
differences of that numpy model.
"""

import itertools
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bridge
import fourierft_jax
from fourierft_jax.nnx import FourierFTGeneral, FourierFTLinear
from fftjax_models import rel_err

B, T, D, N, HD, E, P, K = 2, 7, 8, 2, 4, 3, 5, 3  # batch, time, model, heads, head dim, einsum dim, tp out, classes
N_FREQ, SCALING, SEED = 9, 30.0, 777
TARGETS = ["query", "key", "value", "out", "proj", "mix", "tp", "head"]
MODES = ["spectral", "fused", "auto", "merge"]

# Adapted layer -> (stored kernel shape, contracted axes), written down from each module's definition.
EXPECTED = {
    "attn.query": ((D, N, HD), (0,)),
    "attn.key": ((D, N, HD), (0,)),
    "attn.value": ((D, N, HD), (0,)),
    "attn.out": ((N, HD, D), (0, 1)),
    "proj": ((D, N, E), (0,)),        # "btd,dne->btne"
    "mix": ((N, E, D), (0, 1)),       # LinearGeneral((N, E), D, axis=(-2, -1))
    "tp": ((P, D), (1,)),             # "btd,pd->btp": a 2-D kernel stored (out, in)
    "head": ((P, K), (0,)),           # a plain nnx.Linear
}


class Net(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(num_heads=N, in_features=D, qkv_features=N * HD, decode=False,
                                           rngs=rngs)
        self.proj = nnx.Einsum("btd,dne->btne", (D, N, E), (N, E), rngs=rngs)
        self.mix = nnx.LinearGeneral((N, E), D, axis=(-2, -1), rngs=rngs)
        self.tp = nnx.Einsum("btd,pd->btp", (P, D), (P,), rngs=rngs)
        self.head = nnx.Linear(P, K, rngs=rngs)

    def __call__(self, x):
        h = x + self.attn(x)
        h = h + self.mix(nnx.gelu(self.proj(h)))
        return self.head(nnx.relu(self.tp(h)))


def _random_base(seed=0):
    """A Net with random (non-zero) biases, so that every bias path is exercised."""
    model = Net(nnx.Rngs(seed))
    key = jax.random.key(seed + 100)
    for path, module in nnx.iter_modules(model):
        bias = getattr(module, "bias", None)
        if isinstance(bias, nnx.Param):
            key, sub = jax.random.split(key)
            bias[...] = 0.1 * jax.random.normal(sub, bias.shape)
    return model


# --- the numpy float64 reference ------------------------------------------------------------------------------------

def _kernel_layout(matrix, dims, in_axes):
    """An (in, out) matrix in a kernel of shape ``dims`` contracted on ``in_axes`` (kept axes in kernel order)."""
    kept = [a for a in range(len(dims)) if a not in in_axes]
    split = matrix.reshape([dims[a] for a in in_axes] + [dims[a] for a in kept])
    return np.transpose(split, np.argsort(list(in_axes) + kept))


def _delta(name, spectrum):
    dims, in_axes = EXPECTED[name]
    n_in = int(np.prod([dims[a] for a in in_axes]))
    n_out = int(np.prod(dims)) // n_in
    torch = bridge.delta_weight(np.asarray(spectrum, np.float64), bridge.spectral_indices(n_out, n_in, N_FREQ, SEED),
                                n_out, n_in, SCALING)
    return _kernel_layout(torch.T, dims, in_axes)


def _params(base):
    """{module path: {"kernel": float64, "bias": float64}} of the plain model."""
    out = {}
    for path, module in nnx.iter_modules(base):
        name = ".".join(str(k) for k in path)
        if name in EXPECTED:
            out[name] = {"kernel": np.asarray(module.kernel[...], np.float64),
                         "bias": np.asarray(module.bias[...], np.float64)}
    return out


def _gelu(x):  # jax.nn.gelu's default tanh approximation
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def numpy_net(params, spectra, x):
    """The Net in float64 with ``W + ΔW`` for every layer in ``spectra``."""
    w = {name: p["kernel"] + (_delta(name, spectra[name]) if name in spectra else 0.0) for name, p in params.items()}
    b = {name: p["bias"] for name, p in params.items()}
    x = np.asarray(x, np.float64)
    q = np.einsum("btd,dnh->btnh", x, w["attn.query"]) + b["attn.query"]
    k = np.einsum("btd,dnh->btnh", x, w["attn.key"]) + b["attn.key"]
    v = np.einsum("btd,dnh->btnh", x, w["attn.value"]) + b["attn.value"]
    logits = np.einsum("bqnh,bknh->bnqk", q / np.sqrt(HD), k)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = np.einsum("bnqk,bknh->bqnh", weights, v)
    h = x + np.einsum("bqnh,nhd->bqd", attended, w["attn.out"]) + b["attn.out"]
    e = _gelu(np.einsum("btd,dne->btne", h, w["proj"]) + b["proj"])
    h = h + np.einsum("btne,ned->btd", e, w["mix"]) + b["mix"]
    t = np.maximum(np.einsum("btd,pd->btp", h, w["tp"]) + b["tp"], 0.0)
    return t @ w["head"] + b["head"]


_FD_CACHE = {}


def numpy_spectrum_grads(params, spectra, x, g, eps=1e-5):
    """d sum(g * net) / d spectrum of every layer, by float64 central differences (computed once per inputs)."""
    key = tuple((name, np.asarray(v).tobytes()) for name, v in sorted(params.items()) for v in v.values()) + tuple(
        (name, np.asarray(c, np.float64).tobytes()) for name, c in sorted(spectra.items())) + (
        np.asarray(x).tobytes(), np.asarray(g).tobytes(), eps)
    if key not in _FD_CACHE:
        _FD_CACHE[key] = _numpy_spectrum_grads(params, spectra, x, g, eps)
    return _FD_CACHE[key]


def _numpy_spectrum_grads(params, spectra, x, g, eps):
    loss = lambda s: float(np.sum(numpy_net(params, s, x) * g))  # noqa: E731
    grads = {}
    for name, c in spectra.items():
        c = np.asarray(c, np.float64)
        grad = np.zeros_like(c)
        for i in range(c.size):
            step = np.zeros_like(c)
            step[i] = eps
            grad[i] = (loss({**spectra, name: c + step}) - loss({**spectra, name: c - step})) / (2 * eps)
        grads[name] = grad
    return grads


# --- helpers ---------------------------------------------------------------------------------------------------------

def _config(**overrides):
    fields = dict(n_frequency=N_FREQ, scaling=SCALING, random_loc_seed=SEED, target_modules=TARGETS)
    fields.update(overrides)
    return fourierft_jax.FourierFTConfig(**fields)


def _adapted(mode="spectral", **overrides):
    return fourierft_jax.nnx.apply(_random_base(), _config(**overrides), rngs=nnx.Rngs(3), mode=mode)


def _modules(model):
    return {".".join(str(k) for k in path): m for path, m in nnx.iter_modules(model) if path}


def _spectra(model):
    return {name: np.asarray(m.spectrum[...], np.float64) for name, m in _modules(model).items()
            if isinstance(m, FourierFTLinear)}


@pytest.fixture(scope="module")
def data():
    x = jax.random.normal(jax.random.key(0), (B, T, D))
    g = np.asarray(jax.random.normal(jax.random.key(1), (B, T, K)), np.float64)
    return x, g


def _shapes_of_dots(hlo):
    return [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"f32\[([0-9,]*)\]\{[0-9,]*\} dot\(",
                                                                                  hlo)]


def _kernel_shapes():
    """Every shape a weight gradient of an adapted kernel could have: its N-D layout (any axis order) and its
    (in, out) matrix either way round."""
    shapes = set()
    for dims, in_axes in EXPECTED.values():
        n_in = int(np.prod([dims[a] for a in in_axes]))
        n_out = int(np.prod(dims)) // n_in
        shapes |= {(n_in, n_out), (n_out, n_in)}
        shapes |= {tuple(dims[a] for a in perm) for perm in itertools.permutations(range(len(dims)))}
    return shapes


# --- selection and surgery -------------------------------------------------------------------------------------------

def test_selection_reads_contractions_from_the_modules():
    layers = {layer.name: layer for layer in fourierft_jax.nnx.select_layers(_random_base(), _config())}
    assert set(layers) == set(EXPECTED)
    for name, (dims, in_axes) in EXPECTED.items():
        layer = layers[name]
        n_in = int(np.prod([dims[a] for a in in_axes]))
        assert layer.dims == dims and layer.contracted == in_axes, name
        assert (layer.in_features, layer.out_features) == (n_in, int(np.prod(dims)) // n_in)
        assert layer.torch_names == (name,) and layer.kernel_path == tuple(name.split(".")) + ("kernel",)
        assert layer.param_shape == dims
    assert layers["head"].is_matrix and not layers["tp"].is_matrix and layers["attn.out"].kernel_dims == (N, HD, D)


def test_surgery_types_and_variables():
    model = _adapted()
    modules = _modules(model)
    for name in EXPECTED:
        kind = FourierFTLinear if name == "head" else FourierFTGeneral
        assert type(modules[name]) is kind, name
        assert type(modules[name].spectrum) is fourierft_jax.nnx.FourierFTSpectrum
        assert type(modules[name].base.kernel) is nnx.Param
    assert type(modules["attn.query"].base) is nnx.LinearGeneral and type(modules["proj"].base) is nnx.Einsum
    assert sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))) == N_FREQ * len(EXPECTED)


@pytest.mark.parametrize("mode", MODES)
def test_output_matches_numpy_reference(data, mode):
    x, _ = data
    params = _params(_random_base())
    model = _adapted(mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no use of a kernel falls back to a merged weight
        y = model(x)
    assert rel_err(y, numpy_net(params, _spectra(model), x)) < 1e-5
    assert rel_err(y, numpy_net(params, {}, x)) > 1e-2  # the adapters do change the output


def test_spectrum_gradients_match_finite_differences_through_nnx_grad(data):
    x, g = data
    params = _params(_random_base())
    model = _adapted("spectral")  # nnx.apply's default mode; every mode runs through jax.grad below
    reference = numpy_spectrum_grads(params, _spectra(model), x, g)

    @nnx.jit
    def grads(model, x):
        return nnx.grad(lambda m: jnp.sum(m(x) * g.astype(np.float32)), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)

    got = grads(model, x)
    flat = {".".join(str(k) for k in path[:-1]): v for path, v in got.flat_state()}
    for name in EXPECTED:
        assert rel_err(flat[name], reference[name]) < 1e-5, name


def test_compiled_training_step_matches_finite_differences_and_has_no_weight_gradient_dot(data):
    """Per mode, one compiled training step: its spectrum gradients equal the float64 finite differences, and only
    "merge" has a dot of a kernel's shape (the weight gradient ``xᵀdy`` the other modes never form)."""
    x, g = data
    params = _params(_random_base())
    for mode, expect in [("spectral", False), ("fused", False), ("auto", False), ("merge", True)]:
        model = _adapted(mode)
        reference = numpy_spectrum_grads(params, _spectra(model), x, g)
        graphdef, spectra, rest = nnx.split(model, nnx.LoRAParam, ...)

        def loss(spectra, rest, x):
            return jnp.sum(nnx.merge(graphdef, spectra, rest)(x) * g.astype(np.float32))

        step = jax.jit(jax.grad(loss)).lower(spectra, rest, x).compile()
        found = [s for s in _shapes_of_dots(step.as_text()) if s in _kernel_shapes()]
        assert bool(found) == expect, (mode, found)
        flat = {".".join(str(k) for k in path[:-1]): v for path, v in step(spectra, rest, x).flat_state()}
        for name in EXPECTED:
            assert rel_err(flat[name], reference[name]) < 1e-5, (mode, name)


@pytest.mark.parametrize("mode", ["spectral", "fused"])
def test_init_weights_true_equals_the_base_model_exactly(data, mode):
    x, _ = data
    base = _random_base()(x)
    model = _adapted(mode, init_weights=True)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(base))


@pytest.mark.parametrize("mode", ["spectral", "fused"])
def test_merge_and_unload_equal_the_adapted_and_base_forward(data, mode):
    x, _ = data
    model = _adapted(mode)
    adapted = np.asarray(model(x))
    params, spectra = _params(_random_base()), _spectra(model)
    fourierft_jax.nnx.merge_and_unload(model)
    modules = _modules(model)
    assert type(modules["attn.query"]) is nnx.LinearGeneral and type(modules["proj"]) is nnx.Einsum
    assert type(modules["head"]) is nnx.Linear
    assert not any(isinstance(m, FourierFTLinear) for m in modules.values())
    assert rel_err(model(x), adapted) < 1e-5
    for name, p in params.items():  # ΔW lands in each kernel's own layout
        assert rel_err(modules[name].kernel[...], p["kernel"] + _delta(name, spectra[name])) < 1e-5, name
    unloaded = fourierft_jax.nnx.unload(_adapted(mode))
    np.testing.assert_array_equal(np.asarray(unloaded(x)), np.asarray(_random_base()(x)))


def test_disabled_layers_run_the_base_model(data):
    x, _ = data
    model = _adapted("fused")
    fourierft_jax.nnx.set_disabled(model)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(_random_base()(x)))


# --- the functional route: nnx.split + fourierft_jax.apply(trace=) + make_apply ------------------------------------

@pytest.fixture(scope="module")
def functional(data):
    x, _ = data
    graphdef, state = nnx.split(_random_base())
    adapter = fourierft_jax.apply(state, _config(), key=jax.random.key(5),
                                  trace=lambda s: nnx.merge(graphdef, s)(x))
    return graphdef, state, adapter


def test_functional_route_finds_the_same_layers_as_nnx_apply(functional):
    _, _, adapter = functional
    ours = {layer.name: layer for layer in fourierft_jax.nnx.select_layers(_random_base(), _config())}
    theirs = {layer.name: layer for layer in adapter.specs["default"].layers}
    assert theirs == ours


def test_functional_route_output_gradients_and_compiled_step(data, functional):
    """Per mode: the output and one compiled training step's spectrum gradients equal the float64 references;
    only "merge" has a dot of a kernel's shape in that step."""
    x, g = data
    graphdef, state, adapter = functional
    params = _params(_random_base())
    spectra = {k: np.asarray(v, np.float64) for k, v in adapter.trainable["default"]["spectra"].items()}
    reference = numpy_spectrum_grads(params, spectra, x, g)
    for mode, expect in [("spectral", False), ("fused", False), ("auto", None), ("merge", True)]:
        forward = adapter.make_apply(lambda s, x: nnx.merge(graphdef, s)(x), mode=mode)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y = forward(adapter.trainable, state, x)
        assert rel_err(y, numpy_net(params, spectra, x)) < 1e-5, mode
        step = jax.jit(jax.grad(lambda t, s, x: jnp.sum(forward(t, s, x) * g.astype(np.float32))))
        step = step.lower(adapter.trainable, state, x).compile()
        if expect is not None:
            found = [s for s in _shapes_of_dots(step.as_text()) if s in _kernel_shapes()]
            assert bool(found) == expect, (mode, found)
        grads = step(adapter.trainable, state, x)
        for name in EXPECTED:
            assert rel_err(grads["default"]["spectra"][name], reference[name]) < 1e-5, (mode, name)


# --- export ---------------------------------------------------------------------------------------------------------

def test_peft_export_writes_the_matrix_spectra(tmp_path):
    from safetensors.numpy import load_file

    model = _adapted()
    config = _config()
    folder = fourierft_jax.export_peft(model, os.fspath(tmp_path / "peft"), config=config)
    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    spectra = _spectra(model)
    for name in EXPECTED:
        (key,) = [k for k in tensors if f".{name}." in k and "spectrum" in k]
        np.testing.assert_array_equal(tensors[key], spectra[name].astype(np.float32))


# --- errors ---------------------------------------------------------------------------------------------------------

class Odd(nnx.Module):
    def __init__(self, rngs):
        self.ok = nnx.Einsum("btd,dh->bth", (D, 4), (4,), rngs=rngs)
        self.batched = nnx.Einsum("bnd,ndh->bnh", (N, D, 4), rngs=rngs)          # n: a batch axis of the kernel
        self.summed = nnx.Einsum("bd,dxh->bh", (D, 3, 4), rngs=rngs)            # x: summed on its own
        self.ellipsis = nnx.Einsum("...d,...dh->...h", (D, 4), rngs=rngs)
        self.lg_batch = nnx.LinearGeneral(D, 4, batch_axis={0: N}, axis=-1, rngs=rngs)


@pytest.mark.parametrize("target,match", [
    ("batched", r"'batched'.*batch axis"),
    ("summed", r"'summed'.*sums its kernel axis 1"),
    ("ellipsis", r"'ellipsis'.*ellipsis"),
    ("lg_batch", r"'lg_batch'.*batch_axis"),
])
def test_inexpressible_contractions_raise_naming_the_path(target, match):
    model = Odd(nnx.Rngs(0))
    with pytest.raises(TypeError, match=match):
        fourierft_jax.nnx.apply(model, _config(target_modules=[target]), rngs=nnx.Rngs(1))
    assert type(model.batched) is nnx.Einsum  # nothing touched


def test_all_linear_skips_what_cannot_be_adapted():
    layers = fourierft_jax.nnx.select_layers(Odd(nnx.Rngs(0)), _config(target_modules="all-linear", n_frequency=3))
    assert [layer.name for layer in layers] == ["ok"]


def test_einsum_without_einsum_str_is_refused():
    class Late(nnx.Module):
        def __init__(self, rngs):
            self.late = nnx.Einsum("bd,dh->bh", (D, 4), rngs=rngs)
            self.late.einsum_str = None  # the equation is only given at call time

    with pytest.raises(TypeError, match=r"'late'.*einsum_str"):
        fourierft_jax.nnx.apply(Late(nnx.Rngs(0)), _config(target_modules=["late"]), rngs=nnx.Rngs(1))


def test_call_time_einsum_str_that_contracts_other_axes_is_an_error_naming_the_layer():
    class Swap(nnx.Module):
        def __init__(self, rngs):
            self.proj = nnx.Einsum("btd,dne->btne", (D, N, E), rngs=rngs)

    model = fourierft_jax.nnx.apply(Swap(nnx.Rngs(0)), _config(target_modules=["proj"]), rngs=nnx.Rngs(1))
    model.proj(jnp.ones((1, 2, D)))  # the declared contraction works
    with pytest.raises(ValueError, match=r"'proj'.*axes \[1\]"):
        model.proj(jnp.ones((1, 2, N)), einsum_str="btn,dne->btde")


# --- stacks: nnx.vmap-made LinearGeneral/Einsum run by nnx.scan -------------------------------------------------------

L = 2  # a stack of two is the same layout as any longer one


class Block(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.LinearGeneral(D, (N, E), rngs=rngs)
        self.down = nnx.Einsum("btne,ned->btd", (N, E, D), (D,), rngs=rngs)

    def __call__(self, h):
        return h + self.down(nnx.tanh(self.up(h)))


class Stacked(nnx.Module):
    def __init__(self, rngs):
        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(rngs)

        self.layers = make(rngs)

    def __call__(self, h):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(h, block):
            return block(h)

        return body(h, self.layers)


@pytest.mark.parametrize("mode", ["spectral", "fused"])
def test_stacked_general_layers_match_numpy_and_merge(data, mode):
    x, _ = data
    base = Stacked(nnx.Rngs(0))
    kernels = {name: np.asarray(getattr(base.layers, name).kernel[...], np.float64) for name in ("up", "down")}
    biases = {name: np.asarray(getattr(base.layers, name).bias[...], np.float64) for name in ("up", "down")}
    config = _config(target_modules=["up", "down"])
    model = fourierft_jax.nnx.apply(base, config, rngs=nnx.Rngs(1), mode=mode, stacked="layers")
    up, down = model.layers.up, model.layers.down
    assert type(up) is FourierFTGeneral and up.layer.spectrum_shape == (L, N_FREQ)
    assert up.layer.dims == (D, N, E) and up.layer.contracted == (0,)
    assert down.layer.dims == (N, E, D) and down.layer.contracted == (0, 1)
    assert up.layer.torch_names == tuple(f"layers.{i}.up" for i in range(L))
    y = model(x)
    h = np.asarray(x, np.float64)
    for i in range(L):
        w_up = kernels["up"][i] + _kernel_layout(bridge.delta_weight(
            np.asarray(up.spectrum[...][i], np.float64), bridge.spectral_indices(N * E, D, N_FREQ, SEED), N * E, D,
            SCALING).T, (D, N, E), (0,))
        w_down = kernels["down"][i] + _kernel_layout(bridge.delta_weight(
            np.asarray(down.spectrum[...][i], np.float64), bridge.spectral_indices(D, N * E, N_FREQ, SEED), D, N * E,
            SCALING).T, (N, E, D), (0, 1))
        a = np.tanh(np.einsum("btd,dne->btne", h, w_up) + biases["up"][i])
        h = h + np.einsum("btne,ned->btd", a, w_down) + biases["down"][i]
    assert rel_err(y, h) < 1e-5
    fourierft_jax.nnx.merge_and_unload(model)
    assert type(model.layers.up) is nnx.LinearGeneral
    assert rel_err(model(x), y) < 1e-5
