"""What the training-step benchmarks (``jax_step.py``, ``torch_step.py``) share: worker processes, interleaved
rounds, peak memory, the half-spectrum plan of the "limit" work, and the printed header and tables.

Imports neither jax nor torch, so the parent process of a benchmark holds no device.

Workers. Every variant (and the limit work) of one model lives in its own child process for the whole run: it
imports, builds its model and prepares its step for every token count once, then answers ``run`` requests (one
token count each) on stdin with one JSON line on stdout. For each token count in turn the parent runs ``rounds``
rounds; every round runs every worker once, in an order rotated by one per round, so slow phases of a shared
machine fall on every variant alike. A worker hands its freed heap back to the system (``malloc_trim``) when it
moves to another token count (so a smaller step's peak does not include a larger one's leftover heap) and whenever
less than a quarter of the machine's memory is available (so idle workers do not add up); its next run then first
takes one untimed step (as does its first run), and every run may add ``warmup`` more before its timed steps.

Peak memory (CPU). Per worker and run, Linux's high-water mark of resident memory (``VmHWM``) is reset by
writing ``5`` to ``/proc/self/clear_refs`` just before the run's steps and read after them, so it is the peak of
that variant's own training steps (model, optimizer state, activations, libraries) -- not of compilation, model
construction or any other variant. Without ``clear_refs`` (not Linux) the process's lifetime peak
(``ru_maxrss``) is reported and said so. GPU memory is measured by each framework (see the scripts).
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

RESULT = "RESULT "


# -- memory ---------------------------------------------------------------------------------------------------
def trim_heap() -> None:
    """Give freed heap pages back to the system (glibc only; elsewhere a no-op)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset this process's resident-memory high-water mark (Linux); False where it cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def peak_rss_gb() -> float:
    """This process's resident-memory high-water mark in GiB (since the last ``reset_peak_rss``)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    import resource

    scale = 2**30 if sys.platform == "darwin" else 2**20  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


class RssSampler:
    """Peak VmRSS of this process, sampled every 5 ms on a thread (for scripts that sample while stepping)."""

    def __init__(self) -> None:
        import threading

        self.peak, self._done = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        self.peak = max(self.peak, int(line.split()[1]))
            self._done.wait(0.005)

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        return self.peak / 2**20


# -- the limit work's positions -------------------------------------------------------------------------------
def half_bins(positions: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Where full-FFT bins ``positions`` (of an axis of ``length``) live in an rfft table, and whether conjugated.

    Example:
        >>> [a.tolist() for a in half_bins(np.array([0, 1, 3]), 4)]
        [[0, 1, 1], [False, False, True]]
    """
    conj = positions > length // 2
    return np.where(conj, length - positions, positions), conj


