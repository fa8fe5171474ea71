"""Merge a PEFT FourierFT adapter into a base model's safetensors weights, without torch and without PEFT.

For each adapted layer ``W += scaling · Re(ifft2(S))`` (``ΔWᵀ`` for a ``Conv1D`` weight stored ``(in, out)``),
computed in float32 as PEFT does and rounded once into the weight's own dtype (bfloat16 to nearest even).
Biases and ``modules_to_save`` tensors of the adapter replace the base tensors. The output has the base's
sharding and file names; every other file of the model folder (config, tokenizer) is copied. The result is
written into a temporary sibling of the destination and renamed into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Optional, Union

import numpy as np

from .atomic import atomic_directory
from .folders import (
    INDEX_NAME,
    Adapter,
    BaseCheckpoint,
    CheckpointError,
    Resolution,
    ResolvedLayer,
    open_base,
)
from .plans import DeltaScatter, delta_scatter, layer_plans
from .tensor_io import FLOAT_DTYPES, from_float32, header_bytes, to_float32, write_bytes

PathLike = Union[str, "os.PathLike[str]"]

# Weight files of other formats are not copied into the merged folder: they would hold the unmerged weights.
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".safetensors")


def delta_weight_float32(
    spectrum: np.ndarray, indices: np.ndarray, out_features: int, in_features: int, scaling: float
) -> np.ndarray:
    """``scaling · Re(ifft2(S))`` as float32 ``(out, in)``, via ``irfft2`` of the Hermitian-symmetrised half spectrum.

    ``Re(ifft2(S)) = ifft2((S + conj(S[-r, -c])) / 2)`` and the symmetrised matrix is Hermitian, so its
    ``c ≤ in // 2`` half determines it: half the FFT work and no complex ``out × in`` buffer (``plans.py``).

    Example:
        >>> from bridge import delta_weight, spectral_indices
        >>> idx = spectral_indices(6, 5, 7, seed=777)
        >>> c = np.arange(7, dtype=np.float32)
        >>> bool(np.allclose(delta_weight_float32(c, idx, 6, 5, 2.0), delta_weight(c, idx, 6, 5, 2.0), atol=1e-6))
        True
    """
    return _delta_float32(spectrum, delta_scatter(indices, out_features, in_features, "torch"), scaling)


def _delta_float32(spectrum: np.ndarray, scatter: DeltaScatter, scaling: float) -> np.ndarray:
    values = np.asarray(spectrum, dtype=np.float32)[scatter.source] * np.float32(0.5)
    spectrum_half = np.zeros(scatter.half_shape, dtype=np.complex64)
    np.add.at(spectrum_half, (scatter.rows, scatter.cols), values)  # add.at: a point may be its own partner
    delta = np.fft.irfft2(spectrum_half, s=scatter.shape)
    return (delta * np.float32(scaling)).astype(np.float32, copy=False)


def merged_weight(base: np.ndarray, base_dtype: str, layer: ResolvedLayer, spectrum: np.ndarray, scaling: float, seed: int) -> np.ndarray:
    """The merged weight of one layer in the base tensor's dtype (bfloat16 as ``uint16`` bit patterns).

    Example:
        >>> from bridge._src.folders import ResolvedLayer
        >>> layer = ResolvedLayer("l", "l.weight", 2, 2, False, 1, "k")
        >>> merged_weight(np.zeros((2, 2), np.float32), "F32", layer, np.array([4.0], np.float32), 1.0, 777).tolist()
        [[1.0, -1.0], [-1.0, 1.0]]
    """
    # Layers of equal shape share positions and plans (PEFT uses one seed for all of them).
    plans = layer_plans(layer.out_features, layer.in_features, layer.n_frequency, seed, "torch")
    delta = _delta_float32(spectrum, plans.delta, scaling)
    if not np.isfinite(delta).all():
        raise CheckpointError(f"layer {layer.name!r}: the adapter's delta weight holds NaN or inf (a broken adapter?)")
    if layer.conv1d:
        delta = delta.T
    # PEFT adds a float32 delta to the weight in place: the sum is formed in float32 and rounded once.
    if base_dtype == "F64":
        return np.asarray(base, dtype=np.float64) + delta
    return from_float32(to_float32(base, base_dtype) + delta, base_dtype)


@dataclasses.dataclass
class MergeReport:
    """What a merge did."""

    out: str
    files: list[str]
    merged_layers: int
    replaced_tensors: int
    copied: list[str]
    skipped: list[str]
    name_mapping: str


def plan_merge(
    base: PathLike, adapter: PathLike, adapter_name: Optional[str] = None, fan_in_fan_out: Optional[bool] = None
) -> tuple[BaseCheckpoint, Adapter, Resolution]:
    """Open both sides and check that the adapter fits the base, strictly (``peft_reader.open_strict``: every key
    against the config and the base, NaN/inf refused); nothing is written."""
    from .peft_reader import open_strict

    checkpoint = open_base(base)
    opened, resolution = open_strict(adapter, adapter_name, base=checkpoint, fan_in_fan_out=fan_in_fan_out,
                                     finite=True)
    return checkpoint, opened, resolution


def merge_adapter(
    base: PathLike,
    adapter: PathLike,
    out: PathLike,
    adapter_name: Optional[str] = None,
    overwrite: bool = False,
    fan_in_fan_out: Optional[bool] = None,
    progress: bool = True,
) -> MergeReport:
    """Write ``base`` with ``adapter`` merged into folder ``out``; return what was done.

    Args:
        base: a model folder (``model.safetensors`` or sharded with ``model.safetensors.index.json``) or one
            ``.safetensors`` file.
        adapter: a PEFT FourierFT adapter folder.
        out: the destination folder; it must not exist unless ``overwrite``.
        adapter_name: which adapter of a folder holding several (default ``"default"`` or the only one).
        overwrite: replace an existing ``out`` (only once the new one is complete).
        fan_in_fan_out: force every adapted weight to be read as ``Conv1D`` (``True``) or ``Linear``
            (``False``); ``None`` decides from the model type and the config.
        progress: show a tqdm progress bar on stderr.

    Example:
        >>> import tempfile, safetensors.numpy
        >>> from bridge import FourierFTConfig, spectrum_key, write_adapter
        >>> root = tempfile.mkdtemp()
        >>> safetensors.numpy.save_file({"lin.weight": np.zeros((4, 3), np.float32)}, os.path.join(root, "model.safetensors"))
        >>> _ = write_adapter(os.path.join(root, "ad"), FourierFTConfig(n_frequency=2, target_modules=["lin"]),
        ...                   {spectrum_key("lin"): np.ones(2, np.float32)})
        >>> merge_adapter(root, os.path.join(root, "ad"), os.path.join(root, "merged"), progress=False).merged_layers
        1
    """
    out_path = os.path.abspath(os.fspath(out))
    _check_destination(out_path, overwrite, [base, adapter])
    checkpoint, opened, resolution = plan_merge(base, adapter, adapter_name, fan_in_fan_out)
    layers = {layer.key: layer for layer in resolution.layers}
    with atomic_directory(out_path) as temporary:
        from tqdm.auto import tqdm

        total = sum(file.nbytes(key) for file in checkpoint.files.values() for key in file.keys())
        with tqdm(total=total, unit="B", unit_scale=True, desc="merging", disable=not progress) as bar:
            for file_name, source in checkpoint.files.items():
                with open(os.path.join(temporary, file_name), "wb") as stream:
                    entries = {key: source.header[key] for key in source.keys()}
                    stream.write(header_bytes(entries, source.metadata))
                    for key in source.keys():
                        if key in layers:
                            layer = layers[key]
                            data = merged_weight(
                                source.array(key), source.dtype(key), layer, opened.file.float32(layer.spectrum_key),
                                opened.config.scaling, opened.config.random_loc_seed,
                            )
                        elif key in resolution.tensors:
                            data = _replacement(opened, resolution.tensors[key], key, source.dtype(key))
                        else:
                            data = source.raw(key)
                        write_bytes(stream, data)
                        bar.update(source.nbytes(key))
                source.close()
        copied, skipped = _copy_model_files(checkpoint, temporary, exclude=out_path)
        if os.path.exists(out_path) and not overwrite:  # appeared while we were writing
            raise CheckpointError(f"--out {out_path} already exists: pass --overwrite to replace it")
    return MergeReport(
        out_path, list(checkpoint.files), len(resolution.layers), len(resolution.tensors), copied, skipped,
        resolution.prefix_note,
    )


def _replacement(adapter: Adapter, adapter_key: str, base_key: str, base_dtype: str) -> np.ndarray:
    source_dtype = adapter.file.dtype(adapter_key)
    if source_dtype == base_dtype:
        return adapter.file.raw(adapter_key)
    if source_dtype in FLOAT_DTYPES and base_dtype in FLOAT_DTYPES:
        values = adapter.file.float32(adapter_key) if source_dtype != "F64" else adapter.file.array(adapter_key)
        if base_dtype == "F64":
            return np.asarray(values, dtype=np.float64)
        return from_float32(np.asarray(values, dtype=np.float32), base_dtype)
    raise CheckpointError(
        f"tensor {adapter_key!r} is {source_dtype} in the adapter but base tensor {base_key!r} is {base_dtype}"
    )


def _check_destination(out_path: str, overwrite: bool, sources: list[PathLike]) -> None:
    for source in sources:
        source_path = os.path.abspath(os.fspath(source))
        source_dir = source_path if os.path.isdir(source_path) else os.path.dirname(source_path)
        # The destination may sit inside the model folder, but must never be, or hold, an input.
        if out_path == source_dir or source_dir.startswith(out_path + os.sep):
            raise CheckpointError(f"--out {out_path} overlaps the input {source_path}: choose a separate folder")
    if os.path.exists(out_path):
        if not os.path.isdir(out_path):
            raise CheckpointError(f"--out {out_path} exists and is not a folder")
        if not overwrite:
            raise CheckpointError(f"--out {out_path} already exists: pass --overwrite to replace it")


def _copy_model_files(checkpoint: BaseCheckpoint, destination: str, exclude: str) -> tuple[list[str], list[str]]:
    copied, skipped = [], []
    if checkpoint.model_dir is None:
        return copied, skipped
    for entry in sorted(os.listdir(checkpoint.model_dir)):
        source = os.path.join(checkpoint.model_dir, entry)
        if entry in checkpoint.files or entry.startswith(".") or os.path.abspath(source) == exclude:
            continue
        if entry.endswith(_OTHER_WEIGHTS) and entry != INDEX_NAME:
            skipped.append(entry)
        elif os.path.isdir(source):
            shutil.copytree(source, os.path.join(destination, entry))
            copied.append(entry + "/")
        elif os.path.isfile(source):
            shutil.copy2(source, os.path.join(destination, entry))
            copied.append(entry)
    return copied, skipped

