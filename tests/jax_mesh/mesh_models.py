"""A tiny attention + MLP linen model, the meshes and the DP / FSDP / TP parameter shardings of the mesh tests."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import fourierft_jax

FEATURES, HIDDEN = 64, 128
MESHES = {"8": ((8,), ("data",)), "4x2": ((4, 2), ("data", "model")), "2x4": ((2, 4), ("data", "model"))}
SPECS = ("dp", "fsdp", "tp")
TARGETS = ["query", "key", "up", "down"]
# Megatron roles: column-parallel layers split their outputs (and bias), row-parallel ones their inputs.
COLUMN, ROW = ("query", "key", "up"), ("down",)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="ln1")(x)
        q, k = nn.Dense(FEATURES, name="query")(h), nn.Dense(FEATURES, name="key")(h)
        attention = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k) / np.sqrt(FEATURES), axis=-1)
        x = x + jnp.einsum("bts,bsd->btd", attention, h)
        h = nn.LayerNorm(name="ln2")(x)
        x = x + nn.Dense(FEATURES, name="down")(nn.gelu(nn.Dense(HIDDEN, name="up")(h)))
        return nn.Dense(4, name="head")(x)


def make_mesh(name):
    shape, axes = MESHES[name]
    return Mesh(np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape), axes)


def setup(n_frequency=12):
    model = Block()
    x = jax.random.normal(jax.random.key(0), (8, 2, FEATURES))
    target = jax.random.normal(jax.random.key(1), (8, 2, 4))
    params = model.init(jax.random.key(2), x)
    config = fourierft_jax.FourierFTConfig(n_frequency=n_frequency, target_modules=TARGETS, scaling=30.0)
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(3))
    return model, params, adapter, x, target


def param_shardings(params, mesh, spec):
    """DP: replicated; FSDP: kernels split on "data" along their larger axis; TP: Megatron on the last axis."""
    tp_axis = mesh.axis_names[-1]

    def place(path, leaf):
        names = [str(getattr(k, "key", k)) for k in path]
        layer, kind = names[-2], names[-1]
        if spec == "fsdp" and kind == "kernel" and leaf.ndim == 2:
            return NamedSharding(mesh, P("data", None) if leaf.shape[0] >= leaf.shape[1] else P(None, "data"))
        if spec == "tp" and layer in COLUMN:
            return NamedSharding(mesh, P(None, tp_axis) if kind == "kernel" else P(tp_axis))
        if spec == "tp" and layer in ROW and kind == "kernel":
            return NamedSharding(mesh, P(tp_axis, None))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(place, params)


def batch_sharding(mesh, spec):
    # Pure tensor parallelism on the 1-D mesh keeps the batch whole; otherwise the batch is split on "data".
    if spec == "tp" and mesh.axis_names == ("data",):
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, P("data"))


_COLLECTIVE = re.compile(
    r"= (\([^)]*\)|\S+) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("
)
_ARRAY = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def collectives(hlo_text):
    """Every collective of a compiled HLO module: ``(kind, elements)`` per array it produces."""
    out = []
    for shapes, kind in _COLLECTIVE.findall(hlo_text):
        for dims in _ARRAY.findall(shapes):
            out.append((kind, int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))))
    return out
