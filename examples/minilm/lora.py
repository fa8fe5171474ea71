"""A minimal LoRA for linen parameter trees: the baseline the example compares FourierFT against.

``W' = W + (alpha / r) · A B`` on the Dense kernels ``(in, out)`` whose dotted path ends with a target name;
``A`` is ``(in, r)`` with a Kaiming-uniform-like init, ``B`` is ``(r, out)`` of zeros (LoRA's init).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def _kernels(tree: Any, prefix: tuple[str, ...] = ()):
    for key, value in tree.items():
        if isinstance(value, dict):
            if "kernel" in value and getattr(value["kernel"], "ndim", 0) == 2:
                yield prefix + (key,), value["kernel"]
            yield from _kernels(value, prefix + (key,))


def init_lora(params: Any, targets: tuple[str, ...], rank: int, key: jax.Array) -> dict[str, dict[str, jax.Array]]:
    """``{dotted path: {"A", "B"}}`` for every targeted kernel."""
    found = [(path, kernel) for path, kernel in _kernels(params) if path[-1] in targets]
    if not found:
        raise ValueError(f"LoRA: no Dense kernel named {targets} in the parameter tree")
    state = {}
    for path, kernel in found:
        key, sub = jax.random.split(key)
        fan_in, fan_out = kernel.shape
        bound = 1.0 / jnp.sqrt(fan_in)
        state[".".join(path)] = {
            "A": jax.random.uniform(sub, (fan_in, rank), jnp.float32, -bound, bound),
            "B": jnp.zeros((rank, fan_out), jnp.float32),
        }
    return state


def merge_lora(params: Any, lora: dict[str, dict[str, jax.Array]], alpha: float, rank: int) -> Any:
    """A copy of ``params`` with every LoRA-adapted kernel replaced by ``W + (alpha / r) A B``."""
    params = jax.tree.map(lambda x: x, params)  # shallow structural copy; leaves are shared
    for path, factors in lora.items():
        node = params
        parts = path.split(".")
        for part in parts[:-1]:
            node = node[part]
        leaf = dict(node[parts[-1]])
        leaf["kernel"] = leaf["kernel"] + (alpha / rank) * factors["A"] @ factors["B"]
        node[parts[-1]] = leaf
    return params
