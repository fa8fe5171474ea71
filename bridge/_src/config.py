"""``FourierFTConfig``: PEFT's FourierFT configuration, its validation and its ``adapter_config.json``.

The one config class of the project: ``fourierft_jax`` and ``fourierft_torch`` re-export it. Field names,
defaults and the JSON file are PEFT's (``peft.FourierFTConfig``, PEFT 0.21), so a config written here loads
in PEFT and the other way round.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from typing import Any, Optional, Union

from .atomic import write_text_atomically

PEFT_TYPE = "FOURIERFT"
CONFIG_NAME = "adapter_config.json"
# The PEFT release whose file format this package writes; stored as `peft_version` in files we create.
PEFT_FORMAT_VERSION = "0.21.2"
BIAS_MODES = ("none", "all", "fourier_only")


@dataclasses.dataclass
class FourierFTConfig:
    """Configuration of a FourierFT adapter, field for field PEFT's ``FourierFTConfig``.

    Args:
        n_frequency: trainable spectral coefficients per adapted layer.
        scaling: multiplier of the delta weight (plays the role of LoRA's alpha).
        random_loc_seed: seed of the spectral positions (the same for every layer).
        fan_in_fan_out: the target stores its weight as ``(in, out)`` (transformers' ``Conv1D``).
        target_modules: module names (a module matches if its full name equals an entry or ends with
            ``"." + entry``) or one regex that must match the full name; ``None`` picks the default for the
            model type.
        exclude_modules: names or a regex, matched like ``target_modules``, never adapted.
        bias: ``"none"``, ``"all"`` (every bias trains) or ``"fourier_only"`` (biases of adapted layers).
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classifier head).
        layers_to_transform: layer indices to adapt (only with a list ``target_modules``).
        layers_pattern: name of the layer list (``"layers"``, ``"h"``) used to read the layer index.
        n_frequency_pattern: per-layer ``n_frequency`` overrides, keyed by name suffix or full name.
        init_weights: ``False`` draws the spectrum from N(0, 1), ``True`` starts it at zero.

    Example:
        >>> config = FourierFTConfig(n_frequency=500, target_modules=["query", "value"])
        >>> config.to_dict()["peft_type"]
        'FOURIERFT'
    """

    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int = 777
    fan_in_fan_out: bool = False
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    n_frequency_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    init_weights: bool = False
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    auto_mapping: Optional[dict[str, Any]] = None
    peft_version: Optional[str] = None

    def __post_init__(self) -> None:
        self.target_modules = _name_set(self.target_modules, "target_modules")
        self.exclude_modules = _name_set(self.exclude_modules, "exclude_modules")
        if self.modules_to_save is not None:
            self.modules_to_save = list(_strings(self.modules_to_save, "modules_to_save"))
        if isinstance(self.layers_pattern, (list, tuple)):
            self.layers_pattern = list(_strings(self.layers_pattern, "layers_pattern"))
        if isinstance(self.layers_to_transform, (list, tuple)):
            self.layers_to_transform = [_int(i, "layers_to_transform") for i in self.layers_to_transform]
        elif self.layers_to_transform is not None:
            self.layers_to_transform = _int(self.layers_to_transform, "layers_to_transform")
        if self.n_frequency_pattern is None:
            self.n_frequency_pattern = {}
        elif isinstance(self.n_frequency_pattern, dict):  # anything else is rejected by validate()
            self.n_frequency_pattern = dict(self.n_frequency_pattern)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field to change if the config is inconsistent."""
        _positive_int(self.n_frequency, "n_frequency")
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
            raise ValueError(f"FourierFTConfig: `scaling` must be a number, got {self.scaling!r}")
        if (
            isinstance(self.random_loc_seed, bool)
            or not isinstance(self.random_loc_seed, int)
            or not -(2**63) <= self.random_loc_seed < 2**64
        ):
            raise ValueError(
                f"FourierFTConfig: `random_loc_seed` must be a 64-bit integer (the seed of the spectral positions), "
                f"got {self.random_loc_seed!r}"
            )
        for field in ("fan_in_fan_out", "init_weights", "inference_mode"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"FourierFTConfig: `{field}` must be true or false, got {getattr(self, field)!r}")
        for field in ("task_type", "base_model_name_or_path", "revision", "peft_version"):
            if getattr(self, field) is not None and not isinstance(getattr(self, field), str):
                raise ValueError(f"FourierFTConfig: `{field}` must be a string or null, got {getattr(self, field)!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"FourierFTConfig: `bias` must be one of {BIAS_MODES}, got {self.bias!r}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "FourierFTConfig: `layers_to_transform` cannot be used when `target_modules` is a regex string; "
                "pass `target_modules` as a list of names, or put the layer indices into the regex."
            )
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError(
                "FourierFTConfig: `layers_pattern` cannot be used when `target_modules` is a regex string; "
                "pass `target_modules` as a list of names, or put the layer pattern into the regex."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                "FourierFTConfig: `layers_pattern` is set but `layers_to_transform` is not; set "
                "`layers_to_transform` to the layer indices to adapt, or drop `layers_pattern`."
            )
        if not isinstance(self.n_frequency_pattern, dict):
            raise ValueError("FourierFTConfig: `n_frequency_pattern` must be a dict of {name or pattern: int}")
        for key, value in self.n_frequency_pattern.items():
            if not isinstance(key, str):
                raise ValueError(f"FourierFTConfig: `n_frequency_pattern` keys must be strings, got {key!r}")
            _positive_int(value, f"n_frequency_pattern[{key!r}]")

    @property
    def peft_type(self) -> str:
        """Always ``"FOURIERFT"``: the ``peft_type`` field of ``adapter_config.json``."""
        return PEFT_TYPE

    def to_dict(self) -> dict[str, Any]:
        """The config as the dict PEFT writes to ``adapter_config.json`` (every field, ``peft_type`` too).

        Example:
            >>> FourierFTConfig(target_modules=["query"]).to_dict()["target_modules"]
            ['query']
        """
        data = {field.name: _plain(getattr(self, field.name)) for field in dataclasses.fields(self)}
        data["peft_type"] = PEFT_TYPE
        if data["peft_version"] is None:
            data["peft_version"] = PEFT_FORMAT_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FourierFTConfig:
        """Build a config from a dict as found in ``adapter_config.json``.

        A missing or different ``peft_type`` is an error; unknown keys are ignored with a warning, as PEFT does.

        Example:
            >>> FourierFTConfig.from_dict({"peft_type": "FOURIERFT", "n_frequency": 10}).n_frequency
            10
        """
        if not isinstance(data, dict):
            raise ValueError(f"FourierFTConfig.from_dict: expected a dict, got {type(data).__name__}")
        peft_type = data.get("peft_type")
        if peft_type is None:
            raise ValueError(
                "FourierFTConfig.from_dict: the config has no `peft_type`; a FourierFT adapter config must say "
                f'"peft_type": "{PEFT_TYPE}"'
            )
        if str(peft_type).upper() != PEFT_TYPE:
            raise ValueError(
                f"FourierFTConfig.from_dict: this is a {peft_type} adapter, not a FourierFT one "
                f'(expected "peft_type": "{PEFT_TYPE}")'
            )
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"peft_type"})
        if unknown:
            warnings.warn(f"FourierFTConfig: ignoring unknown config keys {unknown}", UserWarning, stacklevel=2)
        return cls(**{key: value for key, value in data.items() if key in names})

    def to_json_string(self) -> str:
        """``adapter_config.json``'s text, byte for byte as PEFT writes it (indent 2, sorted keys)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> str:
        """Write ``<save_directory>/adapter_config.json`` (atomically) and return its path.

        Example:
            >>> import tempfile
            >>> path = FourierFTConfig(target_modules=["query"]).save_pretrained(tempfile.mkdtemp())
        """
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"FourierFTConfig.save_pretrained: {save_directory} is a file, not a directory")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        write_text_atomically(path, self.to_json_string())
        return path

    @classmethod
    def from_pretrained(
        cls, directory: Union[str, os.PathLike], subfolder: Optional[str] = None
    ) -> FourierFTConfig:
        """Read ``adapter_config.json`` from an adapter directory (PEFT's or ours).

        Example:
            >>> import tempfile
            >>> folder = tempfile.mkdtemp()
            >>> _ = FourierFTConfig(n_frequency=64, target_modules=["q"]).save_pretrained(folder)
            >>> FourierFTConfig.from_pretrained(folder).n_frequency
            64
        """
        directory = os.fspath(directory)
        if subfolder:
            directory = os.path.join(directory, subfolder)
        path = directory if directory.endswith(".json") else os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"FourierFTConfig.from_pretrained: no {CONFIG_NAME} at {path}")
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"FourierFTConfig.from_pretrained: {path} is not valid JSON: {error}") from None
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from None

    def n_frequency_for(self, name: str) -> int:
        """``n_frequency`` of the layer with full dotted ``name``, after ``n_frequency_pattern`` (PEFT's rule).

        Example:
            >>> FourierFTConfig(n_frequency_pattern={"value": 8}).n_frequency_for("layer.0.value")
            8
        """
        for key in self.n_frequency_pattern:
            if re.match(rf".*\.{key}$", name):
                return self.n_frequency_pattern[key]
        return self.n_frequency_pattern.get(name, self.n_frequency)


def _plain(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value


def _strings(values: Any, field: str) -> list[str]:
    values = list(values)
    for value in values:
        if not isinstance(value, str):
            raise ValueError(f"FourierFTConfig: `{field}` entries must be strings, got {value!r}")
    return values


def _name_set(value: Any, field: str) -> Optional[Union[list[str], str]]:
    # PEFT keeps a set (and writes it in arbitrary order); a sorted list is the same set, written deterministically.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        return sorted(set(_strings(value, field)))
    raise ValueError(f"FourierFTConfig: `{field}` must be a list of names or a regex string, got {value!r}")


def _int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"FourierFTConfig: `{field}` must be an integer, got {value!r}")
    return value


def _positive_int(value: Any, field: str) -> None:
    if _int(value, field) <= 0:
        raise ValueError(f"FourierFTConfig: `{field}` must be a positive integer, got {value!r}")
