"""The one strict reader of PEFT FourierFT adapter folders, shared by the CLI, ``fourierft_jax`` and ``fourierft_torch``.

PEFT refuses an adapter whose file disagrees with its config; so does every reader of this project, through here:

* the config: JSON, ``peft_type == "FOURIERFT"``, field types and values (``FourierFTConfig.validate``);
* the weights: ``adapter_model.safetensors`` only (``adapter_model.bin`` is a pickle and is never opened), a
  header that fits the file and offsets that fit the data (``tensor_io``);
* every key of the file on its own (``file_problems``): a PEFT key, a float tensor, a spectrum as long as the
  ``n_frequency`` (or ``n_frequency_pattern`` entry) the config gives its layer, on a layer the config's names
  target, biases only when ``bias`` saves them, other tensors only inside a ``modules_to_save`` module;
* with a base model (``base_problems``): the exact key set PEFT writes for that base (``select_targets``,
  ``adapter_keys``), so a key for a layer the config does not target there, or a targeted layer without its key,
  is named with the expected and the found shape;
* NaN/inf (``nonfinite_keys``): refused by merges and loaders, carried (with a warning) by conversions.

Every problem is one sentence naming the file, the key and what was expected and found; a reader raises one
``AdapterFormatError`` listing all of them, ``fourierft inspect`` prints them.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from .config import CONFIG_NAME, FourierFTConfig
from .folders import Adapter, BaseCheckpoint, CheckpointError, Resolution, is_conv1d, open_adapter, resolve, select_adapter
from .peft_format import (
    DEFAULT_ADAPTER,
    KEY_PREFIX,
    SPECTRUM_NAME,
    WEIGHTS_NAME,
    AdapterFormatError,
    AdapterKey,
    adapter_directory,
    adapter_keys,
    adapter_shape_problems,
    modules_to_save_names,
    rename_bias_aliases,
)
from .targets import ALL_LINEAR, CONV1D, LINEAR, ModuleInfo, is_targeted, select_targets, task_modules_to_save
from .tensor_io import FLOAT_DTYPES

PathLike = Union[str, "os.PathLike[str]"]
PICKLE_NAME = "adapter_model.bin"
_SPECTRUM_SUFFIX = "." + SPECTRUM_NAME
# 2-D weights that are not linear layers: PEFT's FourierFT never adapts them (nor does "all-linear").
_EMBEDDING_HINTS = ("embed", "wte", "wpe", "shared")


def recover(path: PathLike) -> None:
    """Put back a folder (and its adapter sub-folders) a killed writer left between two renames."""
    from .atomic import recover_directory

    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(os.path.dirname(path)):
        recover_directory(path, children=True)


def refuse_pickle(folder: PathLike) -> None:
    """Raise ``AdapterFormatError`` when a folder holds only ``adapter_model.bin`` (a pickle, never unpickled here).

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> _ = open(os.path.join(folder, PICKLE_NAME), "wb").write(b"")
        >>> refuse_pickle(folder)
        Traceback (most recent call last):
        ...
        bridge._src.peft_format.AdapterFormatError: ... adapter_model.bin ... never unpickled ...
    """
    folder = os.fspath(folder)
    if not os.path.isfile(os.path.join(folder, WEIGHTS_NAME)) and os.path.isfile(os.path.join(folder, PICKLE_NAME)):
        raise AdapterFormatError(
            f"{folder}: holds {PICKLE_NAME} (a pickle, which can run code when loaded: it is never unpickled here) "
            f"but no {WEIGHTS_NAME}; re-save the adapter with PEFT's save_pretrained(safe_serialization=True)"
        )


def file_problems(adapter: Adapter) -> list[str]:
    """Every way the keys of an adapter's file disagree with its own config (no base model needed).

    Example:
        >>> import tempfile
        >>> from bridge import spectrum_key, write_adapter
        >>> folder = tempfile.mkdtemp()
        >>> _ = write_adapter(folder, FourierFTConfig(n_frequency=3, target_modules=["q"]),
        ...                   {spectrum_key("l.q"): np.zeros(2, np.float32)})
        >>> file_problems(open_adapter(folder))  # doctest: +ELLIPSIS
        ["...: key 'base_model.model.l.q.fourierft_spectrum' has shape (2,) but adapter_config.json gives layer 'l.q' n_frequency 3, so it must be (3,)"]
    """
    config, file = adapter.config, adapter.file
    path = file.path
    problems: list[str] = []
    modules = _modules_to_save_config(config)
    names_checked = config.target_modules is not None and not (
        isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR
    )
    module_keys = [key[len(KEY_PREFIX):] for key in file.keys() if key.startswith(KEY_PREFIX)]
    prefixes = sorted({".".join(name.split(".")[:i]) for name in module_keys for i in range(1, name.count(".") + 1)})
    saved = modules_to_save_names(modules, prefixes)
    for key in file.keys():
        dtype = file.dtype(key)
        if not key.startswith(KEY_PREFIX):
            problems.append(f"{path}: key {key!r} does not start with {KEY_PREFIX!r}: not a PEFT adapter key")
            continue
        name = key[len(KEY_PREFIX):]
        owner = next((m for m in saved if name.startswith(m + ".")), None)
        if name.endswith(_SPECTRUM_SUFFIX):
            layer = name[: -len(_SPECTRUM_SUFFIX)]
            shape = file.shape(key)
            want = config.n_frequency_for(layer)
            if dtype not in FLOAT_DTYPES:
                problems.append(f"{path}: key {key!r} is {dtype}, but a spectrum is a float tensor (F32, F16, BF16, F64)")
            if shape != (want,):
                problems.append(f"{path}: key {key!r} has shape {shape} but {CONFIG_NAME} gives layer {layer!r} "
                                f"n_frequency {want}, so it must be ({want},)")
            if names_checked and not is_targeted(config, layer):
                problems.append(f"{path}: key {key!r} is for layer {layer!r}, which {CONFIG_NAME} does not target "
                                f"(target_modules={config.target_modules!r}"
                                + (f", exclude_modules={config.exclude_modules!r}" if config.exclude_modules else "")
                                + (f", layers_to_transform={config.layers_to_transform!r}"
                                   if config.layers_to_transform is not None else "") + ")")
        elif owner is not None:
            continue  # a modules_to_save tensor: any dtype (a module may hold integer buffers)
        elif name == "bias" or name.endswith(".bias"):
            if config.bias == "none":
                problems.append(f"{path}: key {key!r} is a bias, but {CONFIG_NAME} says bias='none' (no bias is saved)")
            elif dtype not in FLOAT_DTYPES:
                problems.append(f"{path}: key {key!r} is {dtype}, but a bias is a float tensor")
        else:
            problems.append(f"{path}: key {key!r} is neither a spectrum, a bias nor part of a modules_to_save module "
                            f"of {CONFIG_NAME} (modules_to_save={config.modules_to_save!r})")
    if not any(key.endswith(_SPECTRUM_SUFFIX) for key in file.keys()):
        problems.append(f"{path} holds no {SPECTRUM_NAME} tensor: not a FourierFT adapter")
    return problems


def _modules_to_save_config(config: FourierFTConfig) -> FourierFTConfig:
    entries = list(config.modules_to_save or [])
    entries += [name for name in task_modules_to_save(config) if name not in entries]
    return dataclasses.replace(config, modules_to_save=entries or None)


def base_modules(adapter: Adapter, base: BaseCheckpoint, resolution: Resolution,
                 fan_in_fan_out: Optional[bool] = None) -> tuple[list[ModuleInfo], dict[str, tuple[int, ...]]]:
    """The base model as ``select_targets`` sees it, in the adapter's naming: ``(modules, {tensor: shape})``.

    Every 2-D float ``<module>.weight`` is a linear layer (``Conv1D`` where ``is_conv1d`` says so) unless its
    name says embedding; other tensors only make up the state dict.
    """
    strip, add = resolution.rewrite
    shapes: dict[str, tuple[int, ...]] = {}
    for key in base.key_files:
        if not key.startswith(add):
            continue
        shapes[strip + key[len(add):]] = tuple(base.shape(key))
    modules: list[ModuleInfo] = []
    for name, shape in shapes.items():
        if not name.endswith(".weight"):
            continue
        module = name[: -len(".weight")]
        last = module.rsplit(".", 1)[-1].lower()
        base_key = add + name[len(strip):]
        if len(shape) != 2 or base.dtype(base_key) not in FLOAT_DTYPES or any(h in last for h in _EMBEDDING_HINTS):
            modules.append(ModuleInfo(module, "other"))
        elif is_conv1d(module, base.model_type, adapter.config, fan_in_fan_out):
            modules.append(ModuleInfo(module, CONV1D, (shape[1], shape[0])))
        else:
            modules.append(ModuleInfo(module, LINEAR, (shape[0], shape[1])))
    return modules, shapes


def expected_keys(adapter: Adapter, modules: Sequence[ModuleInfo], shapes: Mapping[str, Sequence[int]],
                  model_type: Optional[str] = None) -> list[AdapterKey]:
    """The keys PEFT writes for this adapter's config on a model of ``modules`` and state ``shapes``.

    Raises ``AdapterFormatError`` when the config targets nothing there (or something FourierFT cannot adapt).
    """
    config = _modules_to_save_config(adapter.config)
    output = next((m.name for m in modules if m.name == "lm_head" or m.name.endswith(".lm_head")), None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fan_in_fan_out notes are for building an adapter, not reading one
            targets = select_targets(config, modules, model_type=model_type, output_layer=output)
    except (ValueError, TypeError) as error:
        raise AdapterFormatError(f"{adapter.directory}: {error}") from None
    names = sorted({prefix for name in shapes for prefix in _prefixes(name)})
    saved = modules_to_save_names(config, names)
    file_keys = list(adapter.file.keys())
    # PEFT saves, with bias="fourier_only", the biases of the layers any adapter of the model wrapped.
    wrapped = {k[len(KEY_PREFIX):-len(".base_layer.bias")] for k in file_keys if k.endswith(".base_layer.bias")}
    adapted = sorted({t.name for t in targets} | {m.name for m in modules if m.name in wrapped})
    return adapter_keys(config, targets, shapes, saved, adapted_layers=adapted)


def _prefixes(name: str) -> Iterable[str]:
    parts = name.split(".")
    return (".".join(parts[:i]) for i in range(1, len(parts)))


def key_problems(adapter: Adapter, expected: Sequence[AdapterKey]) -> list[str]:
    """Missing, unexpected and wrong-shaped keys of the file against ``expected`` (bias spellings tolerated)."""
    found = {key: adapter.file.shape(key) for key in adapter.file.keys()}
    renames = rename_bias_aliases(expected, list(found))
    found = {renames.get(key, key): shape for key, shape in found.items()}
    return [f"{adapter.file.path}: {problem}" for problem in adapter_shape_problems(expected, found)]


def base_problems(adapter: Adapter, base: BaseCheckpoint,
                  fan_in_fan_out: Optional[bool] = None) -> tuple[list[str], Optional[Resolution]]:
    """Every way an adapter disagrees with a base model, and where its parts go there (``None`` if they do not).

    The keys must be exactly those PEFT writes for the config on that base: every targeted layer has its
    spectrum, no spectrum is for a layer the config does not target.
    """
    try:
        resolution = resolve(adapter, base, fan_in_fan_out)
    except CheckpointError as error:
        return [str(error)], None
    modules, shapes = base_modules(adapter, base, resolution, fan_in_fan_out)
    try:
        expected = expected_keys(adapter, modules, shapes, base.model_type)
    except AdapterFormatError as error:
        return [f"{error} (on the base model {base.path})"], resolution
    return key_problems(adapter, expected), resolution


def nonfinite_keys(adapter: Adapter, keys: Optional[Iterable[str]] = None) -> list[str]:
    """The float tensors of an adapter's file (all, or ``keys``) holding NaN or inf.

    Example:
        >>> import tempfile
        >>> from bridge import spectrum_key, write_adapter
        >>> folder = tempfile.mkdtemp()
        >>> _ = write_adapter(folder, FourierFTConfig(n_frequency=2, target_modules=["q"]),
        ...                   {spectrum_key("q"): np.array([1.0, np.inf], np.float32)})
        >>> nonfinite_keys(open_adapter(folder))
        ['base_model.model.q.fourierft_spectrum']
    """
    file = adapter.file
    bad = []
    for key in (file.keys() if keys is None else keys):
        if file.dtype(key) in FLOAT_DTYPES and not np.isfinite(file.float32(key)).all():
            bad.append(key)
    return bad


def raise_problems(problems: Sequence[str]) -> None:
    """Raise one ``AdapterFormatError`` listing ``problems`` (nothing when there are none)."""
    if problems:
        count = f"{len(problems)} problems: " if len(problems) > 1 else ""
        raise AdapterFormatError(count + "; ".join(problems))


def open_strict(
    path: PathLike,
    adapter_name: Optional[str] = None,
    *,
    base: Optional[BaseCheckpoint] = None,
    fan_in_fan_out: Optional[bool] = None,
    finite: bool = False,
) -> tuple[Adapter, Optional[Resolution]]:
    """Open adapter ``adapter_name`` of a PEFT folder (default: ``"default"`` or the only one) and check it.

    Args:
        path: the PEFT adapter folder.
        adapter_name: which adapter of a folder holding several.
        base: the base model (``folders.open_base``): the keys must then be exactly those PEFT writes for it.
        fan_in_fan_out: as in ``fourierft merge`` (``None``: from the model type and the config).
        finite: refuse NaN/inf in any float tensor (merges and loaders do; conversions carry them).

    Returns ``(adapter, resolution)``; ``resolution`` (where each part goes in ``base``) is ``None`` without base.
    Raises ``AdapterFormatError`` (or ``CheckpointError`` for a folder that is no adapter) naming every problem.

    Example:
        >>> import tempfile
        >>> from bridge import spectrum_key, write_adapter
        >>> folder = tempfile.mkdtemp()
        >>> _ = write_adapter(folder, FourierFTConfig(n_frequency=2, target_modules=["q"]),
        ...                   {spectrum_key("q"): np.zeros(2, np.float32), spectrum_key("k"): np.zeros(2, np.float32)})
        >>> open_strict(folder)
        Traceback (most recent call last):
        ...
        bridge._src.peft_format.AdapterFormatError: ... key 'base_model.model.k.fourierft_spectrum' is for layer 'k', which adapter_config.json does not target (target_modules=['q'])
    """
    recover(path)
    refuse_pickle(adapter_directory(path, adapter_name or DEFAULT_ADAPTER))
    adapter = select_adapter(path, adapter_name, strict=False)
    problems = file_problems(adapter)
    resolution = None
    if base is not None and not problems:
        more, resolution = base_problems(adapter, base, fan_in_fan_out)
        problems += more
    if finite and not problems:
        bad = nonfinite_keys(adapter)
        if bad:
            problems.append(f"{adapter.file.path}: NaN or inf values in {', '.join(repr(k) for k in bad)}")
    raise_problems(problems)
    return adapter, resolution


def check_folder(path: PathLike, adapter_name: str = "default") -> tuple[FourierFTConfig, str]:
    """Check a PEFT adapter folder on its own (config, weights file, every key against the config) and return
    ``(config, weights path)``: the framework loaders call this before matching the keys to their model.

    Example:
        >>> import tempfile
        >>> from bridge import spectrum_key, write_adapter
        >>> folder = tempfile.mkdtemp()
        >>> _ = write_adapter(folder, FourierFTConfig(n_frequency=2, target_modules=["q"]),
        ...                   {spectrum_key("q"): np.zeros(2, np.float32)})
        >>> check_folder(folder)[0].n_frequency
        2
    """
    recover(path)
    folder = adapter_directory(path, adapter_name or DEFAULT_ADAPTER)
    refuse_pickle(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such adapter folder")
    try:
        adapter = open_adapter(folder, strict=False)
    except CheckpointError as error:
        raise AdapterFormatError(str(error)) from None
    try:
        raise_problems(file_problems(adapter))
        return adapter.config, adapter.file.path
    finally:
        adapter.file.close()
