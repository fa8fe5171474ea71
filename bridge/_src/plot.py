"""Pictures of a FourierFT adapter: each layer's learned spectrum on its out × in grid, and the ΔW it makes.

matplotlib is imported only here and only when a plot is drawn (it is an optional dependency); it draws
through its Agg canvas, so no display or pyplot state is involved.
"""

from __future__ import annotations

import fnmatch
import os
import tempfile
from typing import Optional, Sequence, Union

import numpy as np

from .folders import Adapter, CheckpointError, ResolvedLayer, SpectrumLayer, is_conv1d, open_base, resolve
from .merge import delta_weight_float32
from .positions import spectral_indices

PathLike = Union[str, "os.PathLike[str]"]
DEFAULT_LAYER_COUNT = 3
_MAX_PIXELS = 1024  # ΔW images larger than this per side are strided down for drawing


def parse_shape(text: str) -> tuple[int, int]:
    """``"768x3072"`` → ``(768, 3072)`` (out, in).

    Example:
        >>> parse_shape("16x32")
        (16, 32)
    """
    parts = text.lower().replace("×", "x").split("x")
    try:
        out_features, in_features = (int(part) for part in parts)
    except ValueError:
        raise CheckpointError(f"--shape {text!r}: expected OUTxIN, e.g. 768x768") from None
    if out_features <= 0 or in_features <= 0:
        raise CheckpointError(f"--shape {text!r}: sizes must be positive")
    return out_features, in_features


def choose_layers(adapter: Adapter, patterns: Optional[Sequence[str]], count: int = DEFAULT_LAYER_COUNT) -> list[SpectrumLayer]:
    """The layers named by ``patterns`` (exact name, ``*`` glob, or dotted suffix), else the first ``count``.

    Example:
        >>> from bridge._src.folders import SpectrumLayer
        >>> class A: layers = [SpectrumLayer("a.query", "k1", 2), SpectrumLayer("a.value", "k2", 2)]
        >>> [layer.name for layer in choose_layers(A, ["value"])]
        ['a.value']
    """
    if not patterns:
        return list(adapter.layers[:count])
    chosen: list[SpectrumLayer] = []
    for pattern in patterns:
        hits = [
            layer for layer in adapter.layers
            if layer.name == pattern or fnmatch.fnmatchcase(layer.name, pattern) or layer.name.endswith("." + pattern)
        ]
        if not hits:
            names = ", ".join(layer.name for layer in adapter.layers[:10])
            more = ", ..." if len(adapter.layers) > 10 else ""
            raise CheckpointError(f"--layers {pattern!r} matches no adapted layer; the adapter has: {names}{more}")
        chosen += [layer for layer in hits if layer not in chosen]
    return chosen


def layer_shapes(
    adapter: Adapter, layers: list[SpectrumLayer], base: Optional[PathLike], shape: Optional[str]
) -> list[ResolvedLayer]:
    """Shapes for the chosen layers: from the base checkpoint, or ``--shape`` for exactly one layer."""
    if base is not None:
        resolved = {layer.name: layer for layer in resolve(adapter, open_base(base)).layers}
        return [resolved[layer.name] for layer in layers]
    if shape is None:
        raise CheckpointError(
            "plot needs the layer shapes, which a PEFT adapter does not store: pass --base MODEL_DIR_OR_SAFETENSORS, "
            "or --shape OUTxIN with a single layer chosen by --layers"
        )
    if len(layers) != 1:
        raise CheckpointError(f"--shape gives the shape of one layer but {len(layers)} are chosen: pick one with --layers")
    out_features, in_features = parse_shape(shape)
    layer = layers[0]
    if layer.n_frequency > out_features * in_features:
        raise CheckpointError(
            f"--shape {shape}: layer {layer.name!r} has {layer.n_frequency} coefficients, more than {out_features}x{in_features}"
        )
    conv1d = is_conv1d(layer.name, None, adapter.config, None)
    return [ResolvedLayer(layer.name, layer.name + ".weight", out_features, in_features, conv1d, layer.n_frequency, layer.key)]


