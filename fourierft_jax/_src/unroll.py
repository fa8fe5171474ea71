"""A stacked ``SavedAdapter`` as its unrolled model holds it, and back: how stacked layers reach PEFT files.

PEFT sees the unrolled model: layer ``i`` of stack ``encoder.layer`` is the module ``encoder.layer.<i>...``
(``LayerSpec.torch_names``). ``unroll`` turns a stacked adapter into that form -- one ``(n,)`` spectrum per
adapted row, a stacked bias ``(L, out)`` into ``L`` biases, a ``modules_to_save`` module inside a stack into
``L`` modules -- so that the PEFT writer needs no notion of stacks. ``restack`` is its inverse: rows are
gathered back in ``stack_ids`` order (a file holding some rows of a stack gives those ``stack_ids``), and bias
rows the file lacks (``bias="fourier_only"`` saves the adapted rows only) come from the base parameters.
``unrolled_view`` is the base parameter tree as the unrolled model has it (shapes only under the stacks), which
is what the PEFT reader resolves names and shapes against.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import numpy as np
from bridge._src.targets import stack_row_path

from .adapter import BIAS, MODULES_TO_SAVE, SPECTRA, AdapterSpec
from .saved import SavedAdapter, layer_spec
from .saved_common import flat_leaves
from .targets import Stacks, stack_axes, stack_of, stack_requests
from .tree import Path, dotted, get_path, split_collection

StackTable = dict[Path, tuple[int, int]]  # stack module path -> (layer axis, number of layers)


def _unrolled(path: Path, head: Path, row: int) -> Path:
    return stack_row_path(path, len(head), row)


def stack_table(saved: SavedAdapter, stacked: Stacks = None) -> StackTable:
    """The stacks of ``saved``: those its stacked layers name, plus ``stacked`` (for stacks holding only trained
    biases or ``modules_to_save``; their sizes are read from those arrays).

    Example:
        >>> import numpy as np, bridge
        >>> from fourierft_jax._src.adapter import AdapterSpec
        >>> layer = layer_spec(("l", "q"), 8, 4, 3, bridge.FourierFTConfig(), stack_axis=0, stack_size=2,
        ...                    stack_ids=[0, 1], stack_depth=1)
        >>> stack_table(SavedAdapter(bridge.FourierFTConfig(), AdapterSpec((layer,)), {}))
        {('l',): (0, 2)}
    """
    table: StackTable = {}
    for layer in saved.spec.layers:
        if not layer.stacked:
            continue
        head, entry = layer.path[: layer.stack_depth], (layer.stack_axis, layer.stack_size)
        if table.setdefault(head, entry) != entry:
            raise ValueError(
                f"fourierft_jax: layers of stack {dotted(head)!r} disagree on its layer axis / size: "
                f"{table[head]} and {entry} ({layer.name!r})"
            )
    if stacked is None:
        return table
    arrays = []  # (full path, array) of every trained bias and module tensor
    for group in (BIAS, MODULES_TO_SAVE):
        for name, tree in saved.state.get(group, {}).items():
            arrays.extend((tuple(name.split(".")) + rel, value) for rel, value in flat_leaves(tree))
    for head, axis in stack_requests(stacked).items():
        name = dotted(head)
        if head in table:
            continue
        sizes = {int(np.shape(value)[axis]) for path, value in arrays
                 if path[: len(head)] == head and np.ndim(value) > axis}
        if len(sizes) > 1:
            raise ValueError(f"fourierft_jax: the arrays under stack {name!r} disagree on their number of layers "
                             f"along axis {axis}: {sorted(sizes)}")
        if sizes:
            table[head] = (int(axis), sizes.pop())
    return table


def _rows(value: Any, axis: int, size: int, what: str) -> list[np.ndarray]:
    array = np.asarray(value)
    if array.ndim <= axis or array.shape[axis] != size:
        raise ValueError(f"fourierft_jax: {what} has shape {array.shape}, not {size} layers along axis {axis}")
    return [np.ascontiguousarray(np.take(array, i, axis=axis)) for i in range(size)]


def _nest(pairs: list[tuple[Path, Any]]) -> Any:
    if len(pairs) == 1 and pairs[0][0] == ():
        return pairs[0][1]
    out: dict[str, Any] = {}
    for rel, value in pairs:
        node = out
        for key in rel[:-1]:
            node = node.setdefault(key, {})
        node[rel[-1]] = value
    return out


def _unroll_modules(trees: Mapping[str, Any], stacks: StackTable) -> dict[str, Any]:
    # A module inside a stack becomes one module per row; a module holding a stack keeps its name and gets
    # per-row entries in its tree.
    out: dict[str, Any] = {}
    for name, tree in trees.items():
        path = tuple(name.split("."))
        head = stack_of(path, stacks)
        if head is not None:
            axis, size = stacks[head]
            per_row = [[] for _ in range(size)]
            for rel, value in flat_leaves(tree):
                for row, array in enumerate(_rows(value, axis, size, f"module_to_save tensor {dotted(path + rel)!r}")):
                    per_row[row].append((rel, array))
            for row in range(size):
                out[dotted(_unrolled(path, head, row))] = _nest(per_row[row])
            continue
        pairs = []
        for rel, value in flat_leaves(tree):
            inner = stack_of(path + rel, stacks)
            if inner is None:
                pairs.append((rel, value))
                continue
            axis, size = stacks[inner]
            for row, array in enumerate(_rows(value, axis, size, f"module_to_save tensor {dotted(path + rel)!r}")):
                pairs.append((_unrolled(path + rel, inner, row)[len(path) :], array))
        out[name] = _nest(pairs)
    return out


def unroll(saved: SavedAdapter, stacked: Stacks = None) -> SavedAdapter:
    """``saved`` as the unrolled model holds it: no stacked layer, array or module left (unchanged if none).

    Example:
        >>> import numpy as np, bridge
        >>> from fourierft_jax._src.adapter import AdapterSpec
        >>> layer = layer_spec(("l", "q"), 8, 4, 3, bridge.FourierFTConfig(), stack_axis=0, stack_size=3,
        ...                    stack_ids=[0, 2], stack_depth=1)
        >>> flat = unroll(SavedAdapter(bridge.FourierFTConfig(), AdapterSpec((layer,)),
        ...                            {"spectra": {"l.q": np.arange(6.0).reshape(2, 3)}}))
        >>> {name: value.tolist() for name, value in flat.state["spectra"].items()}
        {'l.0.q': [0.0, 1.0, 2.0], 'l.2.q': [3.0, 4.0, 5.0]}
    """
    stacks = stack_table(saved, stacked)
    if not stacks:
        return saved
    spectra_in = saved.state.get(SPECTRA, {})
    layers, spectra = [], {}
    for layer in saved.spec.layers:
        if not layer.stacked:
            layers.append(layer)
            spectra[layer.name] = spectra_in[layer.name]
            continue
        rows = np.asarray(spectra_in[layer.name])
        if rows.shape != layer.spectrum_shape:
            raise ValueError(f"fourierft_jax: spectrum of {layer.name!r} has shape {rows.shape}, expected "
                             f"{layer.spectrum_shape}")
        head = layer.path[: layer.stack_depth]
        for j, row in enumerate(layer.stack_ids):
            layers.append(dataclasses.replace(layer.unstacked, path=_unrolled(layer.path, head, row)))
            spectra[layers[-1].name] = np.ascontiguousarray(rows[j])
    bias_paths, biases = [], {}
    for path in saved.spec.bias_paths:
        value = saved.state[BIAS][dotted(path)]
        head = stack_of(path, stacks)
        if head is None:
            bias_paths.append(path)
            biases[dotted(path)] = value
            continue
        axis, size = stacks[head]
        for row, array in enumerate(_rows(value, axis, size, f"bias {dotted(path)!r}")):
            bias_paths.append(_unrolled(path, head, row))
            biases[dotted(bias_paths[-1])] = array
    modules = _unroll_modules(saved.state.get(MODULES_TO_SAVE, {}), stacks)
    save_paths = [tuple(name.split(".")) for name in modules]
    spec = AdapterSpec(tuple(layers), tuple(bias_paths), tuple(save_paths), saved.config.bias)
    state = {SPECTRA: spectra, BIAS: biases, MODULES_TO_SAVE: modules}
    return SavedAdapter(saved.config, spec, state, _unroll_modules(saved.originals, stacks))


class _Shape:
    # A leaf of the unrolled view: enough of an array for shape lookups, without copying the base model.
    def __init__(self, shape: tuple[int, ...], dtype: Any) -> None:
        self.shape, self.dtype, self.ndim = tuple(shape), dtype, len(shape)


def unrolled_view(params: Mapping[str, Any], stacked: Stacks) -> tuple[dict[str, Any], StackTable]:
    """The ``params`` collection as the unrolled model names it (stack rows as ``"0"``, ``"1"``, ... sub-trees of
    shape-only leaves) and the stacks found (``targets.stack_axes``).

    Example:
        >>> view, stacks = unrolled_view({"l": {"q": {"kernel": np.zeros((3, 8, 4))}}}, "l")
        >>> sorted(view["l"]), view["l"]["2"]["q"]["kernel"].shape, stacks
        (['0', '1', '2'], (8, 4), {('l',): (0, 3)})
    """
    inner, _ = split_collection(params)
    stacks = stack_axes(inner, stacked)

    def shapes(node: Any, axis: int) -> Any:
        if isinstance(node, Mapping):
            return {str(key): shapes(value, axis) for key, value in node.items()}
        shape = tuple(np.shape(node))
        return _Shape(shape[:axis] + shape[axis + 1 :], getattr(node, "dtype", None))

    def build(node: Mapping[str, Any], path: Path) -> dict[str, Any]:
        out = {}
        for key, value in node.items():
            sub = path + (str(key),)
            if sub in stacks:
                axis, size = stacks[sub]
                row = shapes(value, axis)
                out[str(key)] = {str(i): row for i in range(size)}
            elif isinstance(value, Mapping) and any(head[: len(sub)] == sub for head in stacks):
                out[str(key)] = build(value, sub)
            else:
                out[str(key)] = value
        return out

    if () in stacks:
        raise ValueError("fourierft_jax: stacked='' (the whole tree as one stack) cannot be named in a PEFT file")
    return build(inner, ()), stacks


def _split(path: Path, stacks: StackTable) -> Optional[tuple[Path, Path, int]]:
    # An unrolled path head + (row,) + tail -> (head, head + tail, row); None outside every stack.
    for head in stacks:
        if path[: len(head)] == head and len(path) > len(head) and path[len(head)].isdigit():
            return head, head + path[len(head) + 1 :], int(path[len(head)])
    return None


def _restack_modules(trees: Mapping[str, Any], stacks: StackTable, what: str) -> dict[str, Any]:
    grouped: dict[str, dict[int, Any]] = {}
    out: dict[str, Any] = {}
    for name, tree in trees.items():
        found = _split(tuple(name.split(".")), stacks)
        if found is not None:
            grouped.setdefault(dotted(found[1]), {})[found[2]] = tree
            continue
        path = tuple(name.split("."))
        plain, rows = [], {}
        for rel, value in flat_leaves(tree):
            inner = _split(path + rel, stacks)
            if inner is None:
                plain.append((rel, value))
            else:
                rows.setdefault(inner[1][len(path) :], {})[inner[2]] = value
        for rel, by_row in rows.items():
            plain.append((rel, _stack_rows(by_row, stacks[stack_of(path + rel, stacks)], f"{what} {name!r}")))
        out[name] = _nest(plain)
    for name, by_row in grouped.items():
        head = stack_of(tuple(name.split(".")), stacks)
        axis, size = stacks[head]
        missing = sorted(set(range(size)) - set(by_row))
        if missing:
            raise ValueError(f"fourierft_jax: {what} {name!r} of stack {dotted(head)!r} lacks layers {missing} in "
                             f"the file (a module trained under a stack is one array for all {size} layers)")
        leaves = {row: dict(flat_leaves(tree)) for row, tree in by_row.items()}
        keys = list(leaves[0])
        if any(list(leaves[row]) != keys for row in leaves):
            raise ValueError(f"fourierft_jax: the layers of {what} {name!r} hold different tensors")
        out[name] = _nest([(rel, np.stack([leaves[row][rel] for row in range(size)], axis=axis)) for rel in keys])
    return out


def _stack_rows(by_row: Mapping[int, Any], entry: tuple[int, int], what: str) -> np.ndarray:
    axis, size = entry
    missing = sorted(set(range(size)) - set(by_row))
    if missing:
        raise ValueError(f"fourierft_jax: {what} lacks layers {missing} of its stack in the file")
    return np.stack([np.asarray(by_row[row]) for row in range(size)], axis=axis)


def restack(saved: SavedAdapter, stacks: StackTable, params: Mapping[str, Any]) -> SavedAdapter:
    """The inverse of ``unroll`` for the stacks of ``params`` (the stacked base parameters, which supply the bias
    rows a file lacks).

    Example:
        >>> import numpy as np, bridge
        >>> from fourierft_jax._src.adapter import AdapterSpec
        >>> rows = [layer_spec(("l", str(i), "q"), 8, 4, 3, bridge.FourierFTConfig()) for i in (0, 2)]
        >>> flat = SavedAdapter(bridge.FourierFTConfig(), AdapterSpec(tuple(rows)),
        ...                     {"spectra": {"l.0.q": np.zeros(3), "l.2.q": np.ones(3)}})
        >>> back = restack(flat, {("l",): (0, 3)}, {"l": {"q": {"kernel": np.zeros((3, 8, 4))}}})
        >>> back.spec.layers[0].stack_ids, back.state["spectra"]["l.q"].shape
        ((0, 2), (2, 3))
    """
    if not stacks:
        return saved
    layers, spectra = _restack_layers(saved, stacks)
    bias_paths, biases = _restack_biases(saved, stacks, params)
    modules = _restack_modules(saved.state.get(MODULES_TO_SAVE, {}), stacks, "module_to_save")
    spec = AdapterSpec(tuple(layers), tuple(bias_paths), tuple(tuple(name.split(".")) for name in modules),
                       saved.config.bias)
    state = {SPECTRA: spectra, BIAS: biases, MODULES_TO_SAVE: modules}
    originals = _restack_modules(saved.originals, stacks, "original module")
    return SavedAdapter(saved.config, spec, state, originals)


def _restack_layers(saved: SavedAdapter, stacks: StackTable) -> tuple[list, dict[str, Any]]:
    """The layers of ``saved`` with the rows of each stacked kernel gathered into one stacked ``LayerSpec``
    (in the order the first row came), and their spectra, one ``(rows, n)`` array per stacked kernel."""
    groups: dict[Path, dict[int, Any]] = {}
    order: list[Any] = []
    for layer in saved.spec.layers:
        found = _split(layer.path, stacks)
        if found is None:
            order.append(layer)
            continue
        head, path, row = found
        if path not in groups:
            groups[path] = {}
            order.append((head, path))
        groups[path][row] = layer
    layers, spectra = [], {}
    for item in order:
        if not isinstance(item, tuple):
            layers.append(item)
            spectra[item.name] = saved.state[SPECTRA][item.name]
            continue
        head, path = item
        rows = groups[path]
        ids = sorted(rows)
        first = rows[ids[0]]
        odd = [rows[i].name for i in ids if rows[i].n_frequency != first.n_frequency]
        if odd:
            raise ValueError(
                f"fourierft_jax: layers {first.name!r} (n_frequency={first.n_frequency}) and {odd[0]!r} share one "
                "stacked kernel but have spectra of different lengths; a stack needs one n_frequency"
            )
        axis, size = stacks[head]
        layer = layer_spec(path, first.in_features, first.out_features, first.n_frequency, saved.config,
                           stack_axis=axis, stack_size=size, stack_ids=ids, stack_depth=len(head))
        layers.append(layer)
        spectra[layer.name] = np.stack([np.asarray(saved.state[SPECTRA][rows[i].name]) for i in ids])
    return layers, spectra


def _restack_biases(saved: SavedAdapter, stacks: StackTable,
                    params: Mapping[str, Any]) -> tuple[list[Path], dict[str, Any]]:
    """The bias paths and biases of ``saved`` with the rows of each stacked bias gathered into one ``(L, out)``
    array; rows the file lacks come from the base ``params``."""
    inner, _ = split_collection(params)
    bias_paths, biases, bias_rows = [], {}, {}
    for path in saved.spec.bias_paths:
        found = _split(path, stacks)
        value = saved.state[BIAS][dotted(path)]
        if found is None:
            bias_paths.append(path)
            biases[dotted(path)] = value
            continue
        if found[1] not in bias_rows:
            bias_paths.append(found[1])
            bias_rows[found[1]] = {}
        bias_rows[found[1]][found[2]] = np.asarray(value)
    for path, rows in bias_rows.items():
        axis, size = stacks[stack_of(path, stacks)]
        dtype = next(iter(rows.values())).dtype
        missing = [row for row in range(size) if row not in rows]
        if missing:
            # bias="fourier_only" saves the adapted rows; the others are the base model's, untouched.
            base = _rows(get_path(inner, path + ("bias",), "bias"), axis, size, f"base bias {dotted(path)!r}")
            rows = {**{row: base[row].astype(dtype) for row in missing}, **rows}
        biases[dotted(path)] = _stack_rows(rows, (axis, size), f"bias {dotted(path)!r}")
    return bias_paths, biases


def as_stacked(read: Callable[[Mapping[str, Any]], SavedAdapter], params: Mapping[str, Any],
               stacked: Stacks) -> SavedAdapter:
    """``read(unrolled view of params)`` restacked onto the stacks of ``params``.

    Example:
        >>> params = {"q": {"kernel": np.zeros((8, 4))}}
        >>> as_stacked(lambda view: SavedAdapter(None, AdapterSpec(()), {}), params, None).spec.layers
        ()
    """
    if stacked is None:
        return read(params)
    view, stacks = unrolled_view(params, stacked)
    return restack(read(view), stacks, params)


__all__ = ["as_stacked", "restack", "stack_table", "unroll", "unrolled_view"]
