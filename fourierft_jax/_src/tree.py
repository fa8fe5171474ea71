"""Nested-dict helpers for Flax parameter trees, walked in insertion order (``jax.tree_util`` sorts keys).

A path is a tuple of string keys inside the ``params`` collection; its torch-style name joins them with dots.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

Path = tuple[str, ...]

PARAMS = "params"


def dotted(path: Path) -> str:
    """The torch-style dotted name of a path: ``("encoder", "layer", "0")`` → ``"encoder.layer.0"``."""
    return ".".join(str(key) for key in path)


def split_collection(tree: Mapping[str, Any]) -> tuple[Mapping[str, Any], Callable[[Mapping[str, Any]], Any]]:
    """The ``params`` mapping of ``tree`` and a function putting a new one back in its place.

    Accepts either a variables dict (``{"params": ..., "batch_stats": ...}``, as ``model.init`` returns) or the
    ``params`` mapping itself, so that every public function returns the structure it was given.
    """
    if not isinstance(tree, Mapping):
        raise TypeError(f"fourierft_jax: expected a Flax parameter tree (a dict), got {type(tree).__name__}")
    if PARAMS in tree and isinstance(tree[PARAMS], Mapping):
        def rebuild(params: Mapping[str, Any]) -> Any:
            out = dict(tree)
            out[PARAMS] = params
            return type(tree)(out) if not isinstance(tree, dict) else out

        return tree[PARAMS], rebuild
    return tree, lambda params: params


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
