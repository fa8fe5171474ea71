"""`fourierft convert` (and `inspect` on an Orbax checkpoint) through the entry point: both directions, name maps,
and every error path as a one-line message with exit code 2 and nothing written at DST."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import bridge
import fourierft_jax
from bridge._src.cli import main

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from convert_models import ODD_RULES, Net, OddNet, inputs, init, rel_err, torch_odd_twin, torch_twin  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SCRIPT = os.path.join(os.path.dirname(sys.executable), "fourierft")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A JAX adapter (random non-initial values everywhere) saved as an Orbax checkpoint, and its base in torch."""
    root = tmp_path_factory.mktemp("convert")
    params = init(Net(), seed=2)
    config = fourierft_jax.FourierFTConfig(n_frequency=20, scaling=50.0, target_modules=["query", "value"],
                                           bias="fourier_only", modules_to_save=["classifier"])
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(4))
    leaves, tree = jax.tree.flatten(adapter.trainable)
    adapter.set_trainable(jax.tree.unflatten(tree, [a * 1.5 + 0.25 for a in leaves]))
    checkpoint = fourierft_jax.save_adapter(root / "orbax", adapter)
    base = root / "base"
    base.mkdir()
    save_file({k: v.contiguous() for k, v in torch_twin(params).state_dict().items()},
              str(base / "model.safetensors"))
    return root, params, adapter, checkpoint, str(base)


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_orbax_to_peft_to_orbax(trained, tmp_path, capsys):
    _, params, adapter, checkpoint, base = trained
    peft_dir = tmp_path / "peft"
    assert main(["convert", checkpoint, str(peft_dir), "--to", "peft"]) == 0  # no base needed
    assert "(orbax)" in capsys.readouterr().out
    x = inputs()
    want = np.asarray(adapter.make_apply(Net().apply)(adapter.trainable, params, x))
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(torch_twin(params), str(peft_dir)).eval()(torch.from_numpy(x)).numpy()
    assert rel_err(got, want) <= 1e-5

    back = tmp_path / "back"
    assert main(["convert", str(peft_dir), str(back), "--to", "orbax", "--base", base]) == 0
    restored = fourierft_jax.load_adapter(back).attach(params)
    _same(restored.trainable, adapter.trainable)
    assert restored.specs["default"] == adapter.specs["default"]


