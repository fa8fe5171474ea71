"""Calibrates fourierft_torch's ``"auto"`` forward rule: spectral vs fused time for one layer, by token count.

For each layer shape and token count it times forward+backward (training) and forward only (inference) of one
``FourierFTLinear`` in both modes, and prints the crossover token count ``T*`` with the ratio
``T*·(in+out) / (in·out)`` that ``SPECTRAL_RATIO`` is set from.

Usage: flock /tmp/bench.lock /work/venv/bin/python benchmarks/torch_auto_rule.py [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fourierft_torch  # noqa: E402

SHAPES = [(768, 768), (3072, 768), (768, 3072), (4096, 4096)]
TOKENS = [1, 4, 16, 64, 256, 1024]


def _time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(out_features: int, in_features: int, tokens: int, mode: str, train: bool, repeats: int) -> float:
    torch.manual_seed(0)
    layer = fourierft_torch.FourierFTLinear(
        torch.nn.Linear(in_features, out_features), "default",
        fourierft_torch.FourierFTConfig(n_frequency=1000), 1000)
    layer.base_layer.requires_grad_(False)
    layer.forward_mode = mode
    x = torch.randn(tokens, in_features, requires_grad=train)
    dy = torch.randn(tokens, out_features)
    if train:
        return _time(lambda: layer(x).backward(dy), repeats)
    with torch.no_grad():
        return _time(lambda: layer(x), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, n_frequency=1000, median of {args.repeats}; times in ms")
    print("| shape (out x in) | pass | " + " | ".join(f"T={t} spectral/fused" for t in TOKENS) + " | crossover T* | T*(in+out)/(in*out) |")
    print("|---|---|" + "---|" * (len(TOKENS) + 2))
    for out_features, in_features in SHAPES:
        for train in (True, False):
            cells, crossover = [], None
            for tokens in TOKENS:
                spectral = measure(out_features, in_features, tokens, "spectral", train, args.repeats)
                fused = measure(out_features, in_features, tokens, "fused", train, args.repeats)
                cells.append(f"{spectral * 1e3:.2f}/{fused * 1e3:.2f}")
                if spectral <= fused:
                    crossover = tokens
            ratio = "-" if crossover is None else f"{crossover * (in_features + out_features) / (in_features * out_features):.3f}"
            print(f"| {out_features}x{in_features} | {'fwd+bwd' if train else 'fwd'} | " + " | ".join(cells)
                  + f" | {crossover if crossover is not None else '<1'} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
