"""Damaged copies of a PEFT-written adapter through every `fourierft` command that reads one: exit 2, one line on
stderr, no traceback, nothing written (issue 13's list of bad inputs)."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

torch = pytest.importorskip("torch")

from bridge._src.cli import main  # noqa: E402
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers"))
import damage  # noqa: E402  (tests/helpers/damage.py: the file surgery shared by the bad-input tests)

SPECTRUM = "base_model.model.encoder.layer.0.attention.self.key.fourierft_spectrum"


DAMAGES = {
    "wrong peft_type": (lambda f: damage.edit_config(f, lambda d: d.update(peft_type="LORA")), "not a FourierFT one"),
    "missing peft_type": (lambda f: damage.edit_config(f, lambda d: d.pop("peft_type")), "has no `peft_type`"),
    "config not JSON": (lambda f: damage.write_config_text(f, "{oops"), "not valid JSON"),
    "negative n_frequency": (lambda f: damage.edit_config(f, lambda d: d.update(n_frequency=-30)),
                             "`n_frequency` must be a positive integer, got -30"),
    "truncated safetensors": (lambda f: damage.truncate(f, 7), "truncated"),
    "header claims 2**62 bytes": (damage.claim_huge_header,
                                  "header of 4611686018427387904 bytes"),
    "spectrum of the wrong length": (lambda f: damage.edit_tensors(f, lambda t: t.update({SPECTRUM: t[SPECTRUM][:7].copy()})),
                                     f"{SPECTRUM!r} has shape (7,) but adapter_config.json gives layer"),
    "key the config does not target": (
        lambda f: damage.edit_tensors(f, lambda t: t.update({SPECTRUM.replace(".key.", ".query."): t[SPECTRUM].copy()})),
        "'encoder.layer.0.attention.self.query', which adapter_config.json does not target"),
    "targeted layer without its key": (lambda f: damage.edit_tensors(f, lambda t: t.pop(SPECTRUM)),
                                       f"layer 'encoder.layer.0.attention.self.key' is targeted by the config but "
                                       f"its key {SPECTRUM!r} (shape (30,)) is missing"),
    "pickle-only weights": (damage.pickle_only, "never unpickled"),
}


def _commands(case, adapter, tmp_path):
    return {
        "inspect": (["inspect", adapter, "--base", case.base], None),
        "merge": (["merge", "--base", case.base, "--adapter", adapter, "--out", str(tmp_path / "merged"), "-q"],
                  tmp_path / "merged"),
        "convert": (["convert", adapter, str(tmp_path / "orbax"), "--to", "orbax", "--base", case.base],
                    tmp_path / "orbax"),
        "plot": (["plot", adapter, "--out", str(tmp_path / "p.png"), "--base", case.base, "--layers",
                  "encoder.layer.0.attention.self.key"], tmp_path / "p.png"),
    }


def _one_error_line(capsys, argv, fragment):
    capsys.readouterr()
    assert main(argv) == 2, argv
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"fourierft {argv[0]}: error: ") and "Traceback" not in captured.err
    assert fragment in lines[0], (fragment, lines[0])
    return captured


@pytest.fixture()
def adapter(bert_bare, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(bert_bare.adapter, folder)
    return str(folder)


def _snapshot(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize("kind", sorted(DAMAGES))
def test_bad_adapter_refused_by_every_command(capsys, bert_bare, adapter, tmp_path, kind):
    harm, fragment = DAMAGES[kind]
    harm(adapter)
    before = _snapshot(adapter)
    for command, (argv, out) in _commands(bert_bare, adapter, tmp_path).items():
        _one_error_line(capsys, argv, fragment)
        if out is not None:
            assert not out.exists(), command
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # nothing written next to the outputs either
    assert _snapshot(adapter) == before  # the input is untouched
    assert not os.path.exists(tmp_path / "unpickled")


def test_inspect_lists_every_inconsistency(capsys, bert_bare, adapter):
    def two_problems(t):
        t[SPECTRUM.replace(".key.", ".query.")] = t[SPECTRUM].copy()
        t[SPECTRUM] = t[SPECTRUM][:7].copy()

    damage.edit_tensors(adapter, two_problems)
    captured = _one_error_line(capsys, ["inspect", adapter], "(2 problem(s))")
    assert "has shape (7,)" in captured.err and "does not target" in captured.err
    report = captured.out.split("problems (2):")[1].strip().splitlines()
    assert len(report) == 2 and all(line.strip().startswith("- ") for line in report)


def test_nan_refused_by_merge_carried_by_convert(capsys, bert_bare, adapter, tmp_path):
    damage.put_nan(adapter, SPECTRUM, 3)
    out = tmp_path / "merged"
    _one_error_line(capsys, ["merge", "--base", bert_bare.base, "--adapter", adapter, "--out", str(out), "-q"],
                    f"NaN or inf values in {SPECTRUM!r}")
    assert not out.exists()
    assert main(["convert", adapter, str(tmp_path / "orbax"), "--to", "orbax", "--base", bert_bare.base]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fourierft convert: warning: NaN or inf values in {SPECTRUM!r}; copied as they are"]
    import numpy as np

    import fourierft_jax

    saved = fourierft_jax.load_adapter(tmp_path / "orbax")
    copied = np.asarray(saved.state["spectra"]["encoder.layer.0.attention.self.key"])
    assert np.isnan(copied[3]) and np.isfinite(np.delete(copied, 3)).all()


def test_existing_destination_without_overwrite(capsys, bert_bare, tmp_path):
    for command in ("merge", "convert", "plot"):
        out = tmp_path / command
        if command == "plot":
            out.write_bytes(b"old picture")
        else:
            out.mkdir()
            (out / "keep.txt").write_text("old")
        argv = {"merge": ["merge", "--base", bert_bare.base, "--adapter", bert_bare.adapter, "--out", str(out)],
                "convert": ["convert", bert_bare.adapter, str(out), "--to", "orbax", "--base", bert_bare.base],
                "plot": ["plot", bert_bare.adapter, "--out", str(out), "--base", bert_bare.base]}[command]
        _one_error_line(capsys, argv, "already exists")
        if command == "plot":
            assert out.read_bytes() == b"old picture"
        else:
            assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["convert", "merge", "plot"]
