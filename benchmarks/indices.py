"""Time and peak memory of ``bridge.spectral_indices`` against PEFT's ``torch.randperm(out*in)[:n]``.

Every (shape, variant) runs in its own subprocess, so neither the imports nor the other variant's allocations leak
into a measurement. The child reads its resident set size (RSS) just before the call, resets the kernel's peak
counter where Linux allows it (``/proc/self/clear_refs``), makes the call and reports the peak RSS minus that
baseline: the extra memory the call itself needed. The peak comes from ``VmHWM`` after the reset and, where the
reset is not available, from ``resource.getrusage``. The two results are also checked for equality.

Usage:
    python benchmarks/indices.py                 # the four default shapes, n = 1000
    python benchmarks/indices.py --shapes 768x768 --n 5000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SHAPES = ("768x768", "4096x4096", "4096x11008", "8192x28672")

_CHILD = r"""
import json, resource, sys, time
params = json.loads(sys.argv[1])
sys.path.insert(0, params["repo"])
variant, out_features, in_features, n, seed, repeats = (
    params[key] for key in ("variant", "out", "in", "n", "seed", "repeats"))
import numpy as np
if variant == "torch":
    import torch
    def call(out_features=out_features, in_features=in_features, n=n):
        flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n]
        return torch.stack([flat // in_features, flat % in_features]).numpy()
else:
    import bridge
    def call(out_features=out_features, in_features=in_features, n=n):
        return bridge.spectral_indices(out_features, in_features, n, seed)

call(2, 2, 1)  # warm-up on a 2x2 layer: loads code pages and lazy imports, allocates nothing lasting

def status(field):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])  # kB
    return None

baseline = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current RSS
    reset = True
except OSError:
    reset = False
times = []
for _ in range(repeats):
    start = time.perf_counter()
    result = call()
    times.append(time.perf_counter() - start)
peak = status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": min(times), "peak_mb": max(peak - baseline, 0) / 1024, "reset": reset,
                  "result": np.asarray(result).tolist()}))
"""


def measure(variant: str, out_features: int, in_features: int, n: int, seed: int, repeats: int) -> dict:
    params = dict(repo=REPO, variant=variant, out=out_features, n=n, seed=seed, repeats=repeats)
    params["in"] = in_features
    completed = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(params)], capture_output=True, text=True,
                               check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{variant} {out_features}x{in_features} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="OUTxIN, torch layout")
    parser.add_argument("--n", type=int, default=1000, help="n_frequency")
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument("--repeats", type=int, default=3, help="calls per child for layers under 10^8 entries")
    args = parser.parse_args()

    print(f"n_frequency={args.n} seed={args.seed}; time = best of the calls in one child process; "
          f"memory = peak RSS minus RSS before the call")
    header = (f"| shape (out x in) | out*in | torch.randperm s | spectral_indices s | speed-up | "
              f"torch peak MB | ours peak MB | memory ratio | equal |")
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for shape in args.shapes:
        out_features, in_features = (int(v) for v in shape.lower().split("x"))
        repeats = args.repeats if out_features * in_features < 10**8 else 1
        theirs = measure("torch", out_features, in_features, args.n, args.seed, repeats)
        ours = measure("bridge", out_features, in_features, args.n, args.seed, repeats)
        equal = theirs.pop("result") == ours.pop("result")
        speedup = theirs["seconds"] / ours["seconds"]
        ratio = theirs["peak_mb"] / max(ours["peak_mb"], 0.01)
        print(f"| {out_features}x{in_features} | {out_features * in_features:,} | {theirs['seconds']:.4f} | "
              f"{ours['seconds']:.4f} | {_times(speedup)} | {theirs['peak_mb']:.1f} | {ours['peak_mb']:.1f} | "
              f"{_times(ratio)} | {equal} |", flush=True)


def _times(value: float) -> str:
    return f"{value:.1f}x" if value < 10 else f"{value:.0f}x"


if __name__ == "__main__":
    main()
