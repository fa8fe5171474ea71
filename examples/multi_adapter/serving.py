"""Serve many task adapters in one mixed batch: JAX (``AdapterBank``) and PyTorch (``adapter_names=``).

Every row of a batch names its own adapter. JAX: the PEFT folders go into one ``AdapterBank`` (one
``(capacity, n)`` table per adapted layer) and ``make_bank_apply`` runs the encoder with each row's coefficients;
a bank serves spectra only, so each task's classifier head (its ``modules_to_save``, read from the same folder)
is applied here, gathered per row. PyTorch: ``FourierFTModel.load_adapters`` loads the same folders onto
transformers' ``BertForSequenceClassification`` and ``model(..., adapter_names=[...])`` routes each row (heads
included). The references are each adapter alone: its PEFT folder imported and merged in JAX
(``import_peft`` + ``merge_and_unload``), and PEFT itself (``PeftModel.from_pretrained``) in PyTorch.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "minilm"))

import fourierft_jax  # noqa: E402
from flax_bert import BertModel, minilm_path  # noqa: E402

import bridge  # noqa: E402
from bridge._src.peft_format import KEY_PREFIX  # noqa: E402

BASE = -1  # the bank's index of the base model (no adapter)
TORCH_BASE = "__base__"  # its name in PyTorch / PEFT


@dataclasses.dataclass(frozen=True)
class MixedBatch:
    """Rows of every task shuffled together; ``task[i]`` is the row's adapter (``BASE``: none)."""

    ids: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    task: np.ndarray


def mixed_batch(encoded: dict[str, Any], tasks: Sequence[str], base_rows: int, seed: int = 0) -> MixedBatch:
    """The test rows of ``tasks`` (row of task ``t`` routed to slot ``tasks.index(t)``) plus ``base_rows`` rows of
    the first task routed to the base model, in one shuffled order."""
    parts = [(encoded[t], np.full(len(encoded[t].labels), i, np.int32)) for i, t in enumerate(tasks)]
    first = encoded[tasks[0]]
    n = min(base_rows, len(first.labels))
    ids = np.concatenate([p.ids for p, _ in parts] + [first.ids[:n]])
    mask = np.concatenate([p.mask for p, _ in parts] + [first.mask[:n]])
    labels = np.concatenate([p.labels for p, _ in parts] + [first.labels[:n]])
    task = np.concatenate([i for _, i in parts] + [np.full(n, BASE, np.int32)])
    order = np.random.default_rng(seed).permutation(len(task))
    return MixedBatch(ids[order], mask[order], labels[order], task[order])


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _pad(array: np.ndarray, size: int, value: int = 0) -> np.ndarray:
    """Pad the leading axis to ``size`` rows, so that every chunk has one shape (one compilation)."""
    if len(array) == size:
        return array
    return np.concatenate([array, np.full((size - len(array),) + array.shape[1:], value, array.dtype)])


