"""Damaged adapters through fourierft_jax's loaders (read_peft, import_peft, load_adapter) and `fourierft convert`:
a clear error, the model and the destination unchanged."""

from __future__ import annotations

import os
import shutil
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import bridge
import fourierft_jax
from bridge._src.cli import main
from bridge._src.folders import CheckpointError
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers"))
import damage  # noqa: E402  (tests/helpers/damage.py: the file surgery shared by the bad-input tests)

Q, V, K = (bridge.spectrum_key(name) for name in ("q", "v", "k"))
RNG = np.random.default_rng(7)
SPECTRA = {Q: RNG.standard_normal(6).astype(np.float32), V: RNG.standard_normal(6).astype(np.float32)}


def _params():
    rng = np.random.default_rng(1)
    return {name: {"kernel": rng.standard_normal((5, 3)).astype(np.float32), "bias": np.zeros(3, np.float32)}
            for name in ("q", "k", "v")}


class Net(nnx.Module):
    def __init__(self, rngs):
        self.q = nnx.Linear(5, 3, rngs=rngs)
        self.k = nnx.Linear(5, 3, rngs=rngs)
        self.v = nnx.Linear(5, 3, rngs=rngs)


@pytest.fixture()
def valid(tmp_path):
    folder = tmp_path / "adapter"
    bridge.write_adapter(folder, bridge.FourierFTConfig(n_frequency=6, target_modules=["q", "v"]), SPECTRA)
    return str(folder)


DAMAGES = {
    "wrong peft_type": (lambda f: damage.edit_config(f, lambda d: d.update(peft_type="LORA")), "not a FourierFT one"),
    "missing peft_type": (lambda f: damage.edit_config(f, lambda d: d.pop("peft_type")), "has no `peft_type`"),
    "config not JSON": (lambda f: damage.write_config_text(f, "nope"), "not valid JSON"),
    "negative n_frequency": (lambda f: damage.edit_config(f, lambda d: d.update(n_frequency=-1)),
                             "`n_frequency` must be a positive integer, got -1"),
    "truncated safetensors": (lambda f: damage.truncate(f, 4), "truncated"),
    "header claims 2**62 bytes": (damage.claim_huge_header,
                                  "header of 4611686018427387904 bytes"),
    "spectrum of the wrong length": (lambda f: damage.edit_tensors(f, lambda t: t.update({V: t[V][:5].copy()})),
                                     f"{V!r} has shape (5,) but adapter_config.json gives layer 'v' n_frequency 6"),
    "key the config does not target": (lambda f: damage.edit_tensors(f, lambda t: t.update({K: t[Q].copy()})),
                                       "'k', which adapter_config.json does not target (target_modules=['q', 'v'])"),
    "targeted layer without its key": (lambda f: damage.edit_tensors(f, lambda t: t.pop(V)),
                                       f"layer 'v' is targeted by the config but its key {V!r} (shape (6,)) is "
                                       f"missing from the file"),
    "pickle-only weights": (damage.pickle_only, "never unpickled"),
    "NaN in a spectrum": (lambda f: damage.put_nan(f, V, 1), f"NaN or inf values in {V!r}"),
}


def _leaves(tree):
    return [np.array(leaf) for leaf in jax.tree.leaves(tree)]


def test_the_valid_adapter_loads(valid):
    adapter = fourierft_jax.import_peft(valid, _params())
    for name, key in (("q", Q), ("v", V)):
        np.testing.assert_array_equal(np.asarray(adapter.trainable["default"]["spectra"][name]), SPECTRA[key])


@pytest.mark.parametrize("kind", sorted(DAMAGES))
def test_loaders_refuse_and_leave_the_model(valid, tmp_path, kind):
    harm, fragment = DAMAGES[kind]
    harm(valid)
    params = _params()
    before = _leaves(params)
    for load in (lambda: fourierft_jax.read_peft(valid, params), lambda: fourierft_jax.import_peft(valid, params)):
        with pytest.raises(ValueError) as info:  # AdapterFormatError / CheckpointError
            load()
        assert fragment in str(info.value), str(info.value)
    for a, b in zip(before, _leaves(params)):
        np.testing.assert_array_equal(a, b)

    model = Net(nnx.Rngs(0))
    state = jax.tree.map(np.array, nnx.state(model))
    with pytest.raises(ValueError) as info:
        fourierft_jax.import_peft(valid, model)
    assert fragment in str(info.value), str(info.value)
    assert type(model.q) is nnx.Linear and type(model.v) is nnx.Linear
    jax.tree.map(np.testing.assert_array_equal, state, jax.tree.map(np.array, nnx.state(model)))
    assert not os.path.exists(tmp_path / "unpickled")


def test_read_peft_carries_nan_when_asked(valid):
    damage.put_nan(valid, V, 1)
    saved = fourierft_jax.read_peft(valid, _params(), finite=False)
    np.testing.assert_array_equal(np.asarray(saved.state["spectra"]["v"]), np.where(np.arange(6) == 1, np.nan,
                                                                                     SPECTRA[V]))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    params = _params()
    adapter = fourierft_jax.apply(params, fourierft_jax.FourierFTConfig(n_frequency=6, target_modules=["q", "v"],
                                                                        bias="fourier_only"), key=jax.random.key(0))
    root = tmp_path_factory.mktemp("orbax")
    path = fourierft_jax.save_adapter(root / "checkpoint", adapter)
    return path, fourierft_jax.load_adapter(path)


def _files(folder):
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)


def test_orbax_checkpoint_cut_short(checkpoint, tmp_path, capsys):
    """Every file of the checkpoint cut to half: a clear error from load_adapter and `convert --to peft` (nothing
    written), or -- for files the restore does not need -- exactly the saved values."""
    path, reference = checkpoint
    errors = 0
    for name in _files(path):
        copy = tmp_path / "cut"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(path, copy)
        data = (copy / name).read_bytes()
        (copy / name).write_bytes(data[: len(data) // 2])
        out = tmp_path / "peft"
        try:
            saved = fourierft_jax.load_adapter(copy)
        except CheckpointError as error:
            errors += 1
            assert str(copy) in str(error)
            capsys.readouterr()
            assert main(["convert", str(copy), str(out), "--to", "peft"]) == 2, name
            captured = capsys.readouterr()
            assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err
            assert captured.err.startswith("fourierft convert: error: ")
            assert not out.exists() and sorted(os.listdir(tmp_path)) == ["cut"]
            continue
        for a, b in zip(_leaves(saved.state), _leaves(reference.state)):
            np.testing.assert_array_equal(a, b)
    assert errors >= 4  # the metadata JSON, Orbax's metadata and manifest, and the tensor data at least
