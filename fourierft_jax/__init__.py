"""FourierFT for Flax: spectral adapters on linen parameter trees (and NNX models in ``fourierft_jax.nnx``).

Example:
    >>> import numpy as np, jax, fourierft_jax
    >>> params = {"q": {"kernel": np.zeros((8, 4), np.float32)}}
    >>> config = fourierft_jax.FourierFTConfig(n_frequency=5, target_modules=["q"])
    >>> fourierft_jax.apply(params, config, key=jax.random.key(0)).layers()
    ['q']
"""

from bridge import FourierFTConfig, NoTargetError

from ._src.adapter import AdapterSet, AdapterSpec
from ._src.delta import delta_kernel
from ._src.fused import fused_dense
from ._src.intercept import DEFAULT_MODE, choose_path, make_apply
from ._src.layer import LayerSpec
from ._src.merge import merge_params, substitute
from ._src.model import FourierFTAdapter, apply
from ._src.optim import multi_lr
from ._src.sharding import sharded_delta
from ._src.spectral import spectral_delta
from ._src.targets import module_infos, select_layers

from bridge import NameMap

from ._src.checkpoint import TrainingCheckpoints, load_adapter, save_adapter
from ._src.convert import export_peft, import_peft, read_peft
from ._src.saved import AdapterMismatchError, SavedAdapter, attach

from . import nnx  # noqa: E402  (fourierft_jax.nnx.apply without a separate import)

__all__ = [
    "AdapterMismatchError",
    "NameMap",
    "SavedAdapter",
    "TrainingCheckpoints",
    "attach",
    "export_peft",
    "import_peft",
    "load_adapter",
    "read_peft",
    "save_adapter",
    "DEFAULT_MODE",
    "AdapterSet",
    "AdapterSpec",
    "FourierFTAdapter",
    "FourierFTConfig",
    "LayerSpec",
    "NoTargetError",
    "apply",
    "choose_path",
    "delta_kernel",
    "fused_dense",
    "make_apply",
    "merge_params",
    "module_infos",
    "multi_lr",
    "nnx",
    "select_layers",
    "sharded_delta",
    "spectral_delta",
    "substitute",
]
