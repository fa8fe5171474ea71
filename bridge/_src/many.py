"""Reading many PEFT FourierFT folders at once (an adapter bank for serving): one strict read per folder.

Each folder goes through the strict reader (``peft_format.read_adapter``), so a damaged folder is an error that
names it, and only the small files (``adapter_config.json``, ``adapter_model.safetensors``) are opened. The
frameworks then compute positions once per distinct ``(shape, n_frequency, seed)``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence, Union

import numpy as np

from .config import FourierFTConfig
from .peft_format import AdapterFormatError, read_adapter

PathLike = Union[str, os.PathLike]


@dataclasses.dataclass(frozen=True)
class FolderAdapter:
    """One PEFT folder as read: its ``name`` (the folder's base name unless given), config and tensors."""

    name: str
    folder: str
    config: FourierFTConfig
    tensors: dict[str, np.ndarray]


def read_adapters(
    folders: Sequence[PathLike],
    names: Optional[Sequence[str]] = None,
    *,
    progress: bool = True,
) -> list[FolderAdapter]:
    """Read PEFT FourierFT folders (each checked by the strict reader), with a tqdm bar on stderr.

    ``names`` default to the folders' base names; they must be distinct. A folder that fails the strict reader
    raises ``AdapterFormatError`` naming it (and its position in the list); nothing is returned partially.

    Example:
        >>> import tempfile, numpy as np
        >>> from .peft_format import spectrum_key, write_adapter
        >>> root = tempfile.mkdtemp()
        >>> config = FourierFTConfig(n_frequency=2, target_modules=["lin0"])
        >>> for i in range(3):
        ...     _ = write_adapter(f"{root}/task{i}", config, {spectrum_key("lin0"): np.full(2, i, np.float32)})
        >>> [(a.name, a.tensors[spectrum_key("lin0")].tolist()) for a in
        ...  read_adapters([f"{root}/task{i}" for i in range(3)], progress=False)]
        [('task0', [0.0, 0.0]), ('task1', [1.0, 1.0]), ('task2', [2.0, 2.0])]
    """
    folders = [os.fspath(f) for f in folders]
    if names is None:
        names = [os.path.basename(os.path.normpath(f)) for f in folders]
    names = list(names)
    if len(names) != len(folders):
        raise ValueError(f"read_adapters: {len(folders)} folders but {len(names)} names")
    seen: dict[str, str] = {}
    for name, folder in zip(names, folders):
        if name in seen:
            raise ValueError(f"read_adapters: name {name!r} is used by {seen[name]!r} and {folder!r}; pass names=")
        seen[name] = folder
    from tqdm.auto import tqdm

    out = []
    for i, (name, folder) in enumerate(tqdm(list(zip(names, folders)), desc="reading adapters", unit="adapter",
                                            disable=not progress)):
        try:
            config, tensors = read_adapter(folder)
        except AdapterFormatError as error:
            raise AdapterFormatError(f"adapter {i} ({name!r}): {error}") from None
        out.append(FolderAdapter(name, folder, config, tensors))
    return out
