"""The folders the command line reads: PEFT adapter folders, base models' safetensors, and how they fit together.

``open_adapters``/``select_adapter`` read a PEFT adapter folder (every adapter it holds); ``open_base`` reads a
base model's safetensors (one file, or a folder with a sharded index) and its ``config.json`` model type;
``resolve`` maps an adapter's layers and tensors onto the base model's keys. Shared by the ``fourierft`` commands
(``inspect``, ``merge``, ``plot``, ``convert``). Reads headers and tensors with
``tensor_io`` (numpy only, bfloat16 included); never imports a framework. The base model's layer shapes are
not in a PEFT adapter file, so they come from the base checkpoint's safetensors headers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Union

from .config import CONFIG_NAME, FourierFTConfig
from .peft_format import DEFAULT_ADAPTER, KEY_PREFIX, SPECTRUM_NAME, WEIGHTS_NAME, AdapterFormatError, list_adapters
from .tensor_io import SafetensorsError, SafetensorsFile

PathLike = Union[str, "os.PathLike[str]"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_SPECTRUM_SUFFIX = "." + SPECTRUM_NAME
# transformers models whose projections are `Conv1D` (weight stored (in, out)); PEFT then merges ΔWᵀ.
CONV1D_LAYERS = {
    "gpt2": ("c_attn", "c_proj", "c_fc", "q_attn"),
    "openai-gpt": ("c_attn", "c_proj", "c_fc"),
    "imagegpt": ("c_attn", "c_proj", "c_fc", "q_attn"),
    "decision_transformer": ("c_attn", "c_proj", "c_fc", "q_attn"),
}


class CheckpointError(ValueError):
    """A base checkpoint or adapter that cannot be used (the message names the path, key or layer)."""


@dataclasses.dataclass(frozen=True)
class SpectrumLayer:
    """One adapted layer of an adapter file.

    Args:
        name: the layer's module path in the model PEFT wrapped (``bert.encoder.layer.0.attention.self.query``).
        key: its key in ``adapter_model.safetensors``.
        n_frequency: the number of coefficients (the spectrum's length).
    """

    name: str
    key: str
    n_frequency: int


@dataclasses.dataclass
class Adapter:
    """One PEFT FourierFT adapter opened for reading.

    Args:
        directory: the folder holding ``adapter_config.json`` and ``adapter_model.safetensors``.
        name: ``"default"`` for the folder itself, else the sub-folder's name.
        config: the parsed ``adapter_config.json``.
        file: the weights file.
        layers: the adapted layers, in file order.
        tensors: ``{model tensor name: adapter key}`` of tensors the adapter replaces outright (biases and
            ``modules_to_save``), in the wrapped model's naming (``classifier.weight``).
    """

    directory: str
    name: str
    config: FourierFTConfig
    file: SafetensorsFile
    layers: list[SpectrumLayer]
    tensors: dict[str, str]

    @property
    def spectrum_params(self) -> int:
        """Trainable coefficients over all adapted layers."""
        return sum(layer.n_frequency for layer in self.layers)

    @property
    def other_params(self) -> int:
        """Elements of the replaced tensors (biases, ``modules_to_save``)."""
        total = 0
        for key in self.tensors.values():
            count = 1
            for dim in self.file.shape(key):
                count *= dim
            total += count
        return total


def open_adapters(path: PathLike, strict: bool = True) -> list[Adapter]:
    """Every adapter of a PEFT directory: the folder's own (``"default"``) and those in sub-folders.

    Example:
        >>> import tempfile, numpy as np
        >>> from bridge import FourierFTConfig, spectrum_key, write_adapter
        >>> folder = tempfile.mkdtemp()
        >>> _ = write_adapter(folder, FourierFTConfig(n_frequency=4, target_modules=["q"]), {spectrum_key("l.q"): np.zeros(4, np.float32)})
        >>> [(a.name, [(l.name, l.n_frequency) for l in a.layers]) for a in open_adapters(folder)]
        [('default', [('l.q', 4)])]
    """
    directory = os.fspath(path)
    if not os.path.exists(directory):
        raise CheckpointError(f"{directory}: no such file or directory")
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory} is not a directory (expected a PEFT adapter folder with {CONFIG_NAME})")
    names = list_adapters(directory)
    if not names:
        raise CheckpointError(
            f"{directory} holds no {CONFIG_NAME}, neither itself nor in a sub-folder: not a PEFT adapter directory"
        )
    return [open_adapter(directory, name, strict) for name in names]


def select_adapter(path: PathLike, adapter_name: Optional[str] = None, strict: bool = True) -> Adapter:
    """The adapter ``adapter_name`` of a directory; without a name, ``"default"`` or the only one there is.

    Example:
        >>> import tempfile
        >>> select_adapter(tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        bridge._src.folders.CheckpointError: ... not a PEFT adapter directory
    """
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        open_adapters(directory)  # raises the right message
    names = list_adapters(directory)
    if adapter_name is not None:
        if adapter_name not in names:
            raise CheckpointError(
                f"{directory} has no adapter named {adapter_name!r}; it holds {names or 'no adapter'}"
            )
        return open_adapter(directory, adapter_name, strict)
    if not names:
        open_adapters(directory)
    if DEFAULT_ADAPTER in names or len(names) == 1:
        return open_adapter(directory, DEFAULT_ADAPTER if DEFAULT_ADAPTER in names else names[0], strict)
    raise CheckpointError(f"{directory} holds several adapters {names}: choose one with --adapter-name")


def open_adapter(directory: PathLike, name: str = DEFAULT_ADAPTER, strict: bool = True) -> Adapter:
    """Open adapter ``name`` of a PEFT directory and sort its keys into spectra and replaced tensors.

    Raises ``CheckpointError``/``AdapterFormatError`` on a wrong ``peft_type``, a missing or corrupt weights
    file, or (``strict``) keys that are not PEFT FourierFT keys; ``strict=False`` leaves those to
    ``peft_reader.file_problems``, which names every one.
    """
    folder = os.fspath(directory) if name == DEFAULT_ADAPTER else os.path.join(os.fspath(directory), name)
    try:
        config = FourierFTConfig.from_pretrained(folder)
    except (FileNotFoundError, ValueError, TypeError) as error:
        raise CheckpointError(str(error)) from None
    path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(path):
        extra = ""
        if os.path.isfile(os.path.join(folder, "adapter_model.bin")):
            extra = " (found adapter_model.bin; only safetensors is read: re-save with safe_serialization=True)"
        raise CheckpointError(f"{folder}: no {WEIGHTS_NAME}{extra}")
    try:
        file = SafetensorsFile(path)
    except SafetensorsError as error:
        raise CheckpointError(str(error)) from None
    layers: list[SpectrumLayer] = []
    plain: dict[str, str] = {}
    wrapped: dict[str, str] = {}
    for key in file.keys():
        if not key.startswith(KEY_PREFIX):
            if strict:
                raise AdapterFormatError(f"{path}: key {key!r} does not start with {KEY_PREFIX!r}: not a PEFT adapter file")
            continue  # peft_reader.file_problems names it
        name_in_model = key[len(KEY_PREFIX) :]
        if name_in_model.endswith(_SPECTRUM_SUFFIX):
            shape = file.shape(key)
            if len(shape) != 1 or shape[0] == 0:
                raise AdapterFormatError(f"{path}: spectrum {key!r} has shape {shape}; a spectrum is a non-empty vector")
            layers.append(SpectrumLayer(name_in_model[: -len(_SPECTRUM_SUFFIX)], key, shape[0]))
        elif ".original_module." in f".{name_in_model}":
            continue  # bias="all" saves the untouched original of a modules_to_save module too: not merged
        elif ".modules_to_save." in f".{name_in_model}":
            wrapped[name_in_model.replace("modules_to_save.", "", 1)] = key
        elif name_in_model.endswith(".base_layer.bias") or name_in_model == "base_layer.bias":
            plain[name_in_model[: -len("base_layer.bias")] + "bias"] = key
        else:
            plain[name_in_model] = key
    if not layers and strict:
        raise AdapterFormatError(f"{path} holds no {SPECTRUM_NAME} tensor: not a FourierFT adapter")
    plain.update(wrapped)  # the trained modules_to_save copy wins over any other spelling
    return Adapter(folder, name, config, file, layers, plain)


@dataclasses.dataclass
class BaseCheckpoint:
    """A base model's safetensors weights: one file or an index of shards, plus the model folder's config.

    Args:
        path: what was given (a model folder or one ``.safetensors`` file).
        model_dir: the model folder (``None`` when a single file was given).
        files: ``{shard file name: open file}`` in shard order.
        key_files: ``{tensor name: shard file name}``.
        model_type: ``model_type`` from ``config.json`` (``None`` if absent).
    """

    path: str
    model_dir: Optional[str]
    files: dict[str, SafetensorsFile]
    key_files: dict[str, str]
    model_type: Optional[str]

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of tensor ``key``."""
        return self.files[self.key_files[key]].shape(key)

    def dtype(self, key: str) -> str:
        """safetensors dtype name of tensor ``key``."""
        return self.files[self.key_files[key]].dtype(key)


def open_base(path: PathLike) -> BaseCheckpoint:
    """Open a base model: a folder with ``model.safetensors`` or a sharded index, or one ``.safetensors`` file.

    Only the headers are read.

    Example:
        >>> import tempfile, safetensors.numpy, numpy as np
        >>> folder = tempfile.mkdtemp()
        >>> safetensors.numpy.save_file({"w": np.ones((2, 3), np.float32)}, os.path.join(folder, SINGLE_NAME))
        >>> open_base(folder).shape("w")
        (2, 3)
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise CheckpointError(f"{path} is not a .safetensors file or a model folder")
        model_dir, names = None, [os.path.basename(path)]
        folder = os.path.dirname(os.path.abspath(path))
    else:
        model_dir = folder = path
        index = os.path.join(path, INDEX_NAME)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as stream:
                    weight_map = json.load(stream)["weight_map"]
                names = list(dict.fromkeys(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as error:
                raise CheckpointError(f"{index} is not a safetensors index (no readable weight_map): {error}") from None
        elif os.path.isfile(os.path.join(path, SINGLE_NAME)):
            names = [SINGLE_NAME]
        else:
            others = sorted(n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth", ".safetensors")))
            hint = f" (found {others}; convert the weights to safetensors first)" if others else ""
            raise CheckpointError(f"{path} holds neither {SINGLE_NAME} nor {INDEX_NAME}: not a model folder{hint}")
    files: dict[str, SafetensorsFile] = {}
    key_files: dict[str, str] = {}
    for name in names:
        file_path = os.path.join(folder, name)
        if not os.path.isfile(file_path):
            raise CheckpointError(f"{path}: shard {name} listed in {INDEX_NAME} is missing")
        try:
            files[name] = SafetensorsFile(file_path)
        except SafetensorsError as error:
            raise CheckpointError(str(error)) from None
        for key in files[name].keys():
            if key in key_files:
                raise CheckpointError(f"{path}: tensor {key!r} is in both {key_files[key]} and {name}")
            key_files[key] = name
    model_type = None
    config_path = os.path.join(folder, "config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as stream:
                model_type = json.load(stream).get("model_type")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            model_type = None
    return BaseCheckpoint(path, model_dir, files, key_files, model_type)


@dataclasses.dataclass(frozen=True)
class ResolvedLayer:
    """An adapted layer located in the base checkpoint.

    Args:
        name: module path in the adapter.
        key: the base checkpoint's weight key.
        out_features, in_features: torch ``nn.Linear`` layout sizes (positions live on this grid).
        conv1d: the weight is stored ``(in, out)`` (transformers ``Conv1D``); the merged delta is ``ΔWᵀ``.
        n_frequency: the spectrum's length.
        spectrum_key: the adapter key of the spectrum.
    """

    name: str
    key: str
    out_features: int
    in_features: int
    conv1d: bool
    n_frequency: int
    spectrum_key: str


@dataclasses.dataclass
class Resolution:
    """Where each part of an adapter goes in a base checkpoint."""

    layers: list[ResolvedLayer]
    tensors: dict[str, str]  # {base key: adapter key}
    prefix_note: str  # how adapter names were mapped onto the checkpoint's ("" when they matched exactly)
    rewrite: tuple[str, str] = ("", "")  # (strip, add): an adapter name minus `strip`, plus `add`, is the base's


def is_conv1d(layer_name: str, model_type: Optional[str], config: FourierFTConfig, fan_in_fan_out: Optional[bool]) -> bool:
    """Whether a layer is stored ``(in, out)``: the override, else the model type's known ``Conv1D`` layers,
    else the config's ``fan_in_fan_out`` (PEFT itself decides from the module class, which a file lacks).

    Example:
        >>> is_conv1d("h.0.attn.c_attn", "gpt2", FourierFTConfig(), None)
        True
    """
    if fan_in_fan_out is not None:
        return fan_in_fan_out
    if model_type in CONV1D_LAYERS:
        return layer_name.rsplit(".", 1)[-1] in CONV1D_LAYERS[model_type]
    return bool(config.fan_in_fan_out)


def _name_maps(adapter_names: list[str], base_keys: set[str]) -> list[tuple[str, str]]:
    """Candidate ``(strip, add)`` prefix rewrites that carry the first unmatched adapter name onto a base key."""
    candidates = [("", "")]
    missing = next((name for name in adapter_names if name not in base_keys), None)
    if missing is None:
        return candidates
    parts = missing.split(".")
    for cut in range(1, len(parts)):
        stripped = ".".join(parts[:cut]) + "."
        rest = ".".join(parts[cut:])
        if rest in base_keys:
            candidates.append((stripped, ""))
        for key in base_keys:  # both: e.g. `model.` → `transformer.`
            if key.endswith("." + rest) and key != rest:
                candidates.append((stripped, key[: -len(rest)]))
    for key in base_keys:
        if key.endswith("." + missing):
            candidates.append(("", key[: -len(missing)]))
    return list(dict.fromkeys(candidates))


def _apply(name: str, rewrite: tuple[str, str]) -> Optional[str]:
    strip, add = rewrite
    if not name.startswith(strip):
        return None
    return add + name[len(strip) :]


def resolve(adapter: Adapter, base: BaseCheckpoint, fan_in_fan_out: Optional[bool] = None) -> Resolution:
    """Locate every adapted layer and replaced tensor of ``adapter`` in ``base`` and check that it fits.

    Names match exactly when they can; otherwise one prefix rewrite must carry *every* name onto the checkpoint
    (an adapter made on ``BertForSequenceClassification`` — ``bert.encoder…`` — onto a bare ``BertModel``
    checkpoint — ``encoder…`` — or the reverse). Raises ``CheckpointError`` listing every layer or tensor that
    has no place or whose shape does not fit (with both shapes).
    """
    wanted = [layer.name + ".weight" for layer in adapter.layers] + list(adapter.tensors)
    keys = set(base.key_files)
    best, best_missing = ("", ""), None
    for rewrite in _name_maps(wanted, keys):
        missing = [name for name in wanted if _apply(name, rewrite) not in keys]
        if best_missing is None or len(missing) < len(best_missing):
            best, best_missing = rewrite, missing
        if not missing:
            break
    if best_missing:
        shown = ", ".join(repr(name) for name in best_missing[:20])
        more = f" (and {len(best_missing) - 20} more)" if len(best_missing) > 20 else ""
        note = f" after mapping {best[0] or '<no prefix>'!r} -> {best[1] or '<no prefix>'!r}" if best != ("", "") else ""
        raise CheckpointError(
            f"adapter {adapter.directory} does not fit the base model {base.path}: "
            f"{len(best_missing)} tensor(s) have no match in the checkpoint{note}: {shown}{more}"
        )
    problems: list[str] = []
    layers: list[ResolvedLayer] = []
    for layer in adapter.layers:
        key = _apply(layer.name + ".weight", best)
        shape = base.shape(key)
        conv1d = is_conv1d(layer.name, base.model_type, adapter.config, fan_in_fan_out)
        if len(shape) != 2:
            problems.append(f"layer {layer.name!r}: base tensor {key!r} has shape {shape}, not a 2-D weight")
            continue
        if base.dtype(key) not in ("F32", "F16", "BF16", "F64"):
            problems.append(f"layer {layer.name!r}: base tensor {key!r} is {base.dtype(key)}, not a float weight")
            continue
        out_features, in_features = (shape[1], shape[0]) if conv1d else shape
        if layer.n_frequency > out_features * in_features:
            problems.append(
                f"layer {layer.name!r}: spectrum {layer.key!r} has shape ({layer.n_frequency},) but base tensor "
                f"{key!r} has shape {shape}, room for at most {out_features * in_features} coefficients"
            )
            continue
        layers.append(ResolvedLayer(layer.name, key, out_features, in_features, conv1d, layer.n_frequency, layer.key))
    tensors: dict[str, str] = {}
    for name, adapter_key in adapter.tensors.items():
        key = _apply(name, best)
        if adapter.file.shape(adapter_key) != base.shape(key):
            problems.append(
                f"tensor {adapter_key!r} has shape {adapter.file.shape(adapter_key)} in the adapter but base tensor "
                f"{key!r} has shape {base.shape(key)}"
            )
        tensors[key] = adapter_key
    if problems:
        raise CheckpointError(f"adapter {adapter.directory} does not fit the base model {base.path}: " + "; ".join(problems))
    note = "" if best == ("", "") else f"adapter names {best[0] or '<root>'!r}... mapped to {best[1] or '<root>'!r}..."
    return Resolution(layers, tensors, note, best)
