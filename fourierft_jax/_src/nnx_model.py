"""Model surgery for NNX: swap targeted ``nnx.Linear`` modules for ``FourierFTLinear`` (and ``nnx.LinearGeneral`` /
``nnx.Einsum`` modules, e.g. the projections inside ``nnx.MultiHeadAttention``, for ``FourierFTGeneral``) and back.

Targets are chosen by the linen rules (``targets.select_layers``) applied to a linen-shaped *view* of the module
tree: one dict per module, with ``kernel`` shown only for the modules FourierFT can adapt, so that nothing else
can be picked as a linear layer. An N-D kernel's contraction is read from the module's own attributes (no example
input is needed): ``LinearGeneral`` contracts its leading ``len(in_features)`` kernel axes, an ``Einsum`` the
kernel letters of its ``einsum_str`` that the output lacks. Layer stacks made by ``nnx.vmap`` (``stacked=``) are
unrolled into ``stack.<i>.…`` names exactly as for linen ``nn.scan`` trees.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

import bridge

from .layer import LayerSpec
from .nnx_layer import FourierFTGeneral, FourierFTLinear, FourierFTTrainable
from .targets import Stacks, _modules as target_modules, select_layers, stack_of, stack_requests
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


# Module types whose kernel FourierFT adapts (exact types: a subclass may contract its kernel differently).
GENERAL_TYPES = (nnx.LinearGeneral, nnx.Einsum)


def einsum_contraction(einsum_str: str, kernel_shape: tuple[int, ...]) -> tuple[int, ...] | str:
    """The kernel axes an ``nnx.Einsum`` contracts (its kernel is the second operand: the letters the output
    lacks), or a sentence saying why its kernel is no ``(in, out)`` matrix.

    Example:
        >>> einsum_contraction("btd,ndh->btnh", (2, 8, 4))
        (1,)
        >>> einsum_contraction("bnd,ndh->bnh", (2, 8, 4)).split(" (")[0]
        "nnx.Einsum 'bnd,ndh->bnh' whose kernel axis 0"
    """
    spec = einsum_str.replace(" ", "")
    where = f"nnx.Einsum {spec!r}"
    if spec.count("->") != 1 or spec.split("->")[0].count(",") != 1:
        return f"{where} (FourierFT needs an explicit 'input,kernel->output' equation)"
    operands, out = spec.split("->")
    x, kernel = operands.split(",")
    if "." in kernel:
        return f"{where} with an ellipsis in its kernel operand (FourierFT needs one letter per kernel axis)"
    if len(kernel) != len(kernel_shape):
        return f"{where} whose kernel operand {kernel!r} does not match its {len(kernel_shape)}-D kernel {kernel_shape}"
    if len(set(kernel)) != len(kernel):
        return f"{where} that repeats a letter in its kernel operand (a diagonal, no (in, out) matrix)"
    contracted = []
    for axis, letter in enumerate(kernel):
        if letter in x and letter in out:
            return (f"{where} whose kernel axis {axis} ({letter!r}) is a batch axis (in the input, the kernel and "
                    "the output); FourierFT needs every kernel axis either contracted with the input or kept in the "
                    "output")
        if letter not in x and letter not in out:
            return (f"{where} that sums its kernel axis {axis} ({letter!r}) on its own; FourierFT needs every "
                    "kernel axis either contracted with the input or kept in the output")
        if letter in x:
            contracted.append(axis)
    if not contracted or len(contracted) == len(kernel):
        return f"{where} that does not split its kernel into contracted and kept axes"
    return tuple(contracted)


def _per_layer(module: nnx.Module, expected: tuple[int, ...], stacked: bool) -> tuple[int, ...] | str:
    shape = tuple(int(d) for d in module.kernel.shape)
    have = shape[1:] if stacked else shape
    if have != tuple(int(d) for d in expected):
        hint = "" if stacked else " (an nnx.vmap layer stack? name it in stacked=)"
        return (f"{type(module).__name__} whose kernel {shape} is not the {tuple(expected)} its attributes "
                f"describe{hint}")
    return have


def kernel_contraction(module: nnx.Module, stacked: bool = False) -> tuple[int, ...] | str | None:
    """The axes of one layer's kernel (stacked: without the layer axis) that ``module`` contracts with its
    input, a sentence saying why FourierFT cannot adapt it, or None for a module with no adaptable kernel.

    Size-1 contracted axes are left out when larger ones exist (they do not change the ``(in, out)`` matrix).

    Example:
        >>> from flax import nnx
        >>> kernel_contraction(nnx.LinearGeneral((2, 3), 4, axis=(-2, -1), rngs=nnx.Rngs(0)))
        (0, 1)
        >>> kernel_contraction(nnx.Einsum("bd,dnh->bnh", (6, 2, 4), rngs=nnx.Rngs(0)))
        (0,)
        >>> kernel_contraction(nnx.Embed(4, 3, rngs=nnx.Rngs(0))) is None
        True
    """
    kind = type(module)
    if kind is nnx.Linear:
        # A Linear with some other kernel (an unnamed vmap stack) is reported by select_nnx_layers.
        ok = not isinstance(_per_layer(module, (module.in_features, module.out_features), stacked), str)
        return (0,) if ok else None
    if kind is nnx.LinearGeneral:
        if module.batch_axis:
            return (f"nnx.LinearGeneral with batch_axis {dict(module.batch_axis)} (its kernel has batch axes, "
                    "no (in, out) matrix)")
        dims = _per_layer(module, tuple(module.in_features) + tuple(module.out_features), stacked)
        axes: tuple[int, ...] | str = tuple(range(len(module.in_features)))
    elif kind is nnx.Einsum:
        if module.einsum_str is None:
            return ("nnx.Einsum without an einsum_str (given at call time); FourierFT reads the contraction from "
                    "the module's own einsum_str")
        dims = _per_layer(module, tuple(module.kernel_shape), stacked)
        axes = einsum_contraction(module.einsum_str, dims) if not isinstance(dims, str) else dims
    else:
        return None
    if isinstance(dims, str):
        return dims
    if isinstance(axes, str):
        return axes
    large = tuple(a for a in axes if dims[a] > 1)
    return large or axes


def _adaptable(model: nnx.Module, stacked: Stacks = None) -> tuple[dict[Path, tuple[int, ...]], dict[Path, str]]:
    """``({module path: contracted axes of the stored kernel}, {module path: why not})`` for the Linear,
    LinearGeneral and Einsum modules of ``model`` (a stacked module's axes count its leading layer axis)."""
    heads = stack_requests(stacked)
    axes: dict[Path, tuple[int, ...]] = {}
    reasons: dict[Path, str] = {}
    for path, module in _modules(model):
        key = _key(path)
        in_stack = stack_of(key, heads) is not None
        found = kernel_contraction(module, in_stack)
        if isinstance(found, str):
            reasons[key] = found
        elif found is not None:
            axes[key] = tuple(a + 1 for a in found) if in_stack else found
    return axes, reasons


def module_view(model: nnx.Module, stacked: Stacks = None) -> dict[str, Any]:
    """The module tree of ``model`` as a linen-style nested dict of ``jax.ShapeDtypeStruct``s (string keys).

    Every module is a dict holding its own Variables; only a module FourierFT can adapt (``nnx.Linear``, and an
    ``nnx.LinearGeneral``/``nnx.Einsum`` whose kernel is an ``(in, out)`` matrix, see ``kernel_contraction``)
    shows a ``kernel`` (any other module's ``kernel``/``embedding`` is renamed ``"kernel (Conv)"``...), so
    ``targets.select_layers`` treats exactly those modules as linear layers. A stack made by ``nnx.vmap`` shows
    its arrays with the layer axis.

    Example:
        >>> from flax import nnx
        >>> class One(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.fc = nnx.Linear(6, 4, rngs=rngs)
        ...         self.conv = nnx.Conv(2, 2, (3,), rngs=rngs)
        ...         self.q = nnx.LinearGeneral(6, (2, 3), rngs=rngs)
        >>> view = module_view(nnx.eval_shape(lambda: One(nnx.Rngs(0))))
        >>> view["fc"]["kernel"].shape, sorted(view["conv"]), view["q"]["kernel"].shape
        ((6, 4), ['bias', 'kernel (Conv)'], (6, 2, 3))
    """
    adaptable, _ = _adaptable(model, stacked)
    root: dict[str, Any] = {}
    for path, module in _modules(model):
        node = root
        for key in _key(path):
            node = node.setdefault(key, {})
        for attribute, variable in vars(module).items():
            if not isinstance(variable, nnx.Variable) or getattr(variable, "shape", None) is None:
                continue
            name = attribute
            shown = type(module) is nnx.Linear or _key(path) in adaptable
            if attribute in ("kernel", "embedding") and not (attribute == "kernel" and shown):
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
    """The ``LayerSpec`` of every ``nnx.Linear``, ``nnx.LinearGeneral`` and ``nnx.Einsum`` of ``model`` that ``config``
    adapts (PEFT's rules, as for linen). An N-D kernel's spec has ``kernel_dims``/``in_axes`` (its ``(in, out)``
    matrix view, the torch shape PEFT export uses), read from the module (``kernel_contraction``); a targeted
    module whose kernel is contracted in a way FourierFT cannot express (an Einsum batch axis...) raises
    ``TypeError`` naming its path and why.

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
    adaptable, reasons = _adaptable(model, stacked)
    view = module_view(model, stacked)
    # The view hides the class of modules it cannot adapt; matching once more with the real classes makes a target
    # that names, e.g., an nnx.Embed fail with "... is a Embed ..." as it does for PEFT.
    kinds = {(): type(model).__name__, **{_key(path): type(module).__name__ for path, module in modules}}
    kinds.update(reasons)
    for path, module in modules:
        if type(module) is nnx.Linear and len(module.kernel.shape) != 2:
            kinds[_key(path)] = (f"nnx.Linear with a {len(module.kernel.shape)}-D kernel {tuple(module.kernel.shape)} "
                                 "(an nnx.vmap layer stack? name it in stacked=)")
    contractions = {key + ("kernel",): axes for key, axes in adaptable.items()}
    infos = [
        info if info.kind == bridge.LINEAR else bridge.ModuleInfo(info.name, kinds.get(path, info.kind))
        for path, _, info, _ in target_modules(view, stacked, contractions)
    ]
    bridge.select_targets(config, infos, model_type=model_type, output_layer=output_layer)
    layers = select_layers(view, config, model_type=model_type, output_layer=output_layer, stacked=stacked,
                           contractions=contractions)
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
    """Replace (in place) each ``nnx.Linear`` that ``config`` targets with a ``FourierFTLinear``, and each targeted
    ``nnx.LinearGeneral``/``nnx.Einsum`` (e.g. ``attention.query`` of an ``nnx.MultiHeadAttention``) with a
    ``FourierFTGeneral``; returns ``model``.

    Names are the dotted attribute paths (``layers.0.attention.query``) matched by PEFT's rules
    (``bridge.select_targets``). ``mode`` is the layers' forward form: ``"spectral"`` (default), ``"fused"``,
    ``"auto"`` (fused or spectral per call, ``choose_path``) or ``"merge"`` (see ``nnx_layer``); all but
    ``"merge"`` train without a weight-sized gradient. With ``bias`` set, trained biases become
    ``FourierFTTrainable`` (an ``nnx.LoRAParam``), and so do all parameters of ``modules_to_save``:
    ``wrt=nnx.LoRAParam`` trains exactly the adapter. Everything is validated before the model is touched.

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
        (path, (FourierFTLinear if type(module) is nnx.Linear else FourierFTGeneral)(
            module, layers[_key(path)], rngs=rngs, init_weights=config.init_weights, mode=mode))
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
        if merge:  # disabled layers are merged too, as PEFT's merge_and_unload merges disabled adapter layers
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
    """Replace every ``FourierFTLinear``/``FourierFTGeneral`` by its base module with kernel ``W + ΔW`` (in place;
    an N-D kernel gets ``ΔW`` in its own layout).

    Layers turned off by ``set_disabled`` are merged as well, as in PEFT. With ``safe_merge`` every layer is
    checked for NaN/inf before any is replaced: on that error the model is left as it was.

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
    """Replace every ``FourierFTLinear``/``FourierFTGeneral`` by its untouched base module (in place); trained biases
    stay.

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
    """Turn every FourierFT layer of ``model`` off (``True``: the forward runs the base module) or back on.

    ``merge_and_unload`` still merges layers that are off, as PEFT's does.

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
