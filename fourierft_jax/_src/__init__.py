"""The private core of ``fourierft_jax``; the names below are the documented "advanced" entry points.

Example:
    >>> from fourierft_jax._src import LayerSpec
    >>> LayerSpec(("q",), 8, 4, 3, 1.0, 0).kernel_shape
    (8, 4)
"""

from .adapter import AdapterSet, AdapterSpec
from .delta import delta_kernel
from .fused import fused_dense
from .modes import DEFAULT_MODE, choose_path
from .layer import LayerSpec
from .merge import merge_params, substitute
from .sharding import sharded_delta
from .spectral import spectral_delta
from .targets import module_infos, select_layers
from .trace import contractions

__all__ = [
    "DEFAULT_MODE",
    "AdapterSet",
    "AdapterSpec",
    "LayerSpec",
    "choose_path",
    "contractions",
    "delta_kernel",
    "fused_dense",
    "merge_params",
    "module_infos",
    "select_layers",
    "sharded_delta",
    "spectral_delta",
    "substitute",
]
