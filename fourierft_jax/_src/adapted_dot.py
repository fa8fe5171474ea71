"""One adapted contraction: a model's ``dot_general`` whose operand is a view of an adapted kernel.

Whatever layout the model gives the kernel (``KernelView``), FourierFT works on its ``(in, out)`` matrix: ``in``
= the contracted kernel axes flattened in kernel order, ``out`` = the kept ones. ``DotPlan`` turns the input into
``(tokens, in)``, the cotangent into ``(tokens, out)`` and the matrix ``ΔW`` into the operand's layout, so that
the two fast forms of the 2-D layer serve every contraction:

* ``"fused"``: ``dot(x, V + ΔV)`` with a hand-written backward that takes the spectrum gradient from the FFTs of
  the ``(tokens, in)`` input and the ``(tokens, out)`` cotangent (``fused.gather_sum``) -- never the
  weight-sized ``xᵀdy`` -- and ``dx`` in the form bridge's ``choose_input_grad`` picks ("rebuild" ΔW, or
  "spectral" from ``rfft(dy)``; ``input_grad_form`` forces one);
* ``"spectral"``: ``dot(x, V)`` plus the adapter's output computed from the input's spectrum
  (``spectral.spectral_delta``), never building ``ΔW``.

``"auto"`` picks one per call with ``choose_path``. On a device mesh the fused form builds ``ΔW`` shard-locally
(``sharded_delta`` on the matrix's block sharding) and reduces the spectrum gradient as ``n`` floats.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Any, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.sharding import NamedSharding, PartitionSpec

from bridge._src.auto_rule import REBUILD, SPECTRAL, choose_input_grad

from .delta import delta_kernel_f32
from .fused import gather_sum, input_bins, spectrum_grads
from .sharding import sharded_delta
from .kernel_view import KernelView, arrange, gather_atoms
from .layer import LayerSpec
from .spectral import frequency_table, input_grad_delta, spectral_delta, take_rows


class ContractionError(ValueError):
    """A kernel is contracted in a way FourierFT cannot map onto its ``(in, out)`` matrix."""


@dataclasses.dataclass(frozen=True)
class DotPlan:
    """A ``dot_general`` of an input ``x`` with a kernel view: everything static about it (hashable)."""

    kernel_side: int  # 0: the kernel is the lhs operand, 1: the rhs
    dimension_numbers: Any
    precision: Any
    preferred_element_type: Any
    view: KernelView
    x_ndim: int
    out_sharding: Any = None
    part_axis: Optional[int] = None  # a kept kernel axis whose slices are separate layers (a split or a stack)

    @classmethod
    def of(cls, side: int, params: dict, view: KernelView, x_ndim: int) -> "DotPlan":
        """The plan of a ``dot_general`` equation (its ``params``) whose operand ``side`` is the kernel view."""
        return cls(side, params["dimension_numbers"], params.get("precision"), params.get("preferred_element_type"),
                   view, x_ndim, params.get("out_sharding"))

    @property
    def _dims(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        (lc, rc), (lb, rb) = self.dimension_numbers
        kc, xc = (lc, rc) if self.kernel_side == 0 else (rc, lc)
        kb, xb = (lb, rb) if self.kernel_side == 0 else (rb, lb)
        return tuple(kc), tuple(xc), tuple(kb), tuple(xb)

    @property
    def kernel_contracting(self) -> tuple[int, ...]:
        return self._dims[0]

    @property
    def kernel_free(self) -> tuple[int, ...]:
        kc, _, kb, _ = self._dims
        return tuple(d for d in range(len(self.view.axes)) if d not in kc and d not in kb)

    @property
    def x_free(self) -> tuple[int, ...]:
        _, xc, _, xb = self._dims
        return tuple(d for d in range(self.x_ndim) if d not in xc and d not in xb)

    def contracted_axes(self) -> tuple[int, ...]:
        """The kernel axes this contraction sums over (the matrix's ``in``); raises ``ContractionError``."""
        kc, _, kb, _ = self._dims
        if kb:
            raise ContractionError("the kernel has batch dimensions in this dot_general")
        inside = self.view.kernel_axes_of(kc)
        kept = self.view.kernel_axes_of(self.kernel_free)
        if inside & kept:
            raise ContractionError(f"kernel axes {sorted(inside & kept)} are partly contracted and partly kept")
        missing = [a for a, d in enumerate(self.view.root) if d > 1 and a not in inside | kept]
        if missing or not inside or not kept:
            raise ContractionError("the contraction does not split the kernel into contracted and kept axes")
        # Size-1 kernel axes carry no atoms: count them with the kept axes (they do not change the matrix).
        return tuple(sorted(inside))

    # -- moving arrays between the dot's layouts and the (in, out) matrix ------------------------------------
    def in_atoms(self):
        return self.view.canonical(self.view.kernel_axes_of(self.kernel_contracting))

    def out_atoms(self):
        kept = self.view.kernel_axes_of(self.kernel_free)
        if self.part_axis is None:
            return self.view.canonical(kept)
        # The parts' axis first: the (in, parts·out) matrix is then one (in, out) block per part.
        return self.view.canonical({self.part_axis}) + self.view.canonical(kept - {self.part_axis})

    def matrix_input(self, x: jax.Array) -> jax.Array:
        """``x`` as ``(tokens, in)``, features in kernel order."""
        kc, xc, _, _ = self._dims
        order = sorted(range(len(kc)), key=lambda i: kc[i])
        return gather_atoms(x, self.x_free, tuple(xc[i] for i in order),
                            tuple(self.view.axes[kc[i]] for i in order), self.in_atoms())

    def _output_x_first(self, y: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
        n_x, n_k = len(self.x_free), len(self.kernel_free)
        if self.kernel_side == 1:
            return y, tuple(range(n_x))
        return jnp.transpose(y, tuple(range(n_k, n_k + n_x)) + tuple(range(n_k))), tuple(range(n_x))

    def matrix_cotangent(self, dy: jax.Array) -> jax.Array:
        """The output cotangent as ``(tokens, out)``, features in kernel order."""
        moved, lead = self._output_x_first(dy)
        n_x = len(lead)
        return gather_atoms(moved, lead, tuple(range(n_x, moved.ndim)),
                            tuple(self.view.axes[d] for d in self.kernel_free), self.out_atoms())

    def output_from_matrix(self, delta: jax.Array, x_shape: Sequence[int]) -> jax.Array:
        """A ``(tokens, out)`` result laid out as this dot's output."""
        free_shape = tuple(x_shape[d] for d in self.x_free)
        y = arrange(delta.reshape(free_shape + (delta.shape[-1],)), len(free_shape), self.out_atoms(),
                    tuple(self.view.axes[d] for d in self.kernel_free))
        if self.kernel_side == 1:
            return y
        n_x, n_k = len(free_shape), len(self.kernel_free)
        return jnp.transpose(y, tuple(range(n_x, n_x + n_k)) + tuple(range(n_x)))

    def operand_from_matrix(self, matrix: jax.Array) -> jax.Array:
        """An ``(in, out)`` matrix laid out as the kernel operand of this dot."""
        return arrange(matrix, 0, self.in_atoms() + self.out_atoms(), self.view.axes)

    def tokens(self, x_shape: Sequence[int]) -> int:
        return math.prod(int(x_shape[d]) for d in self.x_free)

    def dot(self, x: jax.Array, operand: jax.Array) -> jax.Array:
        lhs, rhs = (operand, x) if self.kernel_side == 0 else (x, operand)
        return jax.lax.dot_general(lhs, rhs, self.dimension_numbers, precision=self.precision,
                                   preferred_element_type=self.preferred_element_type, out_sharding=self.out_sharding)


def matrix_sharding(layer: LayerSpec, sharding: Any) -> Optional[NamedSharding]:
    """The sharding of ``layer``'s ``(in, out)`` matrix that its stored kernel's ``NamedSharding`` implies, or
    None where that is not a block sharding of the matrix (a split axis after the first of its group: the
    flattened axis would be strided, not blocked).

    Example:
        >>> import numpy as np, jax
        >>> from jax.sharding import Mesh, PartitionSpec as P
        >>> mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
        >>> layer = LayerSpec(("q",), 8, 12, 3, 1.0, 0, kernel_dims=(8, 3, 4), in_axes=(0,))
        >>> matrix_sharding(layer, NamedSharding(mesh, P(None, "model", None))).spec
        P(None, 'model')
    """
    if not isinstance(sharding, NamedSharding):
        return None
    dims = layer.dims
    entries = list(sharding.spec) + [None] * (len(dims) - len(sharding.spec))
    if len(entries) != len(dims):
        return None
    split = lambda entry: entry is not None and any(  # noqa: E731
        sharding.mesh.shape[a] > 1 for a in ((entry,) if isinstance(entry, str) else entry))
    matrix = []
    for group in (layer.contracted, layer.out_axes):
        group = [a for a in group if dims[a] != 1]
        if any(split(entries[a]) for a in group[1:]):
            return None
        matrix.append(entries[group[0]] if group else None)
    return NamedSharding(sharding.mesh, PartitionSpec(*matrix))


def _delta_operand(spectra: Sequence[jax.Array], layers: Sequence[LayerSpec], plan: DotPlan,
                   sharding: Optional[NamedSharding]) -> jax.Array:
    total = None
    for spectrum, layer in zip(spectra, layers):
        spectrum = spectrum.astype(jnp.float32)
        term = delta_kernel_f32(spectrum, layer.flat) if sharding is None else sharded_delta(spectrum, layer.flat,
                                                                                               sharding)
        total = term if total is None else total + term
    return plan.operand_from_matrix(total)


# -- the input gradient and the residuals of the fused backward ---------------------------------------------------
#
# dx = dy (W + ΔW)ᵀ takes one of two forms (bridge's ``choose_input_grad``): "rebuild" ΔW (a token-independent
# irfft2) and ride on the frozen matmul, or "spectral": dy Wᵀ plus dy ΔWᵀ from the dy table the spectrum gradient
# needs anyway (``spectral.input_grad_delta``, token-proportional). On a device mesh the rebuild form stays: its
# ΔW is shard-local already, while a spectral dx would need its own shard_map of the feature-split FFTs.
#
# Residuals: the spectrum gradient needs rfft(x) only at the positions' distinct columns. Where the frozen kernel
# takes no gradient (custom_vjp's symbolic zeros say so) and that table is smaller than x, the forward keeps the
# table instead of x (e.g. 735 of 1537 bins for a 3072-wide input: 0.48 of x's bytes in float32); otherwise x.

_FORCED_INPUT_GRAD: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("fourierft_input_grad",
                                                                                   default=None)


@contextlib.contextmanager
def input_grad_form(form: Optional[str]) -> Iterator[None]:
    """Trace the fused backward's input gradient in ``form`` (``"spectral"`` or ``"rebuild"``) instead of by
    ``choose_input_grad`` (None: the rule); for tests and benchmarks. It applies when a function is traced.

    Example:
        >>> with input_grad_form("spectral"):
        ...     _FORCED_INPUT_GRAD.get()
        'spectral'
    """
    if form not in (None, SPECTRAL, REBUILD):
        raise ValueError(f"input_grad_form: form must be {SPECTRAL!r}, {REBUILD!r} or None, got {form!r}")
    token = _FORCED_INPUT_GRAD.set(form)
    try:
        yield
    finally:
        _FORCED_INPUT_GRAD.reset(token)


def _input_grad(tokens: int, out_features: int, in_features: int, sharded: bool) -> str:
    forced = _FORCED_INPUT_GRAD.get()
    if forced is not None:
        return forced if not sharded else REBUILD
    return REBUILD if sharded else choose_input_grad(tokens, out_features, in_features)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Like:
    """The shape and dtype of a residual that is not kept (a static pytree: no leaves)."""

    shape: tuple[int, ...]
    dtype: Any

    def struct(self) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(self.shape, self.dtype)


def _keeps_table(x: jax.Array, bins: int, in_features: int, operand_perturbed: bool) -> bool:
    return not operand_perturbed and bins * 2 * 4 < in_features * jnp.dtype(x.dtype).itemsize


def _input_residuals(x: jax.Array, layers: Sequence[LayerSpec], plan: DotPlan, operand_perturbed: bool,
                     sharded: bool) -> tuple[Optional[jax.Array], Optional[jax.Array]]:
    """``(x, None)`` or ``(None, x_table)``: what the backward keeps of the input."""
    bins = input_bins(layers)
    if sharded or not _keeps_table(x, bins.size, layers[0].in_features, operand_perturbed):
        return x, None
    return None, take_rows(frequency_table(plan.matrix_input(x)), bins)


def _x_tables(x: Optional[jax.Array], x_table: Optional[jax.Array], layers: Sequence[LayerSpec], plan: DotPlan
              ) -> tuple[jax.Array, Optional[np.ndarray]]:
    if x_table is not None:
        return x_table, input_bins(layers)
    return frequency_table(plan.matrix_input(x)), None


def _input_grad_from(dy: jax.Array, operand: jax.Array, x_like: _Like, plan: DotPlan,
                     delta_rows: Optional[jax.Array]) -> jax.Array:
    """``dy · operandᵀ`` in ``x``'s layout, plus ``delta_rows`` (``(tokens, in)``, ``dy ΔW``) where given."""
    (dx,) = jax.linear_transpose(lambda a: plan.dot(a, operand), x_like.struct())(dy)
    if delta_rows is None:
        return dx
    (extra,) = jax.linear_transpose(plan.matrix_input, jax.ShapeDtypeStruct(x_like.shape, jnp.float32))(delta_rows)
    return (dx.astype(jnp.float32) + extra).astype(dx.dtype)


def _operand_grad(x: Optional[jax.Array], operand: jax.Array, plan: DotPlan, dy: jax.Array) -> Optional[jax.Array]:
    # Kept only when someone asks for it (dead code under jit otherwise); without x the kernel takes no gradient.
    if x is None:
        return None
    return jax.vjp(lambda b: plan.dot(x, b), operand)[1](dy)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _fused(x: jax.Array, operand: jax.Array, spectra: tuple, layers: tuple, plan: DotPlan,
           sharding: Optional[NamedSharding], input_grad: str) -> jax.Array:
    return plan.dot(x, operand + _delta_operand(spectra, layers, plan, sharding).astype(operand.dtype))


def _fused_fwd(x, operand, spectra, layers, plan, sharding, input_grad):
    xv, wv, sv = x.value, operand.value, tuple(s.value for s in spectra)
    y = _fused(xv, wv, sv, layers, plan, sharding, input_grad)
    kept_x, x_table = _input_residuals(xv, layers, plan, operand.perturbed, sharding is not None)
    return y, (kept_x, x_table, wv, sv, _Like(tuple(xv.shape), xv.dtype))


def _fused_bwd(layers, plan, sharding, input_grad, residuals, dy):
    x, x_table, operand, spectra, x_like = residuals
    if isinstance(dy, SymbolicZero):
        return None, None, tuple(None for _ in spectra)
    flat_dy = plan.matrix_cotangent(dy)
    flats = tuple(l.flat for l in layers)
    if sharding is not None:
        grads = spectrum_grads(plan.matrix_input(x), flat_dy, flats, sharding)
        delta_rows = None
    else:
        y_table = frequency_table(flat_dy)
        table, bins = _x_tables(x, x_table, layers, plan)
        grads = [gather_sum(table, y_table, layer, bins) for layer in flats]
        delta_rows = input_grad_delta((y_table,) * len(flats), spectra, flats) if input_grad == SPECTRAL else None
    if delta_rows is None:
        effective = operand + _delta_operand(spectra, layers, plan, sharding).astype(operand.dtype)
        dx = _input_grad_from(dy, effective, x_like, plan, None)
    else:
        dx = _input_grad_from(dy, operand, x_like, plan, delta_rows)
    return (dx, _operand_grad(x, operand, plan, dy), tuple(g.astype(s.dtype) for g, s in zip(grads, spectra)))


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def _part_deltas(rows: jax.Array, layer: LayerSpec) -> jax.Array:
    """``(in, parts·out)``: the matrix of every part (one spectrum row each) side by side."""
    deltas = jax.vmap(lambda row: delta_kernel_f32(row, layer.flat))(rows.astype(jnp.float32))
    return jnp.transpose(deltas, (1, 0, 2)).reshape(layer.in_features, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fused_parts(x: jax.Array, operand: jax.Array, rows: tuple, layers: tuple, plan: DotPlan,
                 input_grad: str) -> jax.Array:
    delta = sum(_part_deltas(r, l) for r, l in zip(rows, layers))
    return plan.dot(x, operand + plan.operand_from_matrix(delta).astype(operand.dtype))


def _fused_parts_fwd(x, operand, rows, layers, plan, input_grad):
    xv, wv, rv = x.value, operand.value, tuple(r.value for r in rows)
    y = _fused_parts(xv, wv, rv, layers, plan, input_grad)
    kept_x, x_table = _input_residuals(xv, layers, plan, operand.perturbed, False)
    return y, (kept_x, x_table, wv, rv, _Like(tuple(xv.shape), xv.dtype))


def _fused_parts_bwd(layers, plan, input_grad, residuals, dy):
    x, x_table, operand, rows, x_like = residuals
    if isinstance(dy, SymbolicZero):
        return None, None, tuple(None for _ in rows)
    flat_dy = plan.matrix_cotangent(dy)
    table, bins = _x_tables(x, x_table, layers, plan)
    parts = rows[0].shape[0]
    blocks = flat_dy.reshape(flat_dy.shape[0], parts, -1)
    y_tables = [frequency_table(blocks[:, p]) for p in range(parts)]
    flats = tuple(l.flat for l in layers)
    grads = [jnp.stack([gather_sum(table, y_tables[p], layer, bins) for p in range(parts)]).astype(r.dtype)
             for r, layer in zip(rows, flats)]
    if input_grad == SPECTRAL:
        pairs = [(y_tables[p], r[p], layer) for r, layer in zip(rows, flats) for p in range(parts)]
        delta_rows = input_grad_delta(*zip(*pairs))
        dx = _input_grad_from(dy, operand, x_like, plan, delta_rows)
    else:
        delta = sum(_part_deltas(r, l) for r, l in zip(rows, layers))
        dx = _input_grad_from(dy, operand + plan.operand_from_matrix(delta).astype(operand.dtype), x_like, plan,
                              None)
    return dx, _operand_grad(x, operand, plan, dy), tuple(grads)


_fused_parts.defvjp(_fused_parts_fwd, _fused_parts_bwd, symbolic_zeros=True)


def adapted_parts_dot(x: jax.Array, operand: jax.Array, rows: Sequence[jax.Array], layers: Sequence[LayerSpec],
                      plan: DotPlan, path: str) -> jax.Array:
    """``adapted_dot`` for a kernel whose ``plan.part_axis`` slices are separate layers (``layers``: one per
    adapter, each the layer of one slice), with one spectrum row per slice in ``rows`` (``(parts, n)`` each)."""
    rows, layers = tuple(rows), tuple(layers)
    if path == "fused":
        part = layers[0]
        form = _input_grad(plan.tokens(jnp.shape(x)), part.out_features * rows[0].shape[0], part.in_features, False)
        return _fused_parts(x, operand, rows, layers, plan, form)
    y = plan.dot(x, operand)
    flat_x = plan.matrix_input(x)
    total = None
    for r, layer in zip(rows, layers):
        term = jnp.concatenate([spectral_delta(flat_x, r[p], layer.flat) for p in range(r.shape[0])], axis=-1)
        total = term if total is None else total + term
    return y + plan.output_from_matrix(total, x.shape).astype(y.dtype)


def adapted_dot(
    x: jax.Array,
    operand: jax.Array,
    spectra: Sequence[jax.Array],
    layers: Sequence[LayerSpec],
    plan: DotPlan,
    path: str,
    *,
    sharding: Optional[Any] = None,
) -> jax.Array:
    """``dot_general(x, operand + ΔV)`` for the adapters ``layers`` (one kernel, several adapters).

    ``path`` is ``"fused"`` or ``"spectral"``; ``sharding`` (the stored kernel's ``NamedSharding``) builds
    ``ΔW`` shard-locally and reduces the spectrum gradient as ``n`` floats where it is a block sharding of the
    ``(in, out)`` matrix (``matrix_sharding``).

    Example:
        >>> import numpy as np, bridge
        >>> layer = LayerSpec(("q",), 6, 8, 5, 3.0, 777, kernel_dims=(2, 6, 4), in_axes=(1,))
        >>> x, w, c = jnp.ones((3, 6)), jnp.zeros((2, 6, 4)), jnp.arange(1.0, 6.0)
        >>> plan = DotPlan(1, (((1,), (1,)), ((), ())), None, None, KernelView.identity((2, 6, 4)), 2)
        >>> ref = np.ones((3, 6)) @ bridge.delta_weight(np.arange(1.0, 6.0), layer.torch_indices, 8, 6, 3.0).T
        >>> bool(np.allclose(adapted_dot(x, w, (c,), (layer,), plan, "spectral").reshape(3, 8), ref, atol=1e-4))
        True
    """
    spectra, layers = tuple(spectra), tuple(layers)
    for spectrum, layer in zip(spectra, layers):
        layer.check_spectrum(jnp.shape(spectrum))
    if path == "fused":
        form = _input_grad(plan.tokens(jnp.shape(x)), layers[0].out_features, layers[0].in_features,
                           sharding is not None)
        return _fused(x, operand, spectra, layers, plan, matrix_sharding(layers[0], sharding), form)
    y = plan.dot(x, operand)
    flat_x = plan.matrix_input(x)
    total = None
    for spectrum, layer in zip(spectra, layers):
        term = spectral_delta(flat_x, spectrum, layer.flat)
        total = term if total is None else total + term
    return y + plan.output_from_matrix(total, x.shape).astype(y.dtype)
