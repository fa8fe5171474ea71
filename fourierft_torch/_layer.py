"""``FourierFTLinear``: a FourierFT adapter around a ``torch.nn.Linear`` or a transformers ``Conv1D``.

Same attribute names as PEFT's layer (``base_layer``, ``fourierft_spectrum`` ParameterDict, ``indices``,
``fourierft_scaling`` ...), so the module tree and state-dict names match PEFT's; the forward pass is ours:

* ``"spectral"``: ``base(x) + x ΔWᵀ`` computed in the frequency domain, O(tokens·d·log d), no ΔW at all;
* ``"fused"``: one ``F.linear(x, W + ΔW, b)`` with ΔW from ``irfft2`` of the half spectrum; its backward gets
  the spectrum's gradient from two row FFTs and an ``n × tokens`` gather (never the ``dyᵀx`` matmul), and the
  input's FFT is shared by layers that read the same activation (query/key/value);
* ``"auto"`` (default): ``"spectral"`` while ``tokens · (in + out) < SPECTRAL_RATIO · in · out``, else
  ``"fused"`` -- see ``choose_mode``.

The auto rule. Spectral costs grow with the token count (an FFT of every token row in and out), fused costs a
fixed ``irfft2`` of the ``out × in`` ΔW plus the matmul the base layer does anyway; so spectral wins below a
token count proportional to ``in·out/(in+out)``. ``SPECTRAL_RATIO`` is the measured constant of that
proportionality (``benchmarks/torch_auto_rule.py``, CPU, torch 2.13, n_frequency=1000; table in BENCHMARKS.md):
measured crossovers (forward+backward and forward only, interpolated between the measured token counts) give
``T*·(in+out)/(in·out)`` between 0.4 (768×768) and 1.1 (3072×768), and about 0.5 for 4096×4096; 0.5 sits
inside that range, and near the crossover the two modes differ little. So BERT-base training batches (1024
tokens) take ``"fused"``, single-sequence generation and small batches ``"spectral"``.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Optional, Sequence

import torch
from torch import nn

import bridge
from bridge._src.auto_rule import SPECTRAL_MAX_RATIO
from bridge._src.auto_rule import choose_path as _choose_path
from bridge._src.targets import fan_in_fan_out_for

from ._mixed import check_rows, layer_mixed_delta
from ._spectral import delta_from_plan, fused_linear, make_grad_plan, make_plan, spectral_delta

FORWARD_MODES = ("auto", "spectral", "fused")
# The auto rule and its constant live in bridge, one for both frameworks (calibrated with
# benchmarks/torch_auto_rule.py, see the module docstring); SPECTRAL_RATIO stays importable as its alias.
SPECTRAL_RATIO = SPECTRAL_MAX_RATIO


@functools.lru_cache(maxsize=256)
def _positions(out_features: int, in_features: int, n_frequency: int, seed: int) -> torch.Tensor:
    # PEFT uses one seed for every layer, so layers of equal shape share positions: compute them once.
    return torch.from_numpy(bridge.spectral_indices(out_features, in_features, n_frequency, seed))


# Index plans depend only on (shape, n, seed, device); layers of equal shape share one.
_PLANS: dict[tuple, tuple] = {}


def _conv1d_class() -> Optional[type]:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers is optional
        return None
    return Conv1D


def layer_kind(module: nn.Module) -> Optional[str]:
    """``bridge.LINEAR`` for ``nn.Linear``, ``bridge.CONV1D`` for transformers' ``Conv1D``, else ``None``.

    Example:
        >>> layer_kind(nn.Linear(2, 3))
        'linear'
    """
    if isinstance(module, nn.Linear):
        return bridge.LINEAR
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return bridge.CONV1D
    return None


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a Linear or Conv1D (Conv1D stores its weight ``(in, out)``)."""
    if layer_kind(module) == bridge.CONV1D:
        in_features, out_features = module.weight.shape
        return int(out_features), int(in_features)
    return int(module.out_features), int(module.in_features)


def choose_mode(tokens: int, out_features: int, in_features: int) -> str:
    """The ``"auto"`` rule (bridge's): ``"spectral"`` when ``tokens·(in+out) < SPECTRAL_RATIO·in·out``, else fused.

    Example:
        >>> choose_mode(1, 768, 768), choose_mode(1024, 768, 768)
        ('spectral', 'fused')
    """
    return _choose_path(tokens, out_features, in_features)


