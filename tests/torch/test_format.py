"""Save with ours -> load with PEFT, save with PEFT -> load with ours; strict validation of bad inputs."""

from __future__ import annotations

import copy
import json
import os
import sys
import warnings

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(__file__))
import torch_models as _models  # noqa: E402

from bridge._src.peft_format import WEIGHTS_NAME  # noqa: E402
import fourierft_torch  # noqa: E402

peft = pytest.importorskip("peft")


def _keys(path):
    with safe_open(os.path.join(path, WEIGHTS_NAME), "pt") as handle:
        return sorted(handle.keys()), handle.metadata()


VARIANTS = [
    dict(bias="none"),
    dict(bias="all"),
    dict(bias="fourier_only"),
    dict(bias="none", modules_to_save=["lin1"]),
    dict(bias="all", modules_to_save=["lin1"]),
]


def _ours_and_peft(kwargs, tmp_path):
    torch.manual_seed(0)
    base = _models.MLP()
    ours_base, peft_base = copy.deepcopy(base), copy.deepcopy(base)
    config = dict(n_frequency=6, target_modules=["lin0"], **kwargs)
    torch.manual_seed(1)
    ours = fourierft_torch.get_fourierft_model(ours_base, fourierft_torch.FourierFTConfig(**config))
    # "other" adapts lin0 only: were it to wrap lin1 too, PEFT itself would drop lin1's bias when loading the
    # default adapter into a fresh model (its loader ignores keys it has no place for yet).
    ours.add_adapter("other", fourierft_torch.FourierFTConfig(n_frequency=4, target_modules=["lin0"]))
    with torch.no_grad():  # make biases and copies differ from the base so that saving them matters
        for param in ours.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        theirs = peft.get_peft_model(peft_base, peft.FourierFTConfig(**config))
        theirs.add_adapter("other", peft.FourierFTConfig(n_frequency=4, target_modules=["lin0"]))
    return base, ours, theirs


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_ours_to_peft_and_back(kwargs, tmp_path):
    base, ours, theirs = _ours_and_peft(kwargs, tmp_path)
    ours_dir, peft_dir = tmp_path / "ours", tmp_path / "peft"
    ours.save_pretrained(ours_dir)
    theirs.save_pretrained(peft_dir)
    for sub in ("", "other"):  # same files, same keys, same metadata as PEFT writes
        assert _keys(ours_dir / sub) == _keys(peft_dir / sub)
        ours_cfg = json.loads((ours_dir / sub / "adapter_config.json").read_text())
        assert ours_cfg["peft_type"] == "FOURIERFT" and ours_cfg["inference_mode"] is True
    x = _models.inputs("mlp")
    expected = {name: None for name in ("default", "other")}
    for name in expected:
        ours.set_adapter(name)
        expected[name] = ours(**x).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), ours_dir)
        loaded.load_adapter(ours_dir / "other", "other")
    torch.testing.assert_close(loaded(**x), expected["default"], rtol=1e-5, atol=1e-6)
    loaded.set_adapter("other")
    torch.testing.assert_close(loaded(**x), expected["other"], rtol=1e-5, atol=1e-6)

    # PEFT's files -> ours.
    peft_out = {}
    for name in ("default", "other"):
        theirs.set_adapter(name)
        peft_out[name] = theirs(**x).detach()
    ours_loaded = fourierft_torch.FourierFTModel.from_pretrained(copy.deepcopy(base), peft_dir)
    ours_loaded.load_adapter(peft_dir / "other", "other")
    torch.testing.assert_close(ours_loaded(**x), peft_out["default"], rtol=1e-5, atol=1e-6)
    ours_loaded.set_adapter("other")
    torch.testing.assert_close(ours_loaded(**x), peft_out["other"], rtol=1e-5, atol=1e-6)


def _saved(tmp_path, **kwargs):
    torch.manual_seed(0)
    model = fourierft_torch.get_fourierft_model(_models.MLP(), fourierft_torch.FourierFTConfig(
        n_frequency=6, target_modules=["lin0"], **kwargs))
    model.save_pretrained(tmp_path / "a")
    return tmp_path / "a"


def _untouched(fn):
    torch.manual_seed(0)
    base = _models.MLP()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    names = [n for n, _ in base.named_modules()]
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        fn(base)
    assert [n for n, _ in base.named_modules()] == names
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    return str(info.value)


