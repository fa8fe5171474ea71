"""Every ``FourierFTModel`` method that raises leaves the model exactly as it was (issue 13, part 3).

Each case provokes one failure and compares the FULL state before and after: every state-dict tensor bit for
bit, ``requires_grad`` flags, ``peft_config``, the active adapter(s), each layer's merged / active / disabled
flags and per-adapter settings, each ``modules_to_save`` wrapper, the module tree's types, and torch's global
random state (adding an adapter draws its spectra from it, as PEFT does).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import bridge
import fourierft_torch
from bridge._src.peft_format import WEIGHTS_NAME
from fourierft_torch._layer import FourierFTLinear
from fourierft_torch._modules_to_save import ModulesToSaveWrapper


class Locked(nn.Module):
    """A module holding a lock: it cannot be deep-copied, so it fails as a ``modules_to_save`` entry mid-way."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3))
        self.lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 12)
        self.head = nn.Linear(12, 3)
        self.locked = Locked()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.locked(self.head(torch.relu(self.lin1(torch.relu(self.lin0(x))))))


def _config(**kwargs) -> bridge.FourierFTConfig:
    return fourierft_torch.FourierFTConfig(**kwargs)


@pytest.fixture()
def model() -> fourierft_torch.FourierFTModel:
    torch.manual_seed(0)
    model = fourierft_torch.get_fourierft_model(
        Net(), _config(n_frequency=9, scaling=20.0, target_modules=["lin0"], modules_to_save=["head"], bias="all")
    )
    model.add_adapter("other", _config(n_frequency=7, scaling=3.0, random_loc_seed=4, target_modules=["lin0"]))
    return model


def _bits(tensor: torch.Tensor) -> tuple:
    tensor = tensor.detach().cpu().contiguous()
    return str(tensor.dtype), tuple(tensor.shape), tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


