"""The writers under fault injection: for each, how to lay out the old state, what the write is, and how the
destination is read back with the project's own loaders.

Every writer works in one root folder: ``inputs/`` (never written by the write), ``live/`` (the destination's
parent, holding the old state before the write). ``prepare`` and ``load`` run unkilled; only ``write`` counts.
Reference values are plain numpy (``spectrum``), known to the test independently of any writer.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import numpy as np

Q = "q"  # the one adapted layer: JAX kernel (8, 4), torch/PEFT weight (4, 8)
OLD, NEW, OTHER = 0, 1, 7


def spectrum(version: int, n: int = 3) -> np.ndarray:
    """The spectrum an adapter of ``version`` holds: distinct, non-round values (bit-for-bit comparisons)."""
    return (np.arange(n, dtype=np.float64) * 1.25 + 10.0 * version + 0.375).astype(np.float32)


def config(version: int):
    import bridge

    return bridge.FourierFTConfig(n_frequency=3, scaling=100.0 + version, target_modules=[Q], random_loc_seed=7)


def _peft(folder: str, version: int, adapter_name: str = "default") -> str:
    import bridge

    return bridge.write_adapter(folder, config(version), {bridge.spectrum_key(Q): spectrum(version)}, adapter_name)


def _saved(version: int):
    """A ``SavedAdapter`` with ``spectrum(version)`` (built with jax: only in ``prepare``)."""
    import fourierft_jax
    from fourierft_jax._src.saved import from_adapter

    params = {Q: {"kernel": np.zeros((8, 4), np.float32)}}
    saved = from_adapter(fourierft_jax.apply(params, dataclasses.replace(config(version), init_weights=True)))
    return dataclasses.replace(saved, state={**saved.state, "spectra": {Q: spectrum(version)}})


def _base(root: str) -> str:
    from safetensors.numpy import save_file

    base = os.path.join(root, "inputs", "base")
    os.makedirs(base)
    weight = (np.arange(32, dtype=np.float32).reshape(4, 8) / 7.0).astype(np.float32)
    save_file({f"{Q}.weight": weight, f"{Q}.bias": np.ones(4, np.float32)}, os.path.join(base, "model.safetensors"))
    with open(os.path.join(base, "config.json"), "w") as stream:
        stream.write('{"hidden_size": 8}')
    return base


def _cli(*argv: str) -> None:
    from bridge._src.cli import main

    code = main(list(argv))
    if code != 0:
        raise RuntimeError(f"fourierft {' '.join(argv)} exited {code}")


@dataclasses.dataclass(frozen=True)
class Writer:
    prepare: Callable[[str], None]  # writes inputs/ and the old state in live/
    load: Callable[[str], Any]  # what the write needs, read before counting starts
    write: Callable[[Any, str], None]  # the write under test, into live/
    kind: str  # how the destination is read: "peft", "orbax", "merged", "training"
    destination: str = "peft"  # under live/
    # "exchange": renameat2 swaps the folders; "fallback": two renames and recovery (renameat2 made to fail).
    modes: tuple[str, ...] = ("exchange", "fallback")


def _prepare_peft(root: str) -> None:
    _peft(os.path.join(root, "live", "peft"), OLD)
    _peft(os.path.join(root, "live", "peft"), OTHER, "other")  # another adapter's sub-folder: must stay


def _prepare_peft_and_orbax(root: str) -> None:
    import fourierft_jax

    _prepare_peft(root)
    fourierft_jax.save_adapter(os.path.join(root, "inputs", "new_orbax"), _saved(NEW))


def _torch_write(payload: Any, root: str) -> None:
    payload.save_pretrained(os.path.join(root, "live", "peft"))


def _torch_load(root: str) -> Any:
    import torch

    import fourierft_torch

    torch.manual_seed(0)
    model = fourierft_torch.get_fourierft_model(torch.nn.Sequential(torch.nn.Linear(8, 4)),
                                                dataclasses.replace(config(NEW), target_modules=["0"]))
    with torch.no_grad():
        model.model[0].fourierft_spectrum["default"].copy_(torch.from_numpy(spectrum(NEW)))
    return model


def _prepare_torch(root: str) -> None:
    import bridge

    folder = os.path.join(root, "live", "peft")
    bridge.write_adapter(folder, dataclasses.replace(config(OLD), target_modules=["0"]),
                         {bridge.spectrum_key("0"): spectrum(OLD)})
    bridge.write_adapter(folder, dataclasses.replace(config(OTHER), target_modules=["0"]),
                         {bridge.spectrum_key("0"): spectrum(OTHER)}, "other")


def _load_new_orbax(root: str) -> Any:
    import fourierft_jax

    return fourierft_jax.load_adapter(os.path.join(root, "inputs", "new_orbax"))


def _prepare_orbax(root: str) -> None:
    import fourierft_jax

    fourierft_jax.save_adapter(os.path.join(root, "live", "ckpt"), _saved(OLD))
    fourierft_jax.save_adapter(os.path.join(root, "inputs", "new_orbax"), _saved(NEW))


def _prepare_merge(root: str) -> None:
    base = _base(root)
    old, new = os.path.join(root, "inputs", "old_peft"), os.path.join(root, "inputs", "new_peft")
    _peft(old, OLD)
    _peft(new, NEW)
    _cli("merge", "--base", base, "--adapter", old, "--out", os.path.join(root, "live", "merged"), "-q")


def _prepare_convert_to_orbax(root: str) -> None:
    import fourierft_jax

    _base(root)
    _peft(os.path.join(root, "inputs", "new_peft"), NEW)
    fourierft_jax.save_adapter(os.path.join(root, "live", "ckpt"), _saved(OLD))


def _prepare_training(root: str) -> None:
    import jax.numpy as jnp

    import fourierft_jax

    with fourierft_jax.TrainingCheckpoints(os.path.join(root, "live", "train"), max_to_keep=2) as checkpoints:
        for step in (1, 2):
            checkpoints.save(step, {"w": jnp.asarray(spectrum(step))})


def _training_load(root: str) -> Any:
    import jax.numpy as jnp

    return {"w": jnp.asarray(spectrum(3))}


def _training_write(state: Any, root: str) -> None:
    import fourierft_jax

    with fourierft_jax.TrainingCheckpoints(os.path.join(root, "live", "train"), max_to_keep=2) as checkpoints:
        checkpoints.save(3, state)


def _none(root: str) -> None:
    return None


WRITERS: dict[str, Writer] = {
    "bridge.write_adapter": Writer(
        _prepare_peft, _none, lambda _, root: _peft(os.path.join(root, "live", "peft"), NEW), "peft"),
    "torch.save_pretrained": Writer(_prepare_torch, _torch_load, _torch_write, "peft"),
    "jax.save_adapter": Writer(
        _prepare_orbax, _load_new_orbax,
        lambda saved, root: __import__("fourierft_jax").save_adapter(
            os.path.join(root, "live", "ckpt"), saved, overwrite=True), "orbax", "ckpt"),
    "jax.export_peft": Writer(
        _prepare_peft_and_orbax, _load_new_orbax,
        lambda saved, root: __import__("fourierft_jax").export_peft(
            saved, os.path.join(root, "live", "peft"), overwrite=True), "peft"),
    "cli.merge": Writer(
        _prepare_merge, _none,
        lambda _, root: _cli("merge", "--base", os.path.join(root, "inputs", "base"), "--adapter",
                             os.path.join(root, "inputs", "new_peft"), "--out", os.path.join(root, "live", "merged"),
                             "--overwrite", "-q"), "merged", "merged"),
    "cli.convert_to_peft": Writer(
        _prepare_peft_and_orbax, _none,
        lambda _, root: _cli("convert", os.path.join(root, "inputs", "new_orbax"), os.path.join(root, "live", "peft"),
                             "--to", "peft", "--overwrite"), "peft"),
    "cli.convert_to_orbax": Writer(
        _prepare_convert_to_orbax, _none,
        lambda _, root: _cli("convert", os.path.join(root, "inputs", "new_peft"), os.path.join(root, "live", "ckpt"),
                             "--to", "orbax", "--base", os.path.join(root, "inputs", "base"), "--overwrite"),
        # Its fallback is jax.save_adapter's (the same swap in checkpoint.py), already run in both modes.
        "orbax", "ckpt", modes=("exchange",)),
    # Orbax's CheckpointManager renames steps itself and never calls replace_directory: one mode says it all.
    "jax.TrainingCheckpoints.save": Writer(_prepare_training, _training_load, _training_write, "training", "train",
                                           modes=("exchange",)),
}
