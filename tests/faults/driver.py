"""Run the writers under fault injection (``python tests/faults/driver.py OUT WRITER...``).

One process imports everything once, then for each writer and mode (``exchange``: ``renameat2``;
``fallback``: the two renames) forks one child per kill point N = 1, 2, ...: the child restores nothing itself,
it writes into a fresh copy of the old state and SIGKILLs itself after its N-th file operation, until a child
completes its write. No JAX backend is started in this parent (children start their own), so forking is safe.
After each kill the parent keeps the state left on disk -- once per distinct state (same files, same bytes) --
and, in a further child, performs the write again on a copy of it (the write after a crash). ``OUT/results.json``
tells pytest, which verifies every state with the project's loaders, what was produced.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import harness  # noqa: E402
from writers import WRITERS  # noqa: E402

_LIMIT = 500  # kill points per write, far above any writer's count: a guard against a loop that never ends


def _fork(function) -> tuple[int, int]:
    """Run ``function`` in a forked child; return ``(exit code or -1, signal or 0)``."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            function()
        except BaseException:
            traceback.print_exc()
            code = 3
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return -1, os.WTERMSIG(status)
    return os.WEXITSTATUS(status), 0


_TEMPORARY = re.compile(r"(\..+\.(tmp|old))-[0-9a-f]+")
_TOKEN = re.compile(r"\.(tmp|old)-[0-9a-f]+")
# Names Orbax draws per write: content hashes as file names, timestamps in temporary folder names.
_DRAWN = re.compile(r"[0-9a-f]{16,}|[0-9]{10,}")


def _normal(path: str) -> str:
    return _DRAWN.sub("*", _TOKEN.sub(r".\1-*", path))


def _collapsed(name: str) -> bool:
    """Temporary folders whose content does not matter: ours (``.<name>.tmp-*``, skipped by readers, removed
    whole by the next write) and Orbax's (``<step>.orbax-checkpoint-tmp-*``, never listed as a step, removed
    whole when the next ``CheckpointManager`` opens the folder)."""
    return bool(_TEMPORARY.fullmatch(name) and ".tmp-" in name) or ".orbax-checkpoint-tmp" in name


def _signature(folder: str) -> str:
    """What identifies the state on disk, so that each distinct one is verified once: every path (random tokens,
    Orbax's drawn names alike) with its size, and the bytes of the project's own files (JSON, safetensors).
    Orbax's internal files differ between runs by timestamps only, so they count by name and size. The content
    of temporary folders is left out (``_collapsed``). ``.old-*`` copies are kept in full: one is renamed back when the destination is missing.
    """
    digest = hashlib.sha256()
    for parent, dirs, files in os.walk(folder):
        rel = os.path.relpath(parent, folder)
        for name in sorted(dirs):
            digest.update(f"d {_normal(os.path.join(rel, name))}\n".encode())
        dirs[:] = sorted(name for name in dirs if not _collapsed(name))
        for name in sorted(files):
            path = os.path.join(parent, name)
            size = os.lstat(path).st_size
            digest.update(f"f {_normal(os.path.join(rel, name))} {size}\n".encode())
            if name.endswith((".json", ".safetensors")) and not os.path.islink(path):
                with open(path, "rb") as stream:
                    digest.update(hashlib.sha256(stream.read()).digest())
    return digest.hexdigest()


def _child(writer, root: str, mode: str, kill_at: int):
    def run() -> None:
        if mode == "fallback":
            harness.force_fallback()
        payload = writer.load(root)
        harness.install(kill_at)
        writer.write(payload, root)
        harness.install_done()
        with open(os.path.join(root, "operations"), "w") as stream:
            stream.write(str(harness.count()))

    return run


def run_writer(name: str, mode: str, root: str) -> dict:
    writer = WRITERS[name]
    live, pristine = os.path.join(root, "live"), os.path.join(root, "pristine")
    os.makedirs(os.path.join(root, "inputs"))
    code, _ = _fork(lambda: writer.prepare(root))
    if code != 0:
        raise RuntimeError(f"{name}: preparing the old state failed")
    os.rename(live, pristine)
    seen: dict[str, int] = {}
    kills: list[int] = []  # kill point N -> index of the distinct state it left
    for kill_at in range(1, _LIMIT):
        shutil.copytree(pristine, live, symlinks=True)
        code, signal_number = _fork(_child(writer, root, mode, kill_at))
        if signal_number == signal.SIGKILL:
            signature = _signature(live)
            if signature not in seen:
                seen[signature] = index = len(seen)
                os.rename(live, os.path.join(root, "killed", str(index)))
                shutil.copytree(os.path.join(root, "killed", str(index)), live, symlinks=True)
                code, _ = _fork(_child(writer, root, mode, 0))
                if code != 0:
                    raise RuntimeError(f"{name} ({mode}): the write after kill point {kill_at} failed")
                os.rename(live, os.path.join(root, "after", str(index)))
            else:
                shutil.rmtree(live)
            kills.append(seen[signature])
        elif code == 0:
            os.rename(live, os.path.join(root, "final"))
            break
        else:
            raise RuntimeError(f"{name} ({mode}): the write with kill point {kill_at} failed (exit {code})")
    else:
        raise RuntimeError(f"{name} ({mode}): still killed after {_LIMIT} operations")
    with open(os.path.join(root, "operations")) as stream:
        operations = int(stream.read())
    return {"kill_points": len(kills), "operations": operations, "states": len(seen), "kills": kills}


def main(out: str, names: list[str]) -> None:
    # One host device: children start a backend per kill point, and more devices only make that slower.
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # Imported once here, so that children only do the write. torch and jax are kept to separate drivers:
    # a smaller parent forks faster. No JAX backend is started here.
    if any(name.startswith("torch.") for name in names):
        import torch  # noqa: F401

        import fourierft_torch  # noqa: F401
    if any(name.startswith(("jax.", "cli.convert")) for name in names):
        import orbax.checkpoint  # noqa: F401

        import fourierft_jax  # noqa: F401
    import safetensors.numpy  # noqa: F401
    import tqdm.auto  # noqa: F401

    import bridge._src.cli  # noqa: F401

    results = {}
    for name in names:
        for mode in WRITERS[name].modes:
            root = os.path.join(out, name, mode)
            os.makedirs(os.path.join(root, "killed"))
            os.makedirs(os.path.join(root, "after"))
            results[f"{name}/{mode}"] = run_writer(name, mode, root)
    with open(os.path.join(out, "results.json"), "w") as stream:
        json.dump(results, stream, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
