"""Which Dense kernels of a linen parameter tree a config adapts: the tree as ``bridge.ModuleInfo``s.

Every dict node becomes a module named by its dotted path. A node holding a 2-D ``kernel`` is a linear layer
(torch shape ``(out, in)`` = the kernel's shape reversed); other nodes get a descriptive kind so that a target
matching them raises ``bridge``'s "cannot adapt" error naming the path.

A stacked subtree (``stacked={"encoder.layer": 0}``: every array under it has the layer axis at the given
position, as ``nn.scan`` makes them) is listed as its unrolled model would be: ``encoder.layer``, then
``encoder.layer.0``, ``encoder.layer.0.attention...``, ``encoder.layer.1``, ... -- the names PEFT matches
``target_modules`` and ``layers_to_transform`` against -- and the selected rows of one stacked kernel become a
single ``LayerSpec`` with ``stack_ids``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence, Union

import bridge
from bridge._src.targets import stack_row_path

from .layer import LayerSpec
from .tree import Path, dotted, get_path, iter_nodes

Stacks = Union[None, str, Sequence[str], Mapping[str, int]]


# Leaf names under which libraries store a projection's kernel (linen/NNX/EasyDeL, gemma's Einsum, equinox).
KERNEL_LEAVES = ("kernel", "w", "weight", "weights")

# ``{kernel leaf path: contracted axes of the stored array}`` (None: the array is not a linear layer's kernel),
# read from the model by ``trace`` or declared by the caller.
Contractions = Mapping[Path, Optional[tuple[int, ...]]]


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A module's kernel as targets see it: which leaf, its torch shape ``(out, in)`` and how it is contracted."""

    leaf: str
    torch_shape: tuple[int, int]
    dims: tuple[int, ...] = ()
    in_axes: tuple[int, ...] = ()
    split_axis: Optional[int] = None  # set on the parts of a split kernel: the stored axis they slice
    split_size: int = 0


# ``{module name or suffix: stored kernel axis}``: kernels that hold several torch layers side by side (gemma's
# ``kv_einsum`` = k_proj + v_proj); each slice along the axis is its own layer ``<module>.<i>``.
Splits = Optional[Mapping[str, int]]


def _split_rule(splits: Splits, name: str) -> Optional[int]:
    for entry, axis in (splits or {}).items():
        if name == entry or name.endswith("." + entry):
            return int(axis)
    return None


def _parts(kernel: Kernel, axis: int, name: str) -> Kernel:
    """One slice of a split kernel along its kept ``axis``, as a kernel of its own."""
    dims = kernel.dims or (kernel.torch_shape[1], kernel.torch_shape[0])
    inside = kernel.in_axes or (0,)
    if not 0 <= axis < len(dims) or axis in inside or len(dims) < 3:
        raise TypeError(f"fourierft_jax: split={{{name!r}: {axis}}}: the kernel {dims} is contracted on axes "
                        f"{list(inside)}; a split axis must be one of its kept axes and leave an N-D kernel")
    part = dims[:axis] + dims[axis + 1 :]
    in_axes = tuple(a - (a > axis) for a in inside)
    n_in = math.prod(part[a] for a in in_axes)
    n_out = math.prod(d for a, d in enumerate(part) if a not in in_axes)
    return Kernel(kernel.leaf, (n_out, n_in), part, in_axes, axis, dims[axis])


