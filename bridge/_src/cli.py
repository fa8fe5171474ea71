"""The ``fourierft`` command line: ``inspect``, ``merge``, ``plot`` and ``convert`` for FourierFT adapters.

Framework-neutral (numpy, safetensors, tqdm; matplotlib for ``plot`` only; jax, flax and orbax for ``convert``
only, imported inside the command). Exit codes: 0 success, 2 a user
error (bad arguments, unreadable or mismatched inputs, an existing destination) reported as one line on stderr,
1 an unexpected failure (with its traceback: that is a bug), 130 interrupted.

Usage::

    fourierft inspect ADAPTER_DIR [--base MODEL] [--lora-rank 8] [--json]
    fourierft merge --base MODEL --adapter ADAPTER_DIR --out MERGED_DIR [--adapter-name NAME] [--overwrite]
    fourierft convert SRC DST --to peft|orbax [--name-map RULES] [--base MODEL] [--overwrite]
    fourierft plot ADAPTER_DIR --out spectra.png [--layers NAME ...] [--base MODEL | --shape OUTxIN]

Also runs as ``python -m bridge._src.cli``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Optional, Sequence

from .folders import CheckpointError
from .config import CONFIG_NAME
from .names import NameMapError
from .peft_format import AdapterFormatError
from .tensor_io import SafetensorsError

PROG = "fourierft"
USER_ERROR = 2
# Errors a user can fix (bad input, wrong paths); anything else is a bug and keeps its traceback.
_USER_ERRORS = (CheckpointError, AdapterFormatError, SafetensorsError, FileNotFoundError, NotADirectoryError,
                IsADirectoryError, PermissionError, FileExistsError, NameMapError)

_FAN_IN_FAN_OUT = {"auto": None, "true": True, "false": False}
_FAN_HELP = (
    "how adapted weights are stored: 'true' = transposed (in, out) like transformers' Conv1D, 'false' = (out, in) "
    "like nn.Linear, 'auto' (default) = from config.json's model_type (gpt2 ...), else the adapter's fan_in_fan_out"
)
_BASE_HELP = "the base model: a folder with model.safetensors (or a sharded index), or one .safetensors file"


def _cmd_inspect(args: argparse.Namespace) -> int:
    from . import summary

    if args.lora_rank <= 0:
        raise CheckpointError(f"--lora-rank must be positive, got {args.lora_rank}")
    summaries = summary.summarize(args.path, base=args.base)
    if args.json:
        print(json.dumps(summary.to_json(summaries, args.path, args.lora_rank), indent=2))
    else:
        print(summary.format_text(summaries, args.path, args.lora_rank))
    problems = summary.problems(summaries)
    if problems:  # the report above lists them one per line; the error line sums them up
        raise AdapterFormatError(f"{args.path} is inconsistent ({len(problems)} problem(s)): " + "; ".join(problems))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .merge import merge_adapter

    report = merge_adapter(
        args.base, args.adapter, args.out, adapter_name=args.adapter_name, overwrite=args.overwrite,
        fan_in_fan_out=_FAN_IN_FAN_OUT[args.fan_in_fan_out], progress=not args.quiet,
    )
    if not args.quiet:
        print(f"merged {report.merged_layers} layer(s) and replaced {report.replaced_tensors} tensor(s) into "
              f"{report.out} ({', '.join(report.files)})")
        if report.name_mapping:
            print(f"  {report.name_mapping}")
        if report.copied:
            print(f"  copied: {', '.join(report.copied)}")
        if report.skipped:
            print(f"  not copied (unmerged weights in another format): {', '.join(report.skipped)}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_adapter

    drawn = plot_adapter(
        args.path, args.out, layers=args.layers, base=args.base, shape=args.shape,
        adapter_name=args.adapter_name, overwrite=args.overwrite,
    )
    print(f"wrote {args.out}: {', '.join(drawn)}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    import os

    from .names import NameMap

    source = _adapter_format(args.src)
    if source == args.to:
        raise CheckpointError(f"{args.src} is already a {source} adapter; nothing to convert")
    dst = os.path.abspath(args.dst)
    _check_convert_destination(args, dst)
    if source == "peft" and args.base is None:
        raise CheckpointError(
            "PEFT -> Orbax needs the layer shapes, which a PEFT adapter does not store: pass --base MODEL "
            "(the base model's safetensors file or folder)"
        )
    name_map = NameMap.parse(args.name_map)
    try:
        import fourierft_jax
    except ImportError as error:
        raise CheckpointError(f"convert needs jax, flax and orbax-checkpoint (pip install 'fourierft[jax]'): {error}") \
            from None
    convert = _orbax_to_peft if source == "orbax" else _peft_to_orbax
    try:
        layers = convert(args, dst, name_map)
    except (fourierft_jax.AdapterMismatchError, KeyError) as error:
        raise CheckpointError(str(error).strip("'\"")) from None
    print(f"converted {args.src} ({source}) -> {dst} ({args.to}): {layers} layer(s)")
    return 0


def _adapter_format(path: str) -> str:
    """``"orbax"`` or ``"peft"``: what kind of adapter ``path`` holds (a ``CheckpointError`` if neither)."""
    import os

    from .orbax_format import is_orbax_adapter
    from .peft_format import list_adapters

    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if is_orbax_adapter(path):
        return "orbax"
    if os.path.isdir(path) and list_adapters(path):
        return "peft"
    raise CheckpointError(f"{path} is neither a PEFT adapter folder (no {CONFIG_NAME}) nor a fourierft_jax "
                          f"Orbax adapter checkpoint (no fourierft_adapter.json)")


def _check_convert_destination(args: argparse.Namespace, dst: str) -> None:
    import os

    for source_path in [args.src] + ([args.base] if args.base else []):
        source_path = os.path.abspath(source_path)
        # DST may sit inside a model folder, but must never be, or hold, an input, nor sit inside the source.
        inside_src = source_path == os.path.abspath(args.src) and dst.startswith(source_path + os.sep)
        if dst == source_path or source_path.startswith(dst + os.sep) or inside_src:
            raise CheckpointError(f"DST {dst} overlaps the input {source_path}: choose a separate folder")
    if os.path.exists(dst) and not args.overwrite:
        raise CheckpointError(f"DST {dst} already exists: pass --overwrite to replace it")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise CheckpointError(f"DST {dst} exists and is not a folder")


def _orbax_to_peft(args: argparse.Namespace, dst: str, name_map) -> int:
    """Export the Orbax checkpoint ``args.src`` as a PEFT folder at ``dst``; return the number of layers."""
    import os

    import fourierft_jax
    from fourierft_jax._src.convert import with_base_originals

    from .atomic import atomic_directory
    from .folders import is_conv1d, open_base

    saved = fourierft_jax.load_adapter(args.src)
    _warn_nonfinite(_orbax_nonfinite(saved))
    conv1d = None
    if args.base:
        base = open_base(args.base)
        saved = with_base_originals(saved, lambda name: _base_array(base, name), name_map)
        if base.model_type:
            model_type = base.model_type
            conv1d = lambda name: is_conv1d(name, model_type, saved.config, None)  # noqa: E731
    with atomic_directory(dst) as temporary:
        fourierft_jax.export_peft(saved, temporary, name_map=name_map, conv1d=conv1d)
        if os.path.exists(dst) and not args.overwrite:  # appeared while we were writing
            raise CheckpointError(f"DST {dst} already exists: pass --overwrite to replace it")
    return len(saved.spec.layers)


def _peft_to_orbax(args: argparse.Namespace, dst: str, name_map) -> int:
    """Save the PEFT adapter ``args.src`` (layer shapes from ``args.base``) as an Orbax checkpoint at ``dst``."""
    import fourierft_jax

    from .folders import is_conv1d, open_base
    from .peft_reader import nonfinite_keys, open_strict

    base = open_base(args.base)
    opened, resolution = open_strict(args.src, args.adapter_name, base=base)
    _warn_nonfinite(nonfinite_keys(opened))
    shapes = {layer.name: (layer.out_features, layer.in_features) for layer in resolution.layers}
    saved = fourierft_jax.read_peft(
        args.src, shapes=shapes, name_map=name_map, adapter_name=args.adapter_name,
        conv1d=lambda name: is_conv1d(name, base.model_type, opened.config, None), finite=False,
    )
    fourierft_jax.save_adapter(dst, saved, overwrite=args.overwrite)
    return len(saved.spec.layers)


def _warn_nonfinite(keys: Sequence[str]) -> None:
    """A conversion copies NaN/inf faithfully (a merge refuses them): say so, naming the tensors."""
    if keys:
        shown = ", ".join(repr(key) for key in keys[:10]) + (f" (and {len(keys) - 10} more)" if len(keys) > 10 else "")
        print(f"{PROG} convert: warning: NaN or inf values in {shown}; copied as they are", file=sys.stderr)


def _orbax_nonfinite(saved) -> list[str]:
    import numpy as np

    from fourierft_jax._src.saved_common import flat_leaves

    bad = []
    for group, modules in saved.state.items():
        for module, tree in modules.items():
            for rel, value in flat_leaves(tree):
                array = np.asarray(value)
                if array.dtype.kind == "f" or array.dtype.name == "bfloat16":
                    if not np.isfinite(array.astype(np.float32)).all():
                        bad.append(".".join([group, module, *map(str, rel)]))
    return bad


def _base_array(base, name: str):
    if name not in base.key_files:
        return None
    array = base.files[base.key_files[name]].array(name)
    if base.dtype(name) == "BF16":
        import ml_dtypes  # installed with jax; only reached by `convert`

        array = array.view(ml_dtypes.bfloat16)
    return array


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fourierft`` (one sub-parser per command)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect, merge and plot FourierFT adapters saved in HuggingFace PEFT's format "
                    "(no torch, no PEFT needed).",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_inspect(commands)
    _add_merge(commands)
    _add_convert(commands)
    _add_plot(commands)
    return parser


def _add_inspect(commands: argparse._SubParsersAction) -> None:
    """``fourierft inspect``: an adapter's config, layers and sizes."""
    inspect = commands.add_parser(
        "inspect", help="show an adapter's config, layers and parameter counts",
        description="Show the format, config, adapted layers (name, shape, n_frequency, scaling, parameters), totals "
                    "and the storage saved against LoRA on the same layers. Every adapter of the folder "
                    f"(sub-folders with their own {CONFIG_NAME}) is listed.",
    )
    inspect.add_argument("path", help="a PEFT adapter folder or a fourierft_jax Orbax adapter checkpoint")
    inspect.add_argument("--base", help=_BASE_HELP + " (gives the layer shapes, which the adapter does not store)")
    inspect.add_argument("--lora-rank", type=int, default=8, metavar="R",
                         help="the LoRA rank to compare with: r*(in+out) parameters per layer (default 8)")
    inspect.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    inspect.set_defaults(run=_cmd_inspect)