def snapshot(model: fourierft_torch.FourierFTModel) -> dict:
    layers = {
        name: {
            "active": list(m.active_adapters), "merged": list(m.merged_adapters), "disabled": m.disable_adapters,
            "n": dict(m.fourierft_n_frequency), "scaling": dict(m.fourierft_scaling),
            "seed": dict(m.fourierft_random_loc_seed), "indices": {k: v.tolist() for k, v in m.indices.items()},
            "spectra": list(m.fourierft_spectrum), "fan_in_fan_out": m.fan_in_fan_out,
        }
        for name, m in model.named_modules() if isinstance(m, FourierFTLinear)
    }
    wrappers = {
        name: {"active": m.active_adapter, "disabled": m.disable_adapters, "copies": list(m.modules_to_save)}
        for name, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)
    }
    return {
        "state": {key: _bits(value) for key, value in model.state_dict().items()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "peft_config": {name: dataclasses.asdict(c) for name, c in model.peft_config.items()},
        "active_adapter": model.active_adapter,
        "active_adapters": model.active_adapters,
        "tree": [(name, type(m).__name__) for name, m in model.named_modules()],
        "layers": layers,
        "wrappers": wrappers,
        "rng": _bits(torch.random.get_rng_state()),
    }


def assert_unchanged(model, before: dict) -> None:
    after = snapshot(model)
    for part in before:
        assert after[part] == before[part], f"{part} changed by a call that raised"


def _fails(model, call, error, match):
    before = snapshot(model)
    with pytest.raises(error, match=match):
        call()
    assert_unchanged(model, before)


ADD_FAILURES = {
    "duplicate name": (lambda m: m.add_adapter("other", _config(n_frequency=3, target_modules=["lin1"])),
                       ValueError, "already exists"),
    "not a config": (lambda m: m.add_adapter("new", {"n_frequency": 3}), TypeError, "FourierFTConfig"),
    "no target": (lambda m: m.add_adapter("new", _config(n_frequency=3, target_modules=["nope"])),
                  bridge.NoTargetError, "nope"),
    "n_frequency above in*out": (lambda m: m.add_adapter("new", _config(n_frequency=100, target_modules=["lin0", "head"])),
                                 ValueError, "head"),
    "second adapter with bias": (lambda m: m.add_adapter("new", _config(n_frequency=3, target_modules=["lin1"], bias="all")),
                                 ValueError, "bias"),
    # Fails after lin0 got the new spectrum and lin1 was wrapped (and their spectra drawn): all undone.
    "module that cannot be copied": (
        lambda m: m.add_adapter("new", _config(n_frequency=5, target_modules=["lin0", "lin1"], modules_to_save=["locked"])),
        TypeError, "lock"),
}


@pytest.mark.parametrize("case", list(ADD_FAILURES))
def test_add_adapter_failure_changes_nothing(model, case):
    call, error, match = ADD_FAILURES[case]
    _fails(model, lambda: call(model), error, match)
    # ... and the model still works as before: the same adapter can be added afterwards.
    model.add_adapter("again", _config(n_frequency=4, target_modules=["lin1"]))
    assert "again" in model.peft_config


def test_add_adapter_rolls_back_a_failure_after_wrapping(model, monkeypatch):
    # The mid-way failure really happens after mutation started (else the test above proves nothing for it).
    seen = []
    original = FourierFTLinear.update_layer

    def counted(self, *args, **kwargs):
        seen.append(args[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FourierFTLinear, "update_layer", counted)
    with pytest.raises(TypeError):
        model.add_adapter("new", _config(n_frequency=5, target_modules=["lin0", "lin1"], modules_to_save=["locked"]))
    assert seen == ["new", "new"]
    assert isinstance(model.model.lin1, nn.Linear) and "new" not in model.model.lin0.fourierft_spectrum


def test_delete_adapter_failures_change_nothing(model):
    _fails(model, lambda: model.delete_adapter("nope"), ValueError, "nope")
    model.merge_adapter(adapter_names=["other"])
    _fails(model, lambda: model.delete_adapter("other"), ValueError, "merged into lin0")
    model.unmerge_adapter()
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]


def test_delete_last_adapter_is_allowed_as_in_peft(model):
    # PEFT deletes the last adapter too (its active adapter becomes []); ours also unwraps the layers.
    model.delete_adapter("other")
    model.delete_adapter("default")
    assert model.peft_config == {} and model.active_adapters == []
    assert [type(m) for m in model.model.children()] == [nn.Linear, nn.Linear, nn.Linear, Locked]
    _fails(model, lambda: model.delete_adapter("default"), ValueError, "default")
    _fails(model, lambda: model.set_adapter("default"), ValueError, "default")


@pytest.mark.parametrize("names, match", [("nope", "nope"), (["default", "nope"], "nope"), ([], "unknown")])
def test_set_adapter_unknown_changes_nothing(model, names, match):
    _fails(model, lambda: model.set_adapter(names), ValueError, match)


def test_set_adapter_two_copies_of_one_module_changes_nothing(model):
    model.add_adapter("third", _config(n_frequency=3, target_modules=["lin1"], modules_to_save=["head"]))
    _fails(model, lambda: model.set_adapter(["default", "third"]), ValueError, "modules_to_save")


def _poison(model, adapter, layer="lin0"):
    with torch.no_grad():
        model.model.get_submodule(layer).fourierft_spectrum[adapter][2] = float("nan")


def test_safe_merge_of_a_nan_spectrum_changes_nothing(model):
    model.add_adapter("broken", _config(n_frequency=6, target_modules=["lin0", "lin1"]))
    _poison(model, "broken", "lin1")  # lin0 comes first and is finite: it must not be merged either
    model.set_adapter(["other", "broken"])
    _fails(model, lambda: model.merge_adapter(safe_merge=True), ValueError, "lin1")
    _fails(model, lambda: model.merge_and_unload(safe_merge=True), ValueError, "lin1")
    _fails(model, lambda: model.merge_adapter(adapter_names=["broken"], safe_merge=True), ValueError, "broken")


def test_merge_with_bad_names_changes_nothing(model):
    _fails(model, lambda: model.merge_adapter(adapter_names=["nope"]), ValueError, "nope")
    _fails(model, lambda: model.merge_adapter(adapter_names="other"), TypeError, "list of strings")
    _fails(model, lambda: model.merge_and_unload(adapter_names=["nope"]), ValueError, "nope")


def test_merging_twice_and_unmerging_nothing_change_nothing(model):
    before = snapshot(model)
    model.unmerge_adapter()  # nothing merged: a no-op
    assert_unchanged(model, before)
    model.merge_adapter()
    merged = snapshot(model)
    assert merged["layers"]["model.lin0"]["merged"] == ["default"]
    model.merge_adapter()  # already merged: a no-op
    assert_unchanged(model, merged)
    model.unmerge_adapter()
    assert snapshot(model)["layers"] == before["layers"]


def _saved_adapter(model, tmp_path):
    model.save_pretrained(tmp_path / "saved", selected_adapters=["other"])
    return tmp_path / "saved" / "other"


def test_load_adapter_of_the_wrong_shape_changes_nothing(model, tmp_path):
    folder = _saved_adapter(model, tmp_path)
    path = os.path.join(folder, WEIGHTS_NAME)
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("fourierft_spectrum"))
    tensors[key] = torch.ones(tensors[key].numel() + 1)  # one coefficient more than n_frequency=7
    save_file(tensors, path, metadata={"format": "pt"})
    _fails(model, lambda: model.load_adapter(folder, "loaded"), bridge.AdapterFormatError, "lin0")


def test_load_adapter_with_a_broken_config_or_taken_name_changes_nothing(model, tmp_path):
    folder = _saved_adapter(model, tmp_path)
    _fails(model, lambda: model.load_adapter(folder, "other"), ValueError, "already exists")
    config_path = os.path.join(folder, "adapter_config.json")
    with open(config_path) as handle:
        text = handle.read()
    with open(config_path, "w") as handle:
        handle.write(text[: len(text) // 2])
    _fails(model, lambda: model.load_adapter(folder, "loaded"), bridge.AdapterFormatError, "not valid JSON")
    with open(config_path, "w") as handle:
        json.dump(dict(json.loads(text), target_modules=["lin1"]), handle)  # the file's key names lin0
    _fails(model, lambda: model.load_adapter(folder, "loaded"), bridge.AdapterFormatError, "lin")


@pytest.mark.parametrize("merged", [False, True])
def test_disable_adapter_exited_by_an_exception_restores_everything(model, merged):
    if merged:
        model.merge_adapter()
    x = torch.randn(2, 10)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="inside"):
        with model.disable_adapter():
            if not merged:  # a forward of a merged, disabled model unmerges it (PEFT does the same)
                model(x)
            raise RuntimeError("inside")
    assert_unchanged(model, before)
    with torch.no_grad():
        enabled = model(x)
        with model.disable_adapter():
            disabled = model(x)
    assert not torch.allclose(enabled, disabled)
