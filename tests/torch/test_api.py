"""Model API against PEFT: several adapters active at once, task_type, meta-device creation, disabled adapters."""

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


def _plain(name):
    return name[len("base_model.model."):] if name.startswith("base_model.model.") else name.removeprefix("model.")


def _error(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _spectra(model):
    return {_plain(n): p for n, p in model.named_parameters() if "fourierft_spectrum" in n}


def _two_adapters(kind, first, second):
    torch.manual_seed(0)
    base = _models.FACTORIES[kind]()
    ours_base = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        theirs = peft.get_peft_model(base, peft.FourierFTConfig(**first))
        theirs.add_adapter("other", peft.FourierFTConfig(**second))
        torch.manual_seed(1)
        ours = fourierft_torch.get_fourierft_model(ours_base, fourierft_torch.FourierFTConfig(**first))
        ours.add_adapter("other", fourierft_torch.FourierFTConfig(**second))
    return theirs, ours


@pytest.mark.parametrize("mode", ["spectral", "fused"])
def test_several_active_adapters_match_peft(mode):
    # "other" adapts lin0 (shared with "default") and lin1 (its own).
    theirs, ours = _two_adapters(
        "mlp", dict(n_frequency=7, target_modules=["lin0"]), dict(n_frequency=5, target_modules=["lin0", "lin1"])
    )
    for module in ours.modules():
        if isinstance(module, fourierft_torch.FourierFTLinear):
            module.forward_mode = mode
    theirs.base_model.set_adapter(["default", "other"])
    ours.set_adapter(["default", "other"])
    assert ours.active_adapters == ["default", "other"] == theirs.base_model.active_adapters
    trainable = lambda m: sorted(_plain(n) for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert trainable(ours) == trainable(theirs) and len(trainable(ours)) == 3
    batch = _models.inputs("mlp")
    y_theirs, y_ours = _models.output(theirs, batch), _models.output(ours, batch)
    assert _error(y_ours, y_theirs) <= 1e-5
    with theirs.disable_adapter():
        base_out = _models.output(theirs, batch)
    assert _error(y_ours, base_out) > 1e-3  # both adapters really act
    y_theirs.sum().backward()
    y_ours.sum().backward()
    their_spectra, our_spectra = _spectra(theirs), _spectra(ours)
    assert sorted(their_spectra) == sorted(our_spectra)
    for name, param in their_spectra.items():
        assert param.grad is not None and _error(our_spectra[name].grad, param.grad) <= 1e-5, name
    with torch.no_grad():
        merged_theirs = theirs.merge_and_unload()
        merged_ours = ours.merge_and_unload()
    for key, value in merged_theirs.state_dict().items():
        assert _error(merged_ours.state_dict()[key], value) <= 1e-6, key


def test_several_active_adapters_with_modules_to_save_rejected():
    torch.manual_seed(0)
    model = fourierft_torch.get_fourierft_model(
        _models.MLP(), fourierft_torch.FourierFTConfig(n_frequency=4, target_modules=["lin0"], modules_to_save=["lin1"])
    )
    model.add_adapter("other", fourierft_torch.FourierFTConfig(n_frequency=4, target_modules=["lin0"],
                                                               modules_to_save=["lin1"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default"]
    with pytest.raises(ValueError, match="nope"):
        model.set_adapter(["default", "nope"])


def _seq_cls():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                        vocab_size=100, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(config).eval()


def _keys(path):
    with safe_open(os.path.join(path, WEIGHTS_NAME), "pt") as handle:
        return sorted(handle.keys())


def test_task_type_adds_modules_to_save_like_peft(tmp_path):
    torch.manual_seed(0)
    base = _seq_cls()
    ours_base = copy.deepcopy(base)
    kwargs = dict(task_type="SEQ_CLS", n_frequency=20, target_modules=["query", "value"], scaling=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        theirs = peft.get_peft_model(base, peft.FourierFTConfig(**kwargs))
    torch.manual_seed(1)
    ours = fourierft_torch.get_fourierft_model(ours_base, fourierft_torch.FourierFTConfig(**kwargs))
    kinds = lambda m, cls: sorted(_plain(n) for n, x in m.named_modules() if type(x).__name__ == cls)  # noqa: E731
    assert kinds(ours, "FourierFTLinear") == kinds(theirs, "FourierFTLinear")
    assert kinds(ours, "ModulesToSaveWrapper") == kinds(theirs, "ModulesToSaveWrapper") == ["classifier"]
    trainable = lambda m: sorted(_plain(n) for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert trainable(ours) == trainable(theirs)
    batch = _models.inputs("bert")
    assert _error(ours(**batch).logits, theirs(**batch).logits) <= 1e-5
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    assert _keys(tmp_path / "ours") == _keys(tmp_path / "peft")
    assert "base_model.model.classifier.weight" in _keys(tmp_path / "ours")
    read = lambda d: json.loads((tmp_path / d / "adapter_config.json").read_text())  # noqa: E731
    theirs_cfg, ours_cfg = read("peft"), read("ours")
    for config in (theirs_cfg, ours_cfg):
        config["target_modules"] = sorted(config["target_modules"])
        config.pop("peft_version")  # ours writes the version it mirrors, PEFT its installed one
    assert ours_cfg == theirs_cfg


def test_create_on_meta_device_like_peft():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, vocab_size=100)
    with torch.device("meta"):
        base = LlamaForCausalLM(config)
    kwargs = dict(n_frequency=30, target_modules="all-linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.FourierFTConfig(**kwargs))
    ours = fourierft_torch.get_fourierft_model(base, fourierft_torch.FourierFTConfig(**kwargs))
    their_layers = {_plain(n): m for n, m in theirs.named_modules() if type(m).__name__ == "FourierFTLinear"}
    our_layers = {_plain(n): m for n, m in ours.named_modules() if isinstance(m, fourierft_torch.FourierFTLinear)}
    assert sorted(our_layers) == sorted(their_layers) and len(our_layers) == 14
    for name, layer in our_layers.items():
        assert layer.base_layer.weight.device.type == "meta"
        assert torch.equal(layer.indices["default"], their_layers[name].indices["default"]), name
        assert layer.fourierft_spectrum["default"].shape == their_layers[name].fourierft_spectrum["default"].shape


def test_disabled_adapters_give_base_output():
    theirs, ours = _two_adapters("bert", dict(n_frequency=20, scaling=1.0), dict(n_frequency=20, scaling=1.0))
    torch.manual_seed(0)
    plain = _models.bert()
    batch = _models.inputs("bert")
    expected = _models.output(plain, batch)
    with ours.disable_adapter():
        assert torch.equal(_models.output(ours, batch), expected)
    with theirs.disable_adapter():
        assert torch.equal(_models.output(theirs, batch), expected)
    assert _error(_models.output(ours, batch), expected) > 1e-4  # enabled again afterwards
    with torch.no_grad():
        ours.merge_adapter()
    with ours.disable_adapter():  # PEFT's rule: a disabled layer unmerges itself first
        torch.testing.assert_close(_models.output(ours, batch), expected, rtol=0, atol=1e-6)
