"""Damaged copies of a PEFT-written adapter through fourierft_torch's loaders: a clear error, the model unchanged."""

from __future__ import annotations

import copy
import os
import shutil
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

import fourierft_torch  # noqa: E402

peft = pytest.importorskip("peft")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers"))
import damage  # noqa: E402  (tests/helpers/damage.py: the file surgery shared by the bad-input tests)

SPECTRUM = "base_model.model.lin0.fourierft_spectrum"


class MLP3(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = torch.nn.Linear(10, 20)
        self.lin1 = torch.nn.Linear(20, 8)
        self.lin2 = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory):
    """A 3-layer MLP adapted by PEFT itself: lin0 and lin1 targeted (not lin2), n_frequency 6, bias="fourier_only"."""
    torch.manual_seed(0)
    base = MLP3()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), peft.FourierFTConfig(
            n_frequency=6, target_modules=["lin0", "lin1"], bias="fourier_only", init_weights=False))
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(str(folder))
    return base, str(folder)


DAMAGES = {
    "wrong peft_type": (lambda f: damage.edit_config(f, lambda d: d.update(peft_type="LORA")), "not a FourierFT one"),
    "missing peft_type": (lambda f: damage.edit_config(f, lambda d: d.pop("peft_type")), "has no `peft_type`"),
    "config not JSON": (lambda f: damage.write_config_text(f, "[1,"), "not valid JSON"),
    "negative n_frequency": (lambda f: damage.edit_config(f, lambda d: d.update(n_frequency=-6)),
                             "`n_frequency` must be a positive integer, got -6"),
    "truncated safetensors": (lambda f: damage.truncate(f, 3), "truncated"),
    "header claims 2**62 bytes": (damage.claim_huge_header,
                                  "header of 4611686018427387904 bytes"),
    "spectrum of the wrong length": (lambda f: damage.edit_tensors(f, lambda t: t.update({SPECTRUM: t[SPECTRUM][:4].copy()})),
                                     f"{SPECTRUM!r} has shape (4,) but adapter_config.json gives layer 'lin0' "
                                     f"n_frequency 6, so it must be (6,)"),
    "key the config does not target": (
        lambda f: damage.edit_tensors(f, lambda t: t.update({"base_model.model.lin2.fourierft_spectrum": t[SPECTRUM].copy()})),
        "'lin2', which adapter_config.json does not target (target_modules=['lin0', 'lin1'])"),
    "targeted layer without its key": (lambda f: damage.edit_tensors(f, lambda t: t.pop(SPECTRUM)),
                                       f"{SPECTRUM!r} (shape (6,)) is missing from the file"),
    "pickle-only weights": (damage.pickle_only, "never unpickled"),
    "NaN in a spectrum": (lambda f: damage.put_nan(f, SPECTRUM, 2), f"NaN or inf values in {SPECTRUM!r}"),
}


def _state(module):
    """Everything a load could change: parameter and buffer values, their names, the module classes."""
    tensors = {name: value.detach().clone() for name, value in module.state_dict().items()}
    classes = [(name, type(child).__name__) for name, child in module.named_modules()]
    return tensors, classes


def _same(a, b):
    assert a[1] == b[1]
    assert sorted(a[0]) == sorted(b[0])
    for name in a[0]:
        assert torch.equal(a[0][name], b[0][name]), name


@pytest.mark.parametrize("kind", sorted(DAMAGES))
def test_from_pretrained_refuses_and_leaves_the_model(peft_adapter, tmp_path, kind):
    base, valid = peft_adapter
    folder = str(tmp_path / "adapter")
    shutil.copytree(valid, folder)
    harm, fragment = DAMAGES[kind]
    harm(folder)
    model = copy.deepcopy(base)
    before = _state(model)
    with pytest.raises(ValueError) as info:  # AdapterFormatError / CheckpointError are ValueErrors
        fourierft_torch.FourierFTModel.from_pretrained(model, folder)
    assert fragment in str(info.value), str(info.value)
    assert "\n" not in str(info.value)
    _same(_state(model), before)
    assert not os.path.exists(tmp_path / "unpickled")

    # load_adapter on a model that already holds an adapter: the model and its adapters stay as they were
    ours = fourierft_torch.get_fourierft_model(copy.deepcopy(base), fourierft_torch.FourierFTConfig(
        n_frequency=3, target_modules=["lin0", "lin1"]))
    before = _state(ours)
    with pytest.raises(ValueError) as info:
        ours.load_adapter(folder, "second")
    assert fragment in str(info.value), str(info.value)
    _same(_state(ours), before)
    assert list(ours.peft_config) == ["default"] and ours.active_adapter == "default"


def test_the_valid_peft_adapter_loads(peft_adapter):
    # the damages above start from an adapter these loaders accept, with PEFT's values
    base, folder = peft_adapter
    model = fourierft_torch.FourierFTModel.from_pretrained(copy.deepcopy(base), folder)
    want = load_file(os.path.join(folder, "adapter_model.safetensors"))[SPECTRUM]
    assert torch.equal(model.model.lin0.fourierft_spectrum["default"].detach(), want)
