"""Orbax checkpoints: adapter-only checkpoints (no base model) and training checkpoints (``CheckpointManager``).

An adapter checkpoint is a folder with ``fourierft_adapter.json`` (config, layer paths and shapes, every
tensor's group/name/shape/dtype; see ``bridge._src.orbax_format``) and ``state/`` (the tensors, saved by Orbax
under flat ids, so module names with dots never clash with Orbax's own key joining). It is written into a
temporary sibling and swapped into place in one step (``bridge._src.atomic.replace_directory``): at every
instant a save can be killed, the destination holds the complete previous checkpoint or the complete new one
(where the one-step swap is unavailable, a kill between the fallback's two renames is undone by
``recover_directory``, which ``save_adapter`` and ``load_adapter`` call first). A killed save may leave a hidden
``.<name>.tmp-*`` folder beside it, which the next save removes.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import bridge
from bridge._src.atomic import recover_directory, replace_directory, temporary_path, temporary_sibling
from bridge._src.folders import CheckpointError
from bridge._src.orbax_format import FORMAT_TAG, FORMAT_VERSION, METADATA_NAME, STATE_DIR, read_metadata

from .adapter import BIAS, MODULES_TO_SAVE, SPECTRA, AdapterSpec
from .saved import STACK_FIELDS, SavedAdapter, SavedSource, as_saved, layer_spec, stack_fields
from .saved_common import flat_leaves
from .tree import dotted

PathLike = Union[str, "os.PathLike[str]"]
_DELETED = ".deleted-steps"  # where TrainingCheckpoints' dropped steps wait for deletion (not a step name)
_GROUPS = (SPECTRA, BIAS, MODULES_TO_SAVE, "originals")


def _entries(saved: SavedAdapter) -> list[tuple[dict[str, Any], Any]]:
    entries = []
    groups = dict(saved.state)
    groups["originals"] = saved.originals
    for group in _GROUPS:
        for module, tree in groups.get(group, {}).items():
            for rel, value in flat_leaves(tree):
                array = jnp.asarray(value)
                entries.append(({"id": f"t{len(entries):05d}", "group": group, "module": module, "rel": list(rel),
                                 "shape": list(array.shape), "dtype": jnp.dtype(array.dtype).name}, array))
    return entries


def save_adapter(
    directory: PathLike,
    source: SavedSource,
    *,
    adapter_name: Optional[str] = None,
    params: Optional[Mapping[str, Any]] = None,
    config: Optional[bridge.FourierFTConfig] = None,
    overwrite: bool = False,
) -> str:
    """Save one adapter -- trainable arrays, config, layer paths and shapes -- as an Orbax checkpoint folder.

    The base model is never saved (``params``, if given, is only read for PEFT's ``original_module`` biases under
    ``bias="all"`` with ``modules_to_save``, so a later PEFT export needs no base). ``source`` is a
    ``FourierFTAdapter``, a ``SavedAdapter`` or an NNX model adapted with ``config``. An existing ``directory``
    is refused unless ``overwrite``; it is replaced only once the new checkpoint is complete.

    With several JAX processes (``jax.distributed``), every process calls it with the same ``directory`` on a
    shared filesystem, as Orbax requires for global arrays; process 0 writes the metadata and renames the folder.

    Example:
        >>> import numpy as np, tempfile, os
        >>> from fourierft_jax._src.saved import apply_for_doc
        >>> params = {"q": {"kernel": np.zeros((8, 4), np.float32)}}
        >>> folder = save_adapter(os.path.join(tempfile.mkdtemp(), "ckpt"), apply_for_doc(params))
        >>> load_adapter(folder).spec.layers[0].kernel_shape
        (8, 4)
    """
    saved = as_saved(source, adapter_name=adapter_name, params=params, config=config)
    target = os.path.abspath(os.fspath(directory))
    if jax.process_index() == 0:  # one process recovers, the others must not see it half-way
        recover_directory(target, writing=True)
    _sync("fourierft_jax.save_adapter: recovered")
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"{target} already exists: pass overwrite=True to replace it")
    if os.path.exists(target) and not os.path.isdir(target):
        raise FileExistsError(f"{target} exists and is not a folder")
    entries = _entries(saved)
    metadata = {
        "format": FORMAT_TAG,
        "version": FORMAT_VERSION,
        "config": saved.config.to_dict(),
        "layers": [
            {"path": list(layer.path), "name": layer.name, "in_features": layer.in_features,
             "out_features": layer.out_features, "n_frequency": layer.n_frequency, **stack_fields(layer)}
            for layer in saved.spec.layers
        ],
        "bias_paths": [list(path) for path in saved.spec.bias_paths],
        "save_paths": [list(path) for path in saved.spec.save_paths],
        "tensors": [entry for entry, _ in entries],
    }
    temporary = _temporary_sibling(target)
    lead = jax.process_index() == 0
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(temporary, STATE_DIR), {entry["id"]: array for entry, array in entries}
                          or {"empty": jnp.zeros(())})
        checkpointer.wait_until_finished()
        checkpointer.close()
        if lead:
            # The metadata goes last: a folder without it is never taken for a checkpoint.
            with open(os.path.join(temporary, METADATA_NAME), "w", encoding="utf-8") as stream:
                json.dump(metadata, stream, indent=2, sort_keys=True)
                stream.flush()
                os.fsync(stream.fileno())
            replace_directory(temporary, target)
        _sync("fourierft_jax.save_adapter: renamed")
    finally:
        if lead and os.path.exists(temporary):
            shutil.rmtree(temporary, ignore_errors=True)
    return target


def _temporary_sibling(target: str) -> str:
    """A fresh temporary folder next to ``target``; with several processes, the same one for all of them."""
    if jax.process_count() == 1:
        return temporary_sibling(target)
    from jax.experimental import multihost_utils

    token = int(multihost_utils.broadcast_one_to_all(np.int32(int.from_bytes(os.urandom(3), "little"))))
    if jax.process_index() == 0:
        path = temporary_sibling(target, token=f"{token:06x}")
    else:
        path = temporary_path(target, f"{token:06x}")
    _sync("fourierft_jax.save_adapter: temporary folder")
    return path


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)




def load_adapter(directory: PathLike, *, sharding: Optional[jax.sharding.Sharding] = None) -> SavedAdapter:
    """Read an adapter checkpoint (no base model needed); ``attach`` it to a params tree or an NNX model.

    Every tensor is restored with ``sharding`` (e.g. ``NamedSharding(mesh, P())`` to replicate the adapter over
    a mesh), whatever mesh it was saved from; by default onto the default device. A missing, truncated or
    inconsistent checkpoint raises ``bridge._src.folders.CheckpointError`` naming the folder and what is
    wrong.

    Example:
        >>> import numpy as np, tempfile, os
        >>> from fourierft_jax._src.saved import apply_for_doc
        >>> params = {"q": {"kernel": np.zeros((8, 4), np.float32)}}
        >>> saved = load_adapter(save_adapter(os.path.join(tempfile.mkdtemp(), "c"), apply_for_doc(params)))
        >>> saved.attach(params).layers()
        ['q']
    """
    folder = os.path.abspath(os.fspath(directory))
    recover_directory(folder)  # a save killed inside the fallback's two renames left the old copy aside
    metadata = read_metadata(folder)
    config = metadata["config"]
    restored = _restore_tensors(folder, metadata["tensors"], sharding)
    groups = _group_tensors(folder, metadata["tensors"], restored)
    spec = _saved_spec(folder, metadata, config)
    _check_complete(folder, spec, groups)
    state = {SPECTRA: groups[SPECTRA], BIAS: groups[BIAS], MODULES_TO_SAVE: groups[MODULES_TO_SAVE]}
    return SavedAdapter(config, spec, state, groups["originals"])


def _restore_tensors(folder: str, tensors: list[dict[str, Any]],
                     sharding: Optional[jax.sharding.Sharding]) -> dict[str, Any]:
    """``{tensor id: array}`` of the checkpoint's ``state/``, each placed with ``sharding``."""
    # Without a target sharding Orbax would reuse the saving mesh, which need not exist in this process.
    sharding = sharding if sharding is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])
    try:
        abstract = {t["id"]: jax.ShapeDtypeStruct(tuple(t["shape"]), jnp.dtype(t["dtype"]), sharding=sharding)
                    for t in tensors}
    except TypeError as error:
        raise CheckpointError(f"{folder}: bad tensor dtype in {METADATA_NAME}: {error}") from None
    if not abstract:
        return {}
    checkpointer = ocp.StandardCheckpointer()
    try:
        return checkpointer.restore(os.path.join(folder, STATE_DIR), abstract)
    except Exception as error:  # Orbax/tensorstore raise many types for missing or truncated data
        raise CheckpointError(
            f"{folder}: cannot read the tensors in {STATE_DIR}/ (incomplete or corrupt checkpoint): "
            f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
        ) from None
    finally:
        checkpointer.close()