def _add_merge(commands: argparse._SubParsersAction) -> None:
    """``fourierft merge``: a base model's safetensors with the adapter merged in."""
    merge = commands.add_parser(
        "merge", help="merge an adapter into a base model's safetensors",
        description="Write the base model with the adapter merged in (W += scaling*Re(ifft2(S)); biases and "
                    "modules_to_save replaced), same sharding and dtypes as the base, other files of the model "
                    "folder copied. Equals PEFT's merge_and_unload(). Written to a temporary sibling and renamed, "
                    "so a failure leaves nothing at --out.",
    )
    merge.add_argument("--base", required=True, help=_BASE_HELP)
    merge.add_argument("--adapter", required=True, help="a PEFT FourierFT adapter folder")
    merge.add_argument("--out", required=True, help="the folder to write (must not exist unless --overwrite)")
    merge.add_argument("--adapter-name", help="which adapter of a folder holding several (default: 'default')")
    merge.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    merge.add_argument("--fan-in-fan-out", choices=sorted(_FAN_IN_FAN_OUT), default="auto", help=_FAN_HELP)
    merge.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    merge.set_defaults(run=_cmd_merge)


def _add_convert(commands: argparse._SubParsersAction) -> None:
    """``fourierft convert``: PEFT folder <-> fourierft_jax Orbax checkpoint."""
    convert = commands.add_parser(
        "convert", help="convert an adapter between PEFT's format and a fourierft_jax Orbax checkpoint",
        description="Convert SRC (a PEFT adapter folder or a fourierft_jax Orbax adapter checkpoint; detected) to "
                    "DST in the format given by --to. Spectra, biases and modules_to_save are copied bit for bit, "
                    "dtypes kept; Dense kernels (in, out) become Linear weights (out, in). Orbax -> PEFT needs no "
                    "base model (the checkpoint records the shapes); PEFT -> Orbax takes the layer shapes from "
                    "--base. Needs jax, flax and orbax-checkpoint. Written to a temporary sibling and renamed.",
    )
    convert.add_argument("src", help="a PEFT adapter folder or a fourierft_jax Orbax adapter checkpoint")
    convert.add_argument("dst", help="the folder to write (must not exist unless --overwrite)")
    convert.add_argument("--to", required=True, choices=("peft", "orbax"), help="the format to write")
    convert.add_argument("--name-map", metavar="RULES",
                         help='JAX path <-> torch name rules: a JSON file or JSON text, {"to_torch": [[pattern, '
                              'replacement], ...], "to_flax": [...]} (regex rewrites applied in order; a bare list '
                              'means to_torch). Default: the dotted JAX path is the torch name')
    convert.add_argument("--base", help=_BASE_HELP + " (PEFT -> Orbax: gives the layer shapes; Orbax -> PEFT: "
                         "gives the original biases PEFT stores for modules_to_save with bias='all', if the "
                         "checkpoint lacks them)")
    convert.add_argument("--adapter-name", help="which adapter of a PEFT folder holding several (default: 'default')")
    convert.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    convert.set_defaults(run=_cmd_convert)


