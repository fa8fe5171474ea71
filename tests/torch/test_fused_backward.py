"""The fused layer's backward (both input-gradient forms) against the dense formula and the merged form's autograd.

References: a dense float64 ``ΔW = scaling · Re(ifft2(S))`` built with torch ops from the positions (checked
against ``bridge.delta_weight``), differentiated by torch autograd through ``x (W + ΔW)ᵀ + b``; and autograd of
the merged form ``F.linear(x, W + get_delta_weight(), b)`` in float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import bridge
import fourierft_torch
from bridge._src import plans
from bridge._src.auto_rule import choose_input_grad
from fourierft_torch import _spectral

FORMS = ("spectral", "rebuild")
# (out, in, n): square even/odd, wide, tall, odd and even; (6, 14) and (8, 64) save the input table instead of x.
SHAPES = [(8, 8, 9), (9, 9, 20), (6, 14, 5), (15, 7, 12), (12, 5, 7), (8, 64, 10)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _dense_delta(c: torch.Tensor, indices: np.ndarray, out_features: int, in_features: int, scaling: float):
    # Differentiable in c: the sparse spectrum by index_put, then the full complex ifft2.
    rows, cols = (torch.from_numpy(np.asarray(i, dtype=np.int64)) for i in indices)
    spectrum = torch.zeros(out_features, in_features, dtype=torch.complex128)
    spectrum = spectrum.index_put((rows, cols), c.to(torch.complex128))
    return torch.fft.ifft2(spectrum).real * scaling


def _reference(x, weight, bias, adapters, coefficients, dy):
    """(y, dx, [dc]) by autograd through the dense float64 formula."""
    x = x.detach().double().requires_grad_()
    coefficients = [c.detach().double().requires_grad_() for c in coefficients]
    out_features, in_features = weight.shape
    effective = weight.detach().double()
    for (indices, scaling), c in zip(adapters, coefficients):
        effective = effective + _dense_delta(c, indices, out_features, in_features, scaling)
    y = torch.nn.functional.linear(x, effective, None if bias is None else bias.detach().double())
    y.backward(dy.double())
    return y, x.grad, [c.grad for c in coefficients]


def _plans(indices, out_features, in_features, scaling):
    return (_spectral.make_plan(indices, out_features, in_features),
            _spectral.make_grad_plan(indices, out_features, in_features), scaling)


def test_dense_reference_is_bridges_delta_weight():
    indices = bridge.spectral_indices(9, 14, 11, 777)
    c = torch.randn(11, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = bridge.delta_weight(c.numpy(), indices, 9, 14, 3.0)
    np.testing.assert_allclose(_dense_delta(c, indices, 9, 14, 3.0).numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("out_features,in_features,n", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_backward_matches_dense_formula_float64(form, out_features, in_features, n, with_bias):
    g = torch.Generator().manual_seed(out_features * 100 + in_features)
    indices = bridge.spectral_indices(out_features, in_features, n, 777)
    x = torch.randn(2, 3, in_features, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(out_features, in_features, dtype=torch.float64, generator=g)
    bias = torch.randn(out_features, dtype=torch.float64, generator=g) if with_bias else None
    c = torch.randn(n, dtype=torch.float64, generator=g, requires_grad=True)
    dy = torch.randn(2, 3, out_features, dtype=torch.float64, generator=g)
    y = _spectral.fused_linear(x, weight, bias, [_plans(indices, out_features, in_features, 2.5)], [c],
                               keep_delta=True, input_grad=form)
    assert y.grad_fn.input_grad == form
    effective = y.grad_fn.saved_tensors[2]
    # Only the rebuild form with keep_delta keeps a weight-sized buffer.
    assert (effective is None) == (form == "spectral")
    y.backward(dy)
    y_ref, dx_ref, (dc_ref,) = _reference(x, weight, bias, [(indices, 2.5)], [c], dy)
    assert _rel(y, y_ref) < 1e-12
    assert _rel(x.grad, dx_ref) < 1e-12
    assert _rel(c.grad, dc_ref) < 1e-12


def test_input_table_replaces_x_when_smaller():
    # (8, 64) with 10 coefficients reads at most 10 of 33 bins: the table is saved and x is not.
    indices = bridge.spectral_indices(8, 64, 10, 777)
    x = torch.randn(4, 64, requires_grad=True)
    c = torch.randn(10, requires_grad=True)
    y = _spectral.fused_linear(x, torch.randn(8, 64), None, [_plans(indices, 8, 64, 1.0)], [c], input_grad="spectral")
    saved = y.grad_fn.saved_tensors
    assert saved[0] is None and y.grad_fn.n_tables == 1
    assert saved[3].shape == (np.unique(plans.grad_plan(indices, 8, 64).in_index).size, 4)
    # A frozen weight that requires grad needs x for its own gradient.
    weight = torch.randn(8, 64, requires_grad=True)
    y = _spectral.fused_linear(x, weight, None, [_plans(indices, 8, 64, 1.0)], [c], input_grad="spectral")
    assert y.grad_fn.saved_tensors[0] is x and y.grad_fn.n_tables == 0
    dy = torch.randn(4, 8)
    y.backward(dy)
    assert _rel(weight.grad, dy.t() @ x.detach()) < 1e-6


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("out_features,in_features", [(10, 10), (7, 12), (16, 9)])
def test_several_adapters_on_one_layer_float64(form, out_features, in_features):
    g = torch.Generator().manual_seed(5)
    specs = [(bridge.spectral_indices(out_features, in_features, 6, 777), 1.5),
             (bridge.spectral_indices(out_features, in_features, 11, 3), -0.7),
             (bridge.spectral_indices(out_features, in_features, 4, 9), 4.0)]
    coefficients = [torch.randn(idx.shape[1], dtype=torch.float64, generator=g, requires_grad=True)
                    for idx, _ in specs]
    x = torch.randn(5, in_features, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(out_features, in_features, dtype=torch.float64, generator=g)
    bias = torch.randn(out_features, dtype=torch.float64, generator=g)
    dy = torch.randn(5, out_features, dtype=torch.float64, generator=g)
    adapters = [_plans(idx, out_features, in_features, s) for idx, s in specs]
    y = _spectral.fused_linear(x, weight, bias, adapters, coefficients, keep_delta=False, input_grad=form)
    y.backward(dy)
    y_ref, dx_ref, dc_ref = _reference(x, weight, bias, specs, coefficients, dy)
    assert _rel(y, y_ref) < 1e-12
    assert _rel(x.grad, dx_ref) < 1e-12
    for c, ref in zip(coefficients, dc_ref):
        assert _rel(c.grad, ref) < 1e-12


def test_input_grad_delta_and_spectrum_grad_match_the_dense_formula():
    g = torch.Generator().manual_seed(2)
    indices = bridge.spectral_indices(11, 6, 13, 777)
    adapters = [_plans(indices, 11, 6, 2.0)]
    x = torch.randn(3, 4, 6, dtype=torch.float64, generator=g)
    dy = torch.randn(3, 4, 11, dtype=torch.float64, generator=g)
    c = torch.randn(13, dtype=torch.float64, generator=g)
    dense = torch.from_numpy(bridge.delta_weight(c.numpy(), indices, 11, 6, 2.0))
    assert _rel(_spectral.input_grad_delta(dy, adapters, [c]), dy @ dense) < 1e-12
    _, _, (dc_ref,) = _reference(x, torch.zeros(11, 6, dtype=torch.float64), None, [(indices, 2.0)], [c], dy)
    assert _rel(_spectral.spectrum_grad(x, dy, adapters[0][1], 2.0), dc_ref) < 1e-12


def test_bad_input_grad_is_named():
    indices = bridge.spectral_indices(4, 4, 3, 777)
    with pytest.raises(ValueError, match="input_grad"):
        _spectral.fused_linear(torch.randn(2, 4), torch.randn(4, 4), None, [_plans(indices, 4, 4, 1.0)],
                               [torch.randn(3)], input_grad="dense")


def _layer(kind: str, out_features: int, in_features: int, with_bias: bool, adapters: int):
    torch.manual_seed(out_features + 7 * in_features)
    base = nn.Linear(in_features, out_features, bias=with_bias) if kind == "linear" else Conv1D(out_features, in_features)
    if kind == "conv1d" and not with_bias:
        base.bias = None
    layer = fourierft_torch.FourierFTLinear(base, "a", bridge.FourierFTConfig(n_frequency=9, scaling=3.0), 9,
                                            fan_in_fan_out=kind == "conv1d")
    if adapters == 2:
        layer.update_layer("b", 5, bridge.FourierFTConfig(n_frequency=5, scaling=-2.0, random_loc_seed=11))
        layer.active_adapters = ["a", "b"]
    base.requires_grad_(False)
    layer.forward_mode = "fused"
    return layer


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("out_features,in_features", [(8, 8), (9, 9), (6, 14), (13, 7)])
@pytest.mark.parametrize("with_bias,adapters,keep_delta", [(True, 1, True), (False, 2, False), (True, 2, True)])
def test_fourierft_linear_fused_matches_merged_autograd(kind, form, out_features, in_features, with_bias, adapters,
                                                       keep_delta, monkeypatch):
    # The layer asks bridge's rule; force the form under test (the rule's own boundary is tested below).
    monkeypatch.setattr(_spectral, "choose_input_grad", lambda tokens, out_features, in_features: form)
    layer = _layer(kind, out_features, in_features, with_bias, adapters)
    layer.keep_delta = keep_delta
    names = layer.active_adapters
    seq = 7
    g = torch.Generator().manual_seed(seq)
    x = torch.randn(2, seq, in_features, generator=g, requires_grad=True)
    dy = torch.randn(2, seq, out_features, generator=g)
    y = layer(x)
    assert y.grad_fn.input_grad == form
    y.backward(dy)
    grads = [layer.fourierft_spectrum[name].grad.clone() for name in names]

    # The merged form, float32, by autograd through get_delta_weight.
    x_merged = x.detach().clone().requires_grad_()
    for name in names:
        layer.fourierft_spectrum[name].grad = None
    weight = layer._torch_weight().detach() + sum(layer.get_delta_weight(name) for name in names)
    y_merged = torch.nn.functional.linear(x_merged, weight, layer.base_layer.bias)
    y_merged.backward(dy)
    assert _rel(y, y_merged) < 1e-5
    assert _rel(x.grad, x_merged.grad) < 1e-5
    for name, grad in zip(names, grads):
        assert _rel(grad, layer.fourierft_spectrum[name].grad) < 1e-5

    # The dense float64 formula, from the layer's own positions and scalings.
    specs = [(layer.indices[name].numpy(), layer.fourierft_scaling[name]) for name in names]
    coefficients = [layer.fourierft_spectrum[name] for name in names]
    y_ref, dx_ref, dc_ref = _reference(x, layer._torch_weight(), layer.base_layer.bias, specs, coefficients, dy)
    assert _rel(y, y_ref) < 1e-5
    assert _rel(x.grad, dx_ref) < 1e-5
    for grad, ref in zip(grads, dc_ref):
        assert _rel(grad, ref) < 1e-5


@pytest.mark.parametrize("form", FORMS)
def test_layers_reading_one_activation_share_its_table_and_stay_exact(form, monkeypatch):
    # query/key/value: three layers of one shape (so one grad plan) on the same x; then x changes in place.
    monkeypatch.setattr(_spectral, "choose_input_grad", lambda tokens, out_features, in_features: form)
    layers = [_layer("linear", 8, 40, True, 1) for _ in range(3)]
    for index, layer in enumerate(layers):
        with torch.no_grad():
            layer.fourierft_spectrum["a"].normal_(generator=torch.Generator().manual_seed(index))
    seq = 6
    x = torch.randn(2, seq, 40, requires_grad=True)
    h = x * 1.0
    dys = [torch.randn(2, seq, 8) for _ in layers]
    outputs = [layer(h) for layer in layers]
    sum((out * dy).sum() for out, dy in zip(outputs, dys)).backward()
    for layer, dy in zip(layers, dys):
        specs = [(layer.indices["a"].numpy(), layer.fourierft_scaling["a"])]
        _, _, (dc_ref,) = _reference(h, layer._torch_weight(), layer.base_layer.bias, specs,
                                     [layer.fourierft_spectrum["a"]], dy)
        assert _rel(layer.fourierft_spectrum["a"].grad, dc_ref) < 1e-5
    # In place: the version counter invalidates the cached table.
    for layer in layers:
        layer.fourierft_spectrum["a"].grad = None
    h2 = x.detach().clone()
    outputs = [layer(h2) for layer in layers[:1]]
    with torch.no_grad():
        h2.mul_(-3.0)
    out = layers[1](h2)
    (out * dys[1]).sum().backward()
    specs = [(layers[1].indices["a"].numpy(), layers[1].fourierft_scaling["a"])]
    _, _, (dc_ref,) = _reference(h2, layers[1]._torch_weight(), layers[1].base_layer.bias, specs,
                                 [layers[1].fourierft_spectrum["a"]], dys[1])
    assert _rel(layers[1].fourierft_spectrum["a"].grad, dc_ref) < 1e-5


@pytest.mark.parametrize("out_features,in_features", [(16, 16), (96, 24)])
def test_unforced_layer_follows_bridges_rule(out_features, in_features):
    layer = _layer("linear", out_features, in_features, True, 1)
    for seq in (1, 3, 10, 40):
        x = torch.randn(2, seq, in_features, requires_grad=True)
        y = layer(x)
        assert y.grad_fn.input_grad == choose_input_grad(2 * seq, out_features, in_features)
        y.sum().backward()
