"""``FourierFTModel``: FourierFT adapters on a torch model, with PEFT's API names and PEFT's file format.

Which layers are adapted comes from ``bridge.select_targets`` (PEFT's rules), positions from
``bridge.spectral_indices``, file layout and validation from ``bridge._src.peft_format`` (see docs/format.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

import bridge
from bridge._src.atomic import atomic_directory, give_normal_mode
from bridge._src.peft_format import (
    MODULE,
    ORIGINAL,
    SAFETENSORS_METADATA,
    SPECTRUM,
    WEIGHTS_NAME,
    AdapterKey,
    adapter_directory,
    adapter_keys,
    check_adapter_shapes,
    config_for_saving,
    modules_to_save_names,
    read_shapes,
    rename_bias_aliases,
)

from ._layer import FourierFTLinear, layer_kind, layer_shape
from ._mixed import BASE, adapter_names_hooks, check_names, generate_expansion
from ._modules_to_save import ModulesToSaveWrapper, unwrap

# PEFT's PeftModelFor<task> add these to `modules_to_save` (PEFT 0.21, peft_model.py).
_TASK_MODULES = {
    "SEQ_CLS": ["classifier", "score"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
}


def _split(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


class FourierFTModel(nn.Module):
    """A model with FourierFT adapters; ``forward`` runs the wrapped model.

    Args:
        model: the base model (modified in place: target layers are wrapped).
        config: the first adapter's ``FourierFTConfig``.
        adapter_name: its name.

    Example:
        >>> import fourierft_torch
        >>> base = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> model = fourierft_torch.get_fourierft_model(base, fourierft_torch.FourierFTConfig(n_frequency=6, target_modules=["0"]))
        >>> model.get_nb_trainable_parameters()
        (6, 64)
    """

    def __init__(self, model: nn.Module, config: bridge.FourierFTConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, bridge.FourierFTConfig] = {}
        self.active_adapter = adapter_name
        self.add_adapter(adapter_name, config)

    @property
    def active_adapter(self) -> Union[str, list[str], None]:
        """The active adapter's name; a list when several are active at once (as PEFT's tuner model)."""
        names = self.__dict__.get("_active", [])
        if not names:
            return None
        return names[0] if len(names) == 1 else list(names)

    @active_adapter.setter
    def active_adapter(self, value: Union[str, Sequence[str], None]) -> None:
        self.__dict__["_active"] = [] if value is None else [value] if isinstance(value, str) else list(value)

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters' names, always a list."""
        return list(self.__dict__.get("_active", []))

    # ------------------------------------------------------------------ structure
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        """Run the wrapped model; ``adapter_names`` (one per batch row) runs each row with its own adapter.

        PEFT's mixed batches: ``"__base__"`` is the base model for that row; an unknown name, a list of the
        wrong length, merged adapters or a model in training mode raise ``ValueError`` (nothing changes). The
        adapters' part runs on the spectral path, for every row at once (``fourierft_torch._mixed``); it is for
        inference and carries no gradient.

        Example:
            >>> import fourierft_torch
            >>> base = nn.Sequential(nn.Linear(6, 6)).eval()
            >>> config = fourierft_torch.FourierFTConfig(n_frequency=4, target_modules=["0"])
            >>> model = fourierft_torch.get_fourierft_model(base, config)
            >>> model.add_adapter("other", config)
            >>> x = torch.randn(3, 6)
            >>> with torch.inference_mode():
            ...     mixed = model(x, adapter_names=["default", "__base__", "other"])
            ...     with model.disable_adapter():
            ...         plain = model(x)
            >>> torch.equal(mixed[1], plain[1])
            True
        """
        if adapter_names is None:
            return self.model(*args, **kwargs)
        with self._mixed_batch(adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        """The wrapped model's ``generate``; ``adapter_names`` (one per input row) as in ``forward``.

        With ``num_beams`` / ``num_return_sequences`` each name is repeated as transformers repeats its row
        (``max`` of the two; the encoder of an encoder-decoder model keeps the original rows), as PEFT does.
        Works with the KV cache (each step's rows are the same sequences).
        """
        generate = getattr(self.model, "generate", None)
        if generate is None:
            raise AttributeError(f"{type(self.model).__name__} has no generate()")
        if adapter_names is None:
            return generate(*args, **kwargs)
        expand = generate_expansion(kwargs, getattr(self.model, "generation_config", None))
        with self._mixed_batch(adapter_names, expand=expand):
            return generate(*args, **kwargs)

    @contextlib.contextmanager
    def _mixed_batch(self, adapter_names: Any, expand: int = 1) -> Iterator[None]:
        """Checks (before anything runs), then hooks that hand ``adapter_names`` to every adapted module."""
        names = check_names(adapter_names, list(self.peft_config))
        if self.model.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode; call model.eval() first.")
        layers, wrappers = self._fourier_layers(), self._wrappers()
        merged = [name for name, layer in layers.items() if layer.merged]
        if merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first "
                f"(merged into {', '.join(merged)})."
            )
        modules = list(layers.values()) + list(wrappers.values())
        expanded = [name for name in names for _ in range(expand)]
        encoder_modules: list[nn.Module] = []
        if expand > 1 and getattr(getattr(self.model, "config", None), "is_encoder_decoder", False):
            encoder = self.model.get_encoder() if hasattr(self.model, "get_encoder") else None
            inside = {id(m) for m in encoder.modules()} if encoder is not None else set()
            encoder_modules = [m for m in modules if id(m) in inside]
            modules = [m for m in modules if id(m) not in inside]
        with adapter_names_hooks(modules, expanded, encoder_modules, names):
            yield

    def _fourier_layers(self) -> dict[str, FourierFTLinear]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, FourierFTLinear)}

    def _wrappers(self) -> dict[str, ModulesToSaveWrapper]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, ModulesToSaveWrapper)}

    def _logical_modules(self) -> list[bridge.ModuleInfo]:
        """The base model's modules as ``bridge.ModuleInfo``, seen through our wrappers (PEFT names)."""
        infos: list[bridge.ModuleInfo] = []

        def visit(prefix: str, module: nn.Module) -> None:
            if isinstance(module, FourierFTLinear):
                module = module.base_layer
            elif isinstance(module, ModulesToSaveWrapper):
                module = module.original_module
            if prefix:
                kind = layer_kind(module)
                shape = layer_shape(module) if kind is not None and module.weight.dim() == 2 else None
                infos.append(bridge.ModuleInfo(prefix, kind or type(module).__name__, shape))
            for name, child in module.named_children():
                visit(f"{prefix}.{name}" if prefix else name, child)

        visit("", self.model)
        return infos

    def _logical_state(self) -> dict[str, torch.Tensor]:
        """The base model's state dict in its own naming (``lin0.bias``), tensors shared with the live model."""
        layers, wrappers = set(self._fourier_layers()), set(self._wrappers())
        state: dict[str, torch.Tensor] = {}
        for key, value in self.model.state_dict(keep_vars=True).items():
            logical = self._to_logical(key, layers, wrappers)
            if logical is not None:
                state[logical] = value
        return state

    @staticmethod
    def _to_logical(key: str, layers: set[str], wrappers: set[str]) -> Optional[str]:
        parts = key.split(".")
        out: list[str] = []
        i = 0
        while i < len(parts):
            out.append(parts[i])
            here = ".".join(out)
            if here in layers:
                nxt = parts[i + 1] if i + 1 < len(parts) else None
                if nxt == "fourierft_spectrum":
                    return None
                if nxt == "base_layer":
                    i += 2
                    continue
            if here in wrappers:
                nxt = parts[i + 1] if i + 1 < len(parts) else None
                if nxt == "modules_to_save":
                    return None
                if nxt == "original_module":
                    i += 2
                    continue
            i += 1
        return ".".join(out)

    def _model_type(self) -> Optional[str]:
        config = getattr(self.model, "config", None)
        return getattr(config, "model_type", None)

    def _output_layer(self) -> Optional[str]:
        getter = getattr(self.model, "get_output_embeddings", None)
        if getter is None:
            return None
        try:
            output = getter()
        except Exception:
            return None
        for name, module in self.model.named_modules():
            if module is output:
                return name
        return None

    # ------------------------------------------------------------------ planning (no mutation)
    def _plan_adapter(
        self, config: bridge.FourierFTConfig
    ) -> tuple[bridge.FourierFTConfig, list[bridge.TargetLayer], list[str]]:
        config = dataclasses.replace(config)
        extra = _TASK_MODULES.get(str(config.task_type).upper()) if config.task_type else None
        if extra:
            config.modules_to_save = list(config.modules_to_save or []) + [
                name for name in extra if name not in (config.modules_to_save or [])
            ]
        infos = self._logical_modules()
        targets = bridge.select_targets(
            config, infos, model_type=self._model_type(), output_layer=self._output_layer()
        )
        # PEFT flips the config's flag to fit each layer it creates; the last one wins in the saved config.
        config.fan_in_fan_out = targets[-1].kind == bridge.CONV1D
        saved = modules_to_save_names(config, [info.name for info in infos])
        return config, targets, saved

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, adapter_name: str, config: bridge.FourierFTConfig) -> None:
        """Add adapter ``adapter_name`` (not made active unless it is the first one).

        All or nothing: on any error (name taken, not a config, nothing targeted, a module that cannot be copied
        for ``modules_to_save`` ...) the model, its configs and torch's random state are left as they were.
        """
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete it first or pick another name")
        if not isinstance(config, bridge.FourierFTConfig):
            raise TypeError(f"expected a FourierFTConfig, got {type(config).__name__}")
        if config.bias != "none" and any(c.bias != "none" for c in self.peft_config.values()):
            raise ValueError(
                "FourierFTModel supports only 1 adapter with bias. When using multiple adapters, set bias to "
                "'none' for all adapters."
            )
        config, targets, saved = self._plan_adapter(config)
        rng = torch.random.get_rng_state()
        try:
            self._inject(adapter_name, config, targets, saved)
        except BaseException:
            torch.random.set_rng_state(rng)  # a retry draws the same spectra
            raise

    def _inject(
        self, adapter_name: str, config: bridge.FourierFTConfig, targets: list[bridge.TargetLayer], saved: list[str]
    ) -> None:
        """Wrap ``targets`` and ``saved`` for a new adapter; all or nothing (any error undoes what was done)."""
        undo: list[Any] = []
        flags = self._selection_state()
        try:
            self._inject_steps(adapter_name, config, targets, saved, undo)
            self._refresh()
        except BaseException:
            for action in reversed(undo):
                action()
            self._restore_selection_state(flags)
            raise

    def _inject_steps(
        self, adapter_name: str, config: bridge.FourierFTConfig, targets: list[bridge.TargetLayer], saved: list[str],
        undo: list[Any],
    ) -> None:
        """The mutations of ``_inject``, each followed by its undo action in ``undo`` (the caller rolls back)."""
        self.peft_config[adapter_name] = config
        undo.append(lambda: self.peft_config.pop(adapter_name, None))
        for target in targets:
            module = self.model.get_submodule(target.name)
            if isinstance(module, FourierFTLinear):
                undo.append(functools.partial(module.delete_adapter, adapter_name))
                module.update_layer(adapter_name, target.n_frequency, config)
                continue
            new = FourierFTLinear(
                module, adapter_name, config, target.n_frequency, fan_in_fan_out=target.kind == bridge.CONV1D
            )
            self._replace(target.name, new)
            undo.append(functools.partial(self._replace, target.name, module))
        for name in saved:
            module = self.model.get_submodule(name)
            if isinstance(module, ModulesToSaveWrapper):
                undo.append(functools.partial(module.remove, adapter_name))
                module.update(adapter_name)
            else:
                self._replace(name, ModulesToSaveWrapper(module, adapter_name))
                undo.append(functools.partial(self._replace, name, module))

    def _selection_state(self) -> tuple[dict, dict, dict]:
        """What ``_refresh`` changes: ``requires_grad`` of every parameter, the layers' and wrappers' selection."""
        grads = {id(p): (p, p.requires_grad) for p in self.model.parameters()}
        layers = {id(m): (m, list(m.active_adapters)) for m in self._fourier_layers().values()}
        wrappers = {id(m): (m, m.active_adapter) for m in self._wrappers().values()}
        return grads, layers, wrappers

    @staticmethod
    def _restore_selection_state(state: tuple[dict, dict, dict]) -> None:
        grads, layers, wrappers = state
        for param, flag in grads.values():
            param.requires_grad_(flag)
        for layer, active in layers.values():
            layer.active_adapters = active
        for wrapper, active in wrappers.values():
            wrapper.active_adapter = active

    def _replace(self, name: str, new: nn.Module) -> None:
        parent_name, child = _split(name)
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, new)

    def _refresh(self) -> None:
        """Apply PEFT's trainability rules for the active adapter(s)."""
        active = [name for name in self.active_adapters if name in self.peft_config]
        trainable = {name for name in active if not self.peft_config[name].inference_mode}
        biases = {self.peft_config[name].bias for name in trainable}
        for param in self.model.parameters():
            param.requires_grad_(False)
        for layer in self._fourier_layers().values():
            layer.active_adapters = list(active)
            for name, spectrum in layer.fourierft_spectrum.items():
                spectrum.requires_grad_(name in trainable)
        if "all" in biases:
            for name, param in self.model.named_parameters():
                if (name == "bias" or name.endswith(".bias")) and ".fourierft_spectrum." not in name:
                    param.requires_grad_(True)
        elif "fourier_only" in biases:
            for layer in self._fourier_layers().values():
                if trainable & set(layer.fourierft_spectrum) and getattr(layer.base_layer, "bias", None) is not None:
                    layer.base_layer.bias.requires_grad_(True)
        for wrapper in self._wrappers().values():
            here = [name for name in active if name in wrapper.modules_to_save]
            wrapper.set_adapter(here[0] if here else None, trainable=bool(here) and here[0] in trainable)
            wrapper.original_module.requires_grad_(False)

    def set_adapter(self, adapter_name: Union[str, Sequence[str]]) -> None:
        """Make ``adapter_name`` the active (and trainable) adapter; a list activates several at once (their ΔW add up).

        Example:
            >>> import fourierft_torch
            >>> model = fourierft_torch.get_fourierft_model(nn.Sequential(nn.Linear(4, 4)),
            ...     fourierft_torch.FourierFTConfig(n_frequency=3, target_modules=["0"]))
            >>> model.add_adapter("other", fourierft_torch.FourierFTConfig(n_frequency=2, target_modules=["0"]))
            >>> model.set_adapter(["default", "other"]); model.active_adapters
            ['default', 'other']
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown or not names:
            raise ValueError(f"unknown adapter(s) {unknown or names!r}; adapters: {sorted(self.peft_config)}")
        for path, wrapper in self._wrappers().items():
            here = [name for name in names if name in wrapper.modules_to_save]
            if len(here) > 1:
                raise ValueError(f"Attempted to set multiple ({here}) adapters at once for modules_to_save ({path}).")
        self.active_adapter = names
        self._refresh()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter everywhere; if it was active, the first remaining one becomes active.

        As in PEFT, the last adapter may be deleted too (the layers go back to the base modules), and a merged
        adapter is refused -- before anything changes.
        """
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {sorted(self.peft_config)}")
        merged_into = [name for name, layer in self._fourier_layers().items() if adapter_name in layer.merged_adapters]
        if merged_into:  # checked before anything changes (PEFT refuses this too)
            raise ValueError(
                f"adapter {adapter_name!r} is merged into {', '.join(merged_into)}; unmerge_adapter() before deleting"
            )
        del self.peft_config[adapter_name]
        for name, layer in self._fourier_layers().items():
            layer.delete_adapter(adapter_name)
            if not layer.fourierft_spectrum:
                self._replace(name, layer.base_layer)
        for name, wrapper in self._wrappers().items():
            wrapper.remove(adapter_name)
            if not len(wrapper.modules_to_save):
                self._replace(name, wrapper.original_module)
        remaining = [name for name in self.active_adapters if name != adapter_name]
        self.active_adapter = remaining or next(iter(self.peft_config), None)
        self._refresh()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: inside it the model computes the base model's output.

        Example:
            >>> import fourierft_torch
            >>> base = nn.Sequential(nn.Linear(4, 4))
            >>> model = fourierft_torch.get_fourierft_model(base, fourierft_torch.FourierFTConfig(n_frequency=3, target_modules=["0"]))
            >>> x = torch.randn(1, 4)
            >>> with model.disable_adapter():
            ...     same = torch.equal(model(x), base[0].base_layer(x))
            >>> same
            True
        """
        modules = list(self._fourier_layers().values()) + list(self._wrappers().values())
        previous = [m.disable_adapters for m in modules]
        for module in modules:
            module.disable_adapters = True
        try:
            yield
        finally:
            for module, flag in zip(modules, previous):
                module.disable_adapters = flag

    # ------------------------------------------------------------------ merging
    def _check_merge_names(self, adapter_names: Optional[Sequence[str]]) -> None:
        if adapter_names is None:
            return
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}")
        unknown = [name for name in adapter_names if name not in self.peft_config]
        if unknown:
            raise ValueError(f"cannot merge unknown adapter(s) {unknown}; adapters: {sorted(self.peft_config)}")

    def _check_finite(self, adapter_names: Optional[Sequence[str]]) -> None:
        # Every layer, with every adapter it would merge added in merge order, before any weight changes.
        for name, layer in self._fourier_layers().items():
            merged = layer.merged_weight(adapter_names)
            if merged is not None and not torch.isfinite(merged).all():
                raise ValueError(
                    f"NaNs detected in the merged weights of {name}. The adapter(s) "
                    f"{layer.to_merge(adapter_names)} seem to be broken; no weight was changed"
                )

    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        """Merge the active (or named) adapters into the base weights; ``unmerge_adapter`` undoes it.

        ``safe_merge`` checks every layer for NaN/inf before changing any weight; an unknown name raises first.
        """
        self._check_merge_names(adapter_names)
        if safe_merge:
            self._check_finite(adapter_names)
        for layer in self._fourier_layers().values():
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        """Subtract every merged adapter from the base weights."""
        for layer in self._fourier_layers().values():
            if layer.merged:
                layer.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Optional[list[str]] = None
    ) -> nn.Module:
        """Merge the adapters into the base weights and return the plain base model (no overhead left).

        ``safe_merge`` checks every layer for NaN/inf before changing any weight.
        """
        self._check_merge_names(adapter_names)
        if safe_merge:
            self._check_finite(adapter_names)
        return self._unload(merge=True, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the base model."""
        return self._unload(merge=False)

    def _unload(
        self,
        merge: bool,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ) -> nn.Module:
        layers = list(self._fourier_layers().items())
        iterator: Any = layers
        if progressbar:
            from tqdm.auto import tqdm

            iterator = tqdm(layers, desc="Unloading " + ("and merging " if merge else "") + "model")
        for name, layer in iterator:
            if merge:
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            self._replace(name, layer.base_layer)
        for name, wrapper in self._wrappers().items():
            self._replace(name, unwrap(wrapper))
        return self.model

    # ------------------------------------------------------------------ counting
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable parameters, all parameters)``, counted as PEFT does (adapter copies included)."""
        trainable = total = 0
        for param in self.parameters():
            total += param.numel()
            if param.requires_grad:
                trainable += param.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print PEFT's line ``trainable params: ... || all params: ... || trainable%: ...``."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    # ------------------------------------------------------------------ files
    def _adapter_keys(
        self, config: bridge.FourierFTConfig, targets: list[bridge.TargetLayer], saved: list[str]
    ) -> list[AdapterKey]:
        shapes = {name: tuple(t.shape) for name, t in self._logical_state().items()}
        adapted = sorted(set(self._fourier_layers()) | {t.name for t in targets})
        return adapter_keys(config, targets, shapes, saved, adapted_layers=adapted)

    def _adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        config = self.peft_config[adapter_name]
        layers, wrappers = self._fourier_layers(), self._wrappers()
        targets = [
            bridge.TargetLayer(name, bridge.LINEAR, layer.out_features, layer.in_features,
                               layer.fourierft_n_frequency[adapter_name])
            for name, layer in layers.items() if adapter_name in layer.fourierft_spectrum
        ]
        saved = [name for name, w in wrappers.items() if adapter_name in w.modules_to_save]
        logical = self._logical_state()
        tensors: dict[str, torch.Tensor] = {}
        for key in self._adapter_keys(config, targets, saved):
            tensors[key.key] = self._tensor_for(key, adapter_name, layers, wrappers, logical)
        return tensors

    @staticmethod
    def _tensor_for(key, adapter_name, layers, wrappers, logical) -> torch.Tensor:
        if key.kind == SPECTRUM:
            return layers[key.module].fourierft_spectrum[adapter_name]
        if key.kind == MODULE:
            return wrappers[key.module].modules_to_save[adapter_name].state_dict(keep_vars=True)[key.param]
        if key.kind == ORIGINAL:
            return wrappers[key.module].original_module.state_dict(keep_vars=True)[key.param]
        name = f"{key.module}.{key.param}" if key.module else key.param
        return logical[name]

    def save_pretrained(self, save_directory: Union[str, os.PathLike], selected_adapters: Optional[list[str]] = None) -> None:
        """Write the adapters in PEFT's layout (``default`` in the directory, others in sub-folders), atomically.

        ``peft.PeftModel.from_pretrained(base_model, save_directory)`` loads the result.
        """
        from safetensors.torch import save_file

        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapters {unknown}; adapters: {sorted(self.peft_config)}")
        payloads = {}
        for name in names:
            tensors = {k: v.detach().cpu().contiguous().clone() for k, v in self._adapter_tensors(name).items()}
            config = config_for_saving(self.peft_config[name])
            if config.base_model_name_or_path is None:
                config.base_model_name_or_path = getattr(getattr(self.model, "config", None), "name_or_path", None) or None
            payloads[name] = (config, tensors)
        with atomic_directory(save_directory, merge=True) as temporary:  # other adapters there stay
            for name, (config, tensors) in payloads.items():
                folder = adapter_directory(temporary, name)
                os.makedirs(folder, exist_ok=True)
                save_file(tensors, os.path.join(folder, WEIGHTS_NAME), metadata=dict(SAFETENSORS_METADATA))
                give_normal_mode(os.path.join(folder, WEIGHTS_NAME))  # safetensors creates the file 0600
                config.save_pretrained(folder)

    def load_adapter(
        self, directory: Union[str, os.PathLike], adapter_name: str, is_trainable: bool = False
    ) -> None:
        """Load one adapter directory (as PEFT writes it) as ``adapter_name``; strict, and all-or-nothing.

        Every key, shape and the config are checked against this model before anything is changed; a missing,
        extra or wrong-shaped key raises ``bridge.AdapterFormatError`` naming it.
        """
        from safetensors.torch import load_file

        from bridge._src.peft_reader import check_folder

        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        # bridge's strict reader: config, weights file (never a pickle) and every key against the config
        config, path = check_folder(directory)
        config = dataclasses.replace(config, inference_mode=not is_trainable)
        if config.bias != "none" and any(c.bias != "none" for c in self.peft_config.values()):
            raise ValueError("FourierFTModel supports only 1 adapter with bias")
        config, targets, saved = self._plan_adapter(config)
        keys = self._adapter_keys(config, targets, saved)
        shapes, _ = read_shapes(path)
        renames = rename_bias_aliases(keys, list(shapes))
        shapes = {renames.get(k, k): v for k, v in shapes.items()}
        check_adapter_shapes(keys, shapes, source=path)
        try:
            tensors = {renames.get(k, k): v for k, v in load_file(path).items()}
        except Exception as error:
            raise bridge.AdapterFormatError(f"{path}: cannot read the tensors (truncated or corrupt?): {error}") from None
        _refuse_nonfinite(keys, tensors, path)
        # Validated: now mutate.
        state = torch.random.get_rng_state()
        try:
            self._inject(adapter_name, config, targets, saved)
        finally:
            torch.random.set_rng_state(state)  # loading must not consume the caller's random stream
        self._copy_tensors(adapter_name, keys, tensors)
        if not any(name in self.peft_config for name in self.active_adapters) or len(self.peft_config) == 1:
            self.active_adapter = adapter_name
        self._refresh()

    def load_adapters(
        self,
        folders: Sequence[Union[str, os.PathLike]],
        adapter_names: Optional[Sequence[str]] = None,
        *,
        progress: bool = True,
    ) -> list[str]:
        """Load many PEFT FourierFT folders at once (a bank for mixed batches); returns their names.

        ``adapter_names`` default to the folders' base names. Each folder goes through the strict reader
        (``bridge._src.many.read_adapters``, with a tqdm bar) and is checked against this model like
        ``load_adapter`` (every key and shape, no NaN/inf) before anything changes; targets are planned once per
        distinct config and positions once per distinct ``(shape, n_frequency, seed)``. All or nothing: if any
        folder is refused, the model is left exactly as it was. The adapters load for inference (frozen).

        Example:
            >>> import tempfile, fourierft_torch
            >>> base = nn.Sequential(nn.Linear(6, 6)).eval()
            >>> config = fourierft_torch.FourierFTConfig(n_frequency=4, target_modules=["0"])
            >>> model = fourierft_torch.get_fourierft_model(base, config)
            >>> root = tempfile.mkdtemp()
            >>> for task in ("a", "b", "c"):
            ...     model.save_pretrained(f"{root}/{task}")
            >>> model.load_adapters([f"{root}/{task}" for task in ("a", "b", "c")], progress=False)
            ['a', 'b', 'c']
            >>> model(torch.randn(2, 6), adapter_names=["c", "a"]).shape
            torch.Size([2, 6])
        """
        from bridge._src.many import read_adapters

        read = read_adapters(folders, adapter_names, progress=progress)
        taken = [a.name for a in read if a.name in self.peft_config or a.name == BASE]
        if taken:
            raise ValueError(f"adapter name(s) {taken} already exist (or are reserved); pass other adapter_names=")
        with_bias = [a.name for a in read if a.config.bias != "none"]
        with_bias += [name for name, c in self.peft_config.items() if c.bias != "none"]
        if len(with_bias) > 1:
            raise ValueError(f"FourierFTModel supports only 1 adapter with bias, got {with_bias}")
        plans = self._plan_many(read)
        # Validated: now mutate, all adapters or none.
        undo: list[Any] = []
        flags = self._selection_state()
        state = torch.random.get_rng_state()
        active = self.active_adapters
        try:
            for adapter, (config, targets, saved, keys, tensors) in zip(read, plans):
                self._inject_steps(adapter.name, config, targets, saved, undo)
                self._copy_tensors(adapter.name, keys, tensors)
            if read and not any(name in self.peft_config for name in active):
                self.active_adapter = read[0].name  # as load_adapter: a model without an active one gets the first
            self._refresh()
        except BaseException:
            for action in reversed(undo):
                action()
            self.active_adapter = active
            self._restore_selection_state(flags)
            raise
        finally:
            torch.random.set_rng_state(state)  # loading must not consume the caller's random stream
        return [adapter.name for adapter in read]

    def _plan_many(self, read: list) -> list[tuple]:
        """Per folder: ``(config, targets, saved, keys, tensors)`` checked against this model; no mutation."""
        shapes = {name: tuple(t.shape) for name, t in self._logical_state().items()}
        adapted = set(self._fourier_layers())
        planned: dict[str, tuple] = {}
        out = []
        for i, adapter in enumerate(read):
            config = dataclasses.replace(adapter.config, inference_mode=True)
            key = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
            if key not in planned:
                planned[key] = self._plan_adapter(config)
            config, targets, saved = planned[key]
            config = dataclasses.replace(config)  # one config object per adapter, as load_adapter gives
            adapted |= {t.name for t in targets}
            keys = adapter_keys(config, targets, shapes, saved, adapted_layers=sorted(adapted))
            renames = rename_bias_aliases(keys, list(adapter.tensors))
            tensors = {renames.get(k, k): v for k, v in adapter.tensors.items()}
            where = f"adapter {i} ({adapter.name!r}, {adapter.folder})"
            check_adapter_shapes(keys, {k: v.shape for k, v in tensors.items()}, source=where)
            _refuse_nonfinite(keys, tensors, where)
            out.append((config, targets, saved, keys, tensors))
        return out

    def _copy_tensors(self, adapter_name: str, keys: list[AdapterKey], tensors: dict) -> None:
        """Copy an injected adapter's values (numpy or torch) into its spectra, copies and biases."""
        layers, wrappers = self._fourier_layers(), self._wrappers()
        logical = self._logical_state() if any(k.kind not in (SPECTRUM, MODULE) for k in keys) else {}
        with torch.no_grad():
            for key in keys:
                target = self._tensor_for(key, adapter_name, layers, wrappers, logical)
                value = tensors[key.key]
                value = value if isinstance(value, torch.Tensor) else torch.tensor(value)  # read-only numpy: copy
                target.copy_(value.to(device=target.device, dtype=target.dtype))

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        directory: Union[str, os.PathLike],
        adapter_name: str = "default",
        is_trainable: bool = False,
    ) -> FourierFTModel:
        """Load a FourierFT adapter directory (ours or PEFT's) onto ``model``; strict (see ``load_adapter``).

        On any error ``model`` is left exactly as it was.
        """
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.model = model
        self.peft_config = {}
        self.active_adapter = adapter_name
        self.load_adapter(directory, adapter_name, is_trainable=is_trainable)
        return self


