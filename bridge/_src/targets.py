"""Which layers a config adapts: PEFT's matching rules over a framework-neutral list of modules.

Both frameworks describe their model as a list of ``ModuleInfo`` (dotted torch-style name, kind, torch-layout
shape) and call ``select_targets``; the answer -- names, shapes and per-layer ``n_frequency`` -- is the same
as the set of layers ``peft.get_peft_model`` adapts.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Iterable, Optional, Sequence, Union

from .config import FourierFTConfig

LINEAR = "linear"  # torch nn.Linear, Flax Dense kernel: weight (out, in) in torch layout
CONV1D = "conv1d"  # transformers Conv1D: weight stored (in, out), i.e. fan_in_fan_out
SUPPORTED_KINDS = (LINEAR, CONV1D)
ALL_LINEAR = "all-linear"
_SEQ_CLS_HEADS = ("classifier", "score")  # PEFT's PeftModelForSequenceClassification head names

# PEFT's TRANSFORMERS_MODELS_TO_FOURIERFT_TARGET_MODULES_MAPPING (PEFT 0.21): LoRA's defaults, except GPT-2 and
# GPT-BigCode, whose fused `c_attn` gets `mlp.c_proj` instead.
DEFAULT_TARGET_MODULES: dict[str, Union[list[str], str]] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["mlp.c_proj"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}


class NoTargetError(ValueError):
    """The config's ``target_modules`` matched no module of the model."""


@dataclasses.dataclass(frozen=True)
class ModuleInfo:
    """One module of a model, as the matcher sees it.

    Args:
        name: full dotted name, torch style (``encoder.layer.0.attention.self.query``).
        kind: ``"linear"``, ``"conv1d"``, or any other string (a class name) for modules FourierFT cannot adapt.
        shape: ``(out_features, in_features)`` in torch's ``nn.Linear`` layout, for linear and conv1d kinds.

    Example:
        >>> ModuleInfo("encoder.layer.0.attention.self.query", LINEAR, (768, 768)).in_features
        768
    """

    name: str
    kind: str
    shape: Optional[tuple[int, int]] = None

    @property
    def out_features(self) -> int:
        return self._shape()[0]

    @property
    def in_features(self) -> int:
        return self._shape()[1]

    def _shape(self) -> tuple[int, int]:
        if self.shape is None or len(self.shape) != 2:
            raise ValueError(f"module {self.name!r} ({self.kind}) has no 2-D (out, in) shape")
        return int(self.shape[0]), int(self.shape[1])


@dataclasses.dataclass(frozen=True)
class TargetLayer:
    """A layer the config adapts, with everything needed to build its adapter.

    Example:
        >>> layer = TargetLayer("h.0.mlp.c_proj", CONV1D, out_features=8, in_features=32, n_frequency=16)
        >>> layer.fan_in_fan_out, layer.num_positions
        (True, 256)
    """

    name: str
    kind: str
    out_features: int
    in_features: int
    n_frequency: int

    @property
    def fan_in_fan_out(self) -> bool:
        """True when the weight is stored ``(in, out)`` (Conv1D); positions are over ``(out, in)`` regardless."""
        return self.kind == CONV1D

    @property
    def num_positions(self) -> int:
        return self.out_features * self.in_features


def stack_row_path(path: Sequence[str], depth: int, row: int) -> tuple[str, ...]:
    """The path of row ``row`` of a layer stack, as the unrolled model (and PEFT) names it: the row index after
    the first ``depth`` entries, which name the stack module.

    Example:
        >>> ".".join(stack_row_path(("encoder", "layer", "attention", "query"), 2, 3))
        'encoder.layer.3.attention.query'
    """
    path = tuple(str(key) for key in path)
    return path[:depth] + (str(row),) + path[depth:]


def default_target_modules(model_type: Optional[str]) -> Union[list[str], str]:
    """PEFT's default FourierFT ``target_modules`` for a transformers ``model_type``.

    Example:
        >>> default_target_modules("gpt2")
        ['mlp.c_proj']
    """
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(
            f"FourierFT has no default `target_modules` for model type {model_type!r}; set `target_modules` "
            f"in the config (e.g. ['q_proj', 'v_proj'] or 'all-linear')"
        )
    default = DEFAULT_TARGET_MODULES[model_type]
    return list(default) if isinstance(default, list) else default


