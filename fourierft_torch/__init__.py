"""FourierFT for PyTorch: PEFT's API and file format, with a faster forward/backward.

Example:
    >>> import torch
    >>> import fourierft_torch
    >>> base = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> config = fourierft_torch.FourierFTConfig(n_frequency=32, scaling=100.0, target_modules=["0"])
    >>> model = fourierft_torch.get_fourierft_model(base, config)
    >>> model(torch.randn(4, 16)).shape
    torch.Size([4, 2])
"""

from bridge import FourierFTConfig

from ._layer import FORWARD_MODES, SPECTRAL_RATIO, FourierFTLinear, choose_mode, layer_kind
from ._model import FourierFTModel, get_fourierft_model
from ._modules_to_save import ModulesToSaveWrapper
from ._spectral import delta_weight, fused_linear, make_grad_plan, make_plan, spectral_delta, spectrum_grad

__all__ = [
    "FORWARD_MODES",
    "SPECTRAL_RATIO",
    "FourierFTConfig",
    "FourierFTLinear",
    "FourierFTModel",
    "ModulesToSaveWrapper",
    "choose_mode",
    "delta_weight",
    "fused_linear",
    "get_fourierft_model",
    "layer_kind",
    "make_grad_plan",
    "make_plan",
    "spectral_delta",
    "spectrum_grad",
]
