"""Which parameters a model contracts, and along which axes: read from the model itself.

``contractions(params, fn)`` traces ``fn(params)`` abstractly (``jax.make_jaxpr``: no FLOPs) and follows every
floating-point array of two or more axes through the jaxpr (``rewrite.interpret`` with a recording handler). An
array that reaches a ``dot_general`` -- directly or through casts, transposes, reshapes, ``jnp.einsum``, jitted
helpers, or one layer of a scanned stack -- is a linear layer's kernel, contracted on the axes the dot sums
over; one read by a gather (an embedding table) or never contracted is not. The result feeds target selection:
``"all-linear"`` then means exactly the arrays the model uses as projections.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from .adapted_dot import ContractionError, DotPlan
from .rewrite import Tracked, run_with
from .tree import Path, dotted, leaf_paths


class ContractionTraceError(ValueError):
    """The traced function failed, or contracts a kernel in two different ways."""


class _Recorder:
    def __init__(self) -> None:
        self.uses: dict[Path, set] = {}

    def _note(self, tracked: Tracked, use: Any) -> None:
        self.uses.setdefault(tracked.key, set()).add(use)

    def dot(self, x: Any, tracked: Tracked, side: int, params: dict) -> Any:
        plan = DotPlan.of(side, params, tracked.view, jnp.ndim(x))
        try:
            axes = plan.contracted_axes()
        except ContractionError as error:
            self._note(tracked, ("other", f"dot_general ({error})"))
        else:
            stack = tracked.stack
            if stack is not None:  # contracted inside a scan over ``stack``: count axes of the stored array
                axes = ("scanned", stack, tuple(a + (a >= stack) for a in axes))
            self._note(tracked, ("dot", axes))
        return plan.dot(x, tracked.value)

    def materialize(self, tracked: Tracked, why: str) -> Any:
        self._note(tracked, ("other", why))
        return tracked.value

    def scan_rows(self, tracked: Tracked, axis: int) -> Optional[Any]:
        return ()


def contractions(params: Any, fn: Callable[[Any], Any]) -> dict[Path, Optional[tuple[int, ...]]]:
    """``{kernel leaf path: contracted axes}`` for every float array of ``params`` with two or more axes;
    ``None`` for those the model never contracts (embeddings, norms, unused). A kernel contracted one layer at a
    time inside a scan over its axis ``s`` gives ``("scanned", s, axes)`` (its layer stack must be named with
    ``stacked=``); one contracted in two ways ``("conflict", (axes, ...))``.

    Paths are relative to the ``params`` collection, as in target selection.

    Example:
        >>> import numpy as np
        >>> params = {"q": {"w": np.ones((2, 8, 4), np.float32)}, "emb": {"table": np.ones((10, 8), np.float32)}}
        >>> def fn(p):
        ...     h = jnp.take(p["emb"]["table"], jnp.array([1, 2]), axis=0)
        ...     return jnp.einsum("bd,ndh->bnh", h, p["q"]["w"])
        >>> contractions(params, fn)
        {('emb', 'table'): None, ('q', 'w'): (1,)}
    """
    paths = leaf_paths(params)
    leaves = jax.tree.leaves(params)
    candidates = {
        i: path for i, (path, leaf) in enumerate(zip(paths, leaves))
        if hasattr(leaf, "ndim") and leaf.ndim >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating)
        and not (path and path[0].startswith("<"))
    }
    recorder = _Recorder()
    try:
        jax.eval_shape(lambda p: run_with(lambda q: fn(q), p, (), {}, candidates, recorder), params)
    except ContractionTraceError:
        raise
    except Exception as error:  # the user's function: say where it came from
        raise ContractionTraceError(f"fourierft_jax: the trace= function failed while tracing the model: "
                                    f"{type(error).__name__}: {error}") from error
    out: dict[Path, Optional[tuple[int, ...]]] = {}
    for path in sorted(candidates.values()):
        dots = {use[1] for use in recorder.uses.get(path, ()) if use[0] == "dot"}
        others = {use[1] for use in recorder.uses.get(path, ()) if use[0] == "other"}
        if not dots or any("gather" in why for why in others):
            out[path] = None
        elif len(dots) > 1:
            out[path] = ("conflict", tuple(sorted(dots)))  # type: ignore[assignment]
        else:
            out[path] = next(iter(dots))
    return out


def check_unambiguous(found: dict, path: Path) -> None:
    """Raise naming ``path`` when the traced model contracts that kernel on two different sets of axes."""
    entry = found.get(path)
    if isinstance(entry, tuple) and entry and entry[0] == "conflict":
        raise ContractionTraceError(
            f"fourierft_jax: the kernel {dotted(path)!r} is contracted in two different ways by the traced model "
            f"(axes {list(entry[1])}); FourierFT needs one (in, out) matrix per kernel -- declare it with "
            "contracting={path: axes} or leave this layer out of target_modules")
