"""What both frameworks agree on: the config, PEFT's spectral positions, target matching and reference math.

Imports neither jax nor torch. The data path: ``FourierFTConfig`` → ``select_targets`` → ``spectral_indices``
→ spectrum → ``delta_weight``.

Example:
    >>> import bridge
    >>> config = bridge.FourierFTConfig(n_frequency=4, target_modules=["query"])
    >>> layers = bridge.select_targets(config, [bridge.ModuleInfo("layer.0.query", bridge.LINEAR, (8, 8))])
    >>> bridge.spectral_indices(8, 8, layers[0].n_frequency, config.random_loc_seed).shape
    (2, 4)
"""

from ._src.config import BIAS_MODES, CONFIG_NAME, PEFT_TYPE, FourierFTConfig
from ._src.peft_format import (
    KEY_PREFIX,
    SAFETENSORS_METADATA,
    SPECTRUM_NAME,
    WEIGHTS_NAME,
    AdapterFormatError,
    AdapterKey,
    adapter_directory,
    adapter_keys,
    atomic_directory,
    check_adapter_shapes,
    config_for_saving,
    list_adapters,
    modules_to_save_names,
    read_adapter,
    read_shapes,
    rename_bias_aliases,
    spectrum_key,
    weights_path,
    write_adapter,
)
from ._src.names import NameMap, NameMapError
from ._src.positions import randperm_prefix, spectral_indices
from ._src.reference import adapted_linear, delta_weight, dense_spectrum
from ._src.targets import (
    ALL_LINEAR,
    CONV1D,
    DEFAULT_TARGET_MODULES,
    LINEAR,
    ModuleInfo,
    NoTargetError,
    TargetLayer,
    default_target_modules,
    is_targeted,
    layer_index,
    select_targets,
)

__all__ = [
    "ALL_LINEAR",
    "KEY_PREFIX",
    "SAFETENSORS_METADATA",
    "SPECTRUM_NAME",
    "WEIGHTS_NAME",
    "AdapterFormatError",
    "AdapterKey",
    "adapter_directory",
    "adapter_keys",
    "atomic_directory",
    "check_adapter_shapes",
    "config_for_saving",
    "list_adapters",
    "modules_to_save_names",
    "read_adapter",
    "read_shapes",
    "rename_bias_aliases",
    "spectrum_key",
    "weights_path",
    "write_adapter",
    "BIAS_MODES",
    "CONFIG_NAME",
    "CONV1D",
    "DEFAULT_TARGET_MODULES",
    "LINEAR",
    "PEFT_TYPE",
    "FourierFTConfig",
    "ModuleInfo",
    "NameMap",
    "NameMapError",
    "NoTargetError",
    "TargetLayer",
    "adapted_linear",
    "default_target_modules",
    "delta_weight",
    "dense_spectrum",
    "is_targeted",
    "layer_index",
    "randperm_prefix",
    "select_targets",
    "spectral_indices",
]
__version__ = "0.1.0"