def layer_index(name: str, layers_pattern: Optional[Union[str, Sequence[str]]] = None) -> Optional[int]:
    """The layer index PEFT reads from a module name for ``layers_to_transform`` (None if it finds none).

    Example:
        >>> layer_index("model.layers.1.experts.0.w1")
        1
        >>> layer_index("transformer.h.3.attn.c_attn", layers_pattern="h")
        3
    """
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def _matches_names(entries: Union[list[str], str], name: str) -> bool:
    if isinstance(entries, str):
        return re.fullmatch(entries, name) is not None
    return name in entries or any(name.endswith(f".{entry}") for entry in entries)


def is_excluded(config: FourierFTConfig, name: str) -> bool:
    """True if ``exclude_modules`` or ``modules_to_save`` keep the module ``name`` from being adapted."""
    if config.exclude_modules and _matches_names(config.exclude_modules, name):
        return True
    return any(re.match(rf"(^|.*\.){module}($|\..*)", name) for module in _modules_to_save(config))


def _modules_to_save(config: FourierFTConfig) -> list[str]:
    return list(config.modules_to_save or ()) + task_modules_to_save(config)


def task_modules_to_save(config: FourierFTConfig) -> list[str]:
    """The head modules PEFT's task model adds to ``modules_to_save`` before adapting (``SEQ_CLS``: the classifier).

    PeftModelForSequenceClassification appends them *before* injecting the adapter, so with
    ``task_type="SEQ_CLS"`` they are never adapted (the other task types append them afterwards).

    Example:
        >>> task_modules_to_save(FourierFTConfig(task_type="SEQ_CLS"))
        ['classifier', 'score']
    """
    return list(_SEQ_CLS_HEADS) if config.task_type == "SEQ_CLS" else []


def is_targeted(config: FourierFTConfig, name: str, target_modules: Union[list[str], str, None] = None) -> bool:
    """PEFT's ``check_target_module_exists`` for one full module name (excluded modules give False).

    Example:
        >>> is_targeted(FourierFTConfig(target_modules=["query"]), "encoder.layer.0.attention.self.query")
        True
    """
    targets = config.target_modules if target_modules is None else target_modules
    if not targets or is_excluded(config, name):
        return False
    if not _matches_names(targets, name):
        return False
    # PEFT applies layers_to_transform only to suffix matches: an entry equal to the full name always matches.
    if isinstance(targets, str) or name in targets or config.layers_to_transform is None:
        return True
    wanted = config.layers_to_transform
    if isinstance(wanted, list) and not wanted:
        return True  # PEFT treats an empty list as "every layer"
    index = layer_index(name, config.layers_pattern)
    if index is None:
        return False
    return index == wanted if isinstance(wanted, int) else index in wanted


