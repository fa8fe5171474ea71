"""The fused path's backward in both input-gradient forms ("spectral": dy ΔWᵀ from rfft(dy), no ΔW; "rebuild":
dy (W + ΔW)ᵀ with ΔW rebuilt), forced, against independent references.

References: numpy float64 with bridge's dense ΔW (dx = dy (W + ΔW)ᵀ by hand, dc by the chain rule through the
dense ΔW, which is linear in c), and autodiff of the merged kernel (mode="merge").
"""

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bridge
import fourierft_jax
from bridge._src.auto_rule import INPUT_GRAD_MAX_RATIO, choose_input_grad
from fourierft_jax._src import LayerSpec
from fourierft_jax._src.adapted_dot import DotPlan, _keeps_table, adapted_dot, input_grad_form
from fourierft_jax._src.delta import delta_kernel
from fourierft_jax._src.fused import fused_dense, fused_dense_multi, input_bins
from fourierft_jax._src.kernel_view import KernelView
from fftjax_models import rel_err

FORMS = ["spectral", "rebuild"]
# (in, out, n): square, wide, tall, odd, even, a 1-wide axis, and wide inputs with few coefficients (where the
# forward keeps rfft(x) at the used bins instead of x).
# kernel_grad: the frozen kernel's gradient is asked for too (the forward then keeps x).
SHAPES = [(8, 8, 12, False), (6, 14, 20, True), (15, 6, 25, False), (7, 9, 11, True), (10, 12, 30, False),
          (1, 5, 4, False), (5, 1, 3, True), (40, 6, 5, False), (41, 7, 6, True)]
f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731


def _dense(layer, c, x, w, g):
    """float64 (y, dx, dw, dc) of sum(g · (x @ (w + ΔWᵀ))), x (tokens, in), by the dense formula."""
    n_out, n_in = layer.out_features, layer.in_features
    delta = bridge.delta_weight(c, layer.torch_indices, n_out, n_in, layer.scaling)  # (out, in)
    unit = np.eye(layer.n_frequency)
    weight_grad = g.T @ x  # ∂L/∂ΔW over (out, in)
    dc = np.array([np.sum(weight_grad * bridge.delta_weight(unit[k], layer.torch_indices, n_out, n_in,
                                                            layer.scaling)) for k in range(layer.n_frequency)])
    return x @ (w + delta.T), g @ (w + delta.T).T, weight_grad.T, dc


def _data(n_in, n_out, n, tokens=6, seed=0):
    rng = np.random.default_rng(seed + 1000 * n_in + n_out)
    return (rng.standard_normal(n), rng.standard_normal((tokens, n_in)), rng.standard_normal((n_in, n_out)),
            rng.standard_normal((tokens, n_out)))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("n_in,n_out,n,kernel_grad", SHAPES)
def test_backward_matches_dense_formula_and_merge(n_in, n_out, n, form, kernel_grad):
    layer = LayerSpec(("blk", "fc"), n_in, n_out, n, 37.5, 777)
    c, x, w, g = _data(n_in, n_out, n)
    y_ref, dx_ref, dw_ref, dc_ref = _dense(layer, c, x, w, g)

    def pullback(fn):
        if kernel_grad:
            y, pull = jax.vjp(fn, f32(x), f32(w), f32(c))
            return (y, *pull(f32(g)))
        y, pull = jax.vjp(lambda x, c: fn(x, f32(w), c), f32(x), f32(c))  # the kernel frozen: symbolic zero
        return (y, *pull(f32(g)))

    with input_grad_form(form):
        got = jax.jit(lambda: pullback(lambda x, w, c: fused_dense(x, w, c, layer)))()
    merged = jax.jit(lambda: pullback(lambda x, w, c: x @ (w + delta_kernel(c, layer))))()
    refs = (y_ref, dx_ref, dw_ref, dc_ref) if kernel_grad else (y_ref, dx_ref, dc_ref)
    for what, a, m, ref in zip(("y", "dx", "dw", "dc") if kernel_grad else ("y", "dx", "dc"), got, merged, refs):
        assert rel_err(a, ref) < 1e-5, what
        assert rel_err(a, m) < 1e-5, what


