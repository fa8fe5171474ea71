"""Tiny models shared by the fourierft_jax tests: a linen MLP, its NNX twin, and float64 numpy references."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import bridge

# Distinct sizes so that every kernel shape is unique (the jaxpr test looks for kernel-shaped values).
D_IN, D_HID, D_OUT, N_CLASSES = 12, 20, 16, 3


class Encoder(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(D_HID, name="fc1")(x))
        return jnp.tanh(nn.Dense(D_OUT, name="fc2")(h))


class MLP(nn.Module):
    """encoder.fc1 (12→20), encoder.fc2 (20→16), head (16→3), with biases."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(N_CLASSES, name="head")(Encoder(name="encoder")(x))


def init_mlp(seed: int = 0, dtype=jnp.float32):
    """Random MLP variables; fresh dicts each call over cached (immutable) arrays."""
    return jax.tree.map(lambda a: a, _init_mlp(seed, jnp.dtype(dtype)))


@functools.lru_cache(maxsize=None)
def _init_mlp(seed, dtype):
    @jax.jit
    def init():
        params = MLP().init(jax.random.key(seed), jnp.ones((1, D_IN)))
        # Non-zero biases so that bias handling is visible.
        params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(seed + 1), a.shape), params)
        return jax.tree.map(lambda a: a.astype(dtype), params)

    return init()


class NnxEncoder(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(D_IN, D_HID, rngs=rngs)
        self.fc2 = nnx.Linear(D_HID, D_OUT, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.fc2(jnp.tanh(self.fc1(x))))


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.encoder = NnxEncoder(rngs)
        self.head = nnx.Linear(D_OUT, N_CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.head(self.encoder(x))


def nnx_twin(params) -> NnxMLP:
    """An NNX MLP holding the same weights as the linen ``params``."""
    p = params["params"]
    # Abstract construction skips the eager random init (seconds of per-op compiles); every value is set below.
    model = nnx.eval_shape(lambda: NnxMLP(nnx.Rngs(0)))
    for linear, tree in (
        (model.encoder.fc1, p["encoder"]["fc1"]),
        (model.encoder.fc2, p["encoder"]["fc2"]),
        (model.head, p["head"]),
    ):
        linear.kernel.set_value(jnp.asarray(tree["kernel"]))
        linear.bias.set_value(jnp.asarray(tree["bias"]))
    return model


def numpy_mlp(params, x, deltas=None, biases=None):
    """The MLP in float64 numpy; ``deltas`` maps names to torch-layout ΔW (e.g. from ``bridge.delta_weight``)."""
    p = params["params"]
    deltas, biases = deltas or {}, biases or {}

    def dense(name, tree, h):
        kernel = np.asarray(tree["kernel"], np.float64)
        if name in deltas:
            kernel = kernel + deltas[name].T
        bias = np.asarray(biases.get(name, tree["bias"]), np.float64)
        return h @ kernel + bias

    h = np.tanh(dense("encoder.fc1", p["encoder"]["fc1"], np.asarray(x, np.float64)))
    h = np.tanh(dense("encoder.fc2", p["encoder"]["fc2"], h))
    return dense("head", p["head"], h)


def reference_deltas(adapter, name="default"):
    """Torch-layout float64 ΔW of every layer of one adapter, from ``bridge.delta_weight``."""
    out = {}
    for layer in adapter.specs[name].layers:
        spectrum = np.asarray(adapter.state[name]["spectra"][layer.name], np.float64)
        out[layer.name] = bridge.delta_weight(
            spectrum, layer.torch_indices, layer.out_features, layer.in_features, layer.scaling
        )
    return out


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