def half_spectrum_scatter(a: np.ndarray, b: np.ndarray, n_a: int, n_b: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat targets and coefficient indices that build the half spectrum of ``Re(ifft2(S))`` for ``irfft2``.

    ``S`` is ``(n_a, n_b)`` with coefficient ``k`` at ``(a[k], b[k])``; ``Re(ifft2(S)) = irfft2(H, (n_a, n_b))``
    with ``H`` the first ``n_b // 2 + 1`` columns of ``(S + conj(S[-i, -j])) / 2``. Coefficient ``source[j]``
    times 1/2 is added at flat position ``target[j]`` of ``H``.

    Example:
        >>> [x.tolist() for x in half_spectrum_scatter(np.array([1]), np.array([3]), 2, 4)]
        [[4], [0]]
    """
    width = n_b // 2 + 1
    mirror_a, mirror_b = (-a) % n_a, (-b) % n_b
    keep, keep_mirror = b < width, mirror_b < width
    target = np.concatenate([a[keep] * width + b[keep], mirror_a[keep_mirror] * width + mirror_b[keep_mirror]])
    source = np.concatenate([np.flatnonzero(keep), np.flatnonzero(keep_mirror)])
    return target.astype(np.int64), source.astype(np.int64)


def layer_shapes(hidden: int, intermediate: int, layers: int, targets: str) -> dict[str, int]:
    """{"INxOUT": count} of the adapted layers of a BERT encoder: "qv" (query, value) or "all" (every linear).

    Example:
        >>> layer_shapes(768, 3072, 2, "all")
        {'768x768': 8, '768x3072': 2, '3072x768': 2}
    """
    if targets == "qv":
        return {f"{hidden}x{hidden}": 2 * layers}
    if targets == "all":
        return {f"{hidden}x{hidden}": 4 * layers, f"{hidden}x{intermediate}": layers,
                f"{intermediate}x{hidden}": layers}
    raise ValueError(f"targets must be 'qv' or 'all', got {targets!r}")


def limit_work(parts: dict[str, dict[str, list[float]]], shapes: dict[str, int]) -> tuple[float, float]:
    """(min, median) seconds of one step's limit work: per layer shape its parts' (min, median) times the count."""
    return (sum(n * sum(p[0] for p in parts[s].values()) for s, n in shapes.items()),
            sum(n * sum(p[1] for p in parts[s].values()) for s, n in shapes.items()))


# -- workers --------------------------------------------------------------------------------------------------
def memory_tight() -> bool:
    """Whether less than a quarter of the machine's memory is available (Linux; False where unknown)."""
    try:
        with open("/proc/meminfo") as meminfo:
            fields = {line.split(":")[0]: int(line.split()[1]) for line in meminfo}
        return fields["MemAvailable"] < fields["MemTotal"] // 4
    except (OSError, KeyError, ValueError):
        return False


def serve(setup: Callable[[dict], tuple[dict, Callable[[dict], dict]]]) -> None:
    """The worker side: ``setup(spec)`` gives (ready info, ``run(request) -> result``); one JSON line each.

    ``run`` gets ``settle=True`` when it must first take one untimed step to reach a steady state: on its first
    request, on a new token count, and after the heap was handed back because memory ran short.
    """
    spec = json.loads(sys.argv[sys.argv.index("--_worker") + 1])
    info, run = setup(spec)
    trim_heap()
    print(RESULT + json.dumps(info), flush=True)
    settle, last = True, None
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("cmd") == "quit":
            return
        if last is not None and request.get("tokens") != last:
            trim_heap()  # a smaller step must not inherit the larger one's heap in its peak
            settle = True
        result = run({**request, "settle": settle})
        result["settled"], settle, last = settle, False, request.get("tokens")
        if memory_tight():  # idle workers must not add up to the machine's memory
            trim_heap()
            settle = True
        print(RESULT + json.dumps(result), flush=True)


class Worker:
    """One child process running ``script --_worker SPEC`` (see ``serve``)."""

    def __init__(self, script: str, spec: dict, env: Optional[dict] = None) -> None:
        self.spec = spec
        self._log = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(
            [sys.executable, os.path.abspath(script), "--_worker", json.dumps(spec)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._log, text=True, env={**os.environ, **(env or {})},
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(script))))
        self.info: Optional[dict] = None

    def _read(self) -> dict:
        for line in self._proc.stdout:
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT):])
        self._log.seek(0)
        raise RuntimeError(f"worker {self.spec} failed (exit {self._proc.wait()}):\n{self._log.read()[-4000:]}")

    def ready(self) -> dict:
        if self.info is None:
            self.info = self._read()
        return self.info

    def run(self, request: dict) -> dict:
        self._proc.stdin.write(json.dumps({"cmd": "run", **request}) + "\n")
        self._proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self._proc.stdin.close()
            except BrokenPipeError:
                pass
            self._proc.wait()
        self._log.close()


def rotated(items: Sequence[Any], shift: int) -> list[Any]:
    """``items`` rotated left by ``shift`` (round ``r`` of an interleaved run starts at item ``r``).

    Example:
        >>> rotated(["a", "b", "c"], 4)
        ['b', 'c', 'a']
    """
    shift %= max(len(items), 1)
    return list(items[shift:]) + list(items[:shift])


