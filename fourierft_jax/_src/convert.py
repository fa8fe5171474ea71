"""JAX adapters to and from PEFT adapter directories (which ``peft`` and ``fourierft_torch`` load).

Names: a JAX module's dotted path is its torch name unless a ``bridge.NameMap`` says otherwise. Layouts: spectra
and biases are the same vectors in both frameworks (docs/format.md, "Layouts"); a ``modules_to_save`` Dense ``kernel`` ``(in, out)``
is torch's ``weight`` ``(out, in)`` (not transposed for a transformers ``Conv1D``, stored ``(in, out)``), and
``embedding``/``scale`` are torch's ``weight``. Keys, shapes and the file itself come from
``bridge._src.peft_format`` (one implementation of PEFT's format). Values are copied bit for bit, dtypes kept.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Callable, Collection, Mapping, Optional, Union

import numpy as np

import bridge
from bridge._src.atomic import recover_directory
from bridge._src.config import CONFIG_NAME
import bridge._src.targets
from bridge._src.folders import Adapter, CheckpointError
from bridge._src.names import NameMap, map_config_names
from bridge._src.peft_format import (KEY_PREFIX, SPECTRUM_NAME, AdapterKey, adapter_keys, adapter_shape_problems,
                                     modules_to_save_names)
from bridge._src.peft_reader import open_strict
from bridge._src.peft_format import ORIGINAL as KIND_ORIGINAL
from bridge._src.peft_format import SPECTRUM as KIND_SPECTRUM

from .adapter import BIAS, MODULES_TO_SAVE, SPECTRA, AdapterSpec, model_contractions
from .saved import SavedAdapter, SavedSource, as_saved, attach, layer_spec, node_paths
from .saved_common import flat_leaves
from .targets import Stacks, _modules
from .tree import Path, dotted, split_collection
from .unroll import as_stacked, stack_table, unroll

PathLike = Union[str, "os.PathLike[str]"]
Conv1DRule = Union[Collection[str], Callable[[str], bool], None]
# Flax leaf name -> torch parameter name. Only Dense kernels change layout.
_TORCH_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight"}


def _is_conv1d(rule: Conv1DRule, torch_module: str) -> bool:
    if rule is None:
        return False
    if callable(rule):
        return bool(rule(torch_module))
    return torch_module in rule or torch_module.rsplit(".", 1)[-1] in rule


def _numpy(value: Any) -> np.ndarray:
    # np.asarray of a JAX bfloat16 array is an ml_dtypes.bfloat16 array: the bits are kept.
    return np.ascontiguousarray(np.asarray(value))


def peft_tensors(
    saved: SavedAdapter, name_map: Optional[NameMap] = None, conv1d: Conv1DRule = None, stacked: Stacks = None
) -> tuple[bridge.FourierFTConfig, dict[str, np.ndarray]]:
    """The config and ``{PEFT key: numpy array}`` PEFT 0.21 would save for this adapter.

    Stacked layers are written as the unrolled model holds them (``unroll``): one spectrum per adapted row,
    named by ``LayerSpec.torch_names``, and stacked biases / ``modules_to_save`` one per row. ``stacked`` names
    stacks that hold trained biases or modules but no adapted layer (the layers name their own stacks).

    Example:
        >>> import numpy as np
        >>> from fourierft_jax._src.saved import apply_for_doc, from_adapter
        >>> saved = from_adapter(apply_for_doc({"q": {"kernel": np.zeros((8, 4), np.float32)}}))
        >>> sorted(peft_tensors(saved)[1])
        ['base_model.model.q.fourierft_spectrum']
    """
    name_map = name_map or NameMap()
    saved = unroll(saved, stacked)
    spec = saved.spec
    owners, members = _tensor_owners(saved)
    torch_names = name_map.to_torch_names(owners)
    _check_saved_modules_stay_whole(spec, owners, torch_names)
    values, originals = _trained_tensors(saved, owners, members, torch_names, conv1d)
    shapes = {name: tuple(array.shape) for name, array in values.items()}
    targets = [
        bridge.TargetLayer(torch_names[layer.name], bridge.LINEAR, layer.out_features, layer.in_features,
                           layer.n_frequency)
        for layer in spec.layers
    ]
    saved_torch = [torch_names[dotted(path)] for path in spec.save_paths]
    config = saved.config
    if not name_map.is_identity:
        config = map_config_names(config, torch_names, {l.name: l.n_frequency for l in spec.layers},
                                  [dotted(p) for p in spec.save_paths])
    keys = adapter_keys(config, targets, shapes, saved_torch, adapted_layers=[t.name for t in targets])
    spectra = {torch_names[layer.name]: saved.state[SPECTRA][layer.name] for layer in spec.layers}
    return config, _file_tensors(keys, spectra, values, originals)


def _file_tensors(keys: list, spectra: Mapping[str, Any], values: Mapping[str, np.ndarray],
                  originals: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{PEFT key: array}`` for each key PEFT writes, from the spectra by torch layer name and the trained and
    original tensors by their torch name in the base model."""
    tensors: dict[str, np.ndarray] = {}
    for key in keys:
        if key.kind == KIND_SPECTRUM:
            tensors[key.key] = _numpy(spectra[key.module])
        elif key.kind == KIND_ORIGINAL:
            name = f"{key.module}.{key.param}"
            if name not in originals:
                raise bridge.AdapterFormatError(
                    f"PEFT stores the original (untrained) {name!r} of module_to_save {key.module!r} with "
                    f"bias='all', and this adapter does not hold it: export with params=<the base parameters> "
                    f"(fourierft convert: --base MODEL)"
                )
            tensors[key.key] = originals[name]
        else:  # KIND_BIAS and KIND_MODULE: trained tensors, by their name in the base model
            name = f"{key.module}.{key.param}" if key.module else key.param
            tensors[key.key] = values[name]
    return tensors


