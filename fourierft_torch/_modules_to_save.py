"""``ModulesToSaveWrapper``: a module trained in full for an adapter (PEFT's ``modules_to_save``), same layout."""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ._mixed import check_rows


class ModulesToSaveWrapper(nn.Module):
    """Keeps the ``original_module`` and one trainable copy per adapter in ``modules_to_save[adapter]``.

    Example:
        >>> wrapper = ModulesToSaveWrapper(nn.Linear(2, 2), "default")
        >>> sorted(name for name, _ in wrapper.named_children())
        ['modules_to_save', 'original_module']
    """

    def __init__(self, module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict({})
        self.active_adapter: Optional[str] = None
        self.disable_adapters = False
        self.update(adapter_name)

    def update(self, adapter_name: str) -> None:
        """Add a fresh copy of the original module for ``adapter_name``."""
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.original_module.requires_grad_(False)

    def remove(self, adapter_name: str) -> None:
        """Drop ``adapter_name``'s copy (no-op when absent); its selection falls back to the original module."""
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def set_adapter(self, adapter_name: Optional[str], trainable: bool = True) -> None:
        """Use ``adapter_name``'s copy (``None`` or an adapter without a copy: the original module)."""
        self.active_adapter = adapter_name if adapter_name in self.modules_to_save else None
        for name, module in self.modules_to_save.items():
            module.requires_grad_(trainable and name == self.active_adapter)

    def current(self) -> nn.Module:
        if self.disable_adapters or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        if adapter_names is None:
            return self.current()(*args, **kwargs)
        return self._mixed_batch_forward(args, kwargs, adapter_names)

    def _mixed_batch_forward(self, args: tuple, kwargs: dict, adapter_names: Sequence[str]) -> torch.Tensor:
        """Each row of the first argument through its adapter's copy (the original for ``"__base__"`` and for
        adapters without a copy here), as PEFT's wrapper does for a mixed batch."""
        if not args or not isinstance(args[0], torch.Tensor):
            raise TypeError("ModulesToSaveWrapper: a mixed batch needs the batch tensor as the first argument")
        x, rest = args[0], args[1:]
        check_rows(x, adapter_names, "ModulesToSaveWrapper")
        groups: dict[int, tuple[nn.Module, list[int]]] = {}
        for row, name in enumerate(adapter_names):
            module = self.original_module
            if not self.disable_adapters and name in self.modules_to_save:
                module = self.modules_to_save[name]
            groups.setdefault(id(module), (module, []))[1].append(row)
        if len(groups) == 1:
            module = next(iter(groups.values()))[0]
            return module(x, *rest, **kwargs)
        result = None
        for module, rows in groups.values():
            index = torch.tensor(rows, dtype=torch.int64, device=x.device)
            out = module(x.index_select(0, index), *rest, **kwargs)
            if not isinstance(out, torch.Tensor):
                raise TypeError(
                    f"ModulesToSaveWrapper: mixed batches need a module that returns a tensor, "
                    f"{type(module).__name__} returned {type(out).__name__}"
                )
            if result is None:
                result = out.new_empty((x.shape[0], *out.shape[1:]))
            result.index_copy_(0, index, out)
        return result

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Parents sometimes read attributes (e.g. `.weight`) of their child directly.
            return getattr(super().__getattr__("original_module"), name)


def unwrap(wrapper: ModulesToSaveWrapper) -> nn.Module:
    """The module that replaces the wrapper when unloading: the active copy, else the original."""
    with torch.no_grad():
        return wrapper.current() if not wrapper.disable_adapters else wrapper.original_module
