"""Model surgery for NNX: swap targeted ``nnx.Linear`` modules for ``FourierFTLinear`` and back."""

from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp
from flax import nnx

import bridge

from .layer import LayerSpec
from .nnx_layer import FourierFTLinear, FourierFTTrainable

NnxPath = tuple[Any, ...]


def _name(path: NnxPath) -> str:
    return ".".join(str(key) for key in path)


def _info(path: NnxPath, module: nnx.Module) -> bridge.ModuleInfo:
    if type(module) is nnx.Linear:
        in_features, out_features = module.kernel.shape
        return bridge.ModuleInfo(_name(path), bridge.LINEAR, (int(out_features), int(in_features)))
    return bridge.ModuleInfo(_name(path), type(module).__name__)


def _get(model: Any, path: NnxPath) -> Any:
    node = model
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def _set(model: Any, path: NnxPath, value: Any) -> None:
    parent, key = _get(model, path[:-1]), path[-1]
    if isinstance(key, int):
        parent[key] = value
    else:
        setattr(parent, key, value)


def _modules(model: nnx.Module) -> list[tuple[NnxPath, nnx.Module]]:
    return [(tuple(path), module) for path, module in nnx.iter_modules(model) if path]


def apply(
    model: nnx.Module,
    config: bridge.FourierFTConfig,
    *,
    rngs: Optional[nnx.Rngs] = None,
    model_type: Optional[str] = None,
    output_layer: Optional[str] = None,
    mode: str = "spectral",
) -> nnx.Module:
    """Replace (in place) each ``nnx.Linear`` that ``config`` targets with a ``FourierFTLinear``; returns ``model``.

    Names are the dotted attribute paths (``layers.0.attention.query``) matched by PEFT's rules
    (``bridge.select_targets``). With ``bias`` set, trained biases become ``FourierFTTrainable`` (an
    ``nnx.LoRAParam``), and so do all parameters of ``modules_to_save``: ``wrt=nnx.LoRAParam`` trains exactly
    the adapter. Everything is validated before the model is touched.

    Example:
        >>> import jax.numpy as jnp, fourierft_jax
        >>> from flax import nnx
        >>> class MLP(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.fc1, self.fc2 = nnx.Linear(6, 8, rngs=rngs), nnx.Linear(8, 4, rngs=rngs)
        ...     def __call__(self, x):
        ...         return self.fc2(nnx.relu(self.fc1(x)))
        >>> model = fourierft_jax.nnx.apply(MLP(nnx.Rngs(0)), fourierft_jax.FourierFTConfig(n_frequency=10,
        ...                                 target_modules=["fc1"]), rngs=nnx.Rngs(1))
        >>> type(model.fc1).__name__, model(jnp.ones((2, 6))).shape
        ('FourierFTLinear', (2, 4))
    """
    if any(isinstance(module, FourierFTLinear) for _, module in _modules(model)):
        raise ValueError("fourierft_jax.nnx.apply: the model already has FourierFT layers; unload or merge first")
    modules = _modules(model)
    paths = {_name(path): path for path, _ in modules}
    targets = bridge.select_targets(
        config, [_info(path, module) for path, module in modules], model_type=model_type, output_layer=output_layer
    )
    if not config.init_weights and rngs is None:
        raise ValueError("fourierft_jax.nnx.apply: init_weights=False draws N(0, 1) spectra; pass rngs=nnx.Rngs(...)")
    saved = [
        path
        for path, _ in modules
        if any(_name(path).endswith(entry) for entry in config.modules_to_save or ())
    ]
    replacements = []
    for target in targets:
        path = paths[target.name]
        layer = LayerSpec(
            tuple(str(k) for k in path), target.in_features, target.out_features, target.n_frequency,
            float(config.scaling), int(config.random_loc_seed),
        )
        replacements.append((path, FourierFTLinear(_get(model, path), layer, rngs=rngs,
                                                  init_weights=config.init_weights, mode=mode)))
    for path, adapted in replacements:
        _set(model, path, adapted)
    _mark_trainable(model, config, [path for path, _ in replacements], saved)
    return model