def test_inspect_recognises_an_orbax_checkpoint(trained, capsys):
    _, _, adapter, checkpoint, _ = trained
    assert main(["inspect", checkpoint]) == 0
    text = capsys.readouterr().out
    assert "Orbax adapter checkpoint (format: orbax)" in text.splitlines()[0]
    assert main(["inspect", checkpoint, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "orbax"
    layers = {layer["name"]: layer["shape"] for layer in report["adapters"][0]["layers"]}
    assert layers == {layer.name: [layer.out_features, layer.in_features] for layer in adapter.specs["default"].layers}
    assert report["adapters"][0]["totals"]["spectrum_params"] == 80


def test_name_map_through_the_cli(tmp_path):
    params = init(OddNet())
    adapter = fourierft_jax.apply(params, fourierft_jax.FourierFTConfig(n_frequency=12, target_modules=["q", "v"]),
                                  key=jax.random.key(0))
    checkpoint = fourierft_jax.save_adapter(tmp_path / "orbax", adapter)
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(ODD_RULES))
    assert main(["convert", checkpoint, str(tmp_path / "peft"), "--to", "peft", "--name-map", str(rules)]) == 0
    x = inputs()
    want = np.asarray(adapter.make_apply(OddNet().apply)(adapter.trainable, params, x))
    model = peft.PeftModel.from_pretrained(torch_odd_twin(params), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        assert rel_err(model(torch.from_numpy(x)).numpy(), want) <= 1e-5
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in torch_odd_twin(params).state_dict().items()}, str(base))
    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "back"), "--to", "orbax", "--base", str(base),
                 "--name-map", str(rules)]) == 0
    _same(fourierft_jax.load_adapter(tmp_path / "back").attach(params).trainable, adapter.trainable)


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_error_paths(trained, tmp_path, capsys, monkeypatch):
    root, params, _, checkpoint, base = trained
    peft_dir = tmp_path / "peft"
    assert main(["convert", checkpoint, str(peft_dir), "--to", "peft"]) == 0
    capsys.readouterr()
    dst = str(tmp_path / "dst")

    assert "no such file" in _error(capsys, ["convert", str(tmp_path / "nope"), dst, "--to", "peft"])
    (tmp_path / "empty").mkdir()
    assert "neither a PEFT adapter folder" in _error(capsys, ["convert", str(tmp_path / "empty"), dst, "--to", "orbax"])
    assert "already a orbax adapter" in _error(capsys, ["convert", checkpoint, dst, "--to", "orbax"])
    assert "pass --base" in _error(capsys, ["convert", str(peft_dir), dst, "--to", "orbax"])
    assert "not a regular expression" in _error(
        capsys, ["convert", checkpoint, dst, "--to", "peft", "--name-map", '[["(", "x"]]'])

    # Existing DST: refused without --overwrite, replaced whole with it.
    os.makedirs(dst)
    (tmp_path / "dst" / "old.txt").write_text("old")
    assert "already exists: pass --overwrite" in _error(capsys, ["convert", checkpoint, dst, "--to", "peft"])
    assert (tmp_path / "dst" / "old.txt").exists()
    assert main(["convert", checkpoint, dst, "--to", "peft", "--overwrite"]) == 0
    assert sorted(os.listdir(dst)) == ["adapter_config.json", "adapter_model.safetensors"]
    capsys.readouterr()

    # Corrupt sources.
    broken = tmp_path / "broken_peft"
    broken.mkdir()
    for name in os.listdir(peft_dir):
        data = (peft_dir / name).read_bytes()
        (broken / name).write_bytes(data[: len(data) // 2] if name.endswith(".safetensors") else data)
    assert "truncated" in _error(capsys, ["convert", str(broken), str(tmp_path / "d2"), "--to", "orbax", "--base", base])
    bad_orbax = tmp_path / "bad_orbax"
    bad_orbax.mkdir()
    (bad_orbax / "fourierft_adapter.json").write_text("{not json")
    assert "not readable JSON" in _error(capsys, ["convert", str(bad_orbax), str(tmp_path / "d3"), "--to", "peft"])

    # An adapter that does not fit the base.
    other = init(Net(), seed=2)
    wrong_base = tmp_path / "wrong_base.safetensors"
    state = torch_twin(other).state_dict()
    state["layer.1.value.weight"] = torch.zeros(2, 2)
    save_file({k: v.contiguous() for k, v in state.items()}, str(wrong_base))
    message = _error(capsys, ["convert", str(peft_dir), str(tmp_path / "d4"), "--to", "orbax", "--base",
                              str(wrong_base)])
    assert "layer.1.value" in message and "(2, 2)" in message

    # Failure part-way: nothing at DST, no temporary folder left behind.
    def explode(*args, **kwargs):
        raise bridge.AdapterFormatError("disk full (simulated)")

    monkeypatch.setattr(fourierft_jax, "export_peft", explode)
    assert "disk full" in _error(capsys, ["convert", checkpoint, str(tmp_path / "d5"), "--to", "peft"])
    monkeypatch.undo()
    assert not any(name.startswith(".d5") or name == "d5" for name in os.listdir(tmp_path))
    for name in ("d2", "d3", "d4"):
        assert not (tmp_path / name).exists()

    # Without jax (bridge itself never needs it): one clear line.
    monkeypatch.setitem(sys.modules, "fourierft_jax", None)
    assert "convert needs jax, flax and orbax-checkpoint" in _error(
        capsys, ["convert", checkpoint, str(tmp_path / "d6"), "--to", "peft"])


@pytest.mark.skipif(not os.path.isfile(SCRIPT), reason="the fourierft console script is not installed")
def test_console_script(trained, tmp_path):
    _, _, _, checkpoint, _ = trained
    out = tmp_path / "peft"
    result = subprocess.run([SCRIPT, "convert", checkpoint, str(out), "--to", "peft"], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (out / "adapter_model.safetensors").is_file()
    result = subprocess.run([SCRIPT, "convert", checkpoint, str(out), "--to", "peft"], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 2 and "already exists" in result.stderr


def test_bias_all_originals_come_from_base(tmp_path, capsys):
    """bias='all' + modules_to_save: PEFT stores the head's untrained bias too; a checkpoint saved without the
    params lacks it, so convert asks for --base and then takes it from there."""
    params = init(Net(), seed=6)
    config = fourierft_jax.FourierFTConfig(n_frequency=10, target_modules=["query"], bias="all",
                                           modules_to_save=["classifier"])
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(0))
    leaves, tree = jax.tree.flatten(adapter.trainable)
    adapter.set_trainable(jax.tree.unflatten(tree, [a + 0.5 for a in leaves]))
    checkpoint = fourierft_jax.save_adapter(tmp_path / "orbax", adapter)  # no params: no originals
    message = _error(capsys, ["convert", checkpoint, str(tmp_path / "peft"), "--to", "peft"])
    assert "classifier.bias" in message and "--base" in message
    assert not (tmp_path / "peft").exists()

    base = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in torch_twin(params).state_dict().items()}, str(base))
    assert main(["convert", checkpoint, str(tmp_path / "peft"), "--to", "peft", "--base", str(base)]) == 0
    model = peft.PeftModel.from_pretrained(torch_twin(params), str(tmp_path / "peft")).eval()
    x = inputs()
    want = np.asarray(adapter.make_apply(Net().apply)(adapter.trainable, params, x))
    with torch.no_grad():
        assert rel_err(model(torch.from_numpy(x)).numpy(), want) <= 1e-5
        original = model.base_model.model.classifier.original_module.bias.numpy()
    np.testing.assert_array_equal(original, np.asarray(params["params"]["classifier"]["bias"]))