def _refuse_nonfinite(keys: Sequence[AdapterKey], tensors: Mapping[str, Any], where: Any) -> None:
    """``AdapterFormatError`` naming every float tensor of ``keys`` (torch or numpy) that holds NaN or inf."""
    def finite(value: Any) -> bool:
        if isinstance(value, torch.Tensor):
            return not value.is_floating_point() or bool(torch.isfinite(value.float()).all())
        value = np.asarray(value)
        return not np.issubdtype(value.dtype, np.floating) or bool(np.isfinite(value).all())

    bad = [key.key for key in keys if not finite(tensors[key.key])]
    if bad:
        raise bridge.AdapterFormatError(f"{where}: NaN or inf values in {', '.join(repr(k) for k in bad)}")


def get_fourierft_model(
    model: nn.Module, config: bridge.FourierFTConfig, adapter_name: str = "default"
) -> FourierFTModel:
    """Wrap ``model``'s target layers with FourierFT adapters (PEFT's ``get_peft_model`` for FourierFT).

    With the same torch seed, the initial spectra equal PEFT's (one ``torch.randn(n)`` per layer, model order).

    Example:
        >>> import fourierft_torch
        >>> base = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 2))
        >>> model = get_fourierft_model(base, fourierft_torch.FourierFTConfig(n_frequency=5, target_modules=["0"]))
        >>> model(torch.randn(3, 10)).shape
        torch.Size([3, 2])
    """
    return FourierFTModel(model, config, adapter_name)