# -- JAX --------------------------------------------------------------------------------------------------------
def read_heads(folders: Sequence[str], base_head: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Each folder's classifier (``modules_to_save``) as Dense ``(in, out)`` kernels, the base head last."""
    kernels, biases = [], []
    for folder in folders:
        _, tensors = bridge.read_adapter(folder)
        kernels.append(tensors[KEY_PREFIX + "classifier.weight"].T)
        biases.append(tensors[KEY_PREFIX + "classifier.bias"])
    kernels.append(np.asarray(base_head["kernel"]))
    biases.append(np.asarray(base_head["bias"]))
    return np.stack(kernels).astype(np.float32), np.stack(biases).astype(np.float32)


def jax_mixed_logits(model, frozen: dict, folders: Sequence[str], batch: MixedBatch, chunk: int) -> np.ndarray:
    """Logits of every row of ``batch`` from one bank holding all ``folders``, served ``chunk`` rows at a time."""
    encoder = BertModel(model.config, with_pooler=True)

    def pooled(variables, ids, mask):
        return encoder.apply({"params": variables["params"]["bert"]}, ids, mask)

    template = fourierft_jax.import_peft(folders[0], frozen)  # the layers (and their shapes) of the bank
    bank = fourierft_jax.AdapterBank.create(template, capacity=len(folders), spectra_only=True)
    bank = bank.load_peft(folders, slots=list(range(len(folders))), progress=False)  # task i in slot i
    serve = fourierft_jax.make_bank_apply(pooled, bank)
    kernels, biases = read_heads(folders, frozen["params"]["classifier"])

    @jax.jit  # the bank's tables and the heads are arguments: loading other adapters never recompiles
    def logits(spectra, kernels, biases, variables, index, ids, mask):
        features = serve(spectra, variables, index, ids, mask)
        head = jnp.where(index < 0, len(kernels) - 1, index)  # the base head is the last
        return jnp.einsum("bd,bdk->bk", features, kernels[head]) + biases[head]

    out = []
    for part in _chunks(len(batch.task), chunk):
        rows = part.stop - part.start
        result = logits(bank.spectra, kernels, biases, frozen, _pad(batch.task[part], chunk, BASE),
                        _pad(batch.ids[part], chunk), _pad(batch.mask[part], chunk))
        out.append(np.asarray(result)[:rows])
    return np.concatenate(out)


def jax_alone_logits(apply, frozen: dict, folder: str | None, ids: np.ndarray, mask: np.ndarray,
                     chunk: int) -> np.ndarray:
    """Logits of one adapter alone: its PEFT folder imported and merged (``None``: the base model), run by
    ``apply`` (the jitted ``model.apply``)."""
    variables = frozen
    if folder is not None:
        variables = fourierft_jax.import_peft(folder, frozen).merge_and_unload(frozen)
    return np.concatenate([np.asarray(apply(variables, _pad(ids[p], chunk), _pad(mask[p], chunk)))[: p.stop - p.start]
                           for p in _chunks(len(ids), chunk)])


# -- PyTorch ----------------------------------------------------------------------------------------------------
def torch_base(layers: int, base_head: dict[str, Any]):
    """transformers' torch MiniLM classifier (first ``layers`` layers) with the JAX model's base head."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.BertForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=2, num_hidden_layers=layers).eval()
    with torch.no_grad():  # the new head's init is transformers' own: take the one the JAX adapters started from
        model.classifier.weight.copy_(torch.from_numpy(np.asarray(base_head["kernel"]).T.copy()))
        model.classifier.bias.copy_(torch.from_numpy(np.asarray(base_head["bias"]).copy()))
    return model


def _torch_logits(model, ids: np.ndarray, mask: np.ndarray, chunk: int, names: Sequence[str] | None = None):
    import torch

    out = []
    with torch.inference_mode():
        for part in _chunks(len(ids), chunk):
            extra = {} if names is None else {"adapter_names": list(names[part])}
            result = model(input_ids=torch.from_numpy(ids[part]).long(), attention_mask=torch.from_numpy(mask[part]),
                           **extra)
            out.append(result.logits.numpy())
    return np.concatenate(out) if out else np.zeros((0, 2), np.float32)


def torch_mixed_logits(folders: Sequence[str], tasks: Sequence[str], batch: MixedBatch, layers: int,
                       base_head: dict[str, Any], chunk: int) -> np.ndarray:
    """Logits of every row from one torch model holding all ``folders``, each row naming its adapter."""
    import fourierft_torch

    model = fourierft_torch.FourierFTModel.from_pretrained(torch_base(layers, base_head), folders[0],
                                                           adapter_name=tasks[0])
    model.load_adapters(folders[1:], adapter_names=list(tasks[1:]), progress=False)
    names = np.array([tasks[i] if i != BASE else TORCH_BASE for i in batch.task], dtype=object)
    return _torch_logits(model.eval(), batch.ids, batch.mask, chunk, names)


def torch_alone_logits(folder: str | None, ids: np.ndarray, mask: np.ndarray, layers: int,
                       base_head: dict[str, Any], chunk: int) -> np.ndarray:
    """Logits of one adapter alone, loaded by PEFT itself (``None``: the base model)."""
    import warnings

    from peft import PeftModel

    model = torch_base(layers, base_head)
    if folder is not None:
        with warnings.catch_warnings():  # transformers' deprecation of a name PEFT reads, not ours to fix
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            model = PeftModel.from_pretrained(model, folder).eval()
    return _torch_logits(model, ids, mask, chunk)
