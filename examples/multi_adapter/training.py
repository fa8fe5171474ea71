"""Train one FourierFT adapter per task on MiniLM in JAX, all with the same config, and export each to PEFT.

Every task's adapter has the same ``FourierFTConfig`` (targets, ``n_frequency``, scaling, ``random_loc_seed``),
so every layer's spectral positions are shared: one base model and a stack of coefficient vectors serve them
all. The tasks reuse one ``FourierFTAdapter`` and one compiled training step: each task starts from the same
initial state (zero spectra, the base model's classifier head), trains its own copy, and is exported to its own
PEFT folder (``export_peft``), its head saved with it as ``modules_to_save``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "minilm"))

import fourierft_jax  # noqa: E402
from flax_bert import load_minilm_classifier  # noqa: E402
from train import tokenize, train_step  # noqa: E402

import bridge  # noqa: E402

TARGETS = ("query", "value")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The run's sizes; ``quick()`` is the setting the tests use."""

    steps: int = 120  # training steps per task
    batch_size: int = 32
    max_length: int = 8  # tokens per entry
    layers: int = 6  # MiniLM's first ``layers`` encoder layers (6 = the whole model)
    n_frequency: int = 1000
    scaling: float = 150.0
    spectrum_lr: float = 5e-2
    head_lr: float = 5e-3
    max_eval: int | None = None  # test entries per task (None = all)
    seed: int = 0

    @classmethod
    def quick(cls) -> Settings:
        return cls(steps=6, batch_size=16, layers=2, n_frequency=64, max_eval=24)


@dataclasses.dataclass(frozen=True)
class Encoded:
    ids: np.ndarray
    mask: np.ndarray
    labels: np.ndarray


def load_model(settings: Settings) -> tuple[Any, dict, Any]:
    """MiniLM with a classifier head, cut to its first ``settings.layers`` encoder layers."""
    model, params, tokenizer = load_minilm_classifier(num_labels=2, seed=settings.seed)
    if settings.layers != model.config.num_hidden_layers:
        config = dataclasses.replace(model.config, num_hidden_layers=settings.layers)
        layers = params["bert"]["encoder"]["layer"]
        params["bert"]["encoder"]["layer"] = {str(i): layers[str(i)] for i in range(settings.layers)}
        model = model.clone(config=config)
    return model, params, tokenizer


def encode(tokenizer, split, max_length: int, limit: int | None = None) -> Encoded:
    ids, mask = tokenize(tokenizer, split.texts, max_length)
    labels = split.labels
    if limit is not None:
        ids, mask, labels = ids[:limit], mask[:limit], labels[:limit]
    return Encoded(ids, mask, labels)


def make_adapter(frozen: dict, settings: Settings) -> fourierft_jax.FourierFTAdapter:
    config = bridge.FourierFTConfig(
        n_frequency=settings.n_frequency, scaling=settings.scaling, target_modules=list(TARGETS),
        modules_to_save=["classifier"], init_weights=True,
    )
    return fourierft_jax.apply(frozen, config, key=jax.random.key(settings.seed))


def make_step(forward, settings: Settings):
    """The optimizer and one jitted training step (``train.train_step`` of the main example), shared by every task."""
    tx = fourierft_jax.multi_lr(settings.spectrum_lr, settings.head_lr)
    return tx, train_step(forward, tx)


def train_task(name: str, step, tx, initial, frozen: dict, data: Encoded, settings: Settings) -> tuple[Any, float]:
    """``settings.steps`` steps over shuffled epochs of ``data``; returns the trained state and mean last loss."""
    rng = np.random.default_rng(settings.seed)
    trainable, opt_state = initial, tx.init(initial)
    order, position, losses = rng.permutation(len(data.labels)), 0, []
    bar = tqdm(range(settings.steps), desc=f"train {name}", leave=False)
    for _ in bar:
        if position + settings.batch_size > len(order):
            order, position = rng.permutation(len(data.labels)), 0
        batch = order[position : position + settings.batch_size]
        position += settings.batch_size
        trainable, opt_state, loss = step(trainable, opt_state, frozen, data.ids[batch], data.mask[batch],
                                          data.labels[batch])
        losses.append(float(loss))
        bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    return trainable, float(np.mean(losses[-10:]))


def train_all(tasks, splits: dict, frozen: dict, tokenizer, model, out: str, settings: Settings) -> dict[str, dict]:
    """Train every task, export each adapter to ``out/<task>`` (PEFT); per task: folder, trainable, seconds."""
    adapter = make_adapter(frozen, settings)
    forward = adapter.make_apply(model.apply)
    tx, step = make_step(forward, settings)
    initial = adapter.trainable
    trained = {}
    for task in tasks:
        start = time.time()
        data = encode(tokenizer, splits[task]["train"], settings.max_length)
        state, loss = train_task(task, step, tx, initial, frozen, data, settings)
        adapter.set_trainable(state)
        folder = fourierft_jax.export_peft(adapter, os.path.join(out, task), overwrite=True)
        trained[task] = {"folder": folder, "trainable": state, "loss": loss, "seconds": time.time() - start}
        print(f"  {task}: {settings.steps} steps, final loss {loss:.3f}, {time.time() - start:.0f} s -> {folder}")
    return {"adapter": adapter, "forward": forward, "tasks": trained}