def _kernel_of(array: Any, leaf: str, path: Path, stack_axis: Optional[int],
               contractions: Optional[Contractions]) -> tuple[str, Optional[Kernel]]:
    shape = tuple(int(d) for d in getattr(array, "shape", ()))
    if stack_axis is not None and len(shape) > stack_axis:
        shape = shape[:stack_axis] + shape[stack_axis + 1 :]
    known = contractions is not None and path in contractions
    axes = contractions[path] if known else None
    if known and axes is None:
        return f"array {shape} that the traced model never contracts (an embedding or other non-linear use)", None
    if axes is not None and axes and axes[0] == "conflict":
        return (f"kernel {shape} that the traced model contracts in two different ways (axes "
                f"{[list(a) for a in axes[1]]}); declare one with contracting=", None)
    if axes is not None and axes and axes[0] == "scanned":
        _, scanned, axes = axes
        if stack_axis != scanned:
            where = "without a stacked= entry" if stack_axis is None else f"but stacked= gives axis {stack_axis}"
            return (f"kernel {shape} that the traced model scans over along axis {scanned} (a layer stack) "
                    f"{where}: name its stack with stacked={{'<stack path>': {scanned}}}", None)
    if axes is not None and stack_axis is not None:
        axes = tuple(a - (a > stack_axis) for a in axes if a != stack_axis)
    if axes is None:
        if len(shape) != 2:
            return (f"{len(shape)}-D kernel {shape} (DenseGeneral/Einsum): pass trace= (a function of the params "
                    "that runs the model) or contracting= to fourierft_jax.apply to say which axes are contracted"), None
        axes = (0,)
    n_in = math.prod(shape[a] for a in axes)
    n_out = math.prod(d for a, d in enumerate(shape) if a not in axes)
    if len(shape) == 2 and axes == (0,):
        return bridge.LINEAR, Kernel(leaf, (n_out, n_in))
    return bridge.LINEAR, Kernel(leaf, (n_out, n_in), shape, tuple(axes))


def _kind(node: Mapping[str, Any], path: Path = (), stack_axis: Optional[int] = None,
          contractions: Optional[Contractions] = None) -> tuple[str, Optional[Kernel]]:
    for leaf in KERNEL_LEAVES:
        array = node.get(leaf)
        if array is not None and not isinstance(array, Mapping) and hasattr(array, "shape"):
            if "embedding" in node:
                break
            return _kernel_of(array, leaf, path + (leaf,), stack_axis, contractions)
    if "embedding" in node and not isinstance(node["embedding"], Mapping):
        return "Embed", None
    return "module", None


def _bare_kernels(node: Mapping[str, Any], path: Path, stack_axis: Optional[int],
                  contractions: Optional[Contractions]) -> list[tuple[str, Kernel]]:
    """Array leaves of ``node`` that the model contracts, other than its kernel leaf (gemma's ``mlp.linear``)."""
    if not contractions:
        return []
    found = []
    for key, array in node.items():
        if isinstance(array, Mapping) or key in KERNEL_LEAVES or contractions.get(path + (key,)) is None:
            continue
        kind, kernel = _kernel_of(array, "", path + (key,), stack_axis, contractions)
        if kernel is not None:
            found.append((key, kernel))
    return found


def stack_requests(stacked: Stacks) -> dict[Path, int]:
    """The ``stacked`` argument as ``{stack path: layer axis}``: a dotted path or a list of them (axis 0), or a
    ``{path: axis}`` mapping.

    Example:
        >>> stack_requests(["encoder.layer"]), stack_requests({"layers": 1})
        ({('encoder', 'layer'): 0}, {('layers',): 1})
    """
    if stacked is None:
        return {}
    if isinstance(stacked, str):
        stacked = {stacked: 0}
    elif not isinstance(stacked, Mapping):
        stacked = {name: 0 for name in stacked}
    return {(tuple(name.split(".")) if name else ()): int(axis) for name, axis in stacked.items()}


def stack_axes(params: Mapping[str, Any], stacked: Stacks) -> dict[Path, tuple[int, int]]:
    """``{stack path: (layer axis, number of layers)}`` for the ``stacked`` argument, checked against ``params``.

    ``stacked`` names subtrees whose arrays all carry a leading layer axis: a dotted path, a list of them (axis
    0), or ``{path: axis}`` (e.g. axis 1 for MaxText's ``param_scan_axis=1``).

    Example:
        >>> import numpy as np
        >>> tree = {"layers": {"fc": {"kernel": np.zeros((3, 8, 4)), "bias": np.zeros((3, 4))}}}
        >>> stack_axes(tree, "layers")
        {('layers',): (0, 3)}
    """
    out: dict[Path, tuple[int, int]] = {}
    for path, axis in stack_requests(stacked).items():
        name = dotted(path)
        node = get_path(params, path, "stacked module")
        if not isinstance(node, Mapping):
            raise ValueError(f"fourierft_jax: stacked={name!r} names an array, not a module (a dict of parameters)")
        sizes = {
            dotted(path + sub): _axis_size(leaf, axis)
            for sub, leaf in _leaves(node)
        }
        if not sizes:
            raise ValueError(f"fourierft_jax: stacked module {name!r} holds no arrays")
        bad = {key: size for key, size in sizes.items() if size is None}
        if bad:
            raise ValueError(f"fourierft_jax: stacked={{{name!r}: {axis}}}: {sorted(bad)[0]!r} has no axis {axis}")
        if len(set(sizes.values())) != 1:
            raise ValueError(
                f"fourierft_jax: the arrays under stacked module {name!r} disagree on the number of layers along "
                f"axis {axis}: {dict(sorted(sizes.items())[:4])}"
            )
        out[path] = (int(axis), int(next(iter(sizes.values()))))
    for a in out:
        for b in out:
            if a != b and b[: len(a)] == a:
                raise ValueError(f"fourierft_jax: stacked modules {dotted(a)!r} and {dotted(b)!r} are nested")
    return out


