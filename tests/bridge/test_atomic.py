"""The one temporary-folder routine (``bridge._src.atomic``): permissions, replacement, merging, failure."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

import bridge
from bridge._src.atomic import atomic_directory, replace_directory, temporary_sibling, write_text_atomically


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_temporary_sibling_has_umask_permissions(tmp_path, umask_022):
    folder = temporary_sibling(tmp_path / "sub" / "out")
    assert os.path.dirname(folder) == str(tmp_path / "sub")
    assert os.path.basename(folder).startswith(".out.tmp-")
    assert _mode(folder) == 0o777 & ~_umask()


def test_temporary_sibling_with_token_is_fixed_and_exclusive(tmp_path):
    path = temporary_sibling(tmp_path / "out", token="00ab12")
    assert os.path.basename(path) == ".out.tmp-00ab12"
    with pytest.raises(FileExistsError):
        temporary_sibling(tmp_path / "out", token="00ab12")


def test_written_adapter_has_normal_permissions(tmp_path, umask_022):
    folder = bridge.write_adapter(tmp_path / "adapter", bridge.FourierFTConfig(n_frequency=2, target_modules=["q"]),
                                  {bridge.spectrum_key("q"): np.ones(2, np.float32)})
    assert _mode(folder) == 0o755
    for name in os.listdir(folder):
        assert _mode(os.path.join(folder, name)) == 0o644, name
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no temporary left next to it


def test_atomic_directory_replaces_or_merges(tmp_path):
    target = tmp_path / "out"
    os.makedirs(target / "keep")
    (target / "old.txt").write_text("old")
    with atomic_directory(target, merge=True) as temporary:
        with open(os.path.join(temporary, "new.txt"), "w") as stream:
            stream.write("new")
    assert sorted(os.listdir(target)) == ["keep", "new.txt", "old.txt"]
    with atomic_directory(target) as temporary:
        with open(os.path.join(temporary, "only.txt"), "w") as stream:
            stream.write("x")
    assert sorted(os.listdir(target)) == ["only.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    os.makedirs(target)
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as temporary:
            with open(os.path.join(temporary, "half.txt"), "w") as stream:
                stream.write("half")
            raise RuntimeError("killed")
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert sorted(os.listdir(target)) == ["old.txt"]


def test_atomic_directory_refuses_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        with atomic_directory(tmp_path / "file"):
            pass


def test_replace_directory_puts_the_old_folder_back_when_the_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "out"
    os.makedirs(target)
    (target / "old.txt").write_text("old")
    new = temporary_sibling(target)
    real_rename = os.rename

    def failing(src, dst):
        if os.fspath(src) == new:
            raise OSError("disk gone")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError, match="disk gone"):
        replace_directory(new, str(target))
    assert sorted(os.listdir(target)) == ["old.txt"]


def test_write_text_atomically(tmp_path, umask_022):
    path = tmp_path / "config.json"
    path.write_text("old")
    write_text_atomically(path, "new")
    assert path.read_text() == "new"
    assert _mode(path) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["config.json"]


def test_torch_save_pretrained_has_normal_permissions(tmp_path, umask_022):
    torch = pytest.importorskip("torch")
    import fourierft_torch

    base = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model = fourierft_torch.get_fourierft_model(base, fourierft_torch.FourierFTConfig(n_frequency=3,
                                                                                      target_modules=["0"]))
    model.save_pretrained(tmp_path / "adapter")
    assert _mode(tmp_path / "adapter") == 0o755
    for name in os.listdir(tmp_path / "adapter"):
        assert _mode(tmp_path / "adapter" / name) == 0o644, name
