"""Every user-error path of `fourierft`: one line on stderr, exit code 2, nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(__file__))
import _cli_util  # noqa: E402

import bridge  # noqa: E402
from bridge._src import merge as merge_module  # noqa: E402
from bridge._src.cli import main  # noqa: E402


def run_error(capsys, argv, *fragments):
    """Run main(argv), expect exit 2 and one stderr line containing every fragment."""
    capsys.readouterr()  # drop what earlier set-up printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fourierft {argv[0]}: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)
    return lines[0]


def siblings(path):
    parent = os.path.dirname(path)
    return sorted(name for name in os.listdir(parent) if name.startswith("." + os.path.basename(path)))


@pytest.fixture()
def adapter_copy(bert_cls, tmp_path):
    target = tmp_path / "adapter"
    shutil.copytree(bert_cls.adapter, target)
    return str(target)


# ---- sources that are not adapters -----------------------------------------------------------------------

@pytest.mark.parametrize("command", ["inspect", "merge", "plot"])
def test_missing_path(capsys, tmp_path, bert_cls, command):
    missing = str(tmp_path / "nope")
    argv = {"inspect": ["inspect", missing],
            "merge": ["merge", "--base", bert_cls.base, "--adapter", missing, "--out", str(tmp_path / "o")],
            "plot": ["plot", missing, "--out", str(tmp_path / "p.png"), "--shape", "4x4"]}[command]
    run_error(capsys, argv, missing, "no such file or directory")
    assert not os.path.exists(tmp_path / "o")


def test_not_a_directory(capsys, tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("x")
    run_error(capsys, ["inspect", str(path)], "is not a directory")


def test_no_adapter_config(capsys, tmp_path):
    run_error(capsys, ["inspect", str(tmp_path)], "not a PEFT adapter directory")


def test_wrong_peft_type(capsys, adapter_copy):
    path = os.path.join(adapter_copy, "adapter_config.json")
    with open(path) as stream:
        data = json.load(stream)
    data["peft_type"] = "LORA"
    with open(path, "w") as stream:
        json.dump(data, stream)
    run_error(capsys, ["inspect", adapter_copy], "LORA", "not a FourierFT")


def test_config_not_json(capsys, adapter_copy):
    with open(os.path.join(adapter_copy, "adapter_config.json"), "w") as stream:
        stream.write("{not json")
    run_error(capsys, ["inspect", adapter_copy], "not valid JSON")


def test_missing_weights(capsys, adapter_copy):
    os.remove(os.path.join(adapter_copy, "adapter_model.safetensors"))
    run_error(capsys, ["inspect", adapter_copy], "no adapter_model.safetensors")


@pytest.mark.parametrize("keep", [4, 100, -10])
def test_truncated_adapter(capsys, adapter_copy, keep):
    path = os.path.join(adapter_copy, "adapter_model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:keep] if keep > 0 else data[:keep])
    run_error(capsys, ["inspect", adapter_copy], path, "truncated")


def test_not_safetensors(capsys, adapter_copy):
    path = os.path.join(adapter_copy, "adapter_model.safetensors")
    open(path, "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00not a json header")
    run_error(capsys, ["inspect", adapter_copy], "not a readable safetensors file")


def test_keys_not_peft(capsys, tmp_path):
    bridge.FourierFTConfig(target_modules=["q"]).save_pretrained(tmp_path)
    from safetensors.numpy import save_file
    save_file({"q.fourierft_spectrum": np.zeros(3, np.float32)}, str(tmp_path / "adapter_model.safetensors"))
    run_error(capsys, ["inspect", str(tmp_path)], "does not start with 'base_model.model.'")


def test_truncated_base(capsys, bert_cls, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(bert_cls.base, base)
    path = base / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    out = tmp_path / "out"
    run_error(capsys, ["merge", "--base", str(base), "--adapter", bert_cls.adapter, "--out", str(out)], "truncated")
    assert not out.exists() and siblings(str(out)) == []


def test_base_without_safetensors(capsys, bert_cls, tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "pytorch_model.bin").write_bytes(b"")
    run_error(capsys, ["merge", "--base", str(tmp_path / "base"), "--adapter", bert_cls.adapter, "--out",
                       str(tmp_path / "o")], "pytorch_model.bin", "safetensors")


# ---- adapters that do not fit the base ---------------------------------------------------------------------

def test_adapter_of_another_model(capsys, bert_cls, gpt2_sharded, tmp_path):
    line = run_error(capsys, ["merge", "--base", gpt2_sharded.base, "--adapter", bert_cls.adapter, "--out",
                              str(tmp_path / "o")], "does not fit the base model", "no match",
                     "bert.encoder.layer.0.attention.self.query.weight")
    assert "more)" in line  # long lists are cut, with the count of the rest
    assert not (tmp_path / "o").exists()


def test_modules_to_save_shape_mismatch(capsys, bert_cls, tmp_path):
    # The adapter's classifier has 3 labels; a base with 2 labels has no room for it.
    torch.manual_seed(0)
    other = transformers.BertForSequenceClassification(_cli_util.bert_config(num_labels=2))
    other.save_pretrained(tmp_path / "base2", safe_serialization=True)
    run_error(capsys, ["merge", "--base", str(tmp_path / "base2"), "--adapter", bert_cls.adapter, "--out",
                       str(tmp_path / "o")], "'base_model.model.classifier.weight'", "(3, 32)", "(2, 32)")


def test_spectrum_longer_than_layer(capsys, tmp_path):
    from safetensors.numpy import save_file
    save_file({"lin.weight": np.zeros((3, 2), np.float32)}, str(tmp_path / "model.safetensors"))
    bridge.write_adapter(tmp_path / "ad", bridge.FourierFTConfig(n_frequency=7, target_modules=["lin"]),
                         {bridge.spectrum_key("lin"): np.ones(7, np.float32)})
    run_error(capsys, ["merge", "--base", str(tmp_path / "model.safetensors"), "--adapter", str(tmp_path / "ad"),
                       "--out", str(tmp_path / "o")], "'lin'", "(7,)", "(3, 2)")


def test_several_adapters_need_a_name(capsys, tmp_path, bert_cls):
    for name in ("one", "two"):
        shutil.copytree(bert_cls.adapter, tmp_path / "ads" / name)
    run_error(capsys, ["merge", "--base", bert_cls.base, "--adapter", str(tmp_path / "ads"), "--out",
                       str(tmp_path / "o")], "several adapters", "--adapter-name")
    run_error(capsys, ["merge", "--base", bert_cls.base, "--adapter", str(tmp_path / "ads"), "--adapter-name",
                       "three", "--out", str(tmp_path / "o")], "no adapter named 'three'", "one")


# ---- destinations ----------------------------------------------------------------------------------------

def test_existing_destination_refused_then_overwritten(capsys, bert_cls, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    argv = ["merge", "--base", bert_cls.base, "--adapter", bert_cls.adapter, "--out", str(out), "-q"]
    run_error(capsys, argv, "already exists", "--overwrite")
    assert sorted(os.listdir(out)) == ["stale.txt"]
    assert main(argv + ["--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]  # the old folder is gone entirely
    assert siblings(str(out)) == []


def test_destination_is_the_base(capsys, bert_cls):
    run_error(capsys, ["merge", "--base", bert_cls.base, "--adapter", bert_cls.adapter, "--out", bert_cls.base,
                       "--overwrite"], "overlaps the input")


def test_failure_part_way_leaves_nothing(bert_cls, tmp_path, monkeypatch):
    calls = []
    real = merge_module.merged_weight

    def explode(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # after two layers were written
            raise RuntimeError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_module, "merged_weight", explode)
    out = str(tmp_path / "out")
    with pytest.raises(RuntimeError, match="simulated"):
        merge_module.merge_adapter(bert_cls.base, bert_cls.adapter, out, progress=False)
    assert len(calls) == 3
    assert not os.path.exists(out) and siblings(out) == []

    # With --overwrite, the previous result survives a failed merge untouched.
    os.mkdir(out)
    open(os.path.join(out, "keep.txt"), "w").write("previous")
    calls.clear()
    with pytest.raises(RuntimeError, match="simulated"):
        merge_module.merge_adapter(bert_cls.base, bert_cls.adapter, out, overwrite=True, progress=False)
    assert os.listdir(out) == ["keep.txt"] and siblings(out) == []


def test_nan_spectrum_refused(capsys, tmp_path):
    from safetensors.numpy import save_file
    save_file({"lin.weight": np.zeros((3, 2), np.float32)}, str(tmp_path / "model.safetensors"))
    bridge.write_adapter(tmp_path / "ad", bridge.FourierFTConfig(n_frequency=2, target_modules=["lin"]),
                         {bridge.spectrum_key("lin"): np.array([1.0, np.nan], np.float32)})
    out = tmp_path / "o"
    run_error(capsys, ["merge", "--base", str(tmp_path / "model.safetensors"), "--adapter", str(tmp_path / "ad"),
                       "--out", str(out), "-q"], "NaN")
    assert not out.exists() and siblings(str(out)) == []


# ---- plot ------------------------------------------------------------------------------------------------

def test_plot_needs_shapes(capsys, bert_cls, tmp_path):
    png = str(tmp_path / "p.png")
    run_error(capsys, ["plot", bert_cls.adapter, "--out", png], "--base", "--shape")
    run_error(capsys, ["plot", bert_cls.adapter, "--out", png, "--shape", "32x32"], "--shape", "--layers")
    run_error(capsys, ["plot", bert_cls.adapter, "--out", png, "--layers", "nothing_like_this"], "nothing_like_this",
              "matches no adapted layer")
    run_error(capsys, ["plot", bert_cls.adapter, "--out", png, "--layers", "layer.0.attention.self.query",
                       "--shape", "32by32"], "OUTxIN")
    run_error(capsys, ["plot", bert_cls.adapter, "--out", png, "--layers", "layer.0.attention.self.query",
                       "--shape", "2x3"], "40 coefficients")
    assert not os.path.exists(png)


def test_plot_existing_file(capsys, bert_cls, tmp_path):
    png = tmp_path / "p.png"
    png.write_bytes(b"old")
    run_error(capsys, ["plot", bert_cls.adapter, "--out", str(png), "--base", bert_cls.base], "already exists")
    assert png.read_bytes() == b"old"


def test_plot_without_matplotlib(capsys, bert_cls, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    run_error(capsys, ["plot", bert_cls.adapter, "--out", str(tmp_path / "p.png"), "--base", bert_cls.base],
              "needs matplotlib")


def test_inspect_bad_rank(capsys, bert_cls):
    run_error(capsys, ["inspect", bert_cls.adapter, "--lora-rank", "0"], "--lora-rank")


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--base", "x"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