def test_the_wide_shapes_keep_the_input_table_and_the_others_keep_x():
    # the case split the test above relies on: for (40, 6, 5) the 5 used bins (of 21) are smaller than x
    small = LayerSpec(("a",), 40, 6, 5, 1.0, 777)
    assert _keeps_table(jnp.zeros((2, 40)), input_bins([small]).size, 40, operand_perturbed=False)
    assert not _keeps_table(jnp.zeros((2, 40)), input_bins([small]).size, 40, operand_perturbed=True)
    square = LayerSpec(("a",), 8, 8, 12, 1.0, 777)
    assert not _keeps_table(jnp.zeros((2, 8)), input_bins([square]).size, 8, operand_perturbed=False)


@pytest.mark.parametrize("form", FORMS)
def test_two_adapters_on_one_kernel(form):
    a, b = LayerSpec(("q",), 9, 10, 14, 3.0, 1), LayerSpec(("q",), 9, 10, 6, 5.0, 2)
    rng = np.random.default_rng(3)
    ca, cb, x, w, g = (rng.standard_normal(14), rng.standard_normal(6), rng.standard_normal((5, 9)),
                       rng.standard_normal((9, 10)), rng.standard_normal((5, 10)))
    fn = lambda x, ca, cb: fused_dense_multi(x, f32(w), (ca, cb), (a, b))  # noqa: E731
    with input_grad_form(form):
        dx, dca, dcb = jax.jit(lambda: jax.vjp(fn, f32(x), f32(ca), f32(cb))[1](f32(g)))()
    _, dx_a, _, dc_a = _dense(a, ca, x, w, g)
    delta_b = bridge.delta_weight(cb, b.torch_indices, 10, 9, 5.0)
    dx_ref = dx_a + g @ delta_b
    assert rel_err(dx, dx_ref) < 1e-5 and rel_err(dca, dc_a) < 1e-5
    assert rel_err(dcb, _dense(b, cb, x, w, g)[3]) < 1e-5


# N-D kernels: (dims, contracted kernel axes, which operand the kernel is, dimension numbers, x shape)
GENERAL = [
    ((2, 6, 4), (1,), 1, (((2,), (1,)), ((), ())), (3, 2, 6)),  # DenseGeneral-like, x (3, 2, 6)
    ((6, 3, 5), (0,), 0, (((0,), (1,)), ((), ())), (4, 6)),  # the kernel as the lhs operand
    ((3, 4, 7), (0, 1), 1, (((1, 2), (0, 1)), ((), ())), (5, 3, 4)),  # two contracted axes (attention out)
]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dims,inside,side,numbers,x_shape", GENERAL)
def test_general_kernels_match_merge(dims, inside, side, numbers, x_shape, form):
    n_in = int(np.prod([dims[a] for a in inside]))
    n_out = int(np.prod(dims)) // n_in
    layer = LayerSpec(("q",), n_in, n_out, 9, 7.0, 777, kernel_dims=dims, in_axes=inside)
    plan = DotPlan(side, numbers, None, None, KernelView.identity(dims), len(x_shape))
    rng = np.random.default_rng(5)
    x, w, c = f32(rng.standard_normal(x_shape)), f32(rng.standard_normal(dims)), f32(rng.standard_normal(9))
    g = f32(rng.standard_normal(plan.dot(x, w).shape))

    def grads(fn):
        y, pull = jax.vjp(fn, x, c)
        return (y, *pull(g))

    with input_grad_form(form):
        got = jax.jit(lambda: grads(lambda x, c: adapted_dot(x, w, (c,), (layer,), plan, "fused")))()
    want = jax.jit(lambda: grads(lambda x, c: plan.dot(x, w + delta_kernel(c, layer))))()
    for what, a, b in zip(("y", "dx", "dc"), got, want):
        assert rel_err(a, b) < 1e-5, what