def _tensor_owners(saved: SavedAdapter) -> tuple[dict[str, Path], list[tuple[str, Path, str]]]:
    """``{JAX name: path}`` of every module a tensor belongs to (adapted layers, biases, ``modules_to_save`` and
    their sub-modules), and each ``modules_to_save`` leaf as ``(saved module, relative owner path, flax leaf)``."""
    spec = saved.spec
    owners: dict[str, Path] = {}
    for layer in spec.layers:
        owners[layer.name] = layer.path
    for path in spec.bias_paths:
        owners[dotted(path)] = path
    members: list[tuple[str, Path, str]] = []
    for path in spec.save_paths:
        owners[dotted(path)] = path
        for rel, _ in flat_leaves(saved.state[MODULES_TO_SAVE][dotted(path)]):
            owners[dotted(path + rel[:-1])] = path + rel[:-1]
            members.append((dotted(path), rel[:-1], rel[-1]))
    return owners, members


def _check_saved_modules_stay_whole(spec: AdapterSpec, owners: Mapping[str, Path],
                                    torch_names: Mapping[str, str]) -> None:
    """Every sub-module of a ``modules_to_save`` module must keep its torch name under that module's."""
    for path in spec.save_paths:
        top = torch_names[dotted(path)]
        for name, owner in owners.items():
            if owner[: len(path)] == path and owner != path and not torch_names[name].startswith(top + "."):
                raise bridge.AdapterFormatError(
                    f"name map puts {name!r} at {torch_names[name]!r}, outside its module_to_save {top!r}"
                )


