"""What both frameworks agree on: the config, PEFT's spectral positions, target matching and reference math.

Imports neither jax nor torch. The data path: ``FourierFTConfig`` → ``select_targets`` → ``spectral_indices``
→ spectrum → ``delta_weight``; ``read_adapter``/``write_adapter`` read and write PEFT's adapter folders with
numpy. Everything else (file-format details, the command line's helpers) lives in ``bridge._src``; see the
README's "API" section and ``docs/``.

Example:
    >>> import bridge
    >>> config = bridge.FourierFTConfig(n_frequency=4, target_modules=["query"])
    >>> layers = bridge.select_targets(config, [bridge.ModuleInfo("layer.0.query", bridge.LINEAR, (8, 8))])
    >>> bridge.spectral_indices(8, 8, layers[0].n_frequency, config.random_loc_seed).shape
    (2, 4)
"""

from ._src.config import FourierFTConfig
from ._src.names import NameMap, NameMapError
from ._src.peft_format import AdapterFormatError, read_adapter, spectrum_key, write_adapter
from ._src.positions import spectral_indices
from ._src.reference import delta_weight
from ._src.targets import CONV1D, LINEAR, ModuleInfo, NoTargetError, TargetLayer, select_targets

__all__ = [
    "FourierFTConfig",
    "ModuleInfo",
    "LINEAR",
    "CONV1D",
    "select_targets",
    "TargetLayer",
    "NoTargetError",
    "spectral_indices",
    "delta_weight",
    "read_adapter",
    "write_adapter",
    "spectrum_key",
    "AdapterFormatError",
    "NameMap",
    "NameMapError",
]
__version__ = "0.1.0"