def plot_adapter(
    path: PathLike,
    out: PathLike,
    layers: Optional[Sequence[str]] = None,
    base: Optional[PathLike] = None,
    shape: Optional[str] = None,
    adapter_name: Optional[str] = None,
    overwrite: bool = False,
) -> list[str]:
    """Draw the chosen layers' spectra and ΔW into a PNG at ``out``; return the layer names drawn.

    Example:
        >>> import tempfile
        >>> from bridge import FourierFTConfig, spectrum_key, write_adapter
        >>> folder = tempfile.mkdtemp()
        >>> _ = write_adapter(folder, FourierFTConfig(n_frequency=4, target_modules=["q"]), {spectrum_key("l.q"): np.ones(4, np.float32)})
        >>> plot_adapter(folder, os.path.join(folder, "s.png"), shape="8x8")
        ['l.q']
    """
    out_path = os.path.abspath(os.fspath(out))
    if os.path.exists(out_path) and not overwrite:
        raise CheckpointError(f"--out {out_path} already exists: pass --overwrite to replace it")
    if os.path.isdir(out_path):
        raise CheckpointError(f"--out {out_path} is a folder, not an image file")
    from .peft_reader import open_strict

    adapter, _ = open_strict(path, adapter_name, base=open_base(base) if base is not None else None)
    resolved = layer_shapes(adapter, choose_layers(adapter, layers), base, shape)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise CheckpointError("fourierft plot needs matplotlib: pip install matplotlib") from None

    seed, scaling = adapter.config.random_loc_seed, float(adapter.config.scaling)
    figure = Figure(figsize=(12, 4.6 * len(resolved)), layout="constrained")
    FigureCanvasAgg(figure)
    for row, layer in enumerate(resolved):
        spectrum = adapter.file.float32(layer.spectrum_key)
        indices = spectral_indices(layer.out_features, layer.in_features, layer.n_frequency, seed)
        delta = delta_weight_float32(spectrum, indices, layer.out_features, layer.in_features, scaling)
        _draw_spectrum(figure.add_subplot(len(resolved), 2, 2 * row + 1), figure, layer, spectrum, indices)
        _draw_delta(figure.add_subplot(len(resolved), 2, 2 * row + 2), figure, layer, delta, scaling)
    figure.suptitle(f"FourierFT adapter {adapter.directory} (scaling {scaling:g}, seed {seed})", fontsize=11)
    directory = os.path.dirname(out_path)
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".plot-", suffix=".png", dir=directory)
    os.close(handle)
    try:
        figure.savefig(temporary, format="png", dpi=110)
        os.replace(temporary, out_path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return [layer.name for layer in resolved]


def _draw_spectrum(axes, figure, layer: ResolvedLayer, spectrum: np.ndarray, indices: np.ndarray) -> None:
    limit = float(np.abs(spectrum).max()) or 1.0
    size = float(np.clip(4000.0 / max(layer.n_frequency, 1), 2.0, 40.0))
    points = axes.scatter(
        indices[1], indices[0], c=spectrum, cmap="coolwarm", vmin=-limit, vmax=limit, s=size, linewidths=0
    )
    axes.set_xlim(-0.5, layer.in_features - 0.5)
    axes.set_ylim(layer.out_features - 0.5, -0.5)
    axes.set_xlabel(f"column (in = {layer.in_features})")
    axes.set_ylabel(f"row (out = {layer.out_features})")
    axes.set_title(f"{layer.name}\nspectrum: {layer.n_frequency} coefficients on the out x in grid", fontsize=9)
    figure.colorbar(points, ax=axes, label="coefficient")


def _draw_delta(axes, figure, layer: ResolvedLayer, delta: np.ndarray, scaling: float) -> None:
    step_rows = max(1, -(-delta.shape[0] // _MAX_PIXELS))
    step_cols = max(1, -(-delta.shape[1] // _MAX_PIXELS))
    shown = delta[::step_rows, ::step_cols]
    limit = float(np.abs(delta).max()) or 1.0
    image = axes.imshow(
        shown, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest",
        extent=(-0.5, delta.shape[1] - 0.5, delta.shape[0] - 0.5, -0.5),
    )
    stride = f", every {step_rows}x{step_cols} shown" if step_rows * step_cols > 1 else ""
    layout = " (stored transposed: Conv1D)" if layer.conv1d else ""
    axes.set_title(
        f"ΔW = {scaling:g}·Re(ifft2(S)), out x in{layout}{stride}\n"
        f"max |ΔW| {limit:.3g}, rms {float(np.sqrt(np.mean(delta.astype(np.float64) ** 2))):.3g}",
        fontsize=9,
    )
    axes.set_xlabel("in")
    axes.set_ylabel("out")
    figure.colorbar(image, ax=axes, label="ΔW")
