"""``apply`` and ``FourierFTAdapter``: named adapters over one linen parameter tree, with PEFT's vocabulary.

The object holds configs, static specs and the trainable arrays of every adapter, plus which are active; the
frozen parameters stay with the caller and are never modified. Pure functions for jitted code take
``adapter.trainable`` and ``adapter.static`` (or the closure returned by ``make_apply``). The trainable state a
forward is given selects its adapters at each call, so ``set_adapter``/``disable_adapter`` take effect at once
for a forward built earlier (jitted or not) as long as it gets ``adapter.trainable`` of the moment.

Every method that raises leaves the object as it was: it validates everything before changing anything.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp

import bridge

from .adapter import AdapterSet, AdapterSpec, build_spec, init_state, model_contractions
from .modes import DEFAULT_MODE, make_apply
from .merge import DEFAULT_DELTA_METHOD, check_kernel, merge_params, substitute
from .targets import Stacks
from .tree import split_collection


class FourierFTAdapter:
    """FourierFT adapters of one linen model: trainable state + static facts + PEFT-style management.

    Build it with ``fourierft_jax.apply``. ``trainable`` (the active adapters' arrays) is what optax trains;
    ``static`` is hashable and carries everything else.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, fourierft_jax
        >>> class MLP(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         return nn.Dense(4, name="fc2")(nn.relu(nn.Dense(8, name="fc1")(x)))
        >>> model, x = MLP(), jnp.ones((2, 6))
        >>> params = model.init(jax.random.key(0), x)
        >>> adapter = fourierft_jax.apply(params, fourierft_jax.FourierFTConfig(n_frequency=10,
        ...                               target_modules=["fc1", "fc2"]), key=jax.random.key(1))
        >>> forward = adapter.make_apply(model.apply)
        >>> y = forward(adapter.trainable, params, x)
        >>> merged = adapter.merge_and_unload(params)
        >>> bool(jnp.allclose(model.apply(merged, x), y, atol=1e-4))
        True
    """

    def __init__(self) -> None:
        self.configs: dict[str, bridge.FourierFTConfig] = {}
        self.specs: dict[str, AdapterSpec] = {}
        self.state: dict[str, dict[str, Any]] = {}
        self.active_adapters: list[str] = []
        self.disabled = False

    # -- building ---------------------------------------------------------------------------------------------
    def add_adapter(
        self,
        adapter_name: str,
        config: bridge.FourierFTConfig,
        params: Mapping[str, Any],
        *,
        key: Optional[jax.Array] = None,
        model_type: Optional[str] = None,
        output_layer: Optional[str] = None,
        stacked: Stacks = None,
        trace: Optional[Callable[[Any], Any]] = None,
        contracting: Optional[Mapping[str, Sequence[int]]] = None,
        split: Optional[Mapping[str, int]] = None,
    ) -> None:
        """Add a named adapter for ``params`` (validated fully before anything changes); it is not made active.

        ``stacked``, ``trace``, ``contracting`` and ``split`` as in ``fourierft_jax.apply``.

        Example:
            >>> import numpy as np, fourierft_jax
            >>> params = {"q": {"kernel": np.zeros((8, 4), np.float32)}}
            >>> cfg = fourierft_jax.FourierFTConfig(n_frequency=3, target_modules=["q"], init_weights=True)
            >>> adapter = fourierft_jax.apply(params, cfg)
            >>> adapter.add_adapter("other", cfg, params)
            >>> sorted(adapter.state), adapter.active_adapters
            (['default', 'other'], ['default'])
        """
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f"fourierft_jax: adapter names must be non-empty strings, got {adapter_name!r}")
        if adapter_name in self.specs:
            raise ValueError(f"fourierft_jax: an adapter named {adapter_name!r} already exists")
        if not isinstance(config, bridge.FourierFTConfig):
            raise TypeError(f"fourierft_jax: expected a FourierFTConfig, got {type(config).__name__}")
        biased = [name for name, cfg in self.configs.items() if cfg.bias != "none"]
        if biased and config.bias != "none":
            raise ValueError(
                f"fourierft_jax: only one adapter may train biases (adapter {biased[0]!r} has bias="
                f"{self.configs[biased[0]].bias!r}); set bias='none' for {adapter_name!r}"
            )
        inner, _ = split_collection(params)
        found = model_contractions(params, inner, trace, contracting)
        spec = build_spec(inner, config, model_type=model_type, output_layer=output_layer, stacked=stacked,
                          contractions=found, splits=split)
        state = init_state(inner, spec, init_weights=config.init_weights, key=key)
        self.configs[adapter_name] = config
        self.specs[adapter_name] = spec
        self.state[adapter_name] = state
        if not self.active_adapters:
            self.active_adapters = [adapter_name]

    # -- selecting --------------------------------------------------------------------------------------------
    def set_adapter(self, adapter_name: Union[str, Sequence[str]]) -> None:
        """Make ``adapter_name`` (or a list of names, applied in order) the active adapter(s).

        Example:
            >>> import numpy as np, fourierft_jax
            >>> params = {"q": {"kernel": np.ones((4, 3), np.float32)}}
            >>> cfg = fourierft_jax.FourierFTConfig(n_frequency=2, target_modules=["q"], init_weights=True)
            >>> adapter = fourierft_jax.apply(params, cfg)
            >>> adapter.add_adapter("other", cfg, params)
            >>> adapter.set_adapter(["default", "other"]); adapter.active_adapter
            ['default', 'other']
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            self._require(name)
        if not names:
            raise ValueError("fourierft_jax: set_adapter needs at least one adapter name")
        self.active_adapters = names

    @property
    def active_adapter(self) -> Union[str, list[str], None]:
        """The active adapter's name, or the list of names when several are active (PEFT's convention); ``None``
        once the last adapter is deleted."""
        if not self.active_adapters:
            return None
        return self.active_adapters[0] if len(self.active_adapters) == 1 else list(self.active_adapters)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; if it was active, the first remaining adapter becomes active.

        Example:
            >>> import numpy as np, fourierft_jax
            >>> params = {"q": {"kernel": np.ones((4, 3), np.float32)}}
            >>> cfg = fourierft_jax.FourierFTConfig(n_frequency=2, target_modules=["q"], init_weights=True)
            >>> adapter = fourierft_jax.apply(params, cfg)
            >>> adapter.add_adapter("other", cfg, params)
            >>> adapter.delete_adapter("default"); adapter.active_adapters
            ['other']
        """
        self._require(adapter_name)
        for table in (self.configs, self.specs, self.state):
            del table[adapter_name]
        remaining = [name for name in self.active_adapters if name != adapter_name]
        self.active_adapters = remaining or list(self.specs)[:1]

    def disable_adapters(self) -> None:
        """Run the base model: forwards ignore every adapter until ``enable_adapters``.

        Disabled means exactly the base parameters in a forward: trained biases and ``modules_to_save`` are left
        out too. ``trainable`` is ``{}`` meanwhile, so a forward from ``make_apply`` (built before or after, jitted
        or not) given ``adapter.trainable`` runs the base model. Merges do not look at this flag:
        ``merge_and_unload`` still merges the active (or named) adapters, as PEFT's ``merge_and_unload`` does
        while its adapter layers are disabled.

        Example:
            >>> import numpy as np, fourierft_jax
            >>> params = {"q": {"kernel": np.ones((4, 3), np.float32)}}
            >>> cfg = fourierft_jax.FourierFTConfig(n_frequency=2, target_modules=["q"], init_weights=True)
            >>> adapter = fourierft_jax.apply(params, cfg)
            >>> adapter.disable_adapters(); adapter.static.disabled
            True
        """
        self.disabled = True

    def enable_adapters(self) -> None:
        """Undo ``disable_adapters``.

        Example:
            >>> import numpy as np, fourierft_jax
            >>> params = {"q": {"kernel": np.ones((4, 3), np.float32)}}
            >>> cfg = fourierft_jax.FourierFTConfig(n_frequency=2, target_modules=["q"], init_weights=True)
            >>> adapter = fourierft_jax.apply(params, cfg)
            >>> adapter.disable_adapters(); adapter.enable_adapters(); adapter.static.disabled
            False
        """
        self.disabled = False

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: adapters disabled inside (``disable_adapters``), restored on exit, also by an exception.

        A forward built at any time runs the base model inside when given ``adapter.trainable`` (``{}`` there);
        given a non-empty state inside, an ``adapter.make_apply`` forward raises rather than run the adapters.

        Example:
            >>> import jax, numpy as np, fourierft_jax
            >>> params = {"q": {"kernel": np.ones((4, 3), np.float32)}}
            >>> cfg = fourierft_jax.FourierFTConfig(n_frequency=2, target_modules=["q"])
            >>> adapter = fourierft_jax.apply(params, cfg, key=jax.random.key(0))
            >>> forward = adapter.make_apply(lambda variables, x: x @ variables["q"]["kernel"])
            >>> x = np.arange(4, dtype=np.float32)[None]
            >>> with adapter.disable_adapter():
            ...     base = forward(adapter.trainable, params, x)
            >>> base.tolist(), bool((forward(adapter.trainable, params, x) != base).any())
            ([[6.0, 6.0, 6.0]], True)
        """
        previous, self.disabled = self.disabled, True
        try:
            yield
        finally:
            self.disabled = previous

    # -- what jitted code takes -------------------------------------------------------------------------------
    @property
    def static(self) -> AdapterSet:
        """The hashable description of the active adapters (a snapshot: later changes make a new one).

        A forward built from it (``fourierft_jax.make_apply(fn, adapter.static)``) knows only these adapters:
        given a state for another (after ``set_adapter``) it raises; given ``{}`` (disabled) it runs the base.

        Example:
            >>> import numpy as np, fourierft_jax
            >>> params = {"q": {"kernel": np.ones((4, 3), np.float32)}}
            >>> cfg = fourierft_jax.FourierFTConfig(n_frequency=2, target_modules=["q"], init_weights=True)
            >>> adapter = fourierft_jax.apply(params, cfg)
            >>> hash(adapter.static) == hash(fourierft_jax.apply(params, cfg).static)
            True
        """
        return AdapterSet(tuple((name, self.specs[name]) for name in self.active_adapters), self.disabled)

    @property
    def trainable(self) -> dict[str, dict[str, Any]]:
        """The active adapters' trainable arrays, ``{adapter: {"spectra", "bias", "modules_to_save"}}``.

        ``{}`` while adapters are disabled: forwards select their adapters from this argument (``make_apply``).

        Example:
            >>> import numpy as np, fourierft_jax
            >>> params = {"q": {"kernel": np.ones((4, 3), np.float32)}}
            >>> cfg = fourierft_jax.FourierFTConfig(n_frequency=2, target_modules=["q"], init_weights=True)
            >>> adapter = fourierft_jax.apply(params, cfg)
            >>> sorted(adapter.trainable["default"])
            ['bias', 'modules_to_save', 'spectra']
        """
        if self.disabled:
            return {}
        return self._active_state()

    def _active_state(self) -> dict[str, dict[str, Any]]:
        return {name: self.state[name] for name in self.active_adapters}

    def set_trainable(self, trainable: Mapping[str, Any]) -> None:
        """Store trained arrays back (e.g. after an optax loop); structures must match the existing state.

        Example:
            >>> import numpy as np, fourierft_jax
            >>> params = {"q": {"kernel": np.ones((4, 3), np.float32)}}
            >>> cfg = fourierft_jax.FourierFTConfig(n_frequency=2, target_modules=["q"], init_weights=True)
            >>> adapter = fourierft_jax.apply(params, cfg)
            >>> import jax
            >>> adapter.set_trainable(jax.tree.map(lambda a: a + 1, adapter.trainable))
            >>> adapter.state["default"]["spectra"]["q"].tolist()
            [1.0, 1.0]
        """
        for name, value in trainable.items():  # all checked before any is stored
            self._require(name)
            old, new = jax.tree.structure(self.state[name]), jax.tree.structure(value)
            if old != new:
                raise ValueError(f"fourierft_jax: trained state of adapter {name!r} has structure {new}, not {old}")
        for name, value in trainable.items():
            self.state[name] = value

    def make_apply(
        self,
        apply_fn: Callable[..., Any],
        *,
        mode: str = DEFAULT_MODE,
        method: str = DEFAULT_DELTA_METHOD,
        shardings: Any = None,
    ) -> Callable[..., Any]:
        """``f(trainable, variables, *args, **kwargs)`` running ``apply_fn`` with the adapters ``trainable`` holds.

        See ``fourierft_jax.make_apply``: ``mode="auto"`` (default: fused or spectral per layer and batch size),
        ``"fused"``, ``"spectral"`` or ``"merge"``; ``shardings`` (the parameters' ``NamedSharding`` tree) for a
        device mesh.

        The function knows every adapter that exists now and runs those ``trainable`` holds, so pass
        ``adapter.trainable`` at each call: after ``set_adapter`` it runs the new selection, inside
        ``disable_adapter`` the base model -- also under ``jax.jit`` (the state's keys are part of its structure).
        Errors, checked when it runs or is traced: a state for an adapter added, deleted or replaced since it was
        built (build it again), and a non-empty state while adapters are disabled (a stale copy of
        ``trainable``: the adapters would run). A jitted call that hits a trace made earlier skips these checks,
        so under ``jax.jit`` pass ``adapter.trainable`` itself, not a copy taken before disabling.

        Example:
            >>> import numpy as np, fourierft_jax
            >>> params = {"q": {"kernel": np.ones((4, 3), np.float32)}}
            >>> cfg = fourierft_jax.FourierFTConfig(n_frequency=2, target_modules=["q"], init_weights=True)
            >>> adapter = fourierft_jax.apply(params, cfg)
            >>> forward = adapter.make_apply(lambda variables, x: x @ variables["q"]["kernel"], mode="merge")
            >>> forward(adapter.trainable, params, np.ones((1, 4), np.float32)).tolist()
            [[4.0, 4.0, 4.0]]
        """
        order = list(self.active_adapters) + [name for name in self.specs if name not in self.active_adapters]
        known = AdapterSet(tuple((name, self.specs[name]) for name in order))
        run = make_apply(apply_fn, known, mode=mode, method=method, shardings=shardings)

        def forward(trainable: Mapping[str, Any], variables: Any, *args: Any, **kwargs: Any) -> Any:
            self._check_forward_state(trainable, known)
            return run(trainable, variables, *args, **kwargs)

        return forward

    def _check_forward_state(self, trainable: Any, known: AdapterSet) -> None:
        if not isinstance(trainable, Mapping):
            return  # AdapterSet.select names the problem
        for name, spec in known.adapters:
            if name in trainable and self.specs.get(name) is not spec:
                raise ValueError(
                    f"fourierft_jax: adapter {name!r} was deleted or replaced after this forward was built; build it "
                    f"again with adapter.make_apply(...)"
                )
        if self.disabled and len(trainable):
            raise ValueError(
                f"fourierft_jax: adapters are disabled, but the forward got a trainable state for {list(trainable)}; "
                f"pass `adapter.trainable` (empty while disabled) to run the base model, or enable_adapters() first"
            )

    def num_trainable_params(self) -> int:
        """Number of trainable scalars of the active adapters.

        Example:
            >>> import numpy as np, fourierft_jax
            >>> params = {"q": {"kernel": np.ones((4, 3), np.float32)}}
            >>> cfg = fourierft_jax.FourierFTConfig(n_frequency=2, target_modules=["q"], init_weights=True)
            >>> adapter = fourierft_jax.apply(params, cfg)
            >>> adapter.num_trainable_params()
            2
        """
        return sum(int(leaf.size) for leaf in jax.tree.leaves(self._active_state()))

    # -- leaving ----------------------------------------------------------------------------------------------
    def merge_and_unload(
        self,
        params: Mapping[str, Any],
        *,
        adapter_names: Optional[Sequence[str]] = None,
        safe_merge: bool = False,
        method: str = DEFAULT_DELTA_METHOD,
    ) -> Any:
        """Plain parameters with ``W + ΔW`` of ``adapter_names`` (default: the active ones) for any ``model.apply``.

        With ``safe_merge`` a non-finite merged kernel raises (naming the layer) instead of being returned.
        Disabled adapters are merged all the same, as in PEFT (see ``disable_adapters``).

        Example:
            >>> import numpy as np, fourierft_jax
            >>> params = {"q": {"kernel": np.ones((4, 3), np.float32)}}
            >>> cfg = fourierft_jax.FourierFTConfig(n_frequency=2, target_modules=["q"], init_weights=True)
            >>> adapter = fourierft_jax.apply(params, cfg)
            >>> adapter.merge_and_unload(params, safe_merge=True)["q"]["kernel"].shape
            (4, 3)
        """
        names = list(self.active_adapters if adapter_names is None else adapter_names)
        for name in names:
            self._require(name)
        static = AdapterSet(tuple((name, self.specs[name]) for name in names))
        merged = merge_params(params, {name: self.state[name] for name in names}, static, method=method)
        if safe_merge:
            inner, _ = split_collection(merged)
            for _, spec in static.adapters:
                for layer in spec.layers:
                    if not bool(jnp.isfinite(check_kernel(inner, layer.kernel_path, layer.param_shape)).all()):
                        raise ValueError(
                            f"fourierft_jax: NaN/inf in the merged kernel of {layer.name!r}; the adapter seems broken"
                        )
        return merged

    def unload(self, params: Mapping[str, Any]) -> Any:
        """The base parameters without ``ΔW`` (trained biases and ``modules_to_save`` of active adapters kept).

        Example:
            >>> import numpy as np, fourierft_jax
            >>> params = {"q": {"kernel": np.ones((4, 3), np.float32)}}
            >>> cfg = fourierft_jax.FourierFTConfig(n_frequency=2, target_modules=["q"], init_weights=True)
            >>> adapter = fourierft_jax.apply(params, cfg)
            >>> adapter.unload(params)["q"]["kernel"] is params["q"]["kernel"]
            True
        """
        return substitute(params, self._active_state(), AdapterSet(self.static.adapters))

    # -- helpers ----------------------------------------------------------------------------------------------
    def layers(self, adapter_name: Optional[str] = None) -> list[str]:
        """Names of the layers an adapter adapts (default: the first active one).

        Example:
            >>> import numpy as np, fourierft_jax
            >>> params = {"q": {"kernel": np.ones((4, 3), np.float32)}}
            >>> cfg = fourierft_jax.FourierFTConfig(n_frequency=2, target_modules=["q"], init_weights=True)
            >>> adapter = fourierft_jax.apply(params, cfg)
            >>> adapter.layers()
            ['q']
        """
        if adapter_name is None and not self.active_adapters:
            raise KeyError("fourierft_jax: no adapter is left (all were deleted); pass adapter_name")
        name = adapter_name or self.active_adapters[0]
        self._require(name)
        return [layer.name for layer in self.specs[name].layers]

    def _require(self, name: str) -> None:
        if name not in self.specs:
            raise KeyError(f"fourierft_jax: no adapter named {name!r}; adapters: {list(self.specs)}")

    def __repr__(self) -> str:
        parts = [
            f"{name}: {sum(len(l.torch_names) for l in spec.layers)} layers, "
            f"{sum(l.n_frequency * len(l.torch_names) for l in spec.layers)} coefficients"
            for name, spec in self.specs.items()
        ]
        return f"FourierFTAdapter(active={self.active_adapters}, disabled={self.disabled}, {'; '.join(parts)})"


def apply(
    params: Any,
    config: bridge.FourierFTConfig,
    *,
    key: Optional[jax.Array] = None,
    adapter_name: str = "default",
    model_type: Optional[str] = None,
    output_layer: Optional[str] = None,
    stacked: Stacks = None,
    trace: Optional[Callable[[Any], Any]] = None,
    contracting: Optional[Mapping[str, Sequence[int]]] = None,
    split: Optional[Mapping[str, int]] = None,
) -> FourierFTAdapter:
    """Build a FourierFT adapter for the projection kernels of a parameter pytree that ``config`` targets.

    Module names are dotted parameter paths (``encoder.layer.0.attention.query``); a kernel stored under
    ``kernel``, ``w``, ``weight`` or ``weights`` is named by its module, a bare array leaf by its own path.

    Args:
        params: ``model.init(...)``'s variables or their ``params`` collection, or any parameter pytree
            (``nnx.State``, dicts with integer keys, dataclass models); not modified.
        config: a ``FourierFTConfig`` (PEFT's fields and matching rules, on dotted parameter paths).
        key: JAX key drawing the N(0, 1) spectra (not needed with ``init_weights=True``).
        adapter_name: name of this first adapter.
        model_type: transformers model type, for PEFT's default ``target_modules`` when they are unset.
        output_layer: layer excluded by ``target_modules="all-linear"``.
        stacked: layer stacks (``nn.scan``/MaxText-style trees whose arrays carry a layer axis): a dotted module
            path, a list of them, or ``{path: layer axis}`` (default axis 0). Layer ``i`` of stack
            ``encoder.layer`` is matched and exported as ``encoder.layer.<i>...``, as PEFT names the unrolled
            model; its spectra are one ``(layers, n)`` array per stacked kernel.
        trace: a function of the parameters alone that runs the model (close over an example batch), traced
            once, abstractly: each kernel's contracted axes are read from the ``dot_general`` that consumes it
            (through casts, transposes, reshapes, ``jnp.einsum``, scans), so N-D ``DenseGeneral``/``Einsum``
            kernels get their ``(out, in)`` matrix (out = kept axes, in = contracted axes, each flattened in
            kernel order) and only arrays the model contracts count as linear layers (never an embedding).
        contracting: ``{kernel or module path: contracted axes of the stored kernel}`` for code that cannot be
            traced (overrides ``trace`` for those paths).
        split: ``{module name or suffix: kept kernel axis}`` for kernels that hold several torch layers side by
            side (gemma's ``kv_einsum`` is ``k_proj`` + ``v_proj``): each slice along the axis is its own layer
            ``<module>.<i>`` with its own spectrum and PEFT positions; a ``target_modules`` entry naming the
            module selects all its parts (``GEMMA_SPLIT`` is gemma's).

    Raises:
        bridge.NoTargetError: nothing matched; TypeError: a target is not a linear layer's kernel (or an N-D
        kernel without ``trace``/``contracting``); ValueError: ``n_frequency`` exceeds ``in * out``; each naming
        the path. ``ContractionTraceError`` when ``trace`` fails.

    Example:
        >>> import numpy as np, jax, fourierft_jax
        >>> params = {"params": {"q": {"kernel": np.zeros((8, 4), np.float32)}}}
        >>> adapter = fourierft_jax.apply(params, fourierft_jax.FourierFTConfig(n_frequency=5, target_modules=["q"]),
        ...                               key=jax.random.key(0))
        >>> adapter.trainable["default"]["spectra"]["q"].shape
        (5,)
    """
    adapter = FourierFTAdapter()
    adapter.add_adapter(
        adapter_name, config, params, key=key, model_type=model_type, output_layer=output_layer, stacked=stacked,
        trace=trace, contracting=contracting, split=split,
    )
    return adapter