def _leaves(node: Mapping[str, Any], prefix: Path = ()) -> list[tuple[Path, Any]]:
    found = []
    for key, value in node.items():
        if isinstance(value, Mapping):
            found.extend(_leaves(value, prefix + (str(key),)))
        else:
            found.append((prefix + (str(key),), value))
    return found


def _axis_size(leaf: Any, axis: int) -> Optional[int]:
    shape = tuple(getattr(leaf, "shape", ()))
    return int(shape[axis]) if 0 <= axis < len(shape) else None


def stack_of(path: Path, stacks: Mapping[Path, Any]) -> Optional[Path]:
    """The stack (a key of ``stacks``) that ``path`` lies in, or None.

    Example:
        >>> stack_of(("encoder", "layer", "fc"), {("encoder", "layer"): (0, 3)})
        ('encoder', 'layer')
    """
    return next((head for head in stacks if path[: len(head)] == head), None)


def module_infos(
    params: Mapping[str, Any], stacked: Stacks = None
) -> list[tuple[Path, Optional[int], bridge.ModuleInfo]]:
    """Every module of ``params`` as ``(path, stack row or None, bridge.ModuleInfo)``, in unrolled tree order.

    Example:
        >>> import numpy as np
        >>> tree = {"encoder": {"query": {"kernel": np.zeros((8, 4)), "bias": np.zeros(4)}}}
        >>> [(info.name, info.kind, info.shape) for _, _, info in module_infos(tree)][1:]
        [('encoder', 'module', None), ('encoder.query', 'linear', (4, 8))]
        >>> stacked = {"layer": {"fc": {"kernel": np.zeros((2, 8, 4))}}}
        >>> [info.name for _, _, info in module_infos(stacked, "layer")]
        ['', 'layer', 'layer.0', 'layer.0.fc', 'layer.1', 'layer.1.fc']
    """
    return [(path, row, info) for path, row, info, _ in _modules(params, stacked)]


def _modules(params: Mapping[str, Any], stacked: Stacks = None, contractions: Optional[Contractions] = None,
             splits: Splits = None) -> list[tuple[Path, Optional[int], bridge.ModuleInfo, Optional[Kernel]]]:
    stacks = stack_axes(params, stacked)
    infos: list[tuple[Path, Optional[int], bridge.ModuleInfo, Optional[Kernel]]] = []

    def emit(path: Path, row: Optional[int], name: Path, kind: str, kernel: Optional[Kernel]) -> None:
        axis = _split_rule(splits, dotted(name)) if kernel is not None else None
        if axis is None:
            infos.append((path, row, bridge.ModuleInfo(dotted(name), kind, kernel and kernel.torch_shape), kernel))
            return
        if row is not None:
            raise ValueError(f"fourierft_jax: split= on {dotted(name)!r}, a layer of a stack, is not supported")
        part = _parts(kernel, axis, dotted(name))
        for i in range(part.split_size):
            infos.append((path, i, bridge.ModuleInfo(f"{dotted(name)}.{i}", bridge.LINEAR, part.torch_shape), part))

    def add(path: Path, node: Mapping[str, Any], row: Optional[int], name: Path, axis: Optional[int]) -> None:
        kind, kernel = _kind(node, path, axis, contractions)
        emit(path, row, name, kind, kernel)
        for key, bare in _bare_kernels(node, path, axis, contractions):
            emit(path + (key,), row, name + (key,), bridge.LINEAR, bare)

    for path, node in iter_nodes(params):
        head = stack_of(path, stacks)
        if head is None:
            add(path, node, None, path, None)
        elif path == head:
            # The stack's rows, each followed by its modules (the order of an unrolled model's named_modules).
            infos.append((path, None, bridge.ModuleInfo(dotted(path), "module", None), None))
            axis, size = stacks[head]
            for row in range(size):
                for sub_path, sub_node in iter_nodes(node, path):
                    add(sub_path, sub_node, row, stack_row_path(sub_path, len(head), row), axis)
    return infos


