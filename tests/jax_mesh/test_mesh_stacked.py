"""A scanned (stacked) model on a device mesh: sharded stacked kernels give the one-device loss and gradients."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
import re

from mesh_models import COLUMN, ROW, batch_sharding, make_mesh

import fourierft_jax

# Feature sizes that no batch/sequence size shares (tokens: 8 x 3), so kernel-shaped collectives are recognisable.
D, H, LAYERS, SEQ = 40, 72, 3, 3
D_DIMS = {D, D // 2, D // 4, D // 2 + 1, D // 4 + 1}
H_DIMS = {H, H // 2, H // 4, H // 2 + 1, H // 4 + 1}
_COLLECTIVE = re.compile(r"= (\([^)]*\)|\S+) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                         r"(?:-start)?\(")


def kernel_shaped(hlo_text):
    """Collectives moving an array with both a D-sized and an H-sized axis (a kernel, its gradient or spectrum)."""
    found = []
    for shapes, kind in _COLLECTIVE.findall(hlo_text):
        for dtype, dims in re.findall(r"([a-z]+\d*)\[([\d,]*)\]", shapes):
            sizes = {int(d) for d in dims.split(",") if d}
            if sizes & D_DIMS and sizes & H_DIMS:
                found.append((kind, dtype, dims))
    return sorted(found)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm(name="ln")(x)
        return x + nn.Dense(D, name="down")(nn.gelu(nn.Dense(H, name="up")(h))), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS)
        return scan(name="layers")(x, None)[0]


def stacked_shardings(params, mesh, spec):
    """The mesh tests' DP / FSDP / TP rules on the (in, out) axes of each stacked kernel; the layer axis is whole."""
    tp_axis = mesh.axis_names[-1]

    def place(path, leaf):
        names = [str(getattr(k, "key", k)) for k in path]
        layer, kind = names[-2], names[-1]
        if spec == "fsdp" and kind == "kernel":
            return NamedSharding(mesh, P(None, "data", None) if leaf.shape[1] >= leaf.shape[2] else P(None, None, "data"))
        if spec == "tp" and layer in COLUMN:
            return NamedSharding(mesh, P(None, None, tp_axis) if kind == "kernel" else P(None, tp_axis))
        if spec == "tp" and layer in ROW and kind == "kernel":
            return NamedSharding(mesh, P(None, tp_axis, None))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(place, params)


@functools.lru_cache(maxsize=None)
def setup():
    model = Stack()
    x = jax.random.normal(jax.random.key(0), (8, SEQ, D))
    params = model.init(jax.random.key(1), x)
    config = fourierft_jax.FourierFTConfig(n_frequency=16, target_modules=["up", "down"], scaling=30.0)
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(2), stacked="layers")
    return model, params, adapter, x


def step_fn(forward, trainable, params, x):
    return jax.value_and_grad(lambda t: jnp.mean(forward(t, params, x) ** 2))(trainable)


@pytest.mark.parametrize("mesh_name,spec,mode", [("2x4", "tp", "auto"), ("4x2", "fsdp", "auto"),
                                                 ("2x4", "tp", "merge"), ("8", "dp", "auto")])
def test_stacked_sharded_step_equals_single_device(mesh_name, spec, mode):
    model, params, adapter, x = setup()
    assert [layer.spectrum_shape for layer in adapter.specs["default"].layers] == [(LAYERS, 16)] * 2
    want_loss, want = jax.jit(functools.partial(step_fn, adapter.make_apply(model.apply, mode=mode)))(
        adapter.trainable, params, x)

    mesh = make_mesh(mesh_name)
    shardings = stacked_shardings(params, mesh, spec)
    forward = adapter.make_apply(model.apply, mode=mode, shardings=shardings)
    step = jax.jit(functools.partial(step_fn, forward),
                   in_shardings=(NamedSharding(mesh, P()), shardings, batch_sharding(mesh, spec)))
    args = (adapter.trainable, jax.device_put(params, shardings), x)
    loss, grads = step(*args)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for name, grad in grads["default"]["spectra"].items():
        expected = np.asarray(want["default"]["spectra"][name])
        np.testing.assert_allclose(grad, expected, rtol=0, atol=1e-5 * np.abs(expected).max(), err_msg=name)
    if mode == "auto":
        # Scanned layers too: no kernel-sized spectrum (complex) or gradient (reduction) ever moves; under TP no
        # kernel-shaped array moves at all (FSDP gathers its kernels for the matmul, FourierFT's W + ΔW included).
        ours = kernel_shaped(step.lower(*args).compile().as_text())
        assert not [c for c in ours if c[1].startswith("c") or c[0] in ("all-reduce", "reduce-scatter")], ours
        if spec == "tp":
            assert not ours, ours
