"""The public surface of adapter checkpoints and conversions, gathered for ``fourierft_jax/__init__``."""

from bridge._src.names import NameMap

from .checkpoint import TrainingCheckpoints, load_adapter, save_adapter
from .convert import export_peft, import_peft, read_peft
from .saved import AdapterMismatchError, SavedAdapter, attach

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
]