def select_layers(
    params: Mapping[str, Any],
    config: bridge.FourierFTConfig,
    *,
    model_type: Optional[str] = None,
    output_layer: Optional[str] = None,
    stacked: Stacks = None,
    contractions: Optional[Contractions] = None,
    splits: Splits = None,
) -> tuple[LayerSpec, ...]:
    """The ``LayerSpec`` of every Dense kernel ``config`` adapts in ``params`` (``bridge.select_targets``' rules).

    ``stacked`` names layer stacks (see ``stack_axes``); the selected rows of a stacked kernel form one
    ``LayerSpec`` (its spectrum is ``(rows, n)``), which needs one ``n_frequency`` for all of them.

    Example:
        >>> import numpy as np
        >>> tree = {"q": {"kernel": np.zeros((8, 4))}, "v": {"kernel": np.zeros((8, 4))}}
        >>> config = bridge.FourierFTConfig(n_frequency=5, target_modules=["q"])
        >>> [(l.name, l.kernel_shape, l.n_frequency) for l in select_layers(tree, config)]
        [('q', (8, 4), 5)]
    """
    stacks = stack_axes(params, stacked)
    infos = _modules(params, stacked, contractions, splits)
    where = {info.name: (path, row, kernel) for path, row, info, kernel in infos}
    targets = bridge.select_targets(
        _with_parts(config, infos), [info for _, _, info, _ in infos], model_type=model_type,
        output_layer=output_layer
    )
    groups: dict[Path, list[tuple[int, bridge.TargetLayer]]] = {}
    kernels: dict[Path, Kernel] = {}
    for target in targets:
        path, row, kernel = where[target.name]
        groups.setdefault(path, []).append((row, target))
        kernels[path] = kernel
    layers = []
    for path, rows in groups.items():
        first, kernel = rows[0][1], kernels[path]
        common = dict(
            path=path,
            in_features=first.in_features,
            out_features=first.out_features,
            n_frequency=first.n_frequency,
            scaling=float(config.scaling),
            seed=int(config.random_loc_seed),
            kernel_leaf=kernel.leaf,
            kernel_dims=kernel.dims,
            in_axes=kernel.in_axes,
        )
        if rows[0][0] is None:
            layers.append(LayerSpec(**common))
            continue
        odd = [t.name for _, t in rows if t.n_frequency != first.n_frequency]
        if odd:
            raise ValueError(
                f"fourierft_jax: layers {first.name!r} (n_frequency={first.n_frequency}) and {odd[0]!r} share one "
                "stacked kernel but n_frequency_pattern gives them different n_frequency; a stack needs one value"
            )
        ids = tuple(sorted(row for row, _ in rows))
        if kernel.split_axis is not None:  # the parts of a split kernel, named <module>.<i>
            axis, size, depth = kernel.split_axis, kernel.split_size, len(path)
        else:
            head = stack_of(path, stacks)
            (axis, size), depth = stacks[head], len(head)
        layers.append(LayerSpec(**common, stack_axis=axis, stack_size=size, stack_ids=ids, stack_depth=depth))
    return tuple(layers)


def _with_parts(config: bridge.FourierFTConfig, infos: list) -> bridge.FourierFTConfig:
    """``config`` whose list of ``target_modules`` also names the parts of every split kernel it names."""
    targets = config.target_modules
    if not isinstance(targets, (list, set, tuple)):
        return config
    extra = []
    for path, row, info, kernel in infos:
        if kernel is not None and kernel.split_axis is not None:
            whole = info.name.rsplit(".", 1)[0]
            extra += [f"{t}.{row}" for t in targets if whole == t or whole.endswith("." + t)]
    if not extra:
        return config
    return dataclasses.replace(config, target_modules=sorted(set(targets) | set(extra)))