def interleave(script: str, specs: Sequence[dict], rounds: int, requests: Sequence[dict],
               env: Optional[dict] = None, log: Callable[[str], None] = print) -> list[list[dict]]:
    """Start one worker per spec (concurrently: imports and builds only), then, for each request in turn (one
    per token count), run ``rounds`` rounds of every worker once, in an order rotated by one per round.

    Returns per request the list of ``{"spec", "info", "runs": [result per round]}`` in spec order; the workers
    are closed on return or error.
    """
    workers = [Worker(script, spec, env) for spec in specs]
    try:
        for worker in workers:
            worker.ready()
        out = []
        for request in requests:
            runs: list[list[dict]] = [[] for _ in workers]
            for round_ in range(rounds):
                for i in rotated(range(len(workers)), round_):
                    runs[i].append(workers[i].run(request))
                    log(f"round {round_} {json.dumps(request)} {json.dumps(workers[i].spec)} "
                        f"{json.dumps(runs[i][-1])}")
            out.append([{"spec": w.spec, "info": w.info, "runs": r} for w, r in zip(workers, runs)])
        return out
    finally:
        for worker in workers:
            worker.close()


# -- printing -------------------------------------------------------------------------------------------------
def load() -> str:
    """The 1-, 5- and 15-minute load averages."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def header(title: str) -> list[str]:
    """The lines every benchmark prints first: what, when, the exact command and the load at the start."""
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [title, f"date: {now}", f"command: {command}", f"load average at start (1/5/15 min): {load()}"]


def min_median(values: Iterable[float]) -> tuple[float, float]:
    values = list(values)
    return min(values), statistics.median(values)


def ratio_cell(value: tuple[float, float], base: tuple[float, float]) -> str:
    """``"min× / median×"`` of a (min, median) pair against the floor's."""
    return f"{value[0] / base[0]:.2f}× / {value[1] / base[1]:.2f}×"


