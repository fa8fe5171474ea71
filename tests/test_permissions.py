"""What the writers leave on disk has the permissions of a plain write under the umask, as PEFT's files do.

Everything is written through temporary siblings (``mkdtemp`` folders are 0700, ``mkstemp`` files 0600); on a
shared filesystem (the multi-host setup) other users and processes must still read the result. Under umask 022
every folder must be 0755 and every file 0644: the adapter folders written by ``save_adapter``, ``export_peft``,
``write_adapter``, the CLI's ``convert`` (both ways) and ``merge``, and ``fourierft_torch``'s ``save_pretrained``.
"""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from safetensors.numpy import save_file

import bridge
from bridge._src.cli import main

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
import fourierft_jax  # noqa: E402
import fourierft_torch  # noqa: E402

IN, OUT = 8, 6


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def wrong_modes(top: str) -> list[str]:
    """Each folder under (and including) ``top`` that is not 0755 and each file that is not 0644."""
    assert os.path.isdir(top), f"{top} was not written"
    found = [(top, os.stat(top).st_mode)]
    for folder, dirs, files in os.walk(top):
        found += [(os.path.join(folder, name), os.lstat(os.path.join(folder, name)).st_mode) for name in dirs + files]
    wrong = []
    for path, mode in found:
        want = 0o755 if stat.S_ISDIR(mode) else 0o644
        if stat.S_IMODE(mode) != want:
            wrong.append(f"{os.path.relpath(path, os.path.dirname(top))}: {oct(stat.S_IMODE(mode))}, want {oct(want)}")
    return wrong


def _adapter():
    params = {"q": {"kernel": np.random.default_rng(0).standard_normal((IN, OUT)).astype(np.float32),
                    "bias": np.zeros(OUT, np.float32)}}
    config = fourierft_jax.FourierFTConfig(n_frequency=10, target_modules=["q"])
    return params, fourierft_jax.apply(params, config, key=jax.random.key(0))


def test_jax_writers(tmp_path, umask_022):
    params, adapter = _adapter()
    fourierft_jax.save_adapter(tmp_path / "ckpt", adapter)
    fourierft_jax.export_peft(adapter, tmp_path / "peft")
    config = bridge.FourierFTConfig(n_frequency=10, target_modules=["q"])
    bridge.write_adapter(tmp_path / "written", config,
                         {bridge.spectrum_key("q"): np.zeros(10, np.float32)})
    # An overwrite swaps a new folder in: it must get the same permissions as a first write.
    fourierft_jax.export_peft(adapter, tmp_path / "peft", overwrite=True)
    problems = {name: wrong_modes(str(tmp_path / name)) for name in ("ckpt", "peft", "written")}
    assert not any(problems.values()), problems


def test_cli_convert_and_merge(tmp_path, umask_022):
    params, adapter = _adapter()
    fourierft_jax.save_adapter(tmp_path / "ckpt", adapter)
    base = tmp_path / "model"
    base.mkdir()
    save_file({"q.weight": np.ascontiguousarray(params["q"]["kernel"].T), "q.bias": params["q"]["bias"]},
              str(base / "model.safetensors"))
    (base / "config.json").write_text("{}")
    assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "peft"), "--to", "peft"]) == 0
    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "ckpt2"), "--to", "orbax", "--base", str(base)]) == 0
    assert main(["merge", "--base", str(base), "--adapter", str(tmp_path / "peft"), "--out",
                 str(tmp_path / "merged")]) == 0
    problems = {name: wrong_modes(str(tmp_path / name)) for name in ("peft", "ckpt2", "merged")}
    assert not any(problems.values()), problems


def test_torch_save_pretrained(tmp_path, umask_022):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(IN, OUT)

        def forward(self, x):
            return self.q(x)

    config = fourierft_torch.FourierFTConfig(n_frequency=10, target_modules=["q"])
    model = fourierft_torch.get_fourierft_model(Net(), config)
    model.save_pretrained(tmp_path / "adapter")
    model.save_pretrained(tmp_path / "adapter")  # the second save replaces the first in place
    assert not wrong_modes(str(tmp_path / "adapter")), wrong_modes(str(tmp_path / "adapter"))
