"""Outputs, spectrum gradients, merged weights and merge_and_unload equal PEFT's (the oracle), float32."""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import torch_models as _models  # noqa: E402

import fourierft_torch  # noqa: E402

peft = pytest.importorskip("peft")

CASES = [
    ("mlp", dict(n_frequency=7, target_modules="lin0")),
    ("mlp", dict(n_frequency=7, target_modules=["lin0"])),
    ("mlp", dict(n_frequency=7, target_modules=["lin1"])),
    ("mlp", dict(n_frequency=7, target_modules=["lin0"], modules_to_save=["lin1"])),
    ("mlp", dict(n_frequency=7, target_modules=["lin0", "lin1"])),
    ("mlp", dict(target_modules=["lin0", "lin1"], n_frequency_pattern={"lin0": 5, "lin1": 10})),
    ("mlp", dict(n_frequency=7, target_modules=["lin0", "lin1"], bias="all")),
    # Tiny transformers (32 wide): scaling chosen so that ΔW's entries are about as large as in real use
    # (std ≈ 0.005 at 768 wide, n=1000, scaling=150), not ~1 -- the default 150 on a 32x32 layer would swamp W
    # and make the network ill-conditioned. Never 1.0 (the MLP cases use the default 150): a path that drops the
    # factor must fail here, in every forward mode, in the gradients and in the merges.
    ("bert", dict(n_frequency=50, target_modules=None, scaling=0.5)),
    ("bert", dict(n_frequency=50, target_modules=["query", "key", "value", "dense"], bias="fourier_only", scaling=2.0)),
    ("gpt2", dict(n_frequency=50, target_modules=["c_attn", "c_proj", "c_fc"], scaling=1.5)),
    ("gpt2", dict(n_frequency=50, target_modules=None, scaling=0.7)),
    ("llama", dict(n_frequency=60, target_modules="all-linear", scaling=2.5)),
    ("llama", dict(n_frequency=60, target_modules=["q_proj", "v_proj"], layers_to_transform=[1], scaling=0.4)),
]


def test_every_case_has_a_non_unit_scaling():
    # scaling=1.0 would let a path that forgets the factor agree with PEFT.
    assert all(peft.FourierFTConfig(**kwargs).scaling != 1.0 for _, kwargs in CASES), CASES


def _pair(kind, kwargs, seed=1):
    torch.manual_seed(0)
    base = _models.FACTORIES[kind]()
    base_ours = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        theirs = peft.get_peft_model(base, peft.FourierFTConfig(**kwargs))
        torch.manual_seed(seed)
        ours = fourierft_torch.get_fourierft_model(base_ours, fourierft_torch.FourierFTConfig(**kwargs))
    return theirs, ours


def _plain(name):
    # PEFT: base_model.model.<module>; ours: model.<module>
    return name[len("base_model.model."):] if name.startswith("base_model.model.") else name.removeprefix("model.")


def _spectra(model):
    return {
        _plain(name): p
        for name, p in model.named_parameters()
        if "fourierft_spectrum" in name
    }


def _error(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _close(a, b, rtol=1e-5):
    # Relative error in the Frobenius norm (float32 against float32: roundoff only).
    error = _error(a, b)
    assert error <= rtol, error


# "fused+rebuild" (keep_delta=False) differs from "fused" only in where backward gets W + ΔW: a subset suffices.
PARAMS = [(kind, kwargs, mode) for kind, kwargs in CASES for mode in ("spectral", "fused")] + [
    (kind, kwargs, "fused+rebuild") for kind, kwargs in CASES if kind != "llama"
]


@pytest.mark.parametrize("kind,kwargs,mode", PARAMS)
def test_matches_peft(kind, kwargs, mode):
    theirs, ours = _pair(kind, kwargs)
    for module in ours.modules():
        if isinstance(module, fourierft_torch.FourierFTLinear):
            module.forward_mode = mode.partition("+")[0]
            module.keep_delta = not mode.endswith("+rebuild")
    their_spectra, our_spectra = _spectra(theirs), _spectra(ours)
    assert sorted(their_spectra) == sorted(our_spectra)
    for name in their_spectra:  # same seed -> same torch.randn draws, same order
        assert torch.equal(their_spectra[name], our_spectra[name]), name
    trainable = lambda m: sorted(_plain(n) for n, p in m.named_parameters() if p.requires_grad)  # noqa
    assert trainable(theirs) == trainable(ours)
    assert theirs.get_nb_trainable_parameters() == ours.get_nb_trainable_parameters()

    batch = _models.inputs(kind)
    y_theirs, y_ours = _models.output(theirs, batch), _models.output(ours, batch)
    _close(y_ours, y_theirs)
    weight = torch.randn(y_theirs.shape, generator=torch.Generator().manual_seed(3))
    (y_theirs * weight).sum().backward()
    (y_ours * weight).sum().backward()
    with_grad = [name for name in their_spectra if their_spectra[name].grad is not None]
    # A layer whose output does not reach the loss (BERT's pooler here) has no gradient in either.
    assert len(with_grad) >= len(their_spectra) - 1, sorted(set(their_spectra) - set(with_grad))
    for name in their_spectra:
        if their_spectra[name].grad is None:
            assert our_spectra[name].grad is None, name
        else:
            _close(our_spectra[name].grad, their_spectra[name].grad)

    with torch.no_grad():
        theirs.merge_adapter()
        ours.merge_adapter()
        _close(_models.output(ours, batch), _models.output(theirs, batch))
        theirs.unmerge_adapter()
        ours.unmerge_adapter()
        _close(_models.output(ours, batch), y_theirs)
        merged_theirs = theirs.merge_and_unload()
        merged_ours = ours.merge_and_unload()
    state_theirs, state_ours = merged_theirs.state_dict(), merged_ours.state_dict()
    assert sorted(state_theirs) == sorted(state_ours)
    for key in state_theirs:
        _close(state_ours[key].float(), state_theirs[key].float())
    assert not any(isinstance(m, fourierft_torch.FourierFTLinear) for m in merged_ours.modules())


def test_initial_spectra_and_positions_match_peft_layer():
    theirs, ours = _pair("gpt2", dict(n_frequency=40, target_modules=["c_attn"]))
    their_layer = theirs.base_model.model.h[0].attn.c_attn
    our_layer = ours.model.h[0].attn.c_attn
    assert their_layer.fan_in_fan_out and our_layer.fan_in_fan_out
    assert torch.equal(their_layer.indices["default"], our_layer.indices["default"])
    _close(our_layer.get_delta_weight("default"), their_layer.get_delta_weight("default"))


def test_init_weights_true_gives_base_output():
    theirs, ours = _pair("bert", dict(n_frequency=30, init_weights=True))
    batch = _models.inputs("bert")
    with ours.disable_adapter():
        base = _models.output(ours, batch)
    torch.testing.assert_close(_models.output(ours, batch), base, rtol=0, atol=1e-6)
    _close(_models.output(ours, batch), _models.output(theirs, batch))


def test_default_targets_follow_model_type():
    _, ours = _pair("llama", dict(n_frequency=10))
    names = {n for n, m in ours.named_modules() if isinstance(m, fourierft_torch.FourierFTLinear)}
    assert names and all(n.endswith(("q_proj", "v_proj")) for n in names)


def test_config_is_bridge_class():
    import bridge

    assert fourierft_torch.FourierFTConfig is bridge.FourierFTConfig