def _add_plot(commands: argparse._SubParsersAction) -> None:
    """``fourierft plot``: learned spectra and delta weights as a PNG."""
    plot = commands.add_parser(
        "plot", help="draw learned spectra and delta weights to a PNG",
        description="For the chosen layers (default: the first three) draw the learned spectrum (coefficients on "
                    "the out x in grid) and the delta weight it makes. Needs matplotlib and the layer shapes "
                    "(--base, or --shape for one layer).",
    )
    plot.add_argument("path", help="a PEFT adapter folder")
    plot.add_argument("--out", required=True, help="the PNG file to write")
    plot.add_argument("--layers", nargs="+", metavar="NAME",
                      help="layers to draw: full names, globs (*.query) or dotted suffixes (layer.0.attention.self.query)")
    plot.add_argument("--base", help=_BASE_HELP)
    plot.add_argument("--shape", metavar="OUTxIN", help="the shape of the one chosen layer, when no --base is given")
    plot.add_argument("--adapter-name", help="which adapter of a folder holding several (default: 'default')")
    plot.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    plot.set_defaults(run=_cmd_plot)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``fourierft`` with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    Example:
        >>> main(["inspect", "/no/such/folder"])
        2
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except _USER_ERRORS as error:
        print(f"{PROG} {args.command}: error: {_message(error)}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


def _message(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return " ".join(str(error).split())  # one line


if __name__ == "__main__":
    sys.exit(main())