def markdown(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table.

    Example:
        >>> print(markdown(["a", "b"], [[1, 2]]))
        | a | b |
        |---|---|
        | 1 | 2 |
    """
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_rows(groups: Sequence[dict], variants: Sequence[str], labels: dict[str, str],
                 memory_key: str) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """The summary table (one row per model, tokens, targets) and the per-variant table of finished groups.

    ``groups``: ``{"model", "tokens", "results"}`` with the results of ``interleave``; variant workers' specs
    have ``variant`` and ``targets``, their runs ``times`` (s) and ``memory_key`` (GiB); the limit worker
    (``variant == "limit"``) has per run ``parts`` = {"INxOUT": {part: (min s, median s)}}, and
    ``group["shapes"]`` = {targets: layer_shapes(...)}. Times are min and median over every timed step of every
    round (the limit's: min over rounds of each round's best call, median over rounds of the medians); memory is
    the median over rounds.
    """
    others = [v for v in variants if v != "floor"]
    head = (["model", "tokens", "targets", "adapted layers", "floor step ms (min / median)", "limit × floor"]
            + [f"{labels.get(v, v)} × floor" for v in others] + ["floor peak GiB"]
            + [f"{labels.get(v, v)} memory × floor" for v in others])
    summary, detail = [], []
    for group in groups:
        by = {(r["spec"]["variant"], r["spec"].get("targets", "-")): r for r in group["results"]}
        floor = by[("floor", "-")]
        floor_t = min_median(t for run in floor["runs"] for t in run["times"])
        floor_m = statistics.median(run[memory_key] for run in floor["runs"])
        detail.append([group["model"], group["tokens"], "-", labels.get("floor", "floor"), f"{floor_t[0] * 1e3:.0f}",
                       f"{floor_t[1] * 1e3:.0f}", "1.00× / 1.00×", f"{floor_m:.2f}", "1.00×",
                       f"{floor['info']['trainable']:,}", 0])
        limit = by.get(("limit", "-"))
        targets = list(dict.fromkeys(k[1] for k in by if k[1] != "-"))
        for target in targets:
            row = [group["model"], group["tokens"], target]
            adapted = next((by[(v, target)]["info"].get("adapted") for v in others if (v, target) in by), "-")
            row += [adapted, f"{floor_t[0] * 1e3:.0f} / {floor_t[1] * 1e3:.0f}"]
            if limit:
                per_round = [limit_work(run["parts"], group["shapes"][target]) for run in limit["runs"]]
                work = (min(w[0] for w in per_round), statistics.median(w[1] for w in per_round))
                row.append(ratio_cell((floor_t[0] + work[0], floor_t[1] + work[1]), floor_t))
            else:
                row.append("-")
            mem = []
            for v in others:
                r = by.get((v, target))
                if r is None:
                    row.append("-")
                    mem.append("-")
                    continue
                t = min_median(x for run in r["runs"] for x in run["times"])
                m = statistics.median(run[memory_key] for run in r["runs"])
                row.append(ratio_cell(t, floor_t))
                mem.append(f"{m / floor_m:.2f}×")
                detail.append([group["model"], group["tokens"], target, labels.get(v, v), f"{t[0] * 1e3:.0f}",
                               f"{t[1] * 1e3:.0f}", ratio_cell(t, floor_t), f"{m:.2f}", f"{m / floor_m:.2f}×",
                               f"{r['info']['trainable']:,}", r["info"].get("adapted", "-")])
            summary.append(row + [f"{floor_m:.2f}"] + mem)
    return head, summary, detail


DETAIL_HEAD = ["model", "tokens", "targets", "variant", "min step ms", "median step ms", "× floor (min / median)",
               "peak GiB", "memory × floor", "trainable", "adapted layers"]


def limit_rows(groups: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Per layer shape, the limit work's parts in ms: min over rounds of each round's best call."""
    head, rows = ["model", "tokens", "layer (in x out)"], []
    for group in groups:
        limit = next((r for r in group["results"] if r["spec"]["variant"] == "limit"), None)
        if limit is None:
            continue
        for shape, parts in limit["runs"][0]["parts"].items():
            if len(head) == 3:
                head += [f"{k} ms" for k in parts] + ["sum ms"]
            best = [min(run["parts"][shape][k][0] for run in limit["runs"]) for k in parts]
            rows.append([group["model"], group["tokens"], shape] + [f"{b * 1e3:.2f}" for b in best]
                        + [f"{sum(best) * 1e3:.2f}"])
    return head, rows


def run_models(script: str, models: dict[str, tuple[int, int, int]], targets: Sequence[str],
               variants: Sequence[str], args: Any, extra: Optional[dict] = None,
               env: Optional[dict] = None) -> list[dict]:
    """Every table of a run: per model (hidden, heads, intermediate) one set of workers (floor, each variant x
    targets, limit) over ``args.tokens``; returns one group per (model, tokens) for ``report``."""
    requests = [{"tokens": t, "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats}
                for t in args.tokens]
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    groups = []
    for model, (hidden, heads, inter) in models.items():
        base = {"layers": args.layers, "hidden": hidden, "heads": heads, "intermediate": inter, "seq": args.seq,
                "tokens": args.tokens, "n_frequency": args.n_frequency, **(extra or {})}
        specs = [{"variant": "floor", **base}]
        specs += [{"variant": v, "targets": tg, **base} for tg in targets for v in variants if v != "floor"]
        specs.append({"variant": "limit", **base})
        for t, results in zip(args.tokens, interleave(script, specs, args.rounds, requests, env, log=log)):
            groups.append({"model": f"{model} ({hidden}/{inter})", "tokens": f"{t:,} ({t // args.seq}x{args.seq})",
                           "shapes": {tg: layer_shapes(hidden, inter, args.layers, tg) for tg in targets},
                           "results": results})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(groups, f)
    return groups


def report(groups: Sequence[dict], variants: Sequence[str], labels: dict[str, str], settings: str,
           device_memory: str) -> None:
    """Print the device, the settings, how memory was measured, and the summary, per-variant and limit tables."""
    first = groups[0]["results"][0]
    on_device = first["runs"][0]["device_gb"] is not None
    exact = all(run.get("rss_exact", True) for g in groups for r in g["results"] for run in r["runs"])
    print(f"device: {first['info']['device']}")
    print(settings)
    print("peak memory: " + (device_memory if on_device else
                             "resident-memory high-water of each worker's timed steps" if exact else
                             "ru_maxrss of each worker (lifetime peak: clear_refs unavailable)"))
    head, summary, detail = summary_rows(groups, variants, labels, "memory_gb")
    print("\n" + markdown(head, summary))
    print("\n" + markdown(DETAIL_HEAD, detail))
    head, rows = limit_rows(groups)
    print("\nLimit work per adapted layer (ms, best call):\n" + markdown(head, rows))

