"""``AdapterBank`` and ``make_bank_apply``: many FourierFT adapters of one model served in one mixed batch.

A FourierFT adapter is ``n`` real coefficients per layer at positions fixed by the layer's shape, ``n`` and the
seed, so adapters trained with one config share their positions: a bank stacks their coefficients as one
``(capacity, n)`` table per adapted layer (``(capacity, rows, n)`` for a stacked kernel), and a forward pass takes
a per-example slot index (``-1``: the base model). Slot writes (``load``, ``load_peft``, ``evict``) replace array
values only, never shapes or static facts, so a jitted forward compiles once for any mix of indices and any
bank contents. The bank is functional: every write returns a new bank and leaves the old one as it was.

The forward (``make_bank_apply``) rewrites every contraction of an adapted kernel (``forward.bank_call``) into
``dot(x, W)`` plus each example's spectral delta (``bank_dot.py``); no per-example ``ΔW`` is built. Several
banks (different seeds, ``n_frequency`` or layers) serve one batch through one global index: bank ``i``'s slot
``s`` is ``offsets[i] + s``, ``offsets`` being the running sum of the capacities (``serve.offsets``).

Only spectra are served: an adapter that trains biases (``bias != "none"``) or ``modules_to_save`` is refused,
unless the bank is made with ``spectra_only=True`` (then those parts are left to the caller, e.g. per-task heads
applied to the bank forward's output).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

import bridge
from bridge._src.names import NameMap
from bridge._src.orbax_format import METADATA_NAME
from bridge._src.peft_format import SPECTRUM_NAME

from .adapter import BIAS, MODULES_TO_SAVE, SPECTRA
from .bank_dot import check_index
from .forward import BankEntry, bank_call
from .layer import LayerSpec
from .merge import check_kernel
from .model import FourierFTAdapter
from .saved import SavedAdapter, from_adapter
from .tree import Path, dotted, split_collection

PathLike = Union[str, "os.PathLike[str]"]
# The fields that fix where a layer's coefficients sit and which kernel they adapt (scaling is folded, see _rows).
_GEOMETRY = ("in_features", "out_features", "kernel_leaf", "kernel_dims", "in_axes", "stack_axis", "stack_size",
             "stack_ids")


@dataclasses.dataclass(frozen=True, eq=False)
class AdapterBank:
    """Up to ``capacity`` adapters of one config, stacked per layer: ``spectra[layer]`` is ``(capacity, n)``.

    Build it with ``AdapterBank.create``; ``load`` / ``load_peft`` / ``evict`` return new banks. ``spectra`` (a
    dict of arrays) is what a jitted forward takes; ``layers``, ``config`` and ``capacity`` are static. ``names``
    labels each slot (``None``: empty, i.e. zeros, the base model). Coefficients are stored rescaled to the bank's
    ``config.scaling`` (``c · scaling_adapter / scaling_bank``), so adapters trained with another ``scaling``
    load exactly.

    Example:
        >>> import numpy as np, jax, fourierft_jax
        >>> params = {"q": {"kernel": np.ones((6, 4), np.float32)}}
        >>> adapter = fourierft_jax.apply(params, fourierft_jax.FourierFTConfig(n_frequency=3,
        ...                               target_modules=["q"]), key=jax.random.key(0))
        >>> bank = fourierft_jax.AdapterBank.create(adapter, capacity=8).load(2, adapter, name="task")
        >>> bank.spectra["q"].shape, bank.slot_of("task"), bank.names[:3]
        ((8, 3), 2, (None, None, 'task'))
    """

    config: bridge.FourierFTConfig
    layers: tuple[LayerSpec, ...]
    spectra: dict[str, jax.Array]
    names: tuple[Optional[str], ...]
    spectra_only: bool = False

    # -- building ---------------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        adapter: Union[FourierFTAdapter, SavedAdapter],
        capacity: int = 1024,
        *,
        adapter_name: Optional[str] = None,
        dtype: Any = jnp.float32,
        spectra_only: bool = False,
    ) -> "AdapterBank":
        """An empty bank (all slots zeros) for the layers and config of ``adapter``'s active adapter.

        ``adapter``: a ``FourierFTAdapter`` (``adapter_name``, default its single active adapter) or a
        ``SavedAdapter`` (``load_adapter``, ``read_peft``). ``spectra_only=True`` accepts adapters that also
        train biases or ``modules_to_save`` and serves their spectra only.

        Example:
            >>> import numpy as np, fourierft_jax
            >>> params = {"q": {"kernel": np.ones((6, 4), np.float32)}}
            >>> cfg = fourierft_jax.FourierFTConfig(n_frequency=3, target_modules=["q"], init_weights=True)
            >>> fourierft_jax.AdapterBank.create(fourierft_jax.apply(params, cfg), capacity=4)
            AdapterBank(capacity=4, loaded=0, layers=1, n_frequency=[3], seed=777)
        """
        saved = _saved_of(adapter, adapter_name)
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
            raise ValueError(f"fourierft_jax: AdapterBank capacity must be a positive int, got {capacity!r}")
        if not saved.spec.layers:
            raise ValueError("fourierft_jax: the adapter has no adapted layer; a bank needs at least one")
        bank = cls(saved.config, tuple(saved.spec.layers), {}, (None,) * int(capacity), bool(spectra_only))
        bank._check_extras(saved.config.bias, saved.state, "the bank's adapter")
        spectra = {layer.name: jnp.zeros((int(capacity),) + layer.spectrum_shape, dtype) for layer in saved.spec.layers}
        return dataclasses.replace(bank, spectra=spectra)

    @property
    def capacity(self) -> int:
        """The number of slots."""
        return len(self.names)

    def slot_of(self, name: str) -> int:
        """The slot holding the adapter loaded under ``name``.

        Example:
            >>> _doc_bank().load(1, _doc_state(), name="a").slot_of("a")
            1
        """
        if name is None or name not in self.names:
            loaded = [n for n in self.names if n is not None]
            raise KeyError(f"fourierft_jax: no adapter named {name!r} in the bank; loaded: {loaded[:20]}"
                           f"{' ...' if len(loaded) > 20 else ''}")
        return self.names.index(name)

    # -- writing slots ----------------------------------------------------------------------------------------
    def load(self, slot: int, source: Any, *, name: Optional[str] = None,
             name_map: Optional[NameMap] = None) -> "AdapterBank":
        """A new bank with ``source`` in ``slot`` (the old bank is unchanged; no shape changes, no recompile).

        ``source``: one adapter's state (``adapter.trainable[name]``: its layers taken as the bank's config), a
        ``FourierFTAdapter`` (its active adapter), a ``SavedAdapter``, or a folder: an Orbax checkpoint from
        ``save_adapter`` or a PEFT folder (read strictly; ``name_map`` maps its torch names, as in
        ``import_peft``). Layers, ``n_frequency`` and seed must be the bank's (``ValueError`` naming the slot,
        the layer and the field). ``name`` labels the slot (default: the folder's or adapter's name).

        Example:
            >>> bank = _doc_bank().load(0, _doc_state(2.0))
            >>> bank.spectra["q"][0].tolist(), bank.names[0]
            ([2.0, 2.0, 2.0], '0')
        """
        slot = self._check_slots([slot])[0]
        rows, label = self._rows(source, f"slot {slot}", name_map)
        label = name if name is not None else (label if label is not None else str(slot))
        return self._write([slot], [rows], [label])

    def load_peft(self, folders: Sequence[PathLike], slots: Optional[Sequence[int]] = None, *,
                  names: Optional[Sequence[str]] = None, progress: bool = True,
                  name_map: Optional[NameMap] = None) -> "AdapterBank":
        """A new bank with many PEFT folders loaded at once (one write per layer), each read by the strict reader.

        ``slots`` default to the first empty slots; ``names`` to the folders' base names. Only the small files
        are read (``bridge._src.many.read_adapters``, a tqdm bar unless ``progress=False``); positions are
        never recomputed (they are the bank's). Any folder that fails or does not fit raises, naming it, and
        nothing is loaded.

        Example:
            >>> import tempfile, numpy as np, bridge
            >>> root = tempfile.mkdtemp()
            >>> cfg = bridge.FourierFTConfig(n_frequency=3, target_modules=["q"])
            >>> folders = [bridge.write_adapter(f"{root}/t{i}", cfg, {bridge.spectrum_key("q"):
            ...            np.full(3, i, np.float32)}) for i in range(2)]
            >>> bank = _doc_bank().load_peft(folders, progress=False)
            >>> bank.names[:2], bank.spectra["q"][1].tolist()
            (('t0', 't1'), [1.0, 1.0, 1.0])
        """
        from bridge._src.many import read_adapters

        folders = [os.fspath(f) for f in folders]
        if slots is None:
            free = [i for i, n in enumerate(self.names) if n is None]
            if len(free) < len(folders):
                raise ValueError(f"fourierft_jax: {len(folders)} folders but only {len(free)} empty slots in a bank of "
                                 f"capacity {self.capacity}; evict some or pass slots=")
            slots = free[: len(folders)]
        slots = self._check_slots(slots)
        if len(slots) != len(folders):
            raise ValueError(f"fourierft_jax: {len(folders)} folders but {len(slots)} slots")
        read = read_adapters(folders, names, progress=progress)
        expected = self._peft_keys(name_map)  # the key table once, not once per folder
        rows = [self._peft_rows(a.config, a.tensors, f"slot {s} ({a.folder})", name_map, expected)
                for s, a in zip(slots, read)]
        return self._write(slots, rows, [a.name for a in read])

    def evict(self, slot: int) -> "AdapterBank":
        """A new bank with ``slot`` emptied (zeros: the base model).

        Example:
            >>> bank = _doc_bank().load(0, _doc_state(2.0)).evict(0)
            >>> bank.spectra["q"][0].tolist(), bank.names[0]
            ([0.0, 0.0, 0.0], None)
        """
        slot = self._check_slots([slot])[0]
        zeros = {layer.name: np.zeros(layer.spectrum_shape, np.float32) for layer in self.layers}
        return self._write([slot], [zeros], [None])

    def place(self, sharding: jax.sharding.Sharding) -> "AdapterBank":
        """A new bank with every table placed with ``sharding`` (e.g. ``NamedSharding(mesh, P())`` replicated, or
        ``P("data")`` to split the slots); later writes keep it.

        Example:
            >>> import jax
            >>> bank = _doc_bank().place(jax.sharding.SingleDeviceSharding(jax.devices()[0]))
            >>> bank.spectra["q"].sharding.is_fully_replicated
            True
        """
        return dataclasses.replace(self, spectra=jax.device_put(self.spectra, sharding))

    def __repr__(self) -> str:
        loaded = sum(n is not None for n in self.names)
        ns = sorted({layer.n_frequency for layer in self.layers})
        return (f"AdapterBank(capacity={self.capacity}, loaded={loaded}, layers={len(self.layers)}, n_frequency={ns}, "
                f"seed={self.config.random_loc_seed})")

    # -- helpers ----------------------------------------------------------------------------------------------
    def _check_slots(self, slots: Sequence[int]) -> list[int]:
        out = []
        for slot in slots:
            if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)) or not 0 <= slot < self.capacity:
                raise ValueError(f"fourierft_jax: slot {slot!r} is not in 0 .. {self.capacity - 1} (bank capacity "
                                 f"{self.capacity})")
            out.append(int(slot))
        if len(set(out)) != len(out):
            raise ValueError(f"fourierft_jax: slots {out} repeat a slot")
        return out

    def _check_extras(self, bias: str, state: Mapping[str, Any], where: str) -> None:
        trained = [f"bias {k!r}" for k in state.get(BIAS, {})] + [f"module {k!r}" for k in state.get(MODULES_TO_SAVE, {})]
        if trained and not self.spectra_only:
            raise ValueError(
                f"fourierft_jax: {where} trains {', '.join(trained[:4])} (bias={bias!r} / modules_to_save); a bank "
                "serves spectra only: create the bank with spectra_only=True and apply those parts yourself")

    def _rows(self, source: Any, where: str, name_map: Optional[NameMap]) -> tuple[dict[str, Any], Optional[str]]:
        """``({layer: spectrum rescaled to the bank's scaling}, default label)`` of one source, fully checked."""
        if isinstance(source, (str, os.PathLike)):
            folder = os.fspath(source)
            label = os.path.basename(os.path.normpath(folder))
            if os.path.isfile(os.path.join(folder, METADATA_NAME)):
                from .checkpoint import load_adapter

                return self._saved_rows(load_adapter(folder), f"{where} ({folder})"), label
            config, tensors = bridge.read_adapter(folder)
            return self._peft_rows(config, tensors, f"{where} ({folder})", name_map), label
        if isinstance(source, FourierFTAdapter):
            return self._saved_rows(from_adapter(source, _single_active(source, None)), where), None
        if isinstance(source, SavedAdapter):
            return self._saved_rows(source, where), None
        if isinstance(source, Mapping) and SPECTRA in source:
            self._check_extras("?", source, f"{where}: the adapter state")
            return self._spectra_rows(source[SPECTRA], {l.name: l for l in self.layers}, None, where), None
        hint = " (it looks like adapter.trainable: pass adapter.trainable[name])" if isinstance(source, Mapping) else ""
        raise TypeError(f"fourierft_jax: {where}: cannot load a {type(source).__name__}{hint}; pass one adapter's "
                        "state, a FourierFTAdapter, a SavedAdapter, or an Orbax / PEFT folder")

    def _saved_rows(self, saved: SavedAdapter, where: str) -> dict[str, Any]:
        self._check_extras(saved.config.bias, saved.state, f"{where}: the adapter")
        mine = {layer.name: layer for layer in self.layers}
        theirs = {layer.name: layer for layer in saved.spec.layers}
        _check_names(sorted(mine), sorted(theirs), where)
        for name, layer in theirs.items():
            _check_layer(mine[name], layer.n_frequency, layer.seed, where, name,
                         {f: getattr(layer, f) for f in _GEOMETRY})
        return self._spectra_rows(saved.state.get(SPECTRA, {}), theirs, float(saved.config.scaling), where)

    def _peft_keys(self, name_map: Optional[NameMap]) -> dict[str, tuple[LayerSpec, int, str]]:
        """PEFT's spectrum key of every bank row: ``{key: (layer, stack row, torch name)}``."""
        torch_of = (name_map or NameMap()).to_torch_names([layer.name for layer in self.layers])
        expected = {}
        for layer in self.layers:
            for row, torch_name in enumerate(_torch_rows(layer, torch_of[layer.name])):
                expected[bridge.spectrum_key(torch_name)] = (layer, row, torch_name)
        return expected

    def _peft_rows(self, config: bridge.FourierFTConfig, tensors: Mapping[str, np.ndarray], where: str,
                   name_map: Optional[NameMap], expected: Optional[dict] = None) -> dict[str, Any]:
        spectra = {k: v for k, v in tensors.items() if k.endswith("." + SPECTRUM_NAME)}
        others = sorted(set(tensors) - set(spectra))
        if others and not self.spectra_only:
            raise ValueError(f"fourierft_jax: {where}: the folder also holds {others[:4]} (trained biases / "
                             "modules_to_save); a bank serves spectra only: create it with spectra_only=True")
        if expected is None:
            expected = self._peft_keys(name_map)
        _check_names(sorted(expected), sorted(spectra), where, what="spectrum keys")
        out: dict[str, list] = {layer.name: [] for layer in self.layers}
        for key, (layer, row, torch_name) in expected.items():
            _check_layer(layer, int(np.shape(spectra[key])[-1]), int(config.random_loc_seed), where, torch_name, {})
            out[layer.name].append(np.asarray(spectra[key]))
        stacked = {layer.name: np.stack(out[layer.name]) if layer.stacked else out[layer.name][0]
                   for layer in self.layers}
        return self._spectra_rows(stacked, {l.name: l for l in self.layers}, float(config.scaling), where)

    def _spectra_rows(self, spectra: Mapping[str, Any], layers: Mapping[str, LayerSpec], scaling: Optional[float],
                      where: str) -> dict[str, Any]:
        """The spectra, checked against the bank's layers, as float32 rows at the bank's scaling (``scaling``
        None: a bare state, taken to be at the bank's)."""
        _check_names(sorted(layers), sorted(spectra), where, what="spectra")
        out = {}
        factor = 1.0 if scaling is None or scaling == self.config.scaling else scaling / float(self.config.scaling)
        for layer in self.layers:
            value = spectra[layer.name]
            shape = tuple(np.shape(value))
            if shape != layer.spectrum_shape:
                field = "n_frequency" if shape[:-1] == layer.spectrum_shape[:-1] else "shape"
                raise ValueError(f"fourierft_jax: {where}: layer {layer.name!r}: {field}: the spectrum has shape "
                                 f"{shape}, the bank's layer {layer.spectrum_shape}")
            # numpy on the host: a load of many folders must not pay device dispatches per folder and layer.
            value = np.asarray(value, np.float32)
            if not np.isfinite(value).all():
                raise ValueError(f"fourierft_jax: {where}: layer {layer.name!r}: the spectrum holds NaN/inf")
            out[layer.name] = value * np.float32(factor) if factor != 1.0 else value
        return out

    def _write(self, slots: list[int], rows: list[dict[str, Any]], labels: list[Optional[str]]) -> "AdapterBank":
        names = list(self.names)
        for slot in slots:
            names[slot] = None
        for slot, label in zip(slots, labels):
            if label is not None and label in names:
                raise ValueError(f"fourierft_jax: slot {slot}: name {label!r} is already used by slot "
                                 f"{names.index(label)}; pass another name=")
            names[slot] = label
        index = jnp.asarray(slots, jnp.int32)
        spectra = {}
        for layer in self.layers:
            table = self.spectra[layer.name]
            values = np.stack([np.asarray(r[layer.name], np.float32) for r in rows])
            new = _write_rows(table, index, values)
            if new.sharding != table.sharding:
                new = jax.device_put(new, table.sharding)
            spectra[layer.name] = new
        return dataclasses.replace(self, spectra=spectra, names=tuple(names))


@jax.jit
def _write_rows(table: jax.Array, slots: jax.Array, rows: jax.Array) -> jax.Array:
    return table.at[slots].set(rows.astype(table.dtype))


def _torch_rows(layer: LayerSpec, torch_name: str) -> tuple[str, ...]:
    """The torch name of each spectrum row of ``layer`` (one, or one per stack row) under its torch name."""
    if not layer.stacked:
        return (torch_name,)
    mapped = dataclasses.replace(layer, path=tuple(torch_name.split(".")))
    return mapped.torch_names


def _check_names(mine: Sequence[str], theirs: Sequence[str], where: str, what: str = "layers") -> None:
    missing, extra = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
    if missing or extra:
        parts = ([f"lacks {missing[:5]}"] if missing else []) + ([f"has {extra[:5]} the bank does not"] if extra else [])
        raise ValueError(f"fourierft_jax: {where}: {what} do not fit the bank: the source {' and '.join(parts)}")


def _check_layer(layer: LayerSpec, n_frequency: int, seed: int, where: str, name: str,
                 geometry: Mapping[str, Any]) -> None:
    if n_frequency != layer.n_frequency:
        raise ValueError(f"fourierft_jax: {where}: layer {name!r}: n_frequency is {n_frequency}, the bank's is "
                         f"{layer.n_frequency} (adapters of another n_frequency need their own bank)")
    if seed != layer.seed:
        raise ValueError(f"fourierft_jax: {where}: layer {name!r}: random_loc_seed is {seed}, the bank's is "
                         f"{layer.seed} (adapters of another seed need their own bank)")
    for field, value in geometry.items():
        if value != getattr(layer, field):
            raise ValueError(f"fourierft_jax: {where}: layer {name!r}: {field} is {value!r}, the bank's is "
                             f"{getattr(layer, field)!r} (not the same model or layer layout)")


def _single_active(adapter: FourierFTAdapter, name: Optional[str]) -> str:
    if name is not None:
        adapter._require(name)
        return name
    if len(adapter.active_adapters) != 1:
        raise ValueError(f"fourierft_jax: the FourierFTAdapter has active adapters {adapter.active_adapters}; a bank "
                         "takes one: pass adapter_name= (create) or set_adapter(name) first")
    return adapter.active_adapters[0]


def _saved_of(adapter: Any, adapter_name: Optional[str]) -> SavedAdapter:
    if isinstance(adapter, SavedAdapter):
        return adapter
    if isinstance(adapter, FourierFTAdapter):
        return from_adapter(adapter, _single_active(adapter, adapter_name))
    raise TypeError(f"fourierft_jax: AdapterBank.create takes a FourierFTAdapter or a SavedAdapter, got "
                    f"{type(adapter).__name__}")


def make_bank_apply(apply_fn: Callable[..., Any],
                    banks: Union[AdapterBank, Sequence[AdapterBank]]) -> Callable[..., Any]:
    """``serve(spectra, variables, adapter_index, *args, **kwargs)``: ``apply_fn(variables, *args, **kwargs)``
    with example ``b`` run with the adapter in slot ``adapter_index[b]`` (``-1``: the base model).

    ``apply_fn`` is any JAX function of the parameters (as for ``make_apply``). ``spectra`` is ``bank.spectra``
    (for a list of banks: the list of their ``spectra``, in order); ``adapter_index`` an int ``(batch,)`` array,
    the batch being the leading free axis of every adapted layer's input. With several banks the index is
    global: bank ``i``'s slot ``s`` is ``serve.offsets[i] + s``. Only the bank's static facts (layers, capacity)
    are captured here, so under ``jax.jit`` one compilation serves every index mix and every later ``load`` /
    ``evict``. An index outside the slots raises ``ValueError`` when it is concrete (numpy, a list, an array
    outside ``jit``); under ``jit`` it cannot be checked, and that example's output is NaN (never another
    adapter's or the base model's).

    Example:
        >>> import numpy as np, jax, fourierft_jax
        >>> params = {"q": {"kernel": np.ones((6, 4), np.float32)}}
        >>> adapter = fourierft_jax.apply(params, fourierft_jax.FourierFTConfig(n_frequency=3,
        ...                               target_modules=["q"]), key=jax.random.key(0))
        >>> bank = fourierft_jax.AdapterBank.create(adapter, capacity=8).load(5, adapter)
        >>> serve = jax.jit(fourierft_jax.make_bank_apply(lambda p, x: x @ p["q"]["kernel"], bank))
        >>> x = np.ones((2, 6), np.float32)
        >>> y = serve(bank.spectra, params, np.array([5, -1]), x)
        >>> merged = adapter.merge_and_unload(params)["q"]["kernel"]
        >>> bool(np.allclose(y[0], x[0] @ merged, atol=1e-4)), y[1].tolist()
        (True, [6.0, 6.0, 6.0, 6.0])
    """
    single = isinstance(banks, AdapterBank)
    banks = (banks,) if single else tuple(banks)
    if not banks or not all(isinstance(b, AdapterBank) for b in banks):
        raise TypeError("fourierft_jax: make_bank_apply takes an AdapterBank or a non-empty list of them")
    offsets = tuple(int(o) for o in np.cumsum([0] + [b.capacity for b in banks])[:-1])
    total = sum(b.capacity for b in banks)
    layouts = [{layer.name: ((b.capacity,) + layer.spectrum_shape) for layer in b.layers} for b in banks]
    by_kernel: dict[Path, list[tuple[int, LayerSpec]]] = {}
    for i, bank in enumerate(banks):
        for layer in bank.layers:
            by_kernel.setdefault(layer.kernel_path, []).append((i, layer))
    for path, entries in by_kernel.items():
        first = entries[0][1]
        for i, layer in entries[1:]:
            differ = [f for f in ("kernel_dims", "in_axes", "in_features", "out_features", "stack_axis", "stack_size")
                      if getattr(layer, f) != getattr(first, f)]
            if differ:
                raise ValueError(f"fourierft_jax: banks {entries[0][0]} and {i} adapt kernel {dotted(path)!r} with "
                                 f"different {differ}: they were not built on the same model")
    what = ", ".join(f"bank {i}: {o} .. {o + b.capacity - 1}" for i, (o, b) in enumerate(zip(offsets, banks)))

    def serve(spectra: Any, variables: Any, adapter_index: Any, *args: Any, **kwargs: Any) -> Any:
        tables = [spectra] if single else list(spectra)
        if len(tables) != len(banks):
            raise ValueError(f"fourierft_jax: this forward serves {len(banks)} banks but got {len(tables)} spectra")
        for i, (table, layout) in enumerate(zip(tables, layouts)):
            shapes = {k: tuple(np.shape(v)) for k, v in table.items()} if isinstance(table, Mapping) else None
            if shapes != layout:
                raise ValueError(f"fourierft_jax: spectra {i} do not fit the bank this forward was built for: got "
                                 f"{shapes}, expected {layout}; pass bank.spectra")
        index = check_index(adapter_index, total, what)
        inner, _ = split_collection(variables)
        table: dict[Path, list[BankEntry]] = {}
        for path, entries in by_kernel.items():
            check_kernel(inner, path, entries[0][1].param_shape)
            table[path] = [BankEntry(layer, tables[i][layer.name], offsets[i]) for i, layer in entries]
        return bank_call(apply_fn, variables, args, kwargs, table, index, total)

    serve.offsets = offsets  # type: ignore[attr-defined]
    return serve


def _doc_bank() -> AdapterBank:
    # A tiny bank for the doctests of this module: one 6 -> 4 layer "q", n = 3, capacity 4.
    from .model import apply

    params = {"q": {"kernel": np.ones((6, 4), np.float32)}}
    return AdapterBank.create(apply(params, bridge.FourierFTConfig(n_frequency=3, target_modules=["q"],
                                                                   init_weights=True)), capacity=4)


def _doc_state(value: float = 1.0) -> dict[str, Any]:
    return {SPECTRA: {"q": np.full(3, value, np.float32)}, BIAS: {}, MODULES_TO_SAVE: {}}