def test_other_peft_type(tmp_path):
    path = _saved(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    config["peft_type"] = "LORA"
    (path / "adapter_config.json").write_text(json.dumps(config))
    message = _untouched(lambda m: fourierft_torch.FourierFTModel.from_pretrained(m, path))
    assert "LORA" in message


def test_truncated_file(tmp_path):
    path = _saved(tmp_path)
    data = (path / WEIGHTS_NAME).read_bytes()
    (path / WEIGHTS_NAME).write_bytes(data[: len(data) - 7])
    message = _untouched(lambda m: fourierft_torch.FourierFTModel.from_pretrained(m, path))
    assert WEIGHTS_NAME in message


def test_wrong_spectrum_length(tmp_path):
    path = _saved(tmp_path)
    from safetensors.torch import save_file

    save_file({"base_model.model.lin0.fourierft_spectrum": torch.zeros(5)}, str(path / WEIGHTS_NAME),
              metadata={"format": "pt"})
    message = _untouched(lambda m: fourierft_torch.FourierFTModel.from_pretrained(m, path))
    assert "lin0.fourierft_spectrum" in message and "(5,)" in message and "(6,)" in message


def test_extra_key(tmp_path):
    path = _saved(tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / WEIGHTS_NAME))
    tensors["base_model.model.lin1.fourierft_spectrum"] = torch.zeros(6)
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    message = _untouched(lambda m: fourierft_torch.FourierFTModel.from_pretrained(m, path))
    assert "lin1.fourierft_spectrum" in message


def test_missing_targets(tmp_path):
    path = _saved(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    config["target_modules"] = ["nope"]
    (path / "adapter_config.json").write_text(json.dumps(config))
    message = _untouched(lambda m: fourierft_torch.FourierFTModel.from_pretrained(m, path))
    assert "nope" in message


def test_layer_too_small(tmp_path):
    path = _saved(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    config["n_frequency"] = 10_000
    (path / "adapter_config.json").write_text(json.dumps(config))
    message = _untouched(lambda m: fourierft_torch.FourierFTModel.from_pretrained(m, path))
    assert "lin0" in message


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_safe_merge_nan_leaves_weights(bad):
    torch.manual_seed(0)
    model = fourierft_torch.get_fourierft_model(_models.MLP(), fourierft_torch.FourierFTConfig(
        n_frequency=6, target_modules=["lin0", "lin1"]))
    with torch.no_grad():
        model.model.lin1.fourierft_spectrum["default"][0] = bad
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for merge in (lambda: model.merge_and_unload(safe_merge=True), lambda: model.merge_adapter(safe_merge=True)):
        with pytest.raises(ValueError, match="NaN"):
            merge()
        # lin0 (fine) comes first in the model and is not merged either: nothing changes, nothing is unwrapped.
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if "spectrum" not in k)
        assert isinstance(model.model.lin0, fourierft_torch.FourierFTLinear) and not model.model.lin0.merged


def test_training_changes_only_adapter():
    torch.manual_seed(0)
    model = fourierft_torch.get_fourierft_model(_models.MLP(), fourierft_torch.FourierFTConfig(
        n_frequency=6, target_modules=["lin0"], modules_to_save=["lin1"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(**_models.inputs("mlp")).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"model.lin0.fourierft_spectrum.default", "model.lin1.modules_to_save.default.weight",
                       "model.lin1.modules_to_save.default.bias"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_and_merge(dtype):
    torch.manual_seed(0)
    base = _models.bert()
    reference = fourierft_torch.get_fourierft_model(copy.deepcopy(base), fourierft_torch.FourierFTConfig(n_frequency=30))
    half = fourierft_torch.get_fourierft_model(copy.deepcopy(base).to(dtype), fourierft_torch.FourierFTConfig(n_frequency=30))
    with torch.no_grad():
        for (_, a), (_, b) in zip(reference.named_parameters(), half.named_parameters()):
            b.copy_(a.to(b.dtype))
    batch = _models.inputs("bert")
    expected = _models.output(reference, batch)
    got = _models.output(half, batch)
    assert got.dtype == dtype
    assert ((got.float() - expected).norm() / expected.norm()).item() < 3e-2
    merged = half.merge_and_unload()
    assert ((_models.output(merged, batch).float() - expected).norm() / expected.norm()).item() < 3e-2
