"""FourierFT for PyTorch: PEFT's API and file format, with a faster forward/backward.

``get_fourierft_model`` wraps a model's targeted ``nn.Linear``/``Conv1D`` layers in ``FourierFTLinear`` and
returns a ``FourierFTModel`` (PEFT's methods: ``save_pretrained``, ``from_pretrained``, ``merge_and_unload`` ...).
The spectral kernels (``fourierft_torch._spectral``) and the auto rule (``fourierft_torch._layer``) are
importable from their modules; see the README's "API" section.

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

from ._layer import FourierFTLinear
from ._model import FourierFTModel, get_fourierft_model
from ._modules_to_save import ModulesToSaveWrapper

__all__ = [
    "FourierFTConfig",
    "get_fourierft_model",
    "FourierFTModel",
    "FourierFTLinear",
    "ModulesToSaveWrapper",
]
