"""The layout of a ``fourierft_jax`` Orbax adapter checkpoint, readable without jax (for ``fourierft inspect``).

A checkpoint is a folder holding ``fourierft_adapter.json`` (format tag, config, every adapted layer's path and
shape -- plus, for a stacked kernel, ``stack_axis``, ``stack_size``, ``stack_ids`` and ``stack_depth`` --, every
tensor's group, name, shape and dtype) and ``state/`` (the tensors, written by Orbax under the ids
the JSON lists). The JSON alone answers every question but the values, so the format can be recognised and
summarised without Orbax.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Union

from .folders import CheckpointError
from .config import FourierFTConfig
from .targets import stack_row_path

PathLike = Union[str, "os.PathLike[str]"]
METADATA_NAME = "fourierft_adapter.json"
STATE_DIR = "state"
FORMAT_TAG = "fourierft_jax.adapter"
FORMAT_VERSION = 1


def is_orbax_adapter(path: PathLike) -> bool:
    """Whether ``path`` is a folder holding a ``fourierft_jax`` adapter checkpoint's metadata.

    Example:
        >>> import tempfile
        >>> is_orbax_adapter(tempfile.mkdtemp())
        False
    """
    return os.path.isfile(os.path.join(os.fspath(path), METADATA_NAME))


def read_metadata(path: PathLike) -> dict[str, Any]:
    """The checkpoint's metadata, validated (format tag, version, config); ``CheckpointError`` names the file.

    Example:
        >>> import tempfile
        >>> read_metadata(tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        bridge._src.folders.CheckpointError: ... is not a fourierft_jax adapter checkpoint (no fourierft_adapter.json)
    """
    folder = os.fspath(path)
    file = os.path.join(folder, METADATA_NAME)
    if not os.path.isfile(file):
        raise CheckpointError(f"{folder} is not a fourierft_jax adapter checkpoint (no {METADATA_NAME})")
    try:
        with open(file, encoding="utf-8") as stream:
            data = json.load(stream)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file} is not readable JSON (corrupt checkpoint?): {error}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_TAG:
        raise CheckpointError(f"{file}: format tag is not {FORMAT_TAG!r}")
    if data.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: format version {data.get('version')!r} is not {FORMAT_VERSION} (newer package?)")
    try:
        data["config"] = FourierFTConfig.from_dict(data["config"])
        for layer in data["layers"]:
            for field in ("path", "in_features", "out_features", "n_frequency"):
                layer[field]  # noqa: B018 -- presence check
            if layer.get("stack_axis") is not None:  # a stacked kernel (absent in files before stacks)
                for field in ("stack_size", "stack_ids", "stack_depth"):
                    layer[field]  # noqa: B018
        for tensor in data["tensors"]:
            for field in ("id", "group", "module", "rel", "shape", "dtype"):
                tensor[field]  # noqa: B018
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{file}: missing or bad field ({error}): corrupt checkpoint") from None
    if not os.path.isdir(os.path.join(folder, STATE_DIR)):
        raise CheckpointError(f"{folder}: the tensors folder {STATE_DIR}/ is missing (incomplete checkpoint)")
    return data


def layer_names(layer: Mapping[str, Any]) -> list[str]:
    """The torch-style names of the layers one ``layers`` entry of the metadata covers: its dotted path, or for a
    stacked kernel one ``<stack>.<i>.<rest>`` per adapted row (each with ``n_frequency`` coefficients).

    Example:
        >>> layer_names({"path": ["encoder", "layer", "fc"], "stack_axis": 0, "stack_ids": [0, 2], "stack_depth": 2})
        ['encoder.layer.0.fc', 'encoder.layer.2.fc']
    """
    path = [str(key) for key in layer["path"]]
    if layer.get("stack_axis") is None:
        return [".".join(path)]
    return [".".join(stack_row_path(path, int(layer["stack_depth"]), int(i))) for i in layer["stack_ids"]]


def folder_bytes(path: PathLike) -> int:
    """Total size of the files under ``path``."""
    total = 0
    for root, _, files in os.walk(os.fspath(path)):
        total += sum(os.path.getsize(os.path.join(root, name)) for name in files)
    return total