def _group_tensors(folder: str, tensors: list[dict[str, Any]], restored: Mapping[str, Any]) -> dict[str, dict]:
    """The restored arrays as ``{group: {module: array or nested dict}}``, each checked against its entry."""
    groups: dict[str, dict[str, Any]] = {group: {} for group in _GROUPS}
    for entry in tensors:
        value = restored[entry["id"]]
        if tuple(value.shape) != tuple(entry["shape"]) or jnp.dtype(value.dtype).name != entry["dtype"]:
            raise CheckpointError(f"{folder}: tensor {entry['module']!r} {entry['rel']} was restored as "
                                  f"{value.dtype}{tuple(value.shape)}, not {entry['dtype']}{tuple(entry['shape'])}")
        if entry["group"] not in groups:
            raise CheckpointError(f"{folder}: unknown tensor group {entry['group']!r}")
        rel = entry["rel"]
        if not rel:
            groups[entry["group"]][entry["module"]] = value
            continue
        node = groups[entry["group"]].setdefault(entry["module"], {})
        for key in rel[:-1]:
            node = node.setdefault(key, {})
        node[rel[-1]] = value
    return groups


def _saved_spec(folder: str, metadata: Mapping[str, Any], config: bridge.FourierFTConfig) -> AdapterSpec:
    """The ``AdapterSpec`` the metadata records (layers with their stack fields, bias and module paths)."""
    try:
        layers = tuple(
            layer_spec(tuple(layer["path"]), layer["in_features"], layer["out_features"], layer["n_frequency"],
                       config, **{field: layer[field] for field in STACK_FIELDS if field in layer})
            for layer in metadata["layers"]
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{folder}: bad layer entry in {METADATA_NAME}: {error}") from None
    return AdapterSpec(layers, tuple(tuple(p) for p in metadata.get("bias_paths", [])),
                       tuple(tuple(p) for p in metadata.get("save_paths", [])), config.bias)


def _check_complete(folder: str, spec: AdapterSpec, groups: Mapping[str, Mapping[str, Any]]) -> None:
    """Every layer, bias and module the spec names has its tensor, and every spectrum its layer's shape."""
    missing = [layer.name for layer in spec.layers if layer.name not in groups[SPECTRA]]
    missing += [dotted(p) for p in spec.bias_paths if dotted(p) not in groups[BIAS]]
    missing += [dotted(p) for p in spec.save_paths if dotted(p) not in groups[MODULES_TO_SAVE]]
    if missing:
        raise CheckpointError(f"{folder}: {METADATA_NAME} lists {missing} without their tensors (corrupt checkpoint)")
    wrong = [f"{layer.name!r} {tuple(groups[SPECTRA][layer.name].shape)} (expected {layer.spectrum_shape})"
             for layer in spec.layers if tuple(groups[SPECTRA][layer.name].shape) != layer.spectrum_shape]
    if wrong:
        raise CheckpointError(f"{folder}: spectra of the wrong shape for their layers: {', '.join(wrong)}")


class TrainingCheckpoints:
    """Training checkpoints through Orbax's ``CheckpointManager``: any pytree (adapter state, optimizer state,
    step counters, data-loader position) saved per step, keeping the last ``max_to_keep`` or the best ones.

    Orbax writes each step into a temporary folder and renames it when complete, so a save that is killed
    part-way leaves the earlier steps restorable: killed after any one of its file operations (tests/faults),
    the latest complete step is the previous or the new one, every listed step restores bit for bit, and the
    next manager removes Orbax's left-over temporary folder. The new step's atomicity is Orbax's own (there is no
    folder to swap: each step is a new sub-folder); a step dropped by ``max_to_keep`` is first renamed into the
    hidden ``.deleted-steps/`` (Orbax's ``todelete_subdir``) and deleted from there, so a kill during that
    deletion never leaves a listed, half-deleted step. Restoring with ``like`` (the same structure, e.g. the freshly
    initialised ``(trainable, opt_state)``) gives arrays bit-identical to what was saved, so a resumed run
    continues with exactly the losses of an uninterrupted one.

    Args:
        directory: the root folder (one sub-folder per step).
        max_to_keep: how many checkpoints to keep (``None``: all).
        best_metric: keep the ``max_to_keep`` best by ``metrics[best_metric]`` instead of the most recent.
        best_mode: ``"min"`` or ``"max"``.
        save_interval_steps: ``save`` only acts on multiples of this (unless ``force``).
        async_save: let Orbax write in the background (call ``wait`` before reading the files).

    Example:
        >>> import tempfile, jax.numpy as jnp
        >>> with TrainingCheckpoints(tempfile.mkdtemp(), max_to_keep=2) as checkpoints:
        ...     for step in range(3):
        ...         _ = checkpoints.save(step, {"w": jnp.full(2, float(step))})
        ...     checkpoints.all_steps(), checkpoints.restore({"w": jnp.zeros(2)})["w"].tolist()
        ([1, 2], [2.0, 2.0])
    """

    def __init__(
        self,
        directory: PathLike,
        *,
        max_to_keep: Optional[int] = None,
        best_metric: Optional[str] = None,
        best_mode: str = "min",
        save_interval_steps: int = 1,
        async_save: bool = False,
    ) -> None:
        if best_mode not in ("min", "max"):
            raise ValueError(f"TrainingCheckpoints: best_mode must be 'min' or 'max', got {best_mode!r}")
        best_fn: Optional[Callable[[Any], float]] = None
        if best_metric is not None:
            best_fn = lambda metrics: float(metrics[best_metric])  # noqa: E731
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, best_fn=best_fn, best_mode=best_mode,
            save_interval_steps=save_interval_steps, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            # A step dropped by max_to_keep is renamed out of the listing in one step, then deleted by us: Orbax's
            # own in-place deletion, killed half-way, leaves a listed step that no longer restores.
            todelete_subdir=_DELETED,
        )
        self.directory = os.path.abspath(os.fspath(directory))
        self.best_metric = best_metric
        self._async = async_save
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state",))
        self._purge()

    def save(self, step: int, state: Any, *, metrics: Optional[Mapping[str, Any]] = None, force: bool = False) -> bool:
        """Save ``state`` as ``step`` (with ``metrics`` when keeping the best); returns whether it was saved."""
        if self.best_metric is not None and (metrics is None or self.best_metric not in metrics):
            raise ValueError(f"TrainingCheckpoints: keeping the best by {self.best_metric!r}: pass metrics with it")
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        saved = self._manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                                   metrics=metrics, force=force)
        if not self._async:  # an async save drops old steps in Orbax's background thread: purged by wait/close
            self._purge()
        return saved

    def _purge(self) -> None:
        """Delete the steps Orbax set aside (kept out of every listing, so a kill here loses nothing)."""
        if jax.process_index() == 0:
            shutil.rmtree(os.path.join(self.directory, _DELETED), ignore_errors=True)

    def restore(self, like: Any, step: Optional[int] = None) -> Any:
        """The state saved at ``step`` (default: the latest), with the structure, dtypes and shardings of ``like``.

        ``like`` holds arrays or ``jax.ShapeDtypeStruct``s; each is restored with its ``sharding`` (so a state
        saved on one mesh restores onto another: pass ``like`` laid out on the new mesh), a leaf without one
        onto the default device.
        """
        if step is None:
            step = self.latest_step()
        if step is None:
            raise CheckpointError(f"{self.directory} holds no training checkpoint")
        if step not in self.all_steps():
            raise CheckpointError(f"{self.directory} has no checkpoint of step {step}; it has {self.all_steps()}")
        abstract = jax.tree.map(_abstract_leaf, like)
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return restored["state"]

    def latest_step(self) -> Optional[int]:
        """The newest complete step, or ``None``."""
        return self._manager.latest_step()

    def best_step(self) -> Optional[int]:
        """The best step by ``best_metric`` (the latest when no metric is used)."""
        return self._manager.best_step()

    def all_steps(self) -> list[int]:
        """Every complete step kept, ascending."""
        return sorted(self._manager.all_steps())

    def wait(self) -> None:
        """Block until background saves are written."""
        self._manager.wait_until_finished()
        self._purge()

    def close(self) -> None:
        """Finish pending saves and release Orbax's resources."""
        self._manager.wait_until_finished()
        self._manager.close()
        self._purge()

    def __enter__(self) -> "TrainingCheckpoints":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _abstract_leaf(leaf: Any) -> Any:
    abstract = ocp.utils.to_shape_dtype_struct(leaf)
    if isinstance(abstract, jax.ShapeDtypeStruct) and abstract.sharding is None:
        # Orbax would otherwise restore onto the saving topology, which may not be this one.
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.ShapeDtypeStruct(abstract.shape, abstract.dtype, sharding=device)
    return abstract


def spectra_of(saved: SavedAdapter) -> dict[str, np.ndarray]:
    """``{layer: numpy spectrum}`` of a saved adapter (for inspection and tests).

    Example:
        >>> import numpy as np
        >>> from fourierft_jax._src.saved import apply_for_doc, from_adapter
        >>> spectra_of(from_adapter(apply_for_doc({"q": {"kernel": np.zeros((8, 4), np.float32)}})))["q"].tolist()
        [0.0, 0.0, 0.0]
    """
    return {name: np.asarray(value) for name, value in saved.state[SPECTRA].items()}