def _mark_trainable(model: nnx.Module, config: bridge.FourierFTConfig, adapted: list, saved: list) -> None:
    def retype(module: Any, attribute: str) -> None:
        variable = getattr(module, attribute, None)
        if isinstance(variable, nnx.Param) and not isinstance(variable, nnx.LoRAParam):
            setattr(module, attribute, FourierFTTrainable(variable[...]))

    for path in saved:
        for _, variable_owner in nnx.iter_modules(_get(model, path)):
            for attribute, value in list(vars(variable_owner).items()):
                if isinstance(value, nnx.Param):
                    retype(variable_owner, attribute)
    if config.bias == "all":
        for _, module in nnx.iter_modules(model):
            retype(module, "bias")
    elif config.bias == "fourier_only":
        for path in adapted:
            retype(_get(model, path).base, "bias")


def _plain_params(module: nnx.Module) -> None:
    for _, owner in nnx.iter_modules(module):
        for attribute, value in list(vars(owner).items()):
            if isinstance(value, FourierFTTrainable):
                setattr(owner, attribute, nnx.Param(value[...]))


def _replace_adapted(model: nnx.Module, merge: bool, safe_merge: bool = False) -> nnx.Module:
    adapted = [(path, module) for path, module in _modules(model) if isinstance(module, FourierFTLinear)]
    new = []
    for path, module in adapted:
        base = module.base
        if merge and not module.disabled:
            kernel = base.kernel[...]
            merged = kernel + module.delta_kernel().astype(kernel.dtype)
            if safe_merge and not bool(jnp.isfinite(merged).all()):
                raise ValueError(f"fourierft_jax.nnx: NaN/inf in the merged kernel of {_name(path)!r}")
            new.append((path, base, merged))
        else:
            new.append((path, base, None))
    for path, base, merged in new:
        if merged is not None:
            base.kernel[...] = merged
        _set(model, path, base)
    _plain_params(model)
    return model


def merge_and_unload(model: nnx.Module, *, safe_merge: bool = False) -> nnx.Module:
    """Replace every ``FourierFTLinear`` by its base ``nnx.Linear`` with kernel ``W + ΔW`` (in place).

    Example:
        >>> import fourierft_jax
        >>> from flax import nnx
        >>> class One(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.fc = nnx.Linear(6, 4, rngs=rngs)
        >>> model = fourierft_jax.nnx.apply(One(nnx.Rngs(0)), fourierft_jax.FourierFTConfig(n_frequency=5,
        ...                                 target_modules=["fc"]), rngs=nnx.Rngs(1))
        >>> type(fourierft_jax.nnx.merge_and_unload(model).fc).__name__
        'Linear'
    """
    return _replace_adapted(model, merge=True, safe_merge=safe_merge)


def unload(model: nnx.Module) -> nnx.Module:
    """Replace every ``FourierFTLinear`` by its untouched base ``nnx.Linear`` (in place); trained biases stay.

    Example:
        >>> import fourierft_jax
        >>> class One(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.fc = nnx.Linear(6, 4, rngs=rngs)
        >>> model = fourierft_jax.nnx.apply(One(nnx.Rngs(0)), fourierft_jax.FourierFTConfig(n_frequency=5,
        ...                                 target_modules=["fc"], init_weights=True))
        >>> type(unload(model).fc).__name__
        'Linear'
    """
    return _replace_adapted(model, merge=False)


def set_disabled(model: nnx.Module, disabled: bool = True) -> None:
    """Turn every FourierFT layer of ``model`` off (``True``) or back on.

    Example:
        >>> import fourierft_jax
        >>> class One(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.fc = nnx.Linear(6, 4, rngs=rngs)
        >>> model = fourierft_jax.nnx.apply(One(nnx.Rngs(0)), fourierft_jax.FourierFTConfig(n_frequency=5,
        ...                                 target_modules=["fc"], init_weights=True))
        >>> set_disabled(model); model.fc.disabled
        True
    """
    for _, module in _modules(model):
        if isinstance(module, FourierFTLinear):
            module.disabled = disabled