L, D, H = 2, 10, 14


class _Block(nn.Module):
    @nn.compact
    def __call__(self, h, _=None):
        return jnp.tanh(nn.Dense(D, name="fc2")(jnp.tanh(nn.Dense(H, name="fc1")(h)))), None


class _Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
        return stack(name="layer")(x, None)[0]


@functools.lru_cache(maxsize=None)
def _stack_grads(mode, form):
    model, x = _Scanned(), jax.random.normal(jax.random.key(0), (3, 4, D))
    h = jax.random.normal(jax.random.key(3), (5, D))
    params = model.init(jax.random.key(1), x)
    config = fourierft_jax.FourierFTConfig(n_frequency=17, scaling=30.0, target_modules=["fc1", "fc2"])
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(2), stacked={"layer": 0})

    def fn(v, x, h):  # the scan, and the whole fc1 stack in one contraction (one part per layer)
        whole = jnp.einsum("bd,ldh->lbh", h, v["params"]["layer"]["fc1"]["kernel"])
        return jnp.sum(jnp.sin(model.apply(v, x))) + jnp.sum(jnp.cos(whole))

    forward = adapter.make_apply(fn, mode=mode)
    with input_grad_form(form), warnings.catch_warnings():
        warnings.simplefilter("error")  # no merged fallback
        return jax.jit(jax.grad(lambda t: forward(t, params, x, h)))(adapter.trainable)["default"]["spectra"]


@pytest.mark.parametrize("form", FORMS)
def test_scanned_and_whole_stack_layers_match_merge(form):
    want, got = _stack_grads("merge", None), _stack_grads("fused", form)
    assert set(got) == set(want) == {"layer.fc1", "layer.fc2"}
    for name, ref in want.items():
        assert rel_err(got[name], ref) < 1e-5, name


def _irfft2_count(text: str, n_in: int, n_out: int) -> int:
    # a ΔW build: a 2-D inverse real FFT of the (in, out) kernel's half spectrum (HLO or jaxpr spelling)
    return text.count(f"fft_type=IRFFT, fft_length={{{n_in},{n_out}}}") + text.count(f"fft_lengths=({n_in}, {n_out})")


@pytest.mark.parametrize("form,builds", [("spectral", 1), ("rebuild", 2), (None, 1)])
def test_spectral_backward_builds_no_delta(form, builds):
    # None: the rule, which says "spectral" for 4 tokens of a 24 -> 20 layer
    layer = LayerSpec(("fc",), 24, 20, 30, 10.0, 777)
    assert choose_input_grad(4, 20, 24) == "spectral"
    c, x, w, _ = (f32(a) for a in _data(24, 20, 30, tokens=4))
    grad = jax.grad(lambda x, c: jnp.sum(jnp.sin(fused_dense(x, w, c, layer))), argnums=(0, 1))
    with input_grad_form(form):
        jaxpr = str(jax.make_jaxpr(grad)(x, c))
        hlo = jax.jit(grad).lower(x, c).compile().as_text()
    # the traced step: the forward's build, and the backward's where it rebuilds
    assert _irfft2_count(jaxpr, 24, 20) == builds
    # compiled, XLA merges a rebuild with the forward's identical build (it keeps W + ΔW alive between the
    # passes instead); the spectral form has the one build of the forward
    assert _irfft2_count(hlo, 24, 20) == 1


def test_rule_and_forcing():
    assert choose_input_grad(0, 768, 768) == "spectral"
    boundary = int(INPUT_GRAD_MAX_RATIO * 3072)
    assert choose_input_grad(boundary - 1, 3072, 768) == "spectral"
    assert choose_input_grad(boundary, 3072, 768) == "rebuild"
    with pytest.raises(ValueError, match="input_grad_form"):
        with input_grad_form("fast"):
            pass
