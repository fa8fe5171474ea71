"""`fourierft inspect` counted against the PEFT model itself; `fourierft plot` writes a PNG that decodes."""

from __future__ import annotations

import copy
import json
import os
import struct
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

sys.path.insert(0, os.path.dirname(__file__))
import _cli_util  # noqa: E402
from bridge._src.cli import main  # noqa: E402


def peft_layers(model):
    """{module path: (out, in, n)} of every FourierFT layer of a PEFT model, read from the modules."""
    layers = {}
    for name, module in model.named_modules():
        if hasattr(module, "fourierft_spectrum") and "default" in module.fourierft_spectrum:
            path = name[len("base_model.model."):]
            layers[path] = (module.out_features, module.in_features, module.fourierft_spectrum["default"].numel())
    return layers


def other_trainables(model):
    """Trainable elements that are not spectra (PEFT's bias="all" also marks the untouched original copy)."""
    return sum(p.numel() for name, p in model.named_parameters()
               if p.requires_grad and "fourierft_spectrum" not in name and "original_module" not in name)


def inspect_json(capsys, *argv):
    capsys.readouterr()
    assert main(["inspect", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("case_name", ["bert_cls", "gpt2_sharded", "llama_bf16"])
def test_inspect_counts_match_peft(capsys, request, case_name):
    case = request.getfixturevalue(case_name)
    expected = peft_layers(case.model)
    report = inspect_json(capsys, case.adapter, "--base", case.base, "--lora-rank", "4")
    assert report["format"] == "peft" and len(report["adapters"]) == 1
    adapter = report["adapters"][0]
    got = {layer["name"]: (*layer["shape"], layer["params"]) for layer in adapter["layers"]}
    assert got == expected
    totals = adapter["totals"]
    assert totals["layers"] == len(expected)
    assert totals["spectrum_params"] == sum(n for _, _, n in expected.values())
    assert totals["other_params"] == other_trainables(case.model)
    assert totals["lora_rank"] == 4
    assert totals["lora_params"] == sum(4 * (o + i) for o, i, _ in expected.values())
    conv1d = {layer["name"]: layer["conv1d"] for layer in adapter["layers"]}
    assert all(conv1d.values()) == (case_name == "gpt2_sharded")
    assert adapter["config"]["scaling"] == case.model.peft_config["default"].scaling


def test_inspect_text_and_unknown_shapes(capsys, bert_cls):
    expected = peft_layers(bert_cls.model)
    capsys.readouterr()
    assert main(["inspect", bert_cls.adapter, "--base", bert_cls.base]) == 0
    text = capsys.readouterr().out
    lora = sum(8 * (o + i) for o, i, _ in expected.values())
    assert f"layers: {len(expected)}" in text
    assert f"spectrum parameters: {sum(n for *_, n in expected.values()):,}" in text
    assert f"vs LoRA r=8 on the same {len(expected)} layers" in text and f"{lora:,} parameters" in text
    for name, (out_features, in_features, _) in expected.items():
        assert name in text and f"{out_features} x {in_features}" in text
    # without --base the shapes are unknown but the counts are not
    report = inspect_json(capsys, bert_cls.adapter)
    layers = report["adapters"][0]["layers"]
    assert all(layer["shape"] is None and layer["lora_params"] is None for layer in layers)
    assert sum(layer["params"] for layer in layers) == sum(n for *_, n in expected.values())
    assert main(["inspect", bert_cls.adapter]) == 0
    assert "unknown" in capsys.readouterr().out


def test_inspect_several_adapters(capsys, tmp_path):
    torch.manual_seed(0)
    model = transformers.BertModel(_cli_util.bert_config())
    wrapped = peft.get_peft_model(model, peft.FourierFTConfig(n_frequency=10, target_modules=["query"]))
    wrapped.add_adapter("second", peft.FourierFTConfig(n_frequency=21, target_modules=["value", "key"]))
    wrapped.save_pretrained(tmp_path)
    report = inspect_json(capsys, str(tmp_path))
    summary = {a["name"]: (a["totals"]["layers"], a["totals"]["spectrum_params"]) for a in report["adapters"]}
    assert summary == {"default": (2, 20), "second": (4, 84)}


def png_size(path):
    with open(path, "rb") as stream:
        head = stream.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_plot_with_base(capsys, gpt2_sharded, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plots" / "gpt2.png"
    assert main(["plot", gpt2_sharded.adapter, "--base", gpt2_sharded.base, "--out", str(out),
                 "--layers", "h.1.mlp.c_proj", "*.c_attn"]) == 0
    assert "h.1.mlp.c_proj" in capsys.readouterr().out
    width, height = png_size(out)
    assert width > 500 and height > 3 * 300  # three layers, one row each
    import matplotlib.image
    assert matplotlib.image.imread(str(out)).shape[:2] == (height, width)
    assert [name for name in os.listdir(out.parent) if name != "gpt2.png"] == []  # no temporary left


def test_plot_with_shape(bert_cls, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "one.png"
    assert main(["plot", bert_cls.adapter, "--shape", "32x32", "--layers",
                 "bert.encoder.layer.1.attention.self.query", "--out", str(out)]) == 0
    assert png_size(out)[0] > 500
    assert main(["plot", bert_cls.adapter, "--base", bert_cls.base, "--out", str(out), "--overwrite"]) == 0
