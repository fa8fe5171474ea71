"""What an adapter holds (a PEFT directory or a fourierft_jax Orbax checkpoint): format, config, adapted layers,
parameter totals, storage against LoRA.

The data behind ``fourierft inspect``. Layer shapes are not stored in a PEFT adapter (an Orbax checkpoint records
them); they come from the base checkpoint's headers when one is given, else they are reported as unknown (and so
is the LoRA comparison).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Union

from .folders import Adapter, BaseCheckpoint, Resolution, open_adapters, open_base
from .orbax_format import folder_bytes, is_orbax_adapter, layer_names, read_metadata

PathLike = Union[str, "os.PathLike[str]"]
PEFT_FORMAT = "peft"  # a PEFT adapter folder
ORBAX_FORMAT = "orbax"  # a fourierft_jax Orbax adapter checkpoint (shapes recorded, no base needed)
DEFAULT_LORA_RANK = 8
_CONFIG_FIELDS = (
    "n_frequency", "scaling", "random_loc_seed", "target_modules", "exclude_modules", "bias", "modules_to_save",
    "layers_to_transform", "layers_pattern", "n_frequency_pattern", "fan_in_fan_out", "init_weights", "task_type",
    "base_model_name_or_path", "peft_version",
)


@dataclasses.dataclass
class LayerSummary:
    """One adapted layer: ``out_features``/``in_features`` are ``None`` when the shape is unknown."""

    name: str
    n_frequency: int
    scaling: float
    out_features: Optional[int] = None
    in_features: Optional[int] = None
    conv1d: Optional[bool] = None

    @property
    def params(self) -> int:
        """Trainable coefficients of the layer."""
        return self.n_frequency

    def lora_params(self, rank: int) -> Optional[int]:
        """Parameters of LoRA rank ``rank`` on the same layer, ``rank · (in + out)`` (``None`` if unknown)."""
        if self.out_features is None or self.in_features is None:
            return None
        return rank * (self.out_features + self.in_features)


@dataclasses.dataclass
class AdapterSummary:
    """One adapter of a directory."""

    name: str
    directory: str
    config: dict[str, Any]
    layers: list[LayerSummary]
    other_tensors: int
    other_params: int
    spectrum_dtypes: list[str]
    file_bytes: int
    problems: list[str] = dataclasses.field(default_factory=list)  # every inconsistency (peft_reader's checks)

    @property
    def spectrum_params(self) -> int:
        """Coefficients over every adapted layer."""
        return sum(layer.params for layer in self.layers)

    def lora_params(self, rank: int) -> Optional[int]:
        """LoRA rank ``rank`` on the same layers (``None`` unless every shape is known)."""
        counts = [layer.lora_params(rank) for layer in self.layers]
        return None if any(count is None for count in counts) else sum(counts)


def summarize(path: PathLike, base: Optional[PathLike] = None) -> list[AdapterSummary]:
    """Summaries of every adapter in a PEFT directory, with shapes from ``base`` when given.

    Example:
        >>> import tempfile, numpy as np
        >>> from bridge import FourierFTConfig, spectrum_key, write_adapter
        >>> folder = tempfile.mkdtemp()
        >>> _ = write_adapter(folder, FourierFTConfig(n_frequency=4, target_modules=["q"]), {spectrum_key("l.q"): np.zeros(4, np.float32)})
        >>> summary = summarize(folder)[0]
        >>> summary.spectrum_params, summary.layers[0].out_features
        (4, None)
    """
    from .peft_reader import base_problems, file_problems, recover, refuse_pickle

    if is_orbax_adapter(path):
        return [_summarize_orbax(path)]
    recover(path)
    refuse_pickle(path)
    checkpoint: Optional[BaseCheckpoint] = open_base(base) if base is not None else None
    summaries = []
    for adapter in open_adapters(path, strict=False):
        problems = file_problems(adapter)
        resolution = None
        if checkpoint is not None and not problems:
            more, resolution = base_problems(adapter, checkpoint)
            problems += more
        summaries.append(_summarize(adapter, resolution, problems))
    return summaries


def problems(summaries: list[AdapterSummary]) -> list[str]:
    """Every inconsistency found in the summarised adapters (empty when they are sound).

    Example:
        >>> problems([])
        []
    """
    return [problem for summary in summaries for problem in summary.problems]


def source_format(path: PathLike) -> str:
    """``"orbax"`` for a fourierft_jax adapter checkpoint, else ``"peft"``.

    Example:
        >>> import tempfile
        >>> source_format(tempfile.mkdtemp())
        'peft'
    """
    return ORBAX_FORMAT if is_orbax_adapter(path) else PEFT_FORMAT


def _summarize_orbax(path: PathLike) -> AdapterSummary:
    # The checkpoint records every layer's shape, so no base model is needed for the LoRA comparison.
    metadata = read_metadata(path)
    config = metadata["config"]
    scaling = float(config.scaling)
    # A stacked kernel's entry covers one layer per adapted row, each with its own n coefficients.
    layers = [
        LayerSummary(name, int(layer["n_frequency"]), scaling, int(layer["out_features"]), int(layer["in_features"]),
                     False)
        for layer in metadata["layers"]
        for name in layer_names(layer)
    ]
    others = [t for t in metadata["tensors"] if t["group"] in ("bias", "modules_to_save")]
    other_params = 0
    for tensor in others:
        count = 1
        for dim in tensor["shape"]:
            count *= int(dim)
        other_params += count
    dtypes = sorted({t["dtype"] for t in metadata["tensors"] if t["group"] == "spectra"})
    fields = config.to_dict()
    return AdapterSummary(
        name="default", directory=os.fspath(path), config={field: fields.get(field) for field in _CONFIG_FIELDS},
        layers=layers, other_tensors=len(others), other_params=other_params, spectrum_dtypes=dtypes,
        file_bytes=folder_bytes(path),
    )


def _summarize(adapter: Adapter, resolution: Optional[Resolution], problems: list[str]) -> AdapterSummary:
    scaling = float(adapter.config.scaling)
    layers = [LayerSummary(layer.name, layer.n_frequency, scaling) for layer in adapter.layers]
    if resolution is not None:
        shapes = {layer.name: layer for layer in resolution.layers}
        for layer in layers:
            resolved = shapes[layer.name]
            layer.out_features, layer.in_features, layer.conv1d = (
                resolved.out_features, resolved.in_features, resolved.conv1d,
            )
    config = adapter.config.to_dict()
    return AdapterSummary(
        name=adapter.name,
        directory=adapter.directory,
        config={field: config.get(field) for field in _CONFIG_FIELDS},
        layers=layers,
        other_tensors=len(adapter.tensors),
        other_params=adapter.other_params,
        spectrum_dtypes=sorted({adapter.file.dtype(layer.key) for layer in adapter.layers}),
        file_bytes=os.path.getsize(adapter.file.path),
        problems=list(problems),
    )


def to_json(summaries: list[AdapterSummary], path: str, rank: int) -> dict[str, Any]:
    """A JSON-ready dict of the summaries (what ``fourierft inspect --json`` prints)."""
    adapters = []
    for summary in summaries:
        adapters.append({
            "name": summary.name,
            "directory": summary.directory,
            "config": summary.config,
            "layers": [
                {
                    "name": layer.name,
                    "shape": None if layer.out_features is None else [layer.out_features, layer.in_features],
                    "conv1d": layer.conv1d,
                    "n_frequency": layer.n_frequency,
                    "scaling": layer.scaling,
                    "params": layer.params,
                    "lora_params": layer.lora_params(rank),
                }
                for layer in summary.layers
            ],
            "totals": {
                "layers": len(summary.layers),
                "spectrum_params": summary.spectrum_params,
                "other_tensors": summary.other_tensors,
                "other_params": summary.other_params,
                "trainable_params": summary.spectrum_params + summary.other_params,
                "file_bytes": summary.file_bytes,
                "lora_rank": rank,
                "lora_params": summary.lora_params(rank),
            },
            "problems": summary.problems,
        })
    return {"format": source_format(path), "path": path, "adapters": adapters}


def format_text(summaries: list[AdapterSummary], path: str, rank: int) -> str:
    """The human-readable report of ``fourierft inspect``."""
    if source_format(path) == ORBAX_FORMAT:
        lines = [f"{path}: fourierft_jax Orbax adapter checkpoint (format: orbax), {len(summaries)} adapter(s)"]
    else:
        lines = [f"{path}: PEFT FourierFT adapter directory, {len(summaries)} adapter(s)"]
    for summary in summaries:
        lines += ["", f"adapter {summary.name!r} ({summary.directory})"]
        for field, value in summary.config.items():
            if value not in (None, [], {}):
                lines.append(f"  {field}: {value}")
        rows = [("layer", "shape (out x in)", "n_frequency", "scaling", "params")]
        for layer in summary.layers:
            shape = "unknown" if layer.out_features is None else f"{layer.out_features} x {layer.in_features}"
            if layer.conv1d:
                shape += " (Conv1D)"
            rows.append((layer.name, shape, str(layer.n_frequency), f"{layer.scaling:g}", f"{layer.params:,}"))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines.append("")
        for number, row in enumerate(rows):
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])] + [row[i].rjust(widths[i]) for i in (2, 3, 4)]
            lines.append("  " + "  ".join(cells).rstrip())
            if number == 0:
                lines.append("  " + "  ".join("-" * width for width in widths))
        lines.append("")
        lines.append(f"  layers: {len(summary.layers)}")
        lines.append(f"  spectrum parameters: {summary.spectrum_params:,} ({', '.join(summary.spectrum_dtypes)})")
        if summary.other_tensors:
            lines.append(f"  other trained tensors (biases, modules_to_save): {summary.other_tensors} "
                         f"tensors, {summary.other_params:,} parameters")
        lines.append(f"  total trainable parameters: {summary.spectrum_params + summary.other_params:,}")
        lines.append(f"  adapter file: {summary.file_bytes:,} bytes")
        lines.append(lora_comparison(summary.lora_params(rank), summary.spectrum_params, len(summary.layers), rank))
        if summary.problems:
            lines.append(f"  problems ({len(summary.problems)}):")
            lines += [f"    - {problem}" for problem in summary.problems]
    return "\n".join(lines)


def lora_comparison(lora: Optional[int], fourierft: int, layers: int, rank: int) -> str:
    """The line comparing the spectrum parameters with LoRA rank ``rank`` on the same layers, whichever is smaller.

    Example:
        >>> lora_comparison(2048, 96, 2, 8)
        '  vs LoRA r=8 on the same 2 layers (r*(in+out) each): 2,048 parameters; FourierFT stores 21.3x fewer (1,952 saved)'
        >>> lora_comparison(96, 2048, 2, 8)
        '  vs LoRA r=8 on the same 2 layers (r*(in+out) each): 96 parameters; LoRA r=8 would store 1,952 fewer (21.3x fewer)'
    """
    if lora is None:
        return f"  vs LoRA r={rank}: layer shapes unknown, pass --base MODEL to compare"
    head = f"  vs LoRA r={rank} on the same {layers} layers (r*(in+out) each): {lora:,} parameters; "
    if lora > fourierft:
        return head + f"FourierFT stores {lora / fourierft:,.1f}x fewer ({lora - fourierft:,} saved)"
    if lora < fourierft:
        return head + f"LoRA r={rank} would store {fourierft - lora:,} fewer ({fourierft / lora:,.1f}x fewer)"
    return head + "the same number as FourierFT"
