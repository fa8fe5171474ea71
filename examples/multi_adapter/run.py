"""Train four FourierFT adapters on MiniLM in JAX, then serve them all in ONE mixed batch, in JAX and PyTorch.

One command (from the repository root): ``bash scripts/multi_adapter.sh`` (``--quick``: a tiny run in about a
minute). Offline; about 4 minutes on 2 CPU cores.

1. Four binary tasks from the data ``vaderSentiment`` ships (``tasks.py``): polarity, intensity, emotive, flag.
2. One FourierFT adapter per task (query/value spectra, the classifier as ``modules_to_save``), all with the same
   config, trained in JAX (``training.py``) and exported to PEFT folders.
3. The test rows of every task (plus some rows for the base model) shuffled into one stream, served in mixed
   batches of 64 rows, each row with its own adapter: in JAX from an ``AdapterBank``, in PyTorch with
   ``adapter_names=`` (``serving.py``).
4. Each row's prediction is checked against its adapter alone (JAX: the folder imported and merged; PyTorch:
   PEFT's ``PeftModel``): they must agree on every row. A table of per-task accuracies is printed;
   ``results.json`` and ``mixed_batch.npz`` are written under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from serving import BASE, jax_alone_logits, jax_mixed_logits, mixed_batch, torch_alone_logits, torch_mixed_logits  # noqa: E402
from tasks import LABELS, TASKS, task_splits  # noqa: E402
from training import Settings, encode, load_model, train_all  # noqa: E402

QUICK_ENV = "FOURIERFT_EXAMPLE_QUICK"
LOGIT_ATOL = 1e-4  # float32: the mixed batch and the adapter alone sum the same terms in another order


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/multi_adapter", help="folder for every output")
    parser.add_argument("--quick", action="store_true",
                        help=f"a tiny run (2 layers, a few steps; also set by {QUICK_ENV}=1), for tests")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ", ".join(TASKS))
    parser.add_argument("--steps", type=int, default=None, help="training steps per task")
    parser.add_argument("--chunk", type=int, default=64, help="rows per mixed batch")
    parser.add_argument("--base-rows", type=int, default=32, help="rows of the stream served by the base model")
    parser.add_argument("--skip-torch", action="store_true", help="serve in JAX only")
    return parser.parse_args(argv)


def _compare(mixed: np.ndarray, alone: np.ndarray, where: str) -> dict:
    agree = float((mixed.argmax(-1) == alone.argmax(-1)).mean())
    diff = float(np.abs(mixed - alone).max()) if len(mixed) else 0.0
    if agree != 1.0 or not diff <= LOGIT_ATOL:
        raise AssertionError(f"{where}: the mixed batch and the adapter alone disagree (predictions agree on "
                             f"{100 * agree:.2f}%, max logit difference {diff:.2e})")
    return {"agreement": agree, "max_logit_difference": diff}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    quick = args.quick or os.environ.get(QUICK_ENV, "") not in ("", "0")
    settings = Settings.quick() if quick else Settings()
    if args.steps is not None:
        settings = dataclasses.replace(settings, steps=args.steps)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise SystemExit(f"unknown tasks {unknown}; choose from {', '.join(TASKS)}")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    start = time.time()

    model, params, tokenizer = load_model(settings)
    frozen = {"params": params}
    splits = {t: task_splits(t, settings.seed) for t in tasks}
    print(f"MiniLM ({settings.layers} layers), {len(tasks)} tasks: "
          + ", ".join(f"{t} {len(splits[t]['train'])}/{len(splits[t]['test'])}" for t in tasks)
          + f" train/test entries; outputs in {out}")

    print("Training one FourierFT adapter per task (JAX):")
    trained = train_all(tasks, splits, frozen, tokenizer, model, os.path.join(out, "adapters"), settings)
    folders = [trained["tasks"][t]["folder"] for t in tasks]

    test = {t: encode(tokenizer, splits[t]["test"], settings.max_length, settings.max_eval) for t in tasks}
    batch = mixed_batch(test, tasks, args.base_rows, settings.seed)
    print(f"Serving {len(batch.task)} rows ({len(tasks)} adapters + the base model, shuffled) in mixed batches of "
          f"{args.chunk}")

    base_head = params["classifier"]
    logits = {"jax": jax_mixed_logits(model, frozen, folders, batch, args.chunk)}
    if not args.skip_torch:
        logits["torch"] = torch_mixed_logits(folders, tasks, batch, settings.layers, base_head, args.chunk)

    apply = jax.jit(model.apply)
    base_logits = jax_alone_logits(apply, frozen, None, batch.ids, batch.mask, args.chunk)
    rows = {}
    for slot, task in [(i, t) for i, t in enumerate(tasks)] + [(BASE, None)]:
        where = batch.task == slot
        ids, mask, labels = batch.ids[where], batch.mask[where], batch.labels[where]
        name = task or "base model"
        row = {"rows": int(where.sum())}
        alone = {"jax": jax_alone_logits(apply, frozen, folders[slot] if task else None, ids, mask, args.chunk)}
        if not args.skip_torch:
            alone["torch"] = torch_alone_logits(folders[slot] if task else None, ids, mask, settings.layers,
                                                base_head, args.chunk)
        for framework, mixed in logits.items():
            row[framework] = _compare(mixed[where], alone[framework], f"{framework}, {name}")
            row[framework]["accuracy"] = float((mixed[where].argmax(-1) == labels).mean())
        if "torch" in logits:
            row["torch_vs_jax"] = float(np.abs(logits["torch"][where] - logits["jax"][where]).max())
        if task:
            row["majority"] = float(max(labels.mean(), 1 - labels.mean()))
            # How far the adapter moves its rows from the base model: the agreement above is only a check of
            # the routing if this is far above LOGIT_ATOL.
            row["moved_from_base"] = float(np.abs(alone["jax"] - base_logits[where]).max())
        rows[name] = row

    frameworks = list(logits)
    print("\n| task | labels (0 / 1) | test rows | majority class | "
          + " | ".join(f"{f} mixed batch accuracy" for f in frameworks) + " | = adapter alone |")
    print("|---|---|---:|---:|" + "---:|" * len(frameworks) + "---|")
    for task in tasks:
        row = rows[task]
        print(f"| {task} | {' / '.join(LABELS[task])} | {row['rows']} | {row['majority']:.3f} | "
              + " | ".join(f"{row[f]['accuracy']:.4f}" for f in frameworks) + " | every row |")
    differences = {f: max(r[f]["max_logit_difference"] for r in rows.values()) for f in frameworks}
    print(f"\nEvery row's prediction equals its adapter alone ({', '.join(frameworks)}); max logit difference "
          + ", ".join(f"{f} {d:.1e}" for f, d in differences.items())
          + f"; the {rows['base model']['rows']} base-model rows equal the base model.")
    if "torch" in logits:
        print(f"PyTorch vs JAX on the same mixed batches: max logit difference "
              f"{max(r['torch_vs_jax'] for r in rows.values()):.1e}.")
    report = {"rows": rows, "settings": dataclasses.asdict(settings), "seconds": time.time() - start,
              "adapters": dict(zip(tasks, folders)),
              "training": {t: {k: v for k, v in trained["tasks"][t].items() if k != "trainable"} for t in tasks}}
    np.savez(os.path.join(out, "mixed_batch.npz"), ids=batch.ids, mask=batch.mask, labels=batch.labels,
             adapter=batch.task, **{f"logits_{f}": v for f, v in logits.items()})
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    print(f"Done in {time.time() - start:.0f} s; PEFT adapters in {os.path.join(out, 'adapters')}; results.json and "
          f"mixed_batch.npz (the stream, each row's adapter and logits) in {out}")
    return report


if __name__ == "__main__":
    main()
