"""Parameter trees as nested dicts, walked in insertion order (``jax.tree_util`` sorts keys).

A path is a tuple of string keys inside the ``params`` collection; its torch-style name joins them with dots.
Any other pytree (``nnx.State``, integer keys, dataclass models) is seen through a nested-dict view of the string
form of its path entries (``split_collection``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

Path = tuple[str, ...]

PARAMS = "params"


def dotted(path: Path) -> str:
    """The torch-style dotted name of a path: ``("encoder", "layer", "0")`` → ``"encoder.layer.0"``."""
    return ".".join(str(key) for key in path)


def key_name(entry: Any) -> str:
    """A ``jax.tree_util`` path entry as a name: a dict key, an attribute name or a sequence index."""
    for field in ("key", "name", "idx"):
        if hasattr(entry, field):
            return str(getattr(entry, field))
    return str(entry)


def leaf_paths(tree: Any) -> list[Path]:
    """The string path of every leaf of ``tree`` in ``jax.tree.leaves`` order, relative to the ``params``
    collection when ``tree`` is a variables dict (leaves of other collections get a leading ``None``-free marker
    path that never names a parameter). A trailing ``value`` attribute (an ``nnx.Variable``'s) is dropped.

    Example:
        >>> leaf_paths({"params": {"q": {"kernel": 1, "bias": 2}}, "stats": {"m": 3}})
        [('q', 'bias'), ('q', 'kernel'), ('<stats>', 'm')]
    """
    import jax

    collection = isinstance(tree, Mapping) and isinstance(tree.get(PARAMS), Mapping)
    out = []
    for entries, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        path = tuple(key_name(e) for e in entries)
        if entries and type(entries[-1]).__name__ == "GetAttrKey" and path[-1] == "value":
            path = path[:-1]
        if collection:
            path = path[1:] if path[0] == PARAMS else (f"<{path[0]}>",) + path[1:]
        out.append(path)
    return out


def _is_plain(tree: Any) -> bool:
    if type(tree) is not dict and type(tree).__name__ != "FrozenDict":
        return False
    return all(isinstance(k, str) and (not isinstance(v, Mapping) or _is_plain(v)) for k, v in tree.items())


def _named_view(tree: Any) -> tuple[dict[str, Any], Callable[[Mapping[str, Any]], Any]]:
    """A nested dict of string keys over any pytree, and a function rebuilding the pytree from such a dict."""
    import jax

    leaves, treedef = jax.tree.flatten(tree)
    paths = leaf_paths(tree)
    view: dict[str, Any] = {}
    for path, leaf in zip(paths, leaves):
        node = view
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf

    def rebuild(new_view: Mapping[str, Any]) -> Any:
        return jax.tree.unflatten(treedef, [get_path(new_view, path) for path in paths])

    return view, rebuild


def split_collection(tree: Any) -> tuple[Mapping[str, Any], Callable[[Mapping[str, Any]], Any]]:
    """The ``params`` mapping of ``tree`` and a function putting a new one back in its place.

    Accepts a variables dict (``{"params": ..., "batch_stats": ...}``, as ``model.init`` returns), the ``params``
    mapping itself, or any other pytree (``nnx.State``, dicts with integer keys, dataclass models): those are
    seen as nested dicts keyed by the string form of their path entries, and rebuilt with their own types. Every
    public function thereby returns the structure it was given.

    Example:
        >>> view, rebuild = split_collection({"layers": {0: {"kernel": 1}}})
        >>> view, rebuild({"layers": {"0": {"kernel": 2}}})
        ({'layers': {'0': {'kernel': 1}}}, {'layers': {0: {'kernel': 2}}})
    """
    if isinstance(tree, Mapping) and PARAMS in tree and isinstance(tree[PARAMS], Mapping):
        inner, rebuild_inner = split_collection(tree[PARAMS])

        def rebuild(params: Mapping[str, Any]) -> Any:
            out = dict(tree)
            out[PARAMS] = rebuild_inner(params)
            return type(tree)(out) if not isinstance(tree, dict) else out

        return inner, rebuild
    if _is_plain(tree):
        return tree, lambda params: params
    return _named_view(tree)


def iter_nodes(tree: Mapping[str, Any], prefix: Path = ()) -> Iterator[tuple[Path, Mapping[str, Any]]]:
    """Every dict node (the root included), depth first, in insertion order."""
    yield prefix, tree
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from iter_nodes(value, prefix + (str(key),))


def get_path(tree: Mapping[str, Any], path: Path, what: str = "entry") -> Any:
    """``tree[path[0]][path[1]]...``; a missing key raises ``KeyError`` naming the dotted path."""
    node: Any = tree
    for depth, key in enumerate(path):
        if not isinstance(node, Mapping) or key not in node:
            raise KeyError(
                f"fourierft_jax: the parameter tree has no {what} at {dotted(path)!r} (missing "
                f"{dotted(path[: depth + 1])!r}); is this the tree the adapter was built for?"
            )
        node = node[key]
    return node


def replace_paths(tree: Mapping[str, Any], updates: Mapping[Path, Any]) -> dict[str, Any]:
    """A copy of ``tree`` with the leaves/subtrees at ``updates``' paths replaced; only the touched dicts are copied."""
    if not updates:
        return tree  # type: ignore[return-value]
    heads: dict[str, dict[Path, Any]] = {}
    out = dict(tree)
    for path, value in updates.items():
        if len(path) == 1:
            out[path[0]] = value
        else:
            heads.setdefault(path[0], {})[path[1:]] = value
    for key, sub in heads.items():
        child = tree.get(key)
        if not isinstance(child, Mapping):
            raise KeyError(f"fourierft_jax: cannot replace under {key!r}: it is not a dict in the parameter tree")
        out[key] = replace_paths(child, sub)
    return out
