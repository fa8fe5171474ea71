"""The one temporary-folder routine (``bridge._src.atomic``): permissions, replacement, merging, failure."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

import bridge
from bridge._src import atomic
from bridge._src.atomic import (
    atomic_directory,
    exchange_directories,
    recover_directory,
    replace_directory,
    temporary_sibling,
    write_text_atomically,
)


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


@pytest.fixture
def no_exchange(monkeypatch):
    """As on a system or filesystem without ``renameat2(RENAME_EXCHANGE)``."""
    monkeypatch.setattr(atomic, "_renameat2", None)


def test_replace_directory_puts_the_old_folder_back_when_the_rename_fails(tmp_path, monkeypatch, no_exchange):
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
    assert sorted(os.listdir(tmp_path)) == sorted(["out", os.path.basename(new)])


def test_exchange_swaps_in_one_call_on_linux(tmp_path, monkeypatch):
    # This project's CI runs on Linux (ext4/tmpfs), where the one-step swap must be the path taken.
    for name in ("a", "b"):
        os.makedirs(tmp_path / name / name)
    assert exchange_directories(str(tmp_path / "a"), str(tmp_path / "b"))
    assert os.listdir(tmp_path / "a") == ["b"] and os.listdir(tmp_path / "b") == ["a"]
    target = tmp_path / "out"
    os.makedirs(target)
    (target / "old.txt").write_text("old")
    new = temporary_sibling(target)
    (tmp_path / os.path.basename(new) / "new.txt").write_text("new")

    def no_rename(*args, **kwargs):
        raise AssertionError("replace_directory renamed instead of exchanging")

    monkeypatch.setattr(os, "rename", no_rename)
    replace_directory(new, str(target))
    assert os.listdir(target) == ["new.txt"]
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "out"]


def test_exchange_of_a_missing_path_raises_naming_it(tmp_path):
    os.makedirs(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="missing"):
        exchange_directories(str(tmp_path / "a"), str(tmp_path / "missing"))


def test_fallback_replaces_and_leaves_nothing(tmp_path, no_exchange):
    target = tmp_path / "out"
    for text in ("old", "new"):
        with atomic_directory(target) as temporary:
            with open(os.path.join(temporary, "f.txt"), "w") as stream:
                stream.write(text)
    assert (target / "f.txt").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_recover_puts_the_old_copy_back_when_the_target_is_missing(tmp_path):
    os.makedirs(tmp_path / ".out.old-0a1b" / "sub")
    (tmp_path / ".out.old-0a1b" / "sub" / "x").write_text("old")
    os.makedirs(tmp_path / ".out.tmp-99")  # a write killed after the first fallback rename
    os.makedirs(tmp_path / "..out.tmp-99.tmp-0c")  # a write nested in that temporary folder, killed too
    os.makedirs(tmp_path / ".other.old-12")  # another destination's: not touched
    recover_directory(tmp_path / "out")
    assert (tmp_path / "out" / "sub" / "x").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["..out.tmp-99.tmp-0c", ".other.old-12", ".out.tmp-99", "out"]
    recover_directory(tmp_path / "out", writing=True)
    assert sorted(os.listdir(tmp_path)) == [".other.old-12", "out"]


def test_recover_with_children_recovers_sub_folder_adapters(tmp_path):
    os.makedirs(tmp_path / "peft" / ".other.old-0a" / "cfg")
    os.makedirs(tmp_path / "peft" / ".third.tmp-0b")
    recover_directory(tmp_path / "peft")
    assert sorted(os.listdir(tmp_path / "peft")) == [".other.old-0a", ".third.tmp-0b"]
    recover_directory(tmp_path / "peft", children=True)
    assert sorted(os.listdir(tmp_path / "peft")) == [".third.tmp-0b", "other"]
    recover_directory(tmp_path / "peft", children=True, writing=True)
    assert sorted(os.listdir(tmp_path / "peft")) == ["other"]


def test_recover_removes_stale_old_copies_when_the_target_exists(tmp_path):
    os.makedirs(tmp_path / "out")
    os.makedirs(tmp_path / ".out.old-0a1b" / "half")
    recover_directory(tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_recover_refuses_to_guess_between_two_old_copies(tmp_path):
    os.makedirs(tmp_path / ".out.old-0a")
    os.makedirs(tmp_path / ".out.old-0b")
    with pytest.raises(FileExistsError, match=r"out is missing and several old copies"):
        recover_directory(tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == [".out.old-0a", ".out.old-0b"]


def test_atomic_directory_recovers_before_writing(tmp_path):
    os.makedirs(tmp_path / ".out.old-0a1b")
    (tmp_path / ".out.old-0a1b" / "keep.txt").write_text("old")
    os.makedirs(tmp_path / ".out.tmp-77")
    with atomic_directory(tmp_path / "out", merge=True) as temporary:
        with open(os.path.join(temporary, "new.txt"), "w") as stream:
            stream.write("new")
    assert sorted(os.listdir(tmp_path / "out")) == ["keep.txt", "new.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_merge_is_one_swap_keeping_sub_folders_links_and_modes(tmp_path, umask_022):
    target = tmp_path / "out"
    os.makedirs(target / "other" / "deep")
    (target / "other" / "deep" / "w").write_text("other")
    (target / "other" / "cfg").write_text("other cfg")
    (target / "cfg").write_text("old cfg")
    os.symlink("cfg", target / "link")
    os.makedirs(target / ".sub.tmp-0a")  # a killed sub-adapter write's left-over: not carried
    os.chmod(target / "other", 0o750)
    before = os.stat(target / "other" / "deep" / "w")
    with atomic_directory(target, merge=True) as temporary:
        os.makedirs(os.path.join(temporary, "other"))
        with open(os.path.join(temporary, "other", "cfg"), "w") as stream:
            stream.write("new other cfg")
        with open(os.path.join(temporary, "cfg"), "w") as stream:
            stream.write("new cfg")
    assert sorted(os.listdir(target)) == ["cfg", "link", "other"]
    assert (target / "cfg").read_text() == "new cfg" and os.readlink(target / "link") == "cfg"
    assert (target / "other" / "cfg").read_text() == "new other cfg"
    after = os.stat(target / "other" / "deep" / "w")
    assert (after.st_ino, after.st_dev) == (before.st_ino, before.st_dev)  # linked, not copied
    assert _mode(target / "other") == 0o750 and _mode(target / "cfg") == 0o644
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_merge_copies_where_hard_links_are_refused(tmp_path, monkeypatch):
    target = tmp_path / "out"
    os.makedirs(target)
    (target / "keep").write_text("kept")

    def refuse(*args, **kwargs):
        raise PermissionError("no hard links here")

    monkeypatch.setattr(os, "link", refuse)
    with atomic_directory(target, merge=True) as temporary:
        with open(os.path.join(temporary, "new"), "w") as stream:
            stream.write("new")
    assert (target / "keep").read_text() == "kept" and (target / "new").read_text() == "new"


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


@pytest.mark.parametrize("exchange", [True, False])
def test_writing_into_the_working_directory_keeps_it_usable(tmp_path, monkeypatch, exchange):
    # `save_pretrained(".")`: the swapped-out old folder is deleted, and a working directory left on it would be
    # gone (every relative path failing afterwards).
    if not exchange:
        monkeypatch.setattr(atomic, "_renameat2", None)
    folder = tmp_path / "run"
    (folder / "logs").mkdir(parents=True)
    config = bridge.FourierFTConfig(n_frequency=2, target_modules=["lin0"])
    for inside, value in ((folder, 1.0), (folder / "logs", 2.0)):
        monkeypatch.chdir(inside)
        bridge.write_adapter(str(folder), config, {bridge.spectrum_key("lin0"): np.full(2, value, np.float32)})
        assert os.getcwd() == str(inside) and os.path.samefile(os.getcwd(), inside)
        np.testing.assert_array_equal(bridge.read_adapter(str(folder))[1][bridge.spectrum_key("lin0")], [value] * 2)
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors", "logs"]
