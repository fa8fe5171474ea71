"""The adapter state: a static, hashable description (``AdapterSpec``/``AdapterSet``) and the trainable arrays.

The trainable state of one adapter is a plain dict that optax takes as is::

    {"spectra": {layer name: float32 (n,)}, "bias": {module name: bias}, "modules_to_save": {module name: subtree}}

and a multi-adapter state maps adapter names to such dicts. Everything else (shapes, positions, scaling, which
adapters are active) lives in frozen dataclasses compared by value: closed over or passed as a static argument,
it never reaches the optimizer and never causes a retrace.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

import bridge

from .layer import LayerSpec
from .targets import KERNEL_LEAVES, Contractions, Splits, Stacks, select_layers
from .tree import Path, dotted, get_path, iter_nodes

SPECTRA, BIAS, MODULES_TO_SAVE = "spectra", "bias", "modules_to_save"


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """The static part of one adapter: its layers and which biases / modules it trains in full.

    Example:
        >>> import numpy as np
        >>> tree = {"q": {"kernel": np.zeros((8, 4)), "bias": np.zeros(4)}}
        >>> spec = build_spec(tree, bridge.FourierFTConfig(n_frequency=3, target_modules=["q"], bias="fourier_only"))
        >>> [layer.name for layer in spec.layers], spec.bias_paths
        (['q'], (('q',),))
    """

    layers: tuple[LayerSpec, ...]
    bias_paths: tuple[Path, ...] = ()
    save_paths: tuple[Path, ...] = ()
    bias_mode: str = "none"

    def trained_bias_rows(self, path: Path) -> Optional[LayerSpec]:
        """The stacked layer whose adapted rows alone train the bias at ``path``, or None (the whole array trains).

        PEFT's ``bias="fourier_only"`` trains the biases of adapted layers only; on a stack adapted in some rows
        (``layers_to_transform``) that is those rows of the stacked ``(L, out)`` bias.

        Example:
            >>> layer = LayerSpec(("s", "fc"), 8, 4, 3, 1.0, 0, stack_axis=0, stack_size=3, stack_ids=(1,),
            ...                   stack_depth=1)
            >>> AdapterSpec((layer,), ((("s", "fc")),), bias_mode="fourier_only").trained_bias_rows(("s", "fc")).name
            's.fc'
        """
        if self.bias_mode != "fourier_only":
            return None
        for layer in self.layers:
            if layer.path == tuple(path) and layer.stacked and len(layer.stack_ids) < layer.stack_size:
                return layer
        return None


@dataclasses.dataclass(frozen=True)
class AdapterSet:
    """What a forward pass needs besides arrays: the active adapters, in order, and whether all are disabled.

    Example:
        >>> AdapterSet((("default", AdapterSpec(())),)).names
        ('default',)
    """

    adapters: tuple[tuple[str, AdapterSpec], ...]
    disabled: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.adapters)

    def select(self, trainable: Any) -> "AdapterSet":
        """The adapters of this set that ``trainable`` holds a state for, in this set's order: what a forward runs.

        The trainable state is what selects, at every call (and, under ``jax.jit``, at every retrace, since its
        keys are part of the pytree structure): an empty state runs the base model -- that is what
        ``FourierFTAdapter.trainable`` is while adapters are disabled -- and a name this set does not know is an
        error naming it, never silently ignored.

        Example:
            >>> both = AdapterSet((("a", AdapterSpec(())), ("b", AdapterSpec(()))))
            >>> both.select({"b": {}}).names, both.select({}).names
            (('b',), ())
        """
        if self.disabled:
            return self
        if not isinstance(trainable, Mapping):
            raise TypeError(
                f"fourierft_jax: the trainable state must map adapter names to their arrays, got "
                f"{type(trainable).__name__}; pass `adapter.trainable`"
            )
        unknown = [name for name in trainable if name not in self.names]
        if unknown:
            hint = (
                "it looks like one adapter's state: wrap it as {adapter name: state}"
                if set(trainable) <= {SPECTRA, BIAS, MODULES_TO_SAVE}
                else "build the forward again (`adapter.make_apply(...)`) after adding or switching adapters"
            )
            raise ValueError(
                f"fourierft_jax: the trainable state holds adapter(s) {unknown}, but this forward was built for "
                f"{list(self.names)}; {hint}"
            )
        return AdapterSet(tuple((name, spec) for name, spec in self.adapters if name in trainable))


def _saved_paths(params: Mapping[str, Any], modules_to_save: Optional[list[str]]) -> tuple[Path, ...]:
    # PEFT wraps every module whose full name ends with an entry; the outermost match carries its children.
    if not modules_to_save:
        return ()
    found: list[Path] = []
    for path, _ in iter_nodes(params):
        if not path or any(path[: len(p)] == p for p in found):
            continue
        if any(dotted(path).endswith(entry) for entry in modules_to_save):
            found.append(path)
    missing = [e for e in modules_to_save if not any(dotted(p).endswith(e) for p in found)]
    if missing:
        raise ValueError(f"fourierft_jax: modules_to_save entries {missing} match no module of the parameter tree")
    return tuple(found)


def _bias_paths(
    params: Mapping[str, Any], bias: str, layers: tuple[LayerSpec, ...], saved: tuple[Path, ...]
) -> tuple[Path, ...]:
    def has_bias(node: Any) -> bool:
        return isinstance(node, Mapping) and "bias" in node and not isinstance(node["bias"], Mapping)

    if bias == "fourier_only":
        nodes = {layer.path: None for layer in layers}
        return tuple(path for path in nodes if has_bias(get_path(params, path)))
    if bias == "all":
        return tuple(
            path
            for path, node in iter_nodes(params)
            if has_bias(node) and not any(path[: len(p)] == p for p in saved)
        )
    return ()


def build_spec(
    params: Mapping[str, Any],
    config: bridge.FourierFTConfig,
    *,
    model_type: Optional[str] = None,
    output_layer: Optional[str] = None,
    stacked: Stacks = None,
    contractions: Optional[Contractions] = None,
    splits: Splits = None,
) -> AdapterSpec:
    """The ``AdapterSpec`` of ``config`` on the ``params`` collection of a model (validates everything)."""
    if not isinstance(config, bridge.FourierFTConfig):
        raise TypeError(f"fourierft_jax: expected a FourierFTConfig, got {type(config).__name__}")
    saved = _saved_paths(params, config.modules_to_save)
    layers = select_layers(params, config, model_type=model_type, output_layer=output_layer, stacked=stacked,
                           contractions=contractions, splits=splits)
    bias_paths = _bias_paths(params, config.bias, layers, saved)
    return AdapterSpec(layers, bias_paths, saved, config.bias)


def model_contractions(
    params: Any, inner: Mapping[str, Any], trace: Optional[Callable[[Any], Any]],
    contracting: Optional[Mapping[str, Sequence[int]]],
) -> Optional[dict[Path, Any]]:
    """``{kernel path: contracted axes}`` from ``trace`` (a function of ``params``) and the ``contracting``
    declarations (dotted kernel or module paths), or None when neither is given.

    Example:
        >>> import numpy as np
        >>> tree = {"q": {"w": np.zeros((2, 8, 4))}}
        >>> model_contractions(tree, tree, None, {"q": [1]})
        {('q', 'w'): (1,)}
    """
    if trace is None and not contracting:
        return None
    from .trace import contractions

    found: dict[Path, Any] = dict(contractions(params, trace)) if trace is not None else {}
    for name, axes in (contracting or {}).items():
        path = tuple(name.split(".")) if name else ()
        node = get_path(inner, path, "kernel or module (in contracting=)")
        if isinstance(node, Mapping):
            leaf = next((k for k in KERNEL_LEAVES if k in node and not isinstance(node[k], Mapping)), None)
            if leaf is None:
                raise ValueError(f"fourierft_jax: contracting={{{name!r}: ...}} names a module without a kernel "
                                 f"leaf ({'/'.join(KERNEL_LEAVES)})")
            path, node = path + (leaf,), node[leaf]
        ndim = len(getattr(node, "shape", ()))
        axes = tuple(sorted({int(a) % ndim if ndim else int(a) for a in axes}))
        if not axes or len(axes) >= ndim:
            raise ValueError(f"fourierft_jax: contracting={{{name!r}: {list(axes)}}} must name some but not all "
                             f"axes of a {ndim}-D kernel")
        found[path] = axes
    return found


def init_state(
    params: Mapping[str, Any], spec: AdapterSpec, *, init_weights: bool, key: Optional[jax.Array]
) -> dict[str, dict[str, Any]]:
    """Fresh trainable state: spectra ~ N(0, 1) from ``key`` (or zeros) plus copies of the trained biases/modules.

    Example:
        >>> import numpy as np
        >>> tree = {"q": {"kernel": np.zeros((8, 4))}}
        >>> spec = build_spec(tree, bridge.FourierFTConfig(n_frequency=3, target_modules=["q"]))
        >>> state = init_state(tree, spec, init_weights=False, key=jax.random.key(0))
        >>> state["spectra"]["q"].shape, state["spectra"]["q"].dtype
        ((3,), dtype('float32'))
    """
    if init_weights:
        spectra = {layer.name: jnp.zeros(layer.spectrum_shape, jnp.float32) for layer in spec.layers}
    else:
        if key is None:
            raise ValueError(
                "fourierft_jax: init_weights=False draws the spectra from N(0, 1); pass key=jax.random.key(...) "
                "(or set init_weights=True to start from zeros)"
            )
        keys = jax.random.split(key, max(len(spec.layers), 1))
        spectra = {
            layer.name: jax.random.normal(k, layer.spectrum_shape, jnp.float32) for layer, k in zip(spec.layers, keys)
        }
    # Copies, so that donating or updating the trainable state never touches the frozen parameters.
    biases = {dotted(path): jnp.array(get_path(params, path)["bias"]) for path in spec.bias_paths}
    saved = {dotted(path): jax.tree.map(jnp.array, get_path(params, path)) for path in spec.save_paths}
    return {SPECTRA: spectra, BIAS: biases, MODULES_TO_SAVE: saved}


def adapter_state(trainable: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """``trainable[name]``, with an error naming the adapter when it is missing."""
    if not isinstance(trainable, Mapping) or name not in trainable:
        have = list(trainable) if isinstance(trainable, Mapping) else type(trainable).__name__
        raise KeyError(
            f"fourierft_jax: the trainable state has no adapter {name!r} (it has {have}); pass the state of the "
            f"active adapters, e.g. `adapter.trainable`"
        )
    return trainable[name]


def layer_spectrum(state: Mapping[str, Any], layer: LayerSpec, adapter_name: str) -> jax.Array:
    """The spectrum of ``layer`` in one adapter's state, checked against its static shape."""
    spectra = state.get(SPECTRA, {}) if isinstance(state, Mapping) else {}
    if layer.name not in spectra:
        raise KeyError(f"fourierft_jax: adapter {adapter_name!r} has no spectrum for layer {layer.name!r}")
    spectrum = spectra[layer.name]
    layer.check_spectrum(spectrum.shape, adapter_name)
    return spectrum