def select_targets(
    config: FourierFTConfig,
    modules: Iterable[ModuleInfo],
    *,
    model_type: Optional[str] = None,
    output_layer: Optional[str] = None,
) -> list[TargetLayer]:
    """The layers ``config`` adapts in a model described by ``modules``, in model order.

    Implements PEFT's rules exactly: list/regex ``target_modules`` (``None``: PEFT's default for
    ``model_type``; ``"all-linear"``: every linear layer but ``output_layer``), ``exclude_modules``,
    ``modules_to_save``, ``layers_to_transform``/``layers_pattern`` and ``n_frequency_pattern``.

    Raises:
        NoTargetError: nothing matched (the message lists the model's linear layers).
        TypeError: a matched module is not linear/Conv1D.
        ValueError: a layer's ``n_frequency`` exceeds ``in * out``.

    Example:
        >>> modules = [ModuleInfo("lin0", LINEAR, (20, 10)), ModuleInfo("lin1", LINEAR, (2, 20))]
        >>> [t.name for t in select_targets(FourierFTConfig(n_frequency=8, target_modules=["lin0"]), modules)]
        ['lin0']
    """
    modules = [module for module in modules if module.name]
    targets = config.target_modules
    if targets is None:
        if model_type is None:
            raise ValueError(
                "FourierFTConfig.target_modules is not set and the model type is unknown; set `target_modules` "
                "(e.g. ['query', 'value'] or 'all-linear')"
            )
        targets = default_target_modules(model_type)
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        targets = sorted(m.name for m in modules if m.kind in SUPPORTED_KINDS and m.name != output_layer)

    selected: list[TargetLayer] = []
    excluded = 0
    for module in modules:
        if is_excluded(config, module.name):
            excluded += _matches_names(targets, module.name)
            continue
        if not is_targeted(config, module.name, targets):
            continue
        if module.kind not in SUPPORTED_KINDS:
            raise TypeError(
                f"FourierFT: target {module.name!r} is a {module.kind}, which FourierFT cannot adapt; only linear "
                f"layers (torch nn.Linear / transformers Conv1D / Flax Dense) are supported. Narrow "
                f"`target_modules` so that it matches the linear layers inside it."
            )
        n_frequency = config.n_frequency_for(module.name)
        out_features, in_features = module.out_features, module.in_features
        if n_frequency > out_features * in_features:
            raise ValueError(
                f"FourierFT: n_frequency={n_frequency} for layer {module.name!r} exceeds its {out_features}x"
                f"{in_features} = {out_features * in_features} spectral entries; lower `n_frequency` or set a "
                f"smaller value for it in `n_frequency_pattern`"
            )
        selected.append(TargetLayer(module.name, module.kind, out_features, in_features, n_frequency))

    if not selected:
        raise NoTargetError(_no_target_message(config, targets, modules, excluded))
    _warn_fan_in_fan_out(config, selected)
    return selected


def _no_target_message(
    config: FourierFTConfig, targets: Union[list[str], str], modules: list[ModuleInfo], excluded: int
) -> str:
    linear = [m.name for m in modules if m.kind in SUPPORTED_KINDS]
    shown = ", ".join(linear[:24]) + (f", ... ({len(linear)} in all)" if len(linear) > 24 else "")
    message = f"FourierFT: target_modules={targets!r} matched no layer of the model"
    if excluded:
        message += f" ({excluded} matching module(s) were removed by exclude_modules/modules_to_save)"
    if config.layers_to_transform is not None:
        message += f"; layers_to_transform={config.layers_to_transform!r}"
        if config.layers_pattern is not None:
            message += f", layers_pattern={config.layers_pattern!r}"
    return message + f". The model's linear layers are: {shown or '(none)'}"


def fan_in_fan_out_for(kind: str, requested: bool, stacklevel: int = 2) -> bool:
    """The ``fan_in_fan_out`` a layer of ``kind`` takes: ``True`` for ``CONV1D`` (weight stored ``(in, out)``),
    ``False`` for ``LINEAR``. When ``requested`` says otherwise, warn once (as PEFT does) and correct it.

    ``stacklevel`` is that of ``warnings.warn`` as seen from the caller (2: the caller's caller).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     fan_in_fan_out_for(CONV1D, False), fan_in_fan_out_for(LINEAR, False)
        (True, False)
        >>> [str(w.message) for w in caught]
        ['fan_in_fan_out is set to False but the target module is `Conv1D`; setting fan_in_fan_out to True.']
    """
    wanted = kind == CONV1D
    if bool(requested) != wanted:
        module = "`Conv1D`" if wanted else "a linear layer storing its weight (out, in) (`torch.nn.Linear`, Dense)"
        warnings.warn(
            f"fan_in_fan_out is set to {bool(requested)} but the target module is {module}; setting fan_in_fan_out "
            f"to {wanted}.",
            UserWarning,
            stacklevel=stacklevel + 1,
        )
    return wanted


def _warn_fan_in_fan_out(config: FourierFTConfig, selected: list[TargetLayer]) -> None:
    kinds = {layer.kind for layer in selected}
    for kind in (LINEAR, CONV1D):
        if kind in kinds:
            fan_in_fan_out_for(kind, config.fan_in_fan_out, stacklevel=3)  # the caller of select_targets
