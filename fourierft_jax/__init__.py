"""FourierFT for JAX: spectral adapters on the projection kernels of any JAX model (NNX models also in
``fourierft_jax.nnx``).

Example:
    >>> import numpy as np, jax, fourierft_jax
    >>> params = {"q": {"kernel": np.zeros((8, 4), np.float32)}}
    >>> config = fourierft_jax.FourierFTConfig(n_frequency=5, target_modules=["q"])
    >>> fourierft_jax.apply(params, config, key=jax.random.key(0)).layers()
    ['q']
"""

from bridge import FourierFTConfig, NameMap, NoTargetError

from ._src.bank import AdapterBank, make_bank_apply
from ._src.checkpoint import TrainingCheckpoints, load_adapter, save_adapter
from ._src.convert import export_peft, import_peft, read_peft
from ._src.modes import make_apply
from ._src.model import FourierFTAdapter, apply
from ._src.optim import multi_lr
from ._src.presets import GEMMA_SPLIT, GEMMA_TO_TRANSFORMERS
from ._src.saved import AdapterMismatchError, SavedAdapter, attach
from ._src.trace import ContractionTraceError

from . import nnx  # noqa: E402  (fourierft_jax.nnx.apply without a separate import)

__all__ = [
    "AdapterBank",
    "AdapterMismatchError",
    "ContractionTraceError",
    "GEMMA_SPLIT",
    "GEMMA_TO_TRANSFORMERS",
    "FourierFTAdapter",
    "FourierFTConfig",
    "NameMap",
    "NoTargetError",
    "SavedAdapter",
    "TrainingCheckpoints",
    "apply",
    "attach",
    "export_peft",
    "import_peft",
    "load_adapter",
    "make_apply",
    "make_bank_apply",
    "multi_lr",
    "nnx",
    "read_peft",
    "save_adapter",
]