def _trained_tensors(
    saved: SavedAdapter, owners: Mapping[str, Path], members: list[tuple[str, Path, str]],
    torch_names: Mapping[str, str], conv1d: Conv1DRule,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The trained tensors (``modules_to_save`` members, biases) and the original ``modules_to_save`` biases, each
    ``{torch tensor name in the base model: array in torch's layout}``."""

    def put_member(module: str, rel: Path, leaf: str, value: Any, table: dict) -> None:
        owner = torch_names[dotted(owners[module] + rel)]
        array = _numpy(value)
        if leaf == "kernel" and array.ndim == 2 and not _is_conv1d(conv1d, owner):
            array = np.ascontiguousarray(array.T)
        elif leaf == "kernel" and array.ndim != 2:
            raise bridge.AdapterFormatError(
                f"module_to_save {module!r}: kernel {dotted(owners[module] + rel)!r} has shape "
                f"{array.shape}; only 2-D Dense kernels have a torch layout here"
            )
        table[f"{owner}.{_TORCH_LEAF.get(leaf, leaf)}"] = array

    values: dict[str, np.ndarray] = {}
    for module, rel, leaf in members:
        node = saved.state[MODULES_TO_SAVE][module]
        for key in rel + (leaf,):
            node = node[key]
        put_member(module, rel, leaf, node, values)
    for path in saved.spec.bias_paths:
        # torch biases are vectors: an N-D layer's bias (DenseGeneral's (N, H)) is flattened in kernel order
        values[f"{torch_names[dotted(path)]}.bias"] = _numpy(saved.state[BIAS][dotted(path)]).reshape(-1)
    originals: dict[str, np.ndarray] = {}
    for module, tree in saved.originals.items():
        for rel, value in flat_leaves(tree):
            put_member(module, rel[:-1], rel[-1], value, originals)
    return values, originals


def export_peft(
    source: SavedSource,
    directory: PathLike,
    *,
    adapter_name: Optional[str] = None,
    params: Optional[Mapping[str, Any]] = None,
    config: Optional[bridge.FourierFTConfig] = None,
    name_map: Optional[NameMap] = None,
    conv1d: Conv1DRule = None,
    overwrite: bool = False,
    stacked: Stacks = None,
) -> str:
    """Write a JAX adapter as a PEFT adapter directory; ``peft.PeftModel.from_pretrained`` and
    ``fourierft_torch`` load it onto the torch twin of the model. Returns the directory.

    The adapter's config is written as is under the default name map; with other rules its matching fields are
    rewritten to the torch layers' full names (PEFT re-matches them on the torch model).

    Args:
        source: a ``FourierFTAdapter`` (its ``adapter_name`` adapter, default the first active one), a
            ``SavedAdapter`` (``load_adapter``), or an NNX model adapted by ``fourierft_jax.nnx.apply`` (with
            ``config``).
        directory: the PEFT folder to create; an existing one is refused unless ``overwrite``.
        params: the base parameters, only needed for ``bias="all"`` with ``modules_to_save`` (PEFT stores the
            modules' original biases too).
        name_map: JAX path → torch name rules (default: the dotted path).
        conv1d: torch module names (or last name segments, or a predicate) stored ``(in, out)`` like
            transformers' ``Conv1D``: their ``modules_to_save`` kernels are not transposed.
        overwrite: replace an existing adapter in ``directory``.
        stacked: only for stacks (``nn.scan`` trees) holding trained biases or ``modules_to_save`` but no adapted
            layer; a stacked layer's rows are always written as ``<stack>.<i>.<rest>``, as PEFT names the
            unrolled model.

    Example:
        >>> import numpy as np, tempfile, os
        >>> from fourierft_jax._src.saved import apply_for_doc
        >>> folder = os.path.join(tempfile.mkdtemp(), "peft")
        >>> _ = export_peft(apply_for_doc({"q": {"kernel": np.zeros((8, 4), np.float32)}}), folder)
        >>> sorted(os.listdir(folder))
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    saved = as_saved(source, adapter_name=adapter_name, params=params, config=config)
    peft_config, tensors = peft_tensors(saved, name_map, conv1d, stacked)
    target = os.fspath(directory)
    recover_directory(target)  # a killed fallback write's old copy is back before the existence check
    if os.path.exists(os.path.join(target, CONFIG_NAME)) and not overwrite:
        raise FileExistsError(f"{target} already holds an adapter: pass overwrite=True to replace it")
    if os.path.exists(target) and not os.path.isdir(target):
        raise FileExistsError(f"{target} exists and is not a folder")
    return bridge.write_adapter(target, peft_config, tensors)


def _read_tensor(file: Any, key: str) -> np.ndarray:
    array = np.array(file.array(key))  # a copy: the file's memory map must not outlive this call
    if file.dtype(key) == "BF16":
        import jax.numpy as jnp

        array = array.view(jnp.bfloat16)
    return array


def read_peft(
    directory: PathLike,
    params: Optional[Mapping[str, Any]] = None,
    *,
    shapes: Optional[Mapping[str, tuple[int, int]]] = None,
    name_map: Optional[NameMap] = None,
    adapter_name: Optional[str] = None,
    conv1d: Conv1DRule = None,
    stacked: Stacks = None,
    trace: Optional[Callable[[Any], Any]] = None,
    contracting: Optional[Mapping[str, Any]] = None,
    split: Optional[Mapping[str, int]] = None,
    finite: bool = True,
) -> SavedAdapter:
    """Read a PEFT FourierFT adapter directory as a ``SavedAdapter`` in JAX names and layouts.

    Strict, like PEFT and ``fourierft_torch``: the config, the file and every key are checked first
    (``bridge._src.peft_reader``); with ``params`` the spectra must be exactly the layers the config targets on
    that model. NaN/inf values are refused unless ``finite=False`` (a conversion copying them as they are).

    ``trace``/``contracting`` (as in ``fourierft_jax.apply``) give the contracted axes of N-D kernels (and make
    bare-array kernels known), so a torch ``(out, in)`` layer maps onto a ``DenseGeneral``/``Einsum`` kernel;
    ``split`` (as in ``apply``) maps several torch layers onto the slices of one kernel.

    The layer shapes (which PEFT does not store) come from ``params`` (a linen params tree: also used to find JAX
    names and ``modules_to_save`` leaf names) or from ``shapes`` (``{torch layer name: (out, in)}``). Without
    ``params``, a ``modules_to_save`` 2-D ``weight`` is taken as a Dense kernel and a 1-D one as a LayerNorm
    ``scale``.

    ``stacked`` (as in ``fourierft_jax.apply``; needs ``params``) names the layer stacks of ``params``: the
    file's ``<stack>.<i>.<rest>`` layers are gathered into one ``(rows, n)`` spectrum per stacked kernel in row
    order (the rows present are its ``stack_ids``), biases and ``modules_to_save`` into stacked arrays; bias rows
    the file lacks (``bias="fourier_only"`` with some rows adapted) are the base model's.

    Example:
        >>> import numpy as np, tempfile
        >>> import bridge
        >>> folder = tempfile.mkdtemp()
        >>> _ = bridge.write_adapter(folder, bridge.FourierFTConfig(n_frequency=2, target_modules=["q"]),
        ...                          {bridge.spectrum_key("q"): np.ones(2, np.float32)})
        >>> read_peft(folder, {"q": {"kernel": np.zeros((8, 4), np.float32)}}).spec.layers[0].kernel_shape
        (8, 4)
    """
    if stacked is not None:
        if not isinstance(params, Mapping):
            raise CheckpointError("read_peft: stacked= needs params (the stacked linen parameter tree)")
        return as_stacked(lambda view: read_peft(directory, view, name_map=name_map, adapter_name=adapter_name,
                                                 conv1d=conv1d, contracting=contracting, split=split,
                                                 finite=finite), params,
                          stacked)
    name_map = name_map or NameMap()
    # bridge's strict reader: config, file, every key against the config (and NaN/inf unless `finite=False`)
    opened, _ = open_strict(directory, adapter_name, finite=finite)
    config, file = opened.config, opened.file
    if params is None and shapes is None:
        raise CheckpointError(
            f"{opened.directory}: a PEFT adapter does not record its layer shapes; give the JAX params (or the "
            f"base model's shapes, e.g. `fourierft convert --base MODEL`)"
        )
    saved_torch, member_of, bias_modules = _classify_tensors(opened)
    owners = {layer.name for layer in opened.layers} | set(bias_modules) | set(saved_torch)
    owners |= {name.rsplit(".", 1)[0] for name in member_of}
    owners.discard("")
    kernels = _kernels(params, trace, contracting, split) if params is not None else {}
    known = node_paths(params) if params is not None else None
    if known is not None:
        known.update({dotted(path): path for path in kernels})
    flax_names = name_map.to_flax_names(sorted(owners), known_flax=known)

    def path_of(torch_name: str) -> Path:
        flax_name = flax_names[torch_name]
        return known[flax_name] if known is not None else tuple(flax_name.split("."))

    layers = _layer_specs(opened, kernels if params is not None else None, shapes, path_of)
    if params is not None and split is None:
        _check_targets(opened, params, trace, contracting, name_map, flax_names)
    spectra = {layer.name: _read_tensor(file, peft.key) for layer, peft in zip(layers, opened.layers)}
    layers = _join_parts(layers, spectra, kernels)
    biases = {dotted(path_of(m)): _bias_like(params, path_of(m), _read_tensor(file, opened.tensors[m + ".bias"]))
              for m in bias_modules}
    modules = _read_saved_modules(opened, member_of, params, path_of, conv1d)
    originals = _read_originals(file, flax_names, path_of)
    spec = AdapterSpec(tuple(layers), tuple(path_of(m) for m in bias_modules), tuple(path_of(m) for m in saved_torch),
                       config.bias)
    if not name_map.is_identity:
        config = map_config_names(config, flax_names, {l.name: l.n_frequency for l in opened.layers}, saved_torch)
    file.close()
    return SavedAdapter(config, spec, {SPECTRA: spectra, BIAS: biases, MODULES_TO_SAVE: modules}, originals)


def _check_targets(opened: Adapter, params: Any, trace: Optional[Callable[[Any], Any]],
                   contracting: Optional[Mapping[str, Any]], name_map: NameMap,
                   flax_names: Mapping[str, str]) -> None:
    """The file's spectra are exactly the layers its config targets on the JAX model (``bridge.select_targets``
    over the model's kernels in torch names), as PEFT and ``fourierft_torch`` require; every difference is
    named in one ``AdapterFormatError``. Where the model's torch names cannot be told (a name map covering only
    the adapter's modules, layer stacks), the per-layer checks of ``_layer_specs`` are what applies."""
    config = opened.config
    if config.target_modules is None or (isinstance(config.target_modules, str)
                                         and config.target_modules.lower() == bridge._src.targets.ALL_LINEAR):
        return  # the default targets need the model type, all-linear the output layer: neither is known here
    inner, _ = split_collection(params)
    infos = [info for _, _, info, _ in _modules(inner, None, model_contractions(params, inner, trace, contracting))
             if info.name]  # the root module has no name, and no torch twin
    try:
        torch_of = name_map.to_torch_names([info.name for info in infos], check_rules=False)
    except bridge.NameMapError:
        return
    if any(torch_of.get(flax_names.get(layer.name)) != layer.name for layer in opened.layers):
        return  # the map's two directions disagree outside the adapter's modules
    torch_infos = [dataclasses.replace(info, name=torch_of[info.name]) for info in infos]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fan_in_fan_out notes concern building an adapter, not reading one
            targets = bridge.select_targets(config, torch_infos)
    except (ValueError, TypeError):
        return  # e.g. stacked kernels the flat view does not list as layers
    expected = [AdapterKey(bridge.spectrum_key(t.name), KIND_SPECTRUM, t.name, SPECTRUM_NAME, (t.n_frequency,))
                for t in targets]
    found = {layer.key: (layer.n_frequency,) for layer in opened.layers}
    problems = [f"{opened.file.path}: {problem}" for problem in adapter_shape_problems(expected, found)]
    if problems:
        raise bridge.AdapterFormatError(f"adapter {opened.directory} does not fit the JAX model: "
                                        + "; ".join(problems))


def _classify_tensors(opened: Adapter) -> tuple[list[str], dict[str, str], list[str]]:
    """Which module each replaced tensor of a PEFT adapter belongs to: the ``modules_to_save`` modules present
    (torch names), ``{tensor: its modules_to_save module}`` and the modules whose bias is stored."""
    config, file = opened.config, opened.file
    tensor_names = list(opened.tensors)
    prefixes = {".".join(name.split(".")[:i]) for name in tensor_names for i in range(1, name.count(".") + 1)}
    saved_torch = modules_to_save_names(config, sorted(prefixes))
    member_of: dict[str, str] = {}
    bias_modules: list[str] = []
    for name in tensor_names:
        parent = next((m for m in saved_torch if name.startswith(m + ".")), None)
        if parent is not None:
            member_of[name] = parent
        elif name.endswith(".bias") or name == "bias":
            bias_modules.append(name[: -len(".bias")] if name != "bias" else "")
        else:
            raise bridge.AdapterFormatError(
                f"{file.path}: tensor {name!r} is neither a bias nor part of a modules_to_save module "
                f"({config.modules_to_save}); not a FourierFT adapter this converter understands"
            )
    return saved_torch, member_of, bias_modules


def _kernels(params: Any, trace: Optional[Callable[[Any], Any]], contracting: Optional[Mapping[str, Any]],
             split: Optional[Mapping[str, int]] = None) -> dict[Path, Any]:
    """``{module path: targets.Kernel}`` of every linear layer of ``params`` (N-D ones need trace/contracting;
    the parts of a split kernel are ``<module path>.<i>``)."""
    inner, _ = split_collection(params)
    found = model_contractions(params, inner, trace, contracting)
    out = {}
    for path, row, _, kernel in _modules(inner, None, found, split):
        if kernel is not None:
            out[path + (str(row),) if kernel.split_axis is not None else path] = kernel
    return out


def _bias_like(params: Any, path: Path, bias: np.ndarray) -> np.ndarray:
    """A torch bias vector in the shape of the model's bias at ``path`` (N-D for an N-D layer), when known."""
    if params is None:
        return bias
    inner, _ = split_collection(params)
    node: Any = inner
    for key in path + ("bias",):
        if not isinstance(node, Mapping) or key not in node:
            return bias
        node = node[key]
    shape = tuple(getattr(node, "shape", ()))
    return bias.reshape(shape) if shape and int(np.prod(shape)) == bias.size else bias


def _join_parts(layers: list, spectra: dict, kernels: Mapping[Path, Any]) -> list:
    """The file's layers with the parts of each split kernel (``<module>.<i>``) joined into one layer of that
    kernel, its spectra stacked in part order (``spectra`` is updated in place)."""
    joined: list = []
    parts: dict[Path, list] = {}
    for layer in layers:
        kernel = kernels.get(layer.path)
        if kernel is None or kernel.split_axis is None:
            joined.append(layer)
            continue
        if layer.path[:-1] not in parts:
            parts[layer.path[:-1]] = []
            joined.append(layer.path[:-1])
        parts[layer.path[:-1]].append((int(layer.path[-1]), layer, kernel))
    out = []
    for entry in joined:
        if not isinstance(entry, tuple):
            out.append(entry)
            continue
        rows = sorted(parts[entry], key=lambda r: r[0])
        _, first, kernel = rows[0]
        if len({layer.n_frequency for _, layer, _ in rows}) != 1:
            raise bridge.AdapterFormatError(f"the parts of {dotted(entry)!r} have different n_frequency; one split "
                                            "kernel needs one value")
        whole = dataclasses.replace(first, path=entry, stack_axis=kernel.split_axis, stack_size=kernel.split_size,
                                    stack_ids=tuple(i for i, _, _ in rows), stack_depth=len(entry))
        spectra[whole.name] = np.stack([spectra.pop(layer.name) for _, layer, _ in rows])
        out.append(whole)
    return out


def _layer_specs(opened: Adapter, kernels: Optional[Mapping[Path, Any]],
                 shapes: Optional[Mapping[str, tuple[int, int]]], path_of: Callable[[str], Path]) -> list:
    """One ``LayerSpec`` per adapted layer of the file, its shape from the model's kernels or ``shapes``;
    every layer that does not fit is named in one ``AdapterFormatError``."""
    layers = []
    problems = []
    for layer in opened.layers:
        path = path_of(layer.name)
        layout: dict[str, Any] = {}
        if kernels is not None:
            kernel = kernels.get(path)
            if kernel is None:
                problems.append(f"layer {layer.name!r} -> {dotted(path)!r}: no linear layer's kernel in the params "
                                "(an N-D kernel needs trace= or contracting=)")
                continue
            out_features, in_features = kernel.torch_shape
            layout = {"kernel_leaf": kernel.leaf, "kernel_dims": kernel.dims, "in_axes": kernel.in_axes}
        else:
            if layer.name not in shapes:
                problems.append(f"layer {layer.name!r}: no shape given for it")
                continue
            out_features, in_features = shapes[layer.name]
        if layer.n_frequency > in_features * out_features:
            problems.append(f"layer {layer.name!r}: spectrum has shape ({layer.n_frequency},) but the layer "
                            f"{out_features} x {in_features} has room for {in_features * out_features} coefficients")
            continue
        layers.append(layer_spec(path, in_features, out_features, layer.n_frequency, opened.config, **layout))
    if problems:
        raise bridge.AdapterFormatError(f"adapter {opened.directory} does not fit the model: " + "; ".join(problems))
    return layers


def _read_saved_modules(opened: Adapter, member_of: Mapping[str, str], params: Optional[Mapping[str, Any]],
                        path_of: Callable[[str], Path], conv1d: Conv1DRule) -> dict[str, Any]:
    """The trained ``modules_to_save`` tensors as ``{JAX module: nested dict of Flax leaves}`` (kernels transposed
    back to ``(in, out)`` unless stored like a ``Conv1D``)."""
    modules: dict[str, Any] = {}
    for name, module in member_of.items():
        owner_torch, torch_leaf = name.rsplit(".", 1)
        top, owner = path_of(module), path_of(owner_torch)
        if owner[: len(top)] != top:
            raise bridge.AdapterFormatError(f"name map puts {owner_torch!r} at {dotted(owner)!r}, outside its "
                                            f"module_to_save {dotted(top)!r}")
        array = _read_tensor(opened.file, opened.tensors[name])
        leaf = _flax_leaf(params, owner, torch_leaf, array, name)
        if leaf == "kernel" and not _is_conv1d(conv1d, owner_torch):
            array = np.ascontiguousarray(array.T)
        node = modules.setdefault(dotted(top), {})
        for key in owner[len(top):]:
            node = node.setdefault(key, {})
        node[leaf] = array
    return modules


def _read_originals(file: Any, flax_names: Mapping[str, str], path_of: Callable[[str], Path]) -> dict[str, Any]:
    """PEFT's ``<module>.original_module.<rest>`` tensors (``bias="all"`` with ``modules_to_save``) as
    ``{JAX module: nested dict}``; those of sub-modules without a name mapping are skipped (PEFT restores them
    from the base model)."""
    originals: dict[str, Any] = {}
    marker = ".original_module."
    for key in file.keys():
        rest = key[len(KEY_PREFIX):]
        if marker in f".{rest}":
            module, member = rest.split("original_module.", 1)
            module = module.rstrip(".")
            owner_torch = f"{module}.{member.rsplit('.', 1)[0]}" if "." in member else module
            if owner_torch not in flax_names:
                continue  # a bias of a sub-module whose name we have no map for: PEFT restores it from the base
            top, owner = path_of(module), path_of(owner_torch)
            node = originals.setdefault(dotted(top), {})
            for part in owner[len(top):]:
                node = node.setdefault(part, {})
            node[member.rsplit(".", 1)[-1]] = _read_tensor(file, key)
    return originals


def _subtree(params: Mapping[str, Any], path: Path) -> Any:
    from .tree import split_collection

    node, _ = split_collection(params)
    for key in path:
        node = node[key]
    return node


def _flax_leaf(params: Optional[Mapping[str, Any]], owner: Path, torch_leaf: str, array: np.ndarray, name: str) -> str:
    if torch_leaf != "weight":
        return torch_leaf
    if params is not None:
        node = _subtree(params, owner)
        for leaf in ("kernel", "embedding", "scale", "weight"):
            if isinstance(node, Mapping) and leaf in node:
                return leaf
        raise bridge.AdapterFormatError(f"tensor {name!r}: the JAX module {dotted(owner)!r} has no kernel, "
                                        f"embedding or scale for it")
    return "kernel" if array.ndim == 2 else "scale"


def import_peft(
    directory: PathLike,
    target: Any,
    *,
    name_map: Optional[NameMap] = None,
    adapter_name: Optional[str] = None,
    conv1d: Conv1DRule = None,
    stacked: Stacks = None,
    trace: Optional[Callable[[Any], Any]] = None,
    contracting: Optional[Mapping[str, Any]] = None,
    split: Optional[Mapping[str, int]] = None,
) -> Any:
    """Load a PEFT adapter directory onto a JAX model: a parameter pytree gives a ``FourierFTAdapter``, an NNX
    model is adapted in place and returned. Strict: every key, name and shape is checked first. ``trace`` /
    ``contracting`` and ``split`` as in ``fourierft_jax.apply`` (for N-D and split kernels).

    ``stacked`` names the layer stacks of the model (as in ``fourierft_jax.apply``): a file written
    for the unrolled model (``encoder.layer.<i>.<rest>``) is loaded as stacked spectra (see ``read_peft``).

    Example:
        >>> import numpy as np, tempfile
        >>> import bridge
        >>> folder = tempfile.mkdtemp()
        >>> _ = bridge.write_adapter(folder, bridge.FourierFTConfig(n_frequency=2, target_modules=["q"]),
        ...                          {bridge.spectrum_key("q"): np.ones(2, np.float32)})
        >>> import_peft(folder, {"q": {"kernel": np.zeros((8, 4), np.float32)}}).trainable["default"]["spectra"]["q"]
        Array([1., 1.], dtype=float32)
    """
    from flax import nnx

    if not isinstance(target, nnx.Module):
        view = target
    else:
        from .saved_nnx import nnx_params_view

        view = nnx_params_view(target)
    saved = read_peft(directory, view, name_map=name_map, adapter_name=adapter_name, conv1d=conv1d,
                      stacked=stacked, trace=trace, contracting=contracting, split=split)
    return attach(saved, target, adapter_name=adapter_name or "default")


__all__ = ["export_peft", "import_peft", "peft_tensors", "read_peft"]


def with_base_originals(
    saved: SavedAdapter, lookup: Callable[[str], Optional[np.ndarray]], name_map: Optional[NameMap] = None
) -> SavedAdapter:
    """``saved`` with PEFT's ``original_module`` biases (``bias="all"`` with ``modules_to_save``) read from a base
    model through ``lookup(torch tensor name) -> array or None``; unchanged when they are not needed or known.

    Example:
        >>> import numpy as np
        >>> from fourierft_jax._src.saved import apply_for_doc, from_adapter
        >>> saved = from_adapter(apply_for_doc({"q": {"kernel": np.zeros((8, 4), np.float32)}}))
        >>> with_base_originals(saved, lambda name: None).originals
        {}
    """
    if saved.config.bias != "all" or saved.originals or not saved.spec.save_paths:
        return saved
    name_map = name_map or NameMap()
    stacks = stack_table(saved)

    def base_bias(path: Path, owner: Path) -> np.ndarray:
        torch_name = name_map.to_torch_names([dotted(owner)], check_rules=False)[dotted(owner)] + ".bias"
        array = lookup(torch_name)
        if array is None:
            raise bridge.AdapterFormatError(
                f"the base model has no {torch_name!r}, the original bias PEFT stores for module_to_save "
                f"{dotted(path)!r} (bias='all')"
            )
        return np.asarray(array)

    originals: dict[str, Any] = {}
    for path in saved.spec.save_paths:
        for rel, value in flat_leaves(saved.state[MODULES_TO_SAVE][dotted(path)]):
            if rel[-1] != "bias":
                continue
            owner = path + rel[:-1]
            head = next((h for h in stacks if owner[: len(h)] == h), None)
            if head is None:
                array = base_bias(path, owner)
            else:  # a module under a layer stack: the unrolled model holds one bias per layer
                axis, size = stacks[head]
                array = np.stack([base_bias(path, head + (str(i),) + owner[len(head):]) for i in range(size)], axis)
            if tuple(np.shape(array)) != tuple(np.shape(value)):
                raise bridge.AdapterFormatError(
                    f"the base bias of module_to_save {dotted(owner)!r} has shape {tuple(np.shape(array))} but "
                    f"the adapter's copy has {tuple(np.shape(value))}"
                )
            node = originals.setdefault(dotted(path), {})
            for key in rel[:-1]:
                node = node.setdefault(key, {})
            node["bias"] = np.array(array)
    return SavedAdapter(saved.config, saved.spec, saved.state, originals)
