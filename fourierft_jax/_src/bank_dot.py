"""The per-example spectral contraction of an adapter bank: every example of a batch with its own coefficients.

A bank holds many adapters of one layer geometry as a ``(capacity, n)`` table (``bank.py``). For a batch whose
example ``b`` uses slot ``index[b]`` the adapted contraction is ``dot(x, W)`` plus, per example, the spectral
forward of ``spectral.py`` with that example's coefficient row::

    (x_b ΔW_bᵀ)[p] = scaling/in · irfft(Z_b)[p],   Z_b[bins_t] += ½ · c_b[source_t] · X̂_b[gather_t]  (conj. where
                                                                                           term_conj_t)

with bridge's ``ForwardPlan`` (``term_gather``/``term_conj``/``bins``/``bin_source``): the input's half spectrum
``X̂ = rfft(x)`` is gathered once per token at the plan's terms, multiplied by the example's row gathered from the
table, scattered into the output half bins and inverted with one ``irfft``. The work is
``O(tokens · (in log in + terms + out log out))`` whatever the number of distinct adapters; no per-example
``ΔW`` is ever built. Several banks on one kernel (different ``n``/seed/scaling) share the ``rfft`` and the
``irfft``: each adds its own terms into the same half spectrum.

Which example a token belongs to is read from the contraction's leading free input axis (the batch axis of
``Dense``/``DenseGeneral``/``Einsum`` inputs); its size must be the number of indices.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bridge._src.plans import layer_plans

from .adapted_dot import DotPlan
from .layer import LayerSpec


def slot_rows(table: jax.Array, local: jax.Array, invalid: jax.Array, stack_row: Optional[jax.Array] = None
              ) -> jax.Array:
    """``(batch, n)`` float32: row ``local[b]`` of a bank table (``(capacity, n)``, or ``(capacity, rows, n)``
    with the stack row ``stack_row``, ``-1`` for a layer the bank does not adapt), zero where ``local[b]`` is
    outside the table (another bank's slot, or ``-1`` for the base model) and NaN where ``invalid[b]``.

    Example:
        >>> table = jnp.arange(6.0).reshape(3, 2)
        >>> slot_rows(table, jnp.array([2, -1, 0]), jnp.array([False, False, True])).tolist()
        [[4.0, 5.0], [0.0, 0.0], [nan, nan]]
    """
    capacity = table.shape[0]
    inside = (local >= 0) & (local < capacity)
    rows = table[jnp.clip(local, 0, capacity - 1)]
    if stack_row is not None:
        inside = inside & (stack_row >= 0)
        rows = rows[:, jnp.maximum(stack_row, 0)]
    rows = jnp.where(inside[:, None], rows.astype(jnp.float32), 0.0)
    return jnp.where(invalid[:, None], jnp.nan, rows)


def bank_delta(x: jax.Array, coefficients: Sequence[jax.Array], layers: Sequence[LayerSpec]) -> jax.Array:
    """``x_b ΔW_bᵀ`` per example: ``x`` ``(batch, tokens, in)``, ``coefficients`` one ``(batch, n)`` row table
    per layer (all layers of one ``(in, out)`` kernel); float32 ``(batch, tokens, out)``.

    Example:
        >>> import bridge
        >>> layer = LayerSpec(("q",), in_features=6, out_features=4, n_frequency=5, scaling=3.0, seed=777)
        >>> c = np.stack([np.arange(1.0, 6.0), -np.ones(5)])                # two examples, two adapters
        >>> x = np.linspace(-1, 1, 24).reshape(2, 2, 6)
        >>> ref = np.stack([x[b] @ bridge.delta_weight(c[b], layer.torch_indices, 4, 6, 3.0).T for b in range(2)])
        >>> y = bank_delta(jnp.asarray(x, jnp.float32), [jnp.asarray(c, jnp.float32)], [layer])
        >>> bool(np.allclose(y, ref, atol=1e-5))
        True
    """
    first = layers[0]
    n_in, n_out = first.in_features, first.out_features
    x_hat = jnp.fft.rfft(x.astype(jnp.float32), axis=-1)
    half = jnp.zeros(x.shape[:-1] + (n_out // 2 + 1,), jnp.complex64)
    for rows, layer in zip(coefficients, layers):
        plan = layer_plans(layer.out_features, layer.in_features, layer.n_frequency, layer.seed, "flax").forward
        # Per example and term: ½ · scaling/in · c[source] (the real factor), then the token's picked bin.
        weight = rows[:, plan.bin_source] * np.float32(0.5 * layer.scaling / layer.in_features)
        picked = x_hat[..., plan.term_gather]
        values = jax.lax.complex(picked.real * weight[:, None, :],
                                 picked.imag * (weight * plan.term_sign.astype(np.float32))[:, None, :])
        half = half.at[..., plan.bins].add(values)
    return jnp.fft.irfft(half, n=n_out, axis=-1)


def examples_of(x: jax.Array, plan: DotPlan, batch: int, layer_name: str) -> int:
    """The size of the contraction's leading free input axis, required to be ``batch`` (the number of indices)."""
    if not plan.x_free:
        raise ValueError(f"fourierft_jax: layer {layer_name!r}: its input has no free axis to take the examples "
                         f"from (input shape {tuple(jnp.shape(x))})")
    size = int(jnp.shape(x)[plan.x_free[0]])
    if size != batch:
        raise ValueError(
            f"fourierft_jax: layer {layer_name!r}: the leading free axis of its input (axis {plan.x_free[0]} of "
            f"shape {tuple(jnp.shape(x))}) has size {size}, but adapter_index has {batch} entries; a bank forward "
            "takes the examples from that axis (do not fold the batch into other axes before an adapted layer)")
    return size


def bank_dot(x: jax.Array, operand: jax.Array, plan: DotPlan, coefficients: Sequence[Sequence[jax.Array]],
             layers: Sequence[LayerSpec]) -> jax.Array:
    """``dot_general(x, operand)`` plus each example's adapter output (``bank_delta``).

    ``coefficients[i]`` holds, for layer ``layers[i]``, one ``(batch, n)`` table per part of the kernel: one for a
    plain kernel, one per slice of ``plan.part_axis`` for a split kernel (the parts side by side in ``out``).

    Example:
        >>> import bridge
        >>> from fourierft_jax._src.kernel_view import KernelView
        >>> layer = LayerSpec(("q",), 6, 4, 5, 3.0, 777)
        >>> plan = DotPlan(1, (((2,), (0,)), ((), ())), None, None, KernelView.identity((6, 4)), 3)
        >>> x, c = jnp.ones((2, 3, 6)), jnp.stack([jnp.arange(1.0, 6.0), jnp.zeros(5)])
        >>> y = bank_dot(x, jnp.zeros((6, 4)), plan, [[c]], [layer])
        >>> ref = np.ones((3, 6)) @ bridge.delta_weight(np.arange(1.0, 6.0), layer.torch_indices, 4, 6, 3.0).T
        >>> bool(np.allclose(y[0], ref, atol=1e-4)), bool((y[1] == 0).all())
        (True, True)
    """
    y = plan.dot(x, operand)
    batch = int(coefficients[0][0].shape[0])
    examples_of(x, plan, batch, layers[0].name)
    flat = plan.matrix_input(x)
    flat = flat.reshape(batch, flat.shape[0] // batch, flat.shape[-1])
    parts = len(coefficients[0])
    deltas = [bank_delta(flat, [c[p] for c in coefficients], layers) for p in range(parts)]
    delta = deltas[0] if parts == 1 else jnp.concatenate(deltas, axis=-1)
    return y + plan.output_from_matrix(delta.reshape(-1, delta.shape[-1]), jnp.shape(x)).astype(y.dtype)


def check_index(index: Any, total: int, what: str) -> jax.Array:
    """``index`` as an int32 ``(batch,)`` array; when it is concrete (not traced), every entry must be ``-1`` or a
    slot below ``total`` (``ValueError`` naming the entries at fault and ``what``, the capacity)."""
    if isinstance(index, jax.core.Tracer):
        if index.ndim != 1 or not jnp.issubdtype(index.dtype, jnp.integer):
            raise TypeError(f"fourierft_jax: adapter_index must be a 1-D integer array, got {index.dtype}{index.shape}")
        return index.astype(jnp.int32)
    values = np.asarray(index)
    if values.ndim != 1 or not (np.issubdtype(values.dtype, np.integer) or values.size == 0):
        raise TypeError(f"fourierft_jax: adapter_index must be a 1-D integer array (one slot per example, -1 for "
                        f"the base model), got {values.dtype}{values.shape}")
    bad = np.flatnonzero((values < -1) | (values >= total))
    if bad.size:
        shown = ", ".join(f"[{i}] = {values[i]}" for i in bad[:5])
        raise ValueError(f"fourierft_jax: adapter_index out of range at {shown}{' ...' if bad.size > 5 else ''}: "
                         f"slots are 0 .. {total - 1} ({what}), -1 runs the base model")
    return jnp.asarray(values, jnp.int32)
