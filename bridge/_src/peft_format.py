"""PEFT's on-disk FourierFT format, framework-neutral: file names, key names, layout, validation, atomic writes.

A PEFT FourierFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (metadata
``{"format": "pt"}``). The ``"default"`` adapter lives in the directory itself, any other adapter ``name`` in
``<directory>/<name>/``. Keys are PEFT's state-dict names with ``base_model.model.`` in front and the adapter
name removed:

* ``base_model.model.<layer>.fourierft_spectrum`` -- shape ``(n_frequency,)``, one per adapted layer;
* ``bias="fourier_only"``: ``<layer>.base_layer.bias`` of adapted layers; ``bias="all"``: every ``*.bias`` of the
  model, adapted layers as ``<layer>.base_layer.bias`` and, inside a ``modules_to_save`` module ``M``, both
  ``M.original_module.<rest>`` and ``M.modules_to_save.<rest>`` (PEFT 0.21 saves both wrapper copies);
* ``modules_to_save`` module ``M``: ``base_model.model.M.<rest>`` for every entry of its state dict.

Only numpy and ``safetensors.numpy`` are used, so the JAX package and converters share this code; a torch caller
can serialize its own tensors (bf16) inside ``bridge._src.atomic.atomic_directory(..., merge=True)`` with the key
names computed here.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from .atomic import atomic_directory, give_normal_mode
from .config import CONFIG_NAME, FourierFTConfig
from .targets import TargetLayer

WEIGHTS_NAME = "adapter_model.safetensors"
SAFETENSORS_METADATA = {"format": "pt"}
KEY_PREFIX = "base_model.model."
SPECTRUM_NAME = "fourierft_spectrum"
DEFAULT_ADAPTER = "default"

# What a key holds; a framework maps each kind to where the tensor lives in its model.
SPECTRUM = "spectrum"  # the layer's trainable coefficients
BIAS = "bias"  # a bias of the base model (of an adapted layer, or any module with bias="all")
MODULE = "module"  # a tensor of the adapter's trained copy of a modules_to_save module
ORIGINAL = "original"  # a tensor of the untouched original of a modules_to_save module (bias="all" only)

PathLike = Union[str, "os.PathLike[str]"]


@dataclasses.dataclass(frozen=True)
class AdapterKey:
    """One tensor of an adapter file.

    Args:
        key: the key in ``adapter_model.safetensors``.
        kind: ``"spectrum"``, ``"bias"``, ``"module"`` or ``"original"``.
        module: dotted name of the module in the base model (the layer, or the ``modules_to_save`` module).
        param: the tensor's name relative to ``module`` (``"fourierft_spectrum"``, ``"bias"``, ``"0.weight"``).
        shape: the shape the tensor must have.

    Example:
        >>> AdapterKey(spectrum_key("lin0"), SPECTRUM, "lin0", SPECTRUM_NAME, (5,)).key
        'base_model.model.lin0.fourierft_spectrum'
    """

    key: str
    kind: str
    module: str
    param: str
    shape: tuple[int, ...]


class AdapterFormatError(ValueError):
    """An adapter directory or its tensors do not fit the model (the message names the key and shapes)."""


def spectrum_key(layer_name: str) -> str:
    """The safetensors key of a layer's spectrum.

    Example:
        >>> spectrum_key("h.0.mlp.c_proj")
        'base_model.model.h.0.mlp.c_proj.fourierft_spectrum'
    """
    return f"{KEY_PREFIX}{layer_name}.{SPECTRUM_NAME}"


def adapter_directory(save_directory: PathLike, adapter_name: str = DEFAULT_ADAPTER) -> str:
    """Where PEFT keeps adapter ``adapter_name`` of a directory: itself for ``"default"``, else a sub-folder.

    Example:
        >>> adapter_directory("out", "other")
        'out/other'
    """
    save_directory = os.fspath(save_directory)
    return save_directory if adapter_name == DEFAULT_ADAPTER else os.path.join(save_directory, adapter_name)


def modules_to_save_names(config: FourierFTConfig, module_names: Sequence[str]) -> list[str]:
    """The modules a config's ``modules_to_save`` picks, PEFT's rule: the full name ends with an entry.

    A module inside one already picked is not picked again (it is saved as part of its parent).

    Example:
        >>> modules_to_save_names(FourierFTConfig(modules_to_save=["classifier"]), ["bert", "classifier"])
        ['classifier']
    """
    entries = config.modules_to_save or []
    picked: list[str] = []
    for name in module_names:
        if not name or not any(name.endswith(entry) for entry in entries):
            continue
        if any(name.startswith(parent + ".") for parent in picked):
            continue
        picked.append(name)
    return picked


def adapter_keys(
    config: FourierFTConfig,
    targets: Sequence[TargetLayer],
    state_shapes: Mapping[str, Sequence[int]],
    modules_to_save: Sequence[str] = (),
    adapted_layers: Optional[Sequence[str]] = None,
) -> list[AdapterKey]:
    """Every key PEFT 0.21 writes for one adapter, with its shape, in file order (sorted by key).

    Args:
        config: the adapter's config (``bias`` decides which biases are saved).
        targets: the adapted layers, from ``select_targets``.
        state_shapes: the base model's state dict as ``{name: shape}``, in the base model's own naming
            (``lin0.bias``, not ``lin0.base_layer.bias``).
        modules_to_save: the modules trained in full for this adapter (``modules_to_save_names``).
        adapted_layers: every layer wrapped by *any* adapter of the model (default: ``targets``). PEFT names the
            bias of each of them ``<layer>.base_layer.bias`` and, with ``bias="fourier_only"``, saves all of them.

    Example:
        >>> layers = [TargetLayer("lin0", "linear", 20, 10, 5)]
        >>> [k.key for k in adapter_keys(FourierFTConfig(bias="fourier_only"), layers, {"lin0.bias": (20,)})]
        ['base_model.model.lin0.base_layer.bias', 'base_model.model.lin0.fourierft_spectrum']
    """
    keys: dict[str, AdapterKey] = {}

    def add(key: AdapterKey) -> None:
        keys.setdefault(key.key, key)

    def shape_of(name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in state_shapes[name])

    layer_names = {layer.name for layer in targets} | set(adapted_layers or ())
    for layer in targets:
        add(AdapterKey(spectrum_key(layer.name), SPECTRUM, layer.name, SPECTRUM_NAME, (layer.n_frequency,)))

    def owner(name: str) -> Optional[str]:
        return next((m for m in modules_to_save if name.startswith(m + ".")), None)

    for module in modules_to_save:
        for name in state_shapes:
            if name.startswith(module + "."):
                rest = name[len(module) + 1 :]
                add(AdapterKey(f"{KEY_PREFIX}{name}", MODULE, module, rest, shape_of(name)))

    if config.bias != "none":
        for name in state_shapes:
            if not (name == "bias" or name.endswith(".bias")):
                continue
            module_name = name[: -len(".bias")] if name != "bias" else ""
            if module_name in layer_names:
                prefix = f"{module_name}." if module_name else ""
                add(AdapterKey(f"{KEY_PREFIX}{prefix}base_layer.bias", BIAS, module_name, "bias", shape_of(name)))
            elif config.bias == "all":
                parent = owner(name)
                if parent is None:
                    add(AdapterKey(f"{KEY_PREFIX}{name}", BIAS, module_name, "bias", shape_of(name)))
                else:
                    rest = name[len(parent) + 1 :]
                    shape = shape_of(name)
                    add(AdapterKey(f"{KEY_PREFIX}{parent}.original_module.{rest}", ORIGINAL, parent, rest, shape))
                    add(AdapterKey(f"{KEY_PREFIX}{parent}.modules_to_save.{rest}", MODULE, parent, rest, shape))
    return [keys[key] for key in sorted(keys)]


def rename_bias_aliases(expected: Sequence[AdapterKey], found: Sequence[str]) -> dict[str, str]:
    """``{file key: expected key}`` for biases a file spells ``<layer>.base_layer.bias`` where the model expects
    ``<layer>.bias`` (or the reverse): PEFT's spelling depends on which layers other adapters wrapped when saving.

    Example:
        >>> key = AdapterKey("base_model.model.lin1.bias", BIAS, "lin1", "bias", (2,))
        >>> rename_bias_aliases([key], ["base_model.model.lin1.base_layer.bias"])
        {'base_model.model.lin1.base_layer.bias': 'base_model.model.lin1.bias'}
    """
    wanted = {key.key for key in expected if key.kind == BIAS}
    present = set(found)
    renames = {}
    for key in wanted - present:
        if key.endswith(".base_layer.bias"):
            alias = key[: -len(".base_layer.bias")] + ".bias"
        else:
            alias = key[: -len(".bias")] + ".base_layer.bias"
        if alias in present and alias not in wanted:
            renames[alias] = key
    return renames


def adapter_shape_problems(expected: Sequence[AdapterKey], found: Mapping[str, Sequence[int]]) -> list[str]:
    """Every missing, unexpected and wrong-shaped key of ``found`` against ``expected``, one sentence each.

    Example:
        >>> key = AdapterKey(spectrum_key("lin0"), SPECTRUM, "lin0", SPECTRUM_NAME, (5,))
        >>> adapter_shape_problems([key], {spectrum_key("lin1"): (5,)})  # doctest: +NORMALIZE_WHITESPACE
        ["layer 'lin0' is targeted by the config but its key 'base_model.model.lin0.fourierft_spectrum' (shape (5,))
        is missing from the file",
         "key 'base_model.model.lin1.fourierft_spectrum' (shape (5,)) is in the file but the config does not target
         layer 'lin1' on this model"]
    """
    wanted = {key.key: key for key in expected}
    have = {key: tuple(int(d) for d in shape) for key, shape in found.items()}
    problems = []
    for key in sorted(set(wanted) - set(have)):
        entry = wanted[key]
        if entry.kind == SPECTRUM:
            problems.append(f"layer {entry.module!r} is targeted by the config but its key {key!r} (shape "
                            f"{tuple(entry.shape)}) is missing from the file")
        else:
            problems.append(f"key {key!r} (shape {tuple(entry.shape)}) is missing from the file")
    for key in sorted(set(have) - set(wanted)):
        if key.endswith("." + SPECTRUM_NAME) and key.startswith(KEY_PREFIX):
            layer = key[len(KEY_PREFIX) : -len(SPECTRUM_NAME) - 1]
            problems.append(f"key {key!r} (shape {have[key]}) is in the file but the config does not target layer "
                            f"{layer!r} on this model")
        else:
            problems.append(f"key {key!r} (shape {have[key]}) is in the file but the model has no place for it")
    for key in sorted(set(wanted) & set(have)):
        if tuple(wanted[key].shape) != have[key]:
            problems.append(f"key {key!r} has shape {have[key]} in the file but the model needs "
                            f"{tuple(wanted[key].shape)}")
    return problems


def check_adapter_shapes(
    expected: Sequence[AdapterKey], found: Mapping[str, Sequence[int]], source: str = "adapter"
) -> None:
    """Raise ``AdapterFormatError`` unless ``found`` has exactly the expected keys with the expected shapes.

    The message lists every missing, unexpected and wrong-shaped key (with both shapes).

    Example:
        >>> key = AdapterKey(spectrum_key("lin0"), SPECTRUM, "lin0", SPECTRUM_NAME, (5,))
        >>> check_adapter_shapes([key], {key.key: (5,)})
        >>> check_adapter_shapes([key], {key.key: (4,)})
        Traceback (most recent call last):
        ...
        bridge._src.peft_format.AdapterFormatError: adapter does not fit the model: key 'base_model.model.lin0.fourierft_spectrum' has shape (4,) in the file but the model needs (5,)
    """
    problems = adapter_shape_problems(expected, found)
    if problems:
        raise AdapterFormatError(f"{source} does not fit the model: " + "; ".join(problems))


def weights_path(directory: PathLike) -> str:
    """The safetensors file of an adapter directory (error if absent).

    Example:
        >>> import tempfile
        >>> weights_path(tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        FileNotFoundError: ...
    """
    path = os.path.join(os.fspath(directory), WEIGHTS_NAME)
    if not os.path.isfile(path):
        extra = ""
        if os.path.isfile(os.path.join(os.fspath(directory), "adapter_model.bin")):
            extra = " (found adapter_model.bin; only the safetensors format is read -- re-save it with PEFT)"
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}{extra}")
    return path


def read_shapes(path: PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """``({key: shape}, {key: dtype name})`` from a safetensors file's header, without reading the tensors.

    A truncated or corrupt file raises ``AdapterFormatError`` naming the file.

    Example:
        >>> import tempfile, safetensors.numpy
        >>> path = os.path.join(tempfile.mkdtemp(), WEIGHTS_NAME)
        >>> safetensors.numpy.save_file({"a": np.zeros(3, np.float32)}, path)
        >>> read_shapes(path)
        ({'a': (3,)}, {'a': 'F32'})
    """
    from .tensor_io import SafetensorsError, SafetensorsFile

    path = os.fspath(path)
    try:
        file = SafetensorsFile(path)  # checks the header length, every offset and size against the file
    except SafetensorsError as error:
        raise AdapterFormatError(str(error)) from None
    shapes = {key: file.shape(key) for key in file.keys()}
    dtypes = {key: file.dtype(key) for key in file.keys()}
    return shapes, dtypes


def read_adapter(
    directory: PathLike, targets: Optional[Sequence[AdapterKey]] = None
) -> tuple[FourierFTConfig, dict[str, np.ndarray]]:
    """Read an adapter directory into its config and ``{key: numpy array}``.

    The folder is checked by ``peft_reader.check_folder`` (config, file, spectrum lengths, targeted names); with
    ``targets`` (from ``adapter_keys``) the keys and shapes are checked too (``check_adapter_shapes``).
    bfloat16 tensors are not representable in numpy: read those with a framework's safetensors loader.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> config = FourierFTConfig(n_frequency=2, target_modules=["lin0"])
        >>> _ = write_adapter(folder, config, {spectrum_key("lin0"): np.ones(2, np.float32)})
        >>> read_adapter(folder)[1][spectrum_key("lin0")].tolist()
        [1.0, 1.0]
    """
    from safetensors.numpy import load_file

    from .peft_reader import check_folder

    config, path = check_folder(directory)  # the strict reader: config, file, every key against the config
    shapes, _ = read_shapes(path)
    if targets is not None:
        check_adapter_shapes(targets, shapes, source=path)
    try:
        arrays = load_file(path)
    except Exception as error:
        raise AdapterFormatError(f"{path}: cannot read the tensors (truncated or corrupt?): {error}") from None
    return config, arrays


def config_for_saving(config: FourierFTConfig) -> FourierFTConfig:
    """The config as PEFT writes it: a copy with ``inference_mode=True``.

    Example:
        >>> config_for_saving(FourierFTConfig()).inference_mode
        True
    """
    return dataclasses.replace(config, inference_mode=True)


def write_adapter(
    directory: PathLike,
    config: FourierFTConfig,
    arrays: Mapping[str, np.ndarray],
    adapter_name: str = DEFAULT_ADAPTER,
) -> str:
    """Write one adapter (numpy tensors) in PEFT's layout, atomically; return the adapter's folder.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> config = FourierFTConfig(n_frequency=2, target_modules=["lin0"])
        >>> path = write_adapter(folder, config, {spectrum_key("lin0"): np.zeros(2, np.float32)}, "other")
        >>> sorted(os.listdir(path))
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    target = adapter_directory(directory, adapter_name)
    with atomic_directory(target, merge=True) as temporary:  # the folder may hold other adapters
        save_tensors({key: np.ascontiguousarray(value) for key, value in arrays.items()},
                     os.path.join(temporary, WEIGHTS_NAME))
        config_for_saving(config).save_pretrained(temporary)
    return target


def save_tensors(arrays: Mapping[str, np.ndarray], path: PathLike) -> None:
    """Write numpy arrays as a PEFT safetensors file; ``ml_dtypes.bfloat16`` arrays (what ``np.asarray`` of a
    JAX bfloat16 array gives) are stored as BF16, which ``safetensors.numpy`` cannot write.

    Example:
        >>> import tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), WEIGHTS_NAME)
        >>> save_tensors({"a": np.zeros(2, np.float32)}, path)
        >>> read_shapes(path)[0]
        {'a': (2,)}
    """
    if not any(value.dtype.name == "bfloat16" for value in arrays.values()):
        from safetensors.numpy import save_file

        save_file(dict(arrays), os.fspath(path), metadata=dict(SAFETENSORS_METADATA))
        give_normal_mode(path)  # safetensors creates the file 0600
        return
    from .tensor_io import header_bytes, write_bytes

    names = {"bfloat16": "BF16", "float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64",
             "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
    entries, offset = {}, 0
    for key in sorted(arrays):
        value = arrays[key]
        if value.dtype.name not in names:
            raise AdapterFormatError(f"tensor {key!r} has dtype {value.dtype}, which safetensors cannot hold")
        entries[key] = {"dtype": names[value.dtype.name], "shape": list(value.shape),
                        "data_offsets": [offset, offset + value.nbytes]}
        offset += value.nbytes
    with open(os.fspath(path), "wb") as stream:
        stream.write(header_bytes(entries, SAFETENSORS_METADATA))
        for key in sorted(arrays):
            write_bytes(stream, arrays[key])


def list_adapters(directory: PathLike) -> list[str]:
    """Names of the adapters saved in a directory: ``"default"`` if it holds one, plus every adapter sub-folder.

    Example:
        >>> import tempfile
        >>> list_adapters(tempfile.mkdtemp())
        []
    """
    directory = os.fspath(directory)
    names = [DEFAULT_ADAPTER] if os.path.isfile(os.path.join(directory, CONFIG_NAME)) else []
    if os.path.isdir(directory):
        for entry in sorted(os.listdir(directory)):
            if os.path.isfile(os.path.join(directory, entry, CONFIG_NAME)) and re.fullmatch(r"[^.].*", entry):
                names.append(entry)
    return names
