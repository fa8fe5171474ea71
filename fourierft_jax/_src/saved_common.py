"""What the linen side (``saved``) and the NNX side (``saved_nnx``) of a saved adapter share.

``saved`` builds on ``saved_nnx`` and both build on this module, so neither imports the other back.
"""

from __future__ import annotations

from typing import Any, Mapping

from .tree import Path


class AdapterMismatchError(ValueError):
    """A saved adapter does not fit the parameters or model it is attached to (names the path and both shapes)."""


def flat_leaves(tree: Any, prefix: Path = ()) -> list[tuple[Path, Any]]:
    """``[(relative path, array)]`` of a nested dict, in insertion order (a bare array gives ``[((), array)]``).

    Example:
        >>> [path for path, _ in flat_leaves({"dense": {"kernel": 1, "bias": 2}})]
        [('dense', 'kernel'), ('dense', 'bias')]
    """
    if not isinstance(tree, Mapping):
        return [(prefix, tree)]
    out = []
    for key, value in tree.items():
        out.extend(flat_leaves(value, prefix + (str(key),)))
    return out
