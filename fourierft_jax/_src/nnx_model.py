"""Model surgery for NNX: swap targeted ``nnx.Linear`` modules for ``FourierFTLinear`` and back.

Targets are chosen by the linen rules (``targets.select_layers``) applied to a linen-shaped *view* of the module
tree: one dict per module, with ``kernel`` shown only for ``nnx.Linear`` so that nothing else can be picked as a
linear layer. Layer stacks made by ``nnx.vmap`` (``stacked=``) are unrolled into ``stack.<i>.…`` names exactly as
for linen ``nn.scan`` trees.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

import bridge

from .layer import LayerSpec
from .nnx_layer import FourierFTLinear, FourierFTTrainable
from .targets import Stacks, module_infos, select_layers, stack_requests
from .tree import Path, dotted

NnxPath = tuple[Any, ...]


def _name(path: NnxPath) -> str:
    return ".".join(str(key) for key in path)


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


def _key(path: NnxPath) -> Path:
    return tuple(str(key) for key in path)


def module_view(model: nnx.Module) -> dict[str, Any]:
    """The module tree of ``model`` as a linen-style nested dict of ``jax.ShapeDtypeStruct``s (string keys).

    Every module is a dict holding its own Variables; only an ``nnx.Linear`` shows a ``kernel`` (any other module's
    ``kernel``/``embedding`` is renamed ``"kernel (Conv)"``...), so ``targets.select_layers`` treats exactly the
    ``nnx.Linear`` modules as linear layers. A stack made by ``nnx.vmap`` shows its arrays with the layer axis.

    Example:
        >>> from flax import nnx
        >>> class One(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.fc = nnx.Linear(6, 4, rngs=rngs)
        ...         self.conv = nnx.Conv(2, 2, (3,), rngs=rngs)
        >>> view = module_view(nnx.eval_shape(lambda: One(nnx.Rngs(0))))
        >>> view["fc"]["kernel"].shape, sorted(view["conv"])
        ((6, 4), ['bias', 'kernel (Conv)'])
    """
    root: dict[str, Any] = {}
    for path, module in _modules(model):
        node = root
        for key in _key(path):
            node = node.setdefault(key, {})
        for attribute, variable in vars(module).items():
            if not isinstance(variable, nnx.Variable) or getattr(variable, "shape", None) is None:
                continue
            name = attribute
            if attribute in ("kernel", "embedding") and type(module) is not nnx.Linear:
                name = f"{attribute} ({type(module).__name__})"
            node[name] = jax.ShapeDtypeStruct(tuple(variable.shape), variable.dtype)
    return root


def select_nnx_layers(
    model: nnx.Module,
    config: bridge.FourierFTConfig,
    *,
    model_type: Optional[str] = None,
    output_layer: Optional[str] = None,
    stacked: Stacks = None,
) -> tuple[LayerSpec, ...]:
    """The ``LayerSpec`` of every ``nnx.Linear`` of ``model`` that ``config`` adapts (PEFT's rules, as for linen).

    ``stacked`` names modules made by ``nnx.vmap`` (every Variable under them has the layer axis first); their
    layers are matched under the unrolled names ``stack.<i>.…`` and a selected stacked kernel is one ``LayerSpec``
    with a ``(L, n)`` spectrum. Raises ``ValueError`` for a stack whose layer axis is not 0 or of which only some
    layers are selected (``nnx.scan`` slices every Variable of the stack alike, so a stack is adapted whole).

    Example:
        >>> from flax import nnx
        >>> class Block(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.fc = nnx.Linear(8, 4, rngs=rngs)
        >>> class Net(nnx.Module):
        ...     def __init__(self, rngs):
        ...         make = nnx.split_rngs(splits=3)(nnx.vmap(Block, in_axes=(0,), out_axes=0))
        ...         self.layers = make(rngs)
        >>> net = nnx.eval_shape(lambda: Net(nnx.Rngs(0)))
        >>> (layer,) = select_nnx_layers(net, bridge.FourierFTConfig(n_frequency=5, target_modules=["fc"]),
        ...                              stacked="layers")
        >>> layer.name, layer.spectrum_shape, layer.torch_names
        ('layers.fc', (3, 5), ('layers.0.fc', 'layers.1.fc', 'layers.2.fc'))
    """
    for head, axis in stack_requests(stacked).items():
        if axis != 0:
            raise ValueError(
                f"fourierft_jax.nnx: stacked module {dotted(head)!r}: NNX stacks must carry the layer axis first "
                f"(nnx.vmap(..., out_axes=0), scanned with axis 0), got axis {axis}"
            )
    modules = _modules(model)
    view = module_view(model)
    # The view hides the class of non-Linear modules; matching once more with the real classes makes a target that
    # names, e.g., an nnx.Embed fail with "... is a Embed ..." as it does for PEFT.
    kinds = {(): type(model).__name__, **{_key(path): type(module).__name__ for path, module in modules}}
    for path, module in modules:
        if type(module) is nnx.Linear and len(module.kernel.shape) != 2:
            kinds[_key(path)] = (f"nnx.Linear with a {len(module.kernel.shape)}-D kernel {tuple(module.kernel.shape)} "
                                 "(an nnx.vmap layer stack? name it in stacked=)")
    infos = [
        info if info.kind == bridge.LINEAR else bridge.ModuleInfo(info.name, kinds.get(path, info.kind))
        for path, _, info in module_infos(view, stacked)
    ]
    bridge.select_targets(config, infos, model_type=model_type, output_layer=output_layer)
    layers = select_layers(view, config, model_type=model_type, output_layer=output_layer, stacked=stacked)
    for layer in layers:
        if layer.stacked and len(layer.stack_ids) != layer.stack_size:
            head = dotted(layer.path[: layer.stack_depth])
            raise ValueError(
                f"fourierft_jax.nnx: the config adapts only layers {list(layer.stack_ids)} of the "
                f"{layer.stack_size} in stack {head!r} (at {layer.name!r}); an NNX stack is scanned as a whole, so "
                f"adapt all of its layers (layers_to_transform) or build those layers outside the stack"
            )
    return layers


def apply(
    model: nnx.Module,
    config: bridge.FourierFTConfig,
    *,
    rngs: Optional[nnx.Rngs] = None,
    model_type: Optional[str] = None,
    output_layer: Optional[str] = None,
    mode: str = "spectral",
    stacked: Stacks = None,
) -> nnx.Module:
    """Replace (in place) each ``nnx.Linear`` that ``config`` targets with a ``FourierFTLinear``; returns ``model``.

    Names are the dotted attribute paths (``layers.0.attention.query``) matched by PEFT's rules
    (``bridge.select_targets``). With ``bias`` set, trained biases become ``FourierFTTrainable`` (an
    ``nnx.LoRAParam``), and so do all parameters of ``modules_to_save``: ``wrt=nnx.LoRAParam`` trains exactly
    the adapter. Everything is validated before the model is touched.

    ``stacked`` (as in ``fourierft_jax.apply``: a dotted path, a list of them, or ``{path: 0}``) names modules
    created by ``nnx.vmap`` and run with ``nnx.scan``; their layers are matched as ``path.<i>.…`` and each adapted
    stacked ``nnx.Linear`` gets one ``FourierFTLinear`` with an ``(L, n)`` spectrum (see ``select_nnx_layers``).

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
    modules = _modules(model)
    if any(isinstance(module, FourierFTLinear) for _, module in modules):
        raise ValueError("fourierft_jax.nnx.apply: the model already has FourierFT layers; unload or merge first")
    layers = {layer.path: layer for layer in select_nnx_layers(
        model, config, model_type=model_type, output_layer=output_layer, stacked=stacked)}
    if not config.init_weights and rngs is None:
        raise ValueError("fourierft_jax.nnx.apply: init_weights=False draws N(0, 1) spectra; pass rngs=nnx.Rngs(...)")
    saved = [
        path
        for path, _ in modules
        if any(_name(path).endswith(entry) for entry in config.modules_to_save or ())
    ]
    # Model order (not target order), so that the spectra drawn from ``rngs`` do not depend on the config.
    replacements = [
        (path, FourierFTLinear(module, layers[_key(path)], rngs=rngs, init_weights=config.init_weights, mode=mode))
        for path, module in modules
        if _key(path) in layers
    ]
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
