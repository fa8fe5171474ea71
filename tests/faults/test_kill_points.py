"""Every writer, killed (SIGKILL) right after each of its file operations, in both replacement modes: the
destination always reads back, with the project's own loaders, as the complete old content or the complete new
content, bit for bit; other adapters in the folder are untouched; and the next write succeeds and leaves no
hidden folder behind. The kills run in ``driver.py`` (one subprocess, one fork per kill point); every state they
left is verified here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import bridge
from bridge._src.atomic import recover_directory
from bridge._src.peft_format import adapter_directory, list_adapters
from writers import NEW, OLD, OTHER, WRITERS, spectrum

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = [(name, mode) for name, writer in WRITERS.items() for mode in writer.modes]
# The writers that keep the folder's other adapters (PEFT's save_pretrained semantics); the CLI's `convert`
# replaces DST as a whole, like `merge --out`.
KEEPS_OTHERS = {"bridge.write_adapter", "torch.save_pretrained", "jax.export_peft"}


@pytest.fixture(scope="module")
def kills(tmp_path_factory):
    """Run the drivers (torch's writer apart: a parent without jax forks faster) and collect their results."""
    out = tmp_path_factory.mktemp("faults")
    groups = [[name for name in WRITERS if name.startswith("torch.")],
              [name for name in WRITERS if not name.startswith("torch.")]]
    runs = []
    for index, names in enumerate(groups):
        with open(out / f"{index}.log", "w") as log:  # a file, not a pipe: neither run can block on the other
            runs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "driver.py"), str(out / str(index)),
                                          *names], stdout=log, stderr=subprocess.STDOUT))
    results = {}
    for index, run in enumerate(runs):
        run.wait(timeout=900)
        assert run.returncode == 0, (out / f"{index}.log").read_text()[-6000:]
        with open(out / str(index) / "results.json") as stream:
            results.update({key: dict(value, root=str(out / str(index) / key))
                            for key, value in json.load(stream).items()})
    return results


def _arrays(tree) -> dict:
    return {key: (np.asarray(value).dtype.str, np.asarray(value).shape, np.asarray(value).tobytes())
            for key, value in tree.items()}


def _read_peft(folder: str):
    recover_directory(folder)  # what the PEFT readers do first (see bridge._src.atomic)
    adapters = {}
    for name in list_adapters(folder):
        config, arrays = bridge.read_adapter(adapter_directory(folder, name))
        adapters[name] = (config.to_dict(), _arrays(arrays))
    return adapters


def _read_orbax(folder: str):
    import jax

    import fourierft_jax

    saved = fourierft_jax.load_adapter(folder)  # recovers by itself
    leaves = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(saved.state)}
    return {"default": (saved.config.to_dict(), _arrays(leaves))}


def _read_merged(folder: str):
    from safetensors.numpy import load_file

    recover_directory(folder)
    files = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        files[name] = _arrays(load_file(path)) if name.endswith(".safetensors") else open(path, "rb").read()
    return files


def _read_training(folder: str):
    import jax.numpy as jnp

    import fourierft_jax

    with fourierft_jax.TrainingCheckpoints(folder, max_to_keep=2) as checkpoints:
        steps = checkpoints.all_steps()
        restored = {step: np.asarray(checkpoints.restore({"w": jnp.zeros(3)}, step)["w"]) for step in steps}
    assert steps and steps[-1] in (2, 3), steps  # the latest complete step is the old one or the new one
    for step, value in restored.items():  # every step listed restores, bit for bit
        assert value.tobytes() == spectrum(step).tobytes(), step
    return {"latest": steps[-1], "restores": sorted(restored)}


READ = {"peft": _read_peft, "orbax": _read_orbax, "merged": _read_merged, "training": _read_training}


def _hidden(root: str) -> list[str]:
    return [os.path.join(parent, name) for parent, dirs, files in os.walk(root) for name in dirs + files
            if name.startswith(".")]


def _spectrum_of(state, version: int) -> None:
    config, arrays = state["default"]
    (dtype, shape, data), = arrays.values()
    assert (dtype, shape, data) == ("<f4", (3,), spectrum(version).tobytes())
    assert config["scaling"] == 100.0 + version


@pytest.mark.parametrize("name,mode", CASES)
def test_killed_after_every_operation(kills, name, mode):
    result = kills[f"{name}/{mode}"]
    root = result["root"]
    writer = WRITERS[name]
    read = READ[writer.kind]

    def state(folder: str):
        return read(os.path.join(root, folder, writer.destination))

    old, new = state("pristine"), state("final")
    assert old != new
    # The references themselves, against the values the test wrote (not against the writer's output).
    if writer.kind in ("peft", "orbax"):
        _spectrum_of(old, OLD)
        _spectrum_of(new, NEW)
        if name in KEEPS_OTHERS:
            assert new["other"] == old["other"]
            assert old["other"][1] and next(iter(old["other"][1].values()))[2] == spectrum(OTHER).tobytes()
    if writer.kind == "training":
        assert (old, new) == ({"latest": 2, "restores": [1, 2]}, {"latest": 3, "restores": [2, 3]})
    assert sorted(os.listdir(os.path.join(root, "final"))) == [writer.destination]

    assert result["kill_points"] == result["operations"] >= 5
    assert len(result["kills"]) == result["kill_points"]
    missing = 0
    for index in range(result["states"]):
        killed = os.path.join(root, "killed", str(index))
        missing += not os.path.exists(os.path.join(killed, writer.destination))
        found = state(os.path.join("killed", str(index)))
        if writer.kind == "training":
            assert found["latest"] in (2, 3), index
        else:
            assert found in (old, new), f"kill state {index} is neither the old nor the new content"
        after = os.path.join(root, "after", str(index))
        if writer.kind == "training":
            # Killed after step 3 was committed but before step 1 was deleted, the next save(3) has nothing to
            # do (the step exists): step 1 goes at the next new step. Every listed step restores regardless.
            assert state(os.path.join("after", str(index)))["latest"] == 3, index
        else:
            assert state(os.path.join("after", str(index))) == new, index
        assert _hidden(after) == [], index
    if writer.kind != "training":
        # Only the fallback's two renames have an instant without the destination, which recovery undoes.
        assert (missing > 0) == (mode == "fallback"), missing


def test_kill_point_counts_are_reported(kills, capsys):
    with capsys.disabled():
        print("\nkill points per writer/mode:", {key: value["kill_points"] for key, value in kills.items()})
    assert set(kills) == {f"{name}/{mode}" for name, mode in CASES}
