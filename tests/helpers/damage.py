"""Ways to damage a valid PEFT adapter folder in place, shared by the bad-input tests of the CLI, fourierft_jax and
fourierft_torch (tests/cli/test_bad_inputs.py, tests/convert/test_bad_peft.py, tests/torch/test_bad_inputs.py).

Each test module keeps its own table of damages and the error text it expects, since the keys and layer names
differ between their models; the file surgery itself lives here once. Only numpy and safetensors are used, so
the helpers work on files written by PEFT (torch) and by this project alike.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from typing import Any, Callable

import numpy as np
from safetensors.numpy import load_file, save_file

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def edit_config(folder: str, change: Callable[[dict[str, Any]], Any]) -> None:
    """Apply ``change`` to the folder's config dict and write it back."""
    path = os.path.join(folder, CONFIG)
    with open(path) as stream:
        data = json.load(stream)
    change(data)
    with open(path, "w") as stream:
        json.dump(data, stream)


def write_config_text(folder: str, text: str) -> None:
    """Replace the config file with ``text`` (e.g. something that is not JSON)."""
    with open(os.path.join(folder, CONFIG), "w") as stream:
        stream.write(text)


def edit_tensors(folder: str, change: Callable[[dict[str, np.ndarray]], Any]) -> None:
    """Apply ``change`` to the folder's ``{key: array}`` and write them back as a valid safetensors file."""
    path = os.path.join(folder, WEIGHTS)
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_bytes(folder: str, change: Callable[[bytes], bytes]) -> None:
    """Apply ``change`` to the raw bytes of the safetensors file."""
    path = os.path.join(folder, WEIGHTS)
    with open(path, "rb") as stream:
        data = stream.read()
    with open(path, "wb") as stream:
        stream.write(change(data))


def truncate(folder: str, missing: int) -> None:
    """Cut the last ``missing`` bytes off the safetensors file."""
    edit_bytes(folder, lambda data: data[:-missing])


def claim_huge_header(folder: str) -> None:
    """Make the safetensors header's length field claim 2**62 bytes."""
    edit_bytes(folder, lambda data: struct.pack("<Q", 2**62) + data[8:])


def put_nan(folder: str, key: str, index: int) -> None:
    """Set one entry of tensor ``key`` to NaN."""

    def change(tensors: dict[str, np.ndarray]) -> None:
        tensors[key] = tensors[key].copy()
        tensors[key][index] = np.nan

    edit_tensors(folder, change)


class _Trap:
    """Unpickling it creates ``marker``: a loader that unpickles leaves evidence."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def unpickled_marker(folder: str) -> str:
    """The file ``pickle_only`` arranges to be created if the weights are ever unpickled."""
    return os.path.join(os.path.dirname(os.path.abspath(folder)), "unpickled")


def pickle_only(folder: str) -> None:
    """Replace the safetensors weights by an ``adapter_model.bin`` pickle that must never be unpickled."""
    os.remove(os.path.join(folder, WEIGHTS))
    with open(os.path.join(folder, "adapter_model.bin"), "wb") as stream:
        pickle.dump(_Trap(unpickled_marker(folder)), stream)
