"""N-D (DenseGeneral / Einsum) kernels on a device mesh: tensor- and fully-sharded steps equal one device, and the
adapter adds no kernel-sized collective to the frozen model's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import fourierft_jax
from mesh_models import collectives, make_mesh

D, N, H = 32, 4, 8
KERNEL = D * N * H


class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((N, H), name="query")(x)
        k = nn.Einsum((D, N, H), "btd,dnh->btnh", name="key")(x)
        w = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H), axis=-1)
        return x + nn.DenseGeneral(D, axis=(-2, -1), name="out")(jnp.einsum("bnts,bsnh->btnh", w, k))


def _setup():
    model = Attention()
    x = jax.random.normal(jax.random.key(0), (8, 4, D))
    params = model.init(jax.random.key(1), x)
    config = fourierft_jax.FourierFTConfig(n_frequency=20, scaling=25.0, target_modules=["query", "key", "out"])
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(2), trace=lambda p: model.apply(p, x))
    return model, params, adapter, x


def _shardings(params, mesh, spec):
    axis = "model" if "model" in mesh.axis_names else "data"

    def place(path, leaf):
        names = [str(getattr(k, "key", k)) for k in path]
        layer, kind = names[-2], names[-1]
        if kind != "kernel":
            return NamedSharding(mesh, P())
        if spec == "fsdp":  # the model-width axis of every kernel (the only one 8 divides)
            return NamedSharding(mesh, P(*["data" if d == D else None for d in leaf.shape]))
        # TP: heads split (query/key column-parallel on N, out row-parallel on N)
        return NamedSharding(mesh, P(None, axis) if layer in ("query", "key") else P(axis))

    return jax.tree_util.tree_map_with_path(place, params)


def _loss_and_grads(model, params, adapter, x, mode, shardings=None, mesh=None):
    forward = adapter.make_apply(model.apply, mode=mode, shardings=shardings)
    fn = jax.value_and_grad(lambda t, p, x: jnp.sum(forward(t, p, x) ** 2))
    if mesh is None:
        return jax.jit(fn)(adapter.trainable, params, x), None
    rep = NamedSharding(mesh, P())
    batch = NamedSharding(mesh, P("data"))
    jitted = jax.jit(fn, in_shardings=(jax.tree.map(lambda _: rep, adapter.trainable), shardings, batch))
    placed = jax.device_put(params, shardings)
    hlo = jitted.lower(adapter.trainable, placed, jax.device_put(x, batch)).compile().as_text()
    return jitted(adapter.trainable, placed, jax.device_put(x, batch)), hlo


@pytest.mark.parametrize("mesh_name,spec", [("8", "fsdp"), ("2x4", "tp"), ("4x2", "fsdp"), ("4x2", "tp")])
@pytest.mark.parametrize("mode", ["auto", "spectral"])
def test_sharded_nd_step_equals_one_device(mesh_name, spec, mode):
    model, params, adapter, x = _setup()
    (want_loss, want_grads), _ = _loss_and_grads(model, params, adapter, x, mode)
    mesh = make_mesh(mesh_name)
    shardings = _shardings(params, mesh, spec)
    (loss, grads), hlo = _loss_and_grads(model, params, adapter, x, mode, shardings, mesh)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("mesh_name", ["2x4", "4x2"])
def test_tensor_parallel_nd_adapter_adds_only_spectrum_sized_collectives(mesh_name):
    model, params, adapter, x = _setup()
    mesh = make_mesh(mesh_name)
    shardings = _shardings(params, mesh, "tp")
    _, hlo = _loss_and_grads(model, params, adapter, x, "auto", shardings, mesh)
    # The frozen model's step (activation gradients only) on the same placement.
    batch = NamedSharding(mesh, P("data"))
    floor = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(model.apply(p, x) ** 2), argnums=1),
                    in_shardings=(shardings, batch))
    floor_hlo = floor.lower(jax.device_put(params, shardings), jax.device_put(x, batch)).compile().as_text()
    extra = sorted(collectives(hlo))
    for entry in collectives(floor_hlo):
        if entry in extra:
            extra.remove(entry)
    assert all(size <= 20 for _, size in extra), extra  # n_frequency floats per adapted layer, nothing more
    assert any(size == 20 for _, size in extra)  # the spectrum gradients are reduced
