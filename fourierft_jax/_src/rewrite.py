"""Run any JAX function of a parameter pytree with some of its kernels adapted, at the operator level.

The function is traced once to a jaxpr (``jax.make_jaxpr``: abstract, no FLOPs) and evaluated equation by
equation. Each adapted kernel enters as a ``Tracked`` value: the array the model computes plus its
``KernelView``. Layout-only operations (casts, transposes, reshapes, size-1 squeezes/broadcasts) keep it tracked;
a ``dot_general`` that consumes it is handed to the ``handler`` (which computes the adapted contraction);
``jit``/``pjit``, ``checkpoint``, ``custom_jvp``/``custom_vjp`` calls are entered, so a kernel is followed into
``jnp.einsum`` and any module library's helpers; a ``scan`` over a stacked kernel hands each step its own slice
(and spectrum row). Any other use of a tracked kernel gets the merged kernel ``W + ΔW`` (``handler.materialize``):
correct numbers, the plain autodiff cost. Nothing depends on which module library built the function.

The same walk, with a recording handler, tells which parameters a model contracts and how (``trace.py``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, Sequence

import jax
import jax.extend.core as jex

from .kernel_view import KernelView


class Tracked:
    """An array derived from an adapted kernel by layout-only operations.

    Inside a scan over the kernel's layer stack, ``stack`` is the stored axis the scan slices and ``rows`` what
    the handler passed along for this step (the spectrum rows, one per adapter).
    """

    __slots__ = ("value", "key", "view", "rows", "stack")

    def __init__(self, value: Any, key: Any, view: KernelView, rows: Any = None, stack: Optional[int] = None) -> None:
        self.value, self.key, self.view, self.rows, self.stack = value, key, view, rows, stack

    def moved(self, value: Any, view: KernelView) -> "Tracked":
        return Tracked(value, self.key, view, self.rows, self.stack)


class Handler(Protocol):
    def dot(self, x: Any, tracked: Tracked, side: int, params: dict) -> Any: ...

    def materialize(self, tracked: Tracked, why: str) -> Any: ...

    def scan_rows(self, tracked: Tracked, axis: int) -> Optional[Any]: ...


def _bind(eqn: Any, invals: Sequence[Any]) -> list:
    found = eqn.primitive.get_bind_params(eqn.params)
    # jax >= 0.9 returns the params alone; older versions (subfuns, params).
    subfuns, params = ((), found) if isinstance(found, dict) else found
    out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def interpret(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], handler: Handler) -> list:
    """Evaluate ``jaxpr`` on ``args`` (some ``Tracked``), handing adapted contractions to ``handler``."""
    env: dict = {}

    def read(var: Any) -> Any:
        return var.val if isinstance(var, jex.Literal) else env[var]

    for var, value in zip(jaxpr.constvars, consts):
        env[var] = value
    for var, value in zip(jaxpr.invars, args, strict=True):
        env[var] = value
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if any(isinstance(v, Tracked) for v in invals):
            outs = _tracked_eqn(eqn, invals, handler)
        else:
            outs = _bind(eqn, invals)
        for var, value in zip(eqn.outvars, outs, strict=True):
            if not isinstance(var, jex.DropVar):
                env[var] = value
    return [read(v) for v in jaxpr.outvars]


def _plain(values: Sequence[Any], handler: Handler, why: str) -> list:
    return [handler.materialize(v, why) if isinstance(v, Tracked) else v for v in values]


# Operations that leave every element where it is (casts, copies, placement and sharding annotations).
_IDENTITY_LAYOUT = {"convert_element_type", "copy", "copy_p", "reduce_precision", "optimization_barrier",
                    "device_put", "sharding_constraint", "mesh_cast", "reshard", "pvary"}
_CALLS = {"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"}
_REMAT = {"remat2", "checkpoint", "remat"}


def _tracked_eqn(eqn: Any, invals: list, handler: Handler) -> list:
    name, params = eqn.primitive.name, eqn.params
    if name in _IDENTITY_LAYOUT and len(invals) == 1:
        (t,) = invals
        return [t.moved(_bind(eqn, [t.value])[0], t.view)]
    if name in ("transpose", "reshape", "squeeze", "broadcast_in_dim") and isinstance(invals[0], Tracked) and all(
        not isinstance(v, Tracked) for v in invals[1:]
    ):
        view = _layout_view(name, params, invals[0].view)
        if view is not None:
            t = invals[0]
            return [t.moved(_bind(eqn, [t.value] + invals[1:])[0], view)]
    if name == "dot_general":
        lhs, rhs = invals
        if isinstance(lhs, Tracked) != isinstance(rhs, Tracked):
            side = 0 if isinstance(lhs, Tracked) else 1
            tracked, x = (lhs, rhs) if side == 0 else (rhs, lhs)
            return [handler.dot(x, tracked, side, params)]
    if name in _CALLS:
        closed = params.get("jaxpr", params.get("call_jaxpr"))
        if closed is not None:
            inner, consts = (closed.jaxpr, closed.consts) if hasattr(closed, "consts") else (closed, ())
            return interpret(inner, consts, invals, handler)
    if name in _REMAT:
        return _remat(eqn, invals, handler)
    if name == "scan":
        return _scan(eqn, invals, handler)
    if name == "cond":
        return _cond(eqn, invals, handler)
    return _bind(eqn, _plain(invals, handler, name))


def _layout_view(name: str, params: dict, view: KernelView) -> Optional[KernelView]:
    if name == "transpose":
        return view.transpose(params["permutation"])
    if name == "reshape":
        return view.reshape(params["new_sizes"]) if params.get("dimensions") is None else None
    if name == "squeeze":
        return view.squeeze(params["dimensions"])
    return view.broadcast(params["shape"], params["broadcast_dimensions"])


def _scan(eqn: Any, invals: list, handler: Handler) -> list:
    params = eqn.params
    n_consts, n_carry = params["num_consts"], params["num_carry"]
    consts = invals[:n_consts]
    init = _plain(invals[n_consts : n_consts + n_carry], handler, "scan carry")
    xs = list(invals[n_consts + n_carry :])
    sliced: dict[int, tuple[Tracked, Any, int]] = {}
    for i, value in enumerate(xs):
        if isinstance(value, Tracked):
            axis = value.view.leading_axis()
            rows = handler.scan_rows(value, axis) if axis is not None and value.stack is None else None
            if rows is None:
                xs[i] = handler.materialize(value, "scan over a kernel axis that is not its layer stack")
            else:
                sliced[i] = (value, rows, axis)
                xs[i] = value.value
    body = params["jaxpr"]

    def step(carry: list, packed: tuple) -> tuple:
        values, rows = packed
        args = list(values)
        for (i, (tracked, _, axis)), row in zip(sliced.items(), rows):
            args[i] = Tracked(values[i], tracked.key, tracked.view.drop_leading(), row, axis)
        outs = interpret(body.jaxpr, body.consts, list(consts) + list(carry) + args, handler)
        outs = _plain(outs, handler, "scan output")
        return outs[:n_carry], outs[n_carry:]

    carry, ys = jax.lax.scan(step, init, (xs, [rows for _, rows, _ in sliced.values()]), length=params["length"],
                             reverse=params["reverse"], unroll=params["unroll"])
    return list(carry) + list(ys)


def _remat(eqn: Any, invals: list, handler: Handler) -> list:
    # Keep the model's rematerialisation: the rewritten body runs under the same checkpoint policy, with the
    # tracked kernels' arrays passed in (so they are inputs of the checkpoint, not recomputed constants).
    params = eqn.params
    tracked_at = [i for i, v in enumerate(invals) if isinstance(v, Tracked)]

    def body(*values: Any) -> list:
        args = list(values)
        for i in tracked_at:
            args[i] = invals[i].moved(values[i], invals[i].view)
        return _plain(interpret(params["jaxpr"], (), args, handler), handler, "checkpoint output")

    values = [v.value if isinstance(v, Tracked) else v for v in invals]
    wrapped = jax.checkpoint(body, prevent_cse=params.get("prevent_cse", True), policy=params.get("policy"))
    return list(wrapped(*values))


def _cond(eqn: Any, invals: list, handler: Handler) -> list:
    index, operands = invals[0], invals[1:]
    # Tracked operands are closed over by the branches; the others are passed as usual.
    plain_at = [i for i, v in enumerate(operands) if not isinstance(v, Tracked)]

    def branch(closed: Any) -> Callable:
        def run(*plain: Any) -> list:
            args = list(operands)
            for i, value in zip(plain_at, plain):
                args[i] = value
            return _plain(interpret(closed.jaxpr, closed.consts, args, handler), handler, "cond output")

        return run

    return list(jax.lax.switch(index, [branch(b) for b in eqn.params["branches"]], *[operands[i] for i in plain_at]))


def is_array(leaf: Any) -> bool:
    """Whether a pytree leaf is traced as an array (the rest is passed to the function as it is)."""
    return hasattr(leaf, "shape") and hasattr(leaf, "dtype")


def run_with(fn: Callable, tree: Any, args: tuple, kwargs: dict, tracked: dict[int, Any], handler: Handler) -> Any:
    """``fn(tree, *args, **kwargs)`` with the leaves of ``tree`` at the indices of ``tracked`` (``{leaf index:
    key}``, ``jax.tree.leaves`` order) entering as ``Tracked`` kernels seen by ``handler``."""
    leaves, treedef = jax.tree.flatten(tree)
    arg_leaves, arg_tree = jax.tree.flatten((args, kwargs))
    dynamic = [i for i, leaf in enumerate(arg_leaves) if is_array(leaf)]

    def flat_fn(param_leaves: list, dynamic_leaves: list) -> Any:
        filled = list(arg_leaves)
        for i, value in zip(dynamic, dynamic_leaves):
            filled[i] = value
        call_args, call_kwargs = jax.tree.unflatten(arg_tree, filled)
        return fn(jax.tree.unflatten(treedef, param_leaves), *call_args, **call_kwargs)

    dynamic_leaves = [arg_leaves[i] for i in dynamic]
    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(leaves, dynamic_leaves)
    invals = list(leaves) + dynamic_leaves
    for index, key in tracked.items():
        invals[index] = Tracked(leaves[index], key, KernelView.identity(leaves[index].shape))
    outs = _plain(interpret(closed.jaxpr, closed.consts, invals, handler), handler, "function output")
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)