class FourierFTLinear(nn.Module):
    """A Linear/Conv1D with FourierFT adapters (one or more, by name).

    Args:
        base_layer: the ``nn.Linear`` or transformers ``Conv1D`` to adapt (kept, frozen by the model).
        adapter_name: name of the first adapter.
        config: its ``FourierFTConfig``.
        n_frequency: the layer's ``n_frequency`` (after ``n_frequency_pattern``).
        fan_in_fan_out: weight stored ``(in, out)``; corrected (with PEFT's warning) to fit the layer's type.

    Attributes (plain settings, not saved):
        forward_mode: ``"auto"`` (default), ``"spectral"`` or ``"fused"`` (see the module docstring).
        keep_delta: fused mode, when bridge's ``choose_input_grad`` picks ``"rebuild"`` for the input gradient
            (many tokens): ``True`` (default) keeps ``W + ΔW`` from forward for backward; ``False`` rebuilds it
            there (one ``irfft2`` more per layer and step, one weight-sized buffer less per layer). Where the rule
            picks ``"spectral"`` nothing weight-sized is kept either way.

    Example:
        >>> import bridge
        >>> torch.manual_seed(0) and None
        >>> layer = FourierFTLinear(nn.Linear(6, 8), "default", bridge.FourierFTConfig(n_frequency=5), 5)
        >>> layer(torch.randn(2, 6)).shape
        torch.Size([2, 8])
    """

    adapter_layer_names = ("fourierft_spectrum",)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: bridge.FourierFTConfig,
        n_frequency: int,
        fan_in_fan_out: Optional[bool] = None,
    ) -> None:
        super().__init__()
        kind = layer_kind(base_layer)
        if kind is None:
            raise TypeError(
                f"FourierFT can adapt torch.nn.Linear and transformers Conv1D layers, not {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self.out_features, self.in_features = layer_shape(base_layer)
        flag = config.fan_in_fan_out if fan_in_fan_out is None else fan_in_fan_out
        flag = fan_in_fan_out_for(kind, flag, stacklevel=2)
        self.fan_in_fan_out = flag
        self.fourierft_spectrum = nn.ParameterDict({})
        self.fourierft_n_frequency: dict[str, int] = {}
        self.fourierft_scaling: dict[str, float] = {}
        self.fourierft_random_loc_seed: dict[str, int] = {}
        self.indices: dict[str, torch.Tensor] = {}
        self._plans: dict[str, Any] = {}
        self.active_adapters: list[str] = [adapter_name]
        self.disable_adapters = False
        self.merged_adapters: list[str] = []
        self.forward_mode = "auto"
        # fused mode with the "rebuild" input gradient: keep W + ΔW between forward and backward (faster; one
        # weight-sized buffer per layer, and the peak RSS still stays below PEFT's, which keeps ΔW alive too).
        self.keep_delta = True
        self._mixed_bank = None  # mixed batches: the stacked coefficients (fourierft_torch._mixed), built on use
        self.update_layer(adapter_name, n_frequency, config)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def update_layer(self, adapter_name: str, n_frequency: int, config: bridge.FourierFTConfig) -> None:
        """Add (or replace) adapter ``adapter_name``; the spectrum is drawn like PEFT's: ``torch.randn(n)``."""
        if n_frequency <= 0 or n_frequency > self.in_features * self.out_features:
            raise ValueError(
                f"`n_frequency` must be in 1..{self.in_features * self.out_features} (in*out) for this "
                f"{self.out_features}x{self.in_features} layer, got {n_frequency}"
            )
        indices = _positions(self.out_features, self.in_features, n_frequency, config.random_loc_seed)
        self.fourierft_n_frequency[adapter_name] = n_frequency
        self.fourierft_random_loc_seed[adapter_name] = config.random_loc_seed
        self.fourierft_scaling[adapter_name] = float(config.scaling)
        self.indices[adapter_name] = indices
        self._plans[adapter_name] = None
        self._mixed_bank = None
        weight = self.base_layer.weight
        device = weight.device if weight.device.type != "meta" else torch.device("cpu")
        # Same RNG draw as PEFT (torch.randn(n_frequency), default generator), also with init_weights=True.
        spectrum = torch.randn(n_frequency)
        if config.init_weights:
            spectrum.zero_()
        self.fourierft_spectrum[adapter_name] = nn.Parameter(spectrum.to(device), requires_grad=True)

    def _plan(self, adapter_name: str, device: torch.device):
        cached = self._plans.get(adapter_name)
        if cached is None or cached[0] != device:
            key = (self.out_features, self.in_features, self.fourierft_n_frequency[adapter_name],
                   self.fourierft_random_loc_seed[adapter_name], str(device))
            cached = _PLANS.get(key)
            if cached is None:
                indices = self.indices[adapter_name]
                spectral = make_plan(indices, self.out_features, self.in_features).to(device)
                grad = make_grad_plan(indices, self.out_features, self.in_features).to(device)
                cached = _PLANS[key] = (device, spectral, grad)
            self._plans[adapter_name] = cached
        return cached[1], cached[2]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW of one adapter in ``(out, in)`` layout, computed in float32, cast to the spectrum's dtype (as PEFT)."""
        spectrum = self.fourierft_spectrum[adapter_name]
        plan, _ = self._plan(adapter_name, spectrum.device)
        return delta_from_plan(spectrum, plan, self.fourierft_scaling[adapter_name]).to(spectrum.dtype)

    def _weight_delta(self, adapter_name: str) -> torch.Tensor:
        delta = self.get_delta_weight(adapter_name)
        return delta.t() if self.fan_in_fan_out else delta

    def delete_adapter(self, adapter_name: str) -> None:
        """Forget adapter ``adapter_name`` (no-op when absent); the caller unmerges it first."""
        for store in (self.fourierft_n_frequency, self.fourierft_scaling, self.fourierft_random_loc_seed,
                      self.indices, self._plans):
            store.pop(adapter_name, None)
        if adapter_name in self.fourierft_spectrum:
            del self.fourierft_spectrum[adapter_name]
        self._mixed_bank = None
        self.active_adapters = [name for name in self.active_adapters if name != adapter_name]

    def to_merge(self, adapter_names: Optional[Sequence[str]] = None) -> list[str]:
        """The adapters ``merge(adapter_names=...)`` would add here: present and not merged yet, in order."""
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        return [name for name in names if name in self.fourierft_spectrum and name not in self.merged_adapters]

    def merged_weight(self, adapter_names: Optional[Sequence[str]] = None) -> Optional[torch.Tensor]:
        """The base weight plus the ΔW ``merge`` would add, summed as ``merge`` sums it; ``None`` if nothing to add."""
        names = self.to_merge(adapter_names)
        if not names:
            return None
        weight = self.base_layer.weight
        with torch.no_grad():
            merged = weight.detach().clone()
            for name in names:
                merged += self._weight_delta(name).to(weight.dtype)
        return merged

    def merge(self, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None) -> None:
        """Add the adapters' ΔW to the base weight; ``safe_merge`` checks for NaN/inf first and leaves it untouched."""
        names = self.to_merge(adapter_names)
        weight = self.base_layer.weight
        if safe_merge:
            merged = self.merged_weight(adapter_names)
            if merged is None:
                return
            if not torch.isfinite(merged).all():
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter(s) {names} seem to be broken "
                    f"(layer weight left unchanged)"
                )
            with torch.no_grad():
                weight.data.copy_(merged)
        else:
            with torch.no_grad():
                for name in names:
                    weight.data += self._weight_delta(name).to(weight.dtype)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Subtract every merged adapter's ΔW again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", UserWarning, stacklevel=2)
            return
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.fourierft_spectrum:
                with torch.no_grad():
                    weight.data -= self._weight_delta(name).to(weight.dtype)

    def _torch_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        return weight.t() if layer_kind(self.base_layer) == bridge.CONV1D else weight

    def forward(self, x: torch.Tensor, *args: Any, adapter_names: Optional[Sequence[str]] = None,
                **kwargs: Any) -> torch.Tensor:
        """The layer's output; ``adapter_names`` (one per row of ``x``, ``"__base__"`` for none): a mixed batch."""
        if adapter_names is not None:
            check_rows(x, adapter_names, "FourierFTLinear")
            if self.merged:
                raise ValueError(
                    "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
                )
            result = self.base_layer(x, *args, **kwargs)
            if self.disable_adapters:
                return result
            delta = layer_mixed_delta(self, x, adapter_names)
            if delta is None:
                return result
            if result.dtype == delta.dtype and not torch.is_grad_enabled():
                return result.add_(delta)  # inference: the base output is ours, no second output-sized buffer
            return (result + delta).to(result.dtype)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.fourierft_spectrum]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        tokens = x.numel() // max(x.shape[-1], 1)
        mode = self.forward_mode
        if mode == "auto":
            mode = choose_mode(tokens, self.out_features, self.in_features)
        device = x.device
        if mode == "fused" and not args and not kwargs:
            adapters = []
            spectra = []
            for name in active:
                plan, grad_plan = self._plan(name, device)
                adapters.append((plan, grad_plan, self.fourierft_scaling[name]))
                spectra.append(self.fourierft_spectrum[name])
            return fused_linear(x, self._torch_weight(), self.base_layer.bias, adapters, spectra, self.keep_delta)
        result = self.base_layer(x, *args, **kwargs)
        previous_dtype = result.dtype
        for name in active:
            plan, _ = self._plan(name, device)
            spectrum = self.fourierft_spectrum[name]
            result = result + spectral_delta(x, spectrum, plan, self.fourierft_scaling[name])
        return result.to(previous_dtype)

    def extra_repr(self) -> str:
        return f"adapters={list(self.fourierft_spectrum.keys())}, fan_in_fan_out={self.fan_in_fan_out}"

    def __repr__(self) -> str:
        return "fourierft." + super().__repr__()
