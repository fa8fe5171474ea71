"""Sharded checkpoints restore onto another mesh: an adapter saved from an (8,) mesh (a classifier head sharded along
its out axis) loads replicated on (2, 4) or on one device with the same values; a training checkpoint saved on
(4, 2) restores onto (2, 4) with the requested shardings, and training continues as the uninterrupted run."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import fourierft_jax

D_IN, D, C, BATCH = 12, 16, 8, 16


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(D, name="embed")(x))
        h = h + nn.Dense(D, name="fc2")(jnp.tanh(nn.Dense(D, name="fc1")(h)))
        return nn.Dense(C, name="classifier")(h)


def _mesh(shape):
    names = ("data",) if len(shape) == 1 else ("data", "model")
    return Mesh(np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape), names)


def _place(tree, mesh):
    """Replicated, except the classifier head (and its optimizer moments) sharded along the out axis."""
    out_axis = mesh.axis_names[-1]

    def sharding(path, leaf):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if "classifier" in names and np.ndim(leaf) >= 1 and np.shape(leaf)[-1] % mesh.shape[out_axis] == 0:
            return NamedSharding(mesh, P(*([None] * (np.ndim(leaf) - 1)), out_axis))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(lambda p, a: jax.device_put(a, sharding(p, a)), tree)


def _setup():
    x = jax.random.normal(jax.random.key(0), (BATCH, D_IN))
    y = jax.random.normal(jax.random.key(1), (BATCH, C))
    params = Net().init(jax.random.key(2), x)
    config = fourierft_jax.FourierFTConfig(n_frequency=40, scaling=30.0, target_modules=["fc1", "fc2"],
                                           modules_to_save=["classifier"], bias="fourier_only")
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(3))
    forward = adapter.make_apply(Net().apply, mode="merge")
    optimizer = optax.adamw(optax.linear_schedule(1e-2, 1e-3, 10))

    @jax.jit
    def step(trainable, opt_state, params, x, y):
        loss, grads = jax.value_and_grad(lambda t: jnp.mean((forward(t, params, x) - y) ** 2))(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return adapter, params, optimizer, step, x, y


def _on(mesh, params, x, y):
    batch = NamedSharding(mesh, P("data"))
    return jax.device_put(params, NamedSharding(mesh, P())), jax.device_put(x, batch), jax.device_put(y, batch)


def _bits_equal(got, want):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        a, b = np.atleast_1d(np.asarray(a)), np.atleast_1d(np.asarray(b))
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def test_adapter_saved_on_one_mesh_restores_on_another(tmp_path):
    adapter, params, optimizer, step, x, y = _setup()
    mesh8 = _mesh((8,))
    p8, x8, y8 = _on(mesh8, params, x, y)
    trainable = _place(adapter.trainable, mesh8)
    opt_state = _place(optimizer.init(trainable), mesh8)
    for _ in range(2):
        trainable, opt_state, _ = step(trainable, opt_state, p8, x8, y8)
    head = trainable["default"]["modules_to_save"]["classifier"]["kernel"]
    assert head.sharding.spec == P(None, "data") and len(head.sharding.device_set) == 8
    adapter.set_trainable(trainable)
    folder = fourierft_jax.save_adapter(tmp_path / "adapter", adapter)

    mesh24 = _mesh((2, 4))
    replicated = NamedSharding(mesh24, P())
    saved = fourierft_jax.load_adapter(folder, sharding=replicated)
    for leaf in jax.tree.leaves(saved.state):
        assert leaf.sharding.is_equivalent_to(replicated, leaf.ndim) and leaf.sharding.mesh.shape == mesh24.shape
    _bits_equal(saved.state, trainable["default"])

    single = fourierft_jax.load_adapter(folder)  # default: the default device
    for leaf in jax.tree.leaves(single.state):
        assert leaf.sharding.device_set == {jax.devices()[0]}
    _bits_equal(single.state, trainable["default"])

    # The restored adapter runs on the new mesh with the same outputs.
    p24, x24, _ = _on(mesh24, params, x, y)
    attached = saved.attach(p24)
    forward = attached.make_apply(Net().apply, mode="merge")
    want = adapter.make_apply(Net().apply, mode="merge")(adapter.trainable, p8, x8)
    np.testing.assert_allclose(np.asarray(jax.jit(forward)(attached.trainable, p24, x24)), np.asarray(want),
                               rtol=1e-5, atol=1e-5)


def test_training_checkpoint_moves_from_mesh_4x2_to_2x4(tmp_path):
    adapter, params, optimizer, step, x, y = _setup()
    mesh42, mesh24 = _mesh((4, 2)), _mesh((2, 4))
    p42, x42, y42 = _on(mesh42, params, x, y)
    t = _place(adapter.trainable, mesh42)
    o = _place(optimizer.init(t), mesh42)
    uninterrupted = []
    with fourierft_jax.TrainingCheckpoints(tmp_path / "run") as checkpoints:
        for i in range(6):
            t, o, loss = step(t, o, p42, x42, y42)
            uninterrupted.append(float(loss))
            if i == 2:
                checkpoints.save(i, {"trainable": t, "opt_state": o})
                saved_state = jax.tree.map(np.asarray, {"trainable": t, "opt_state": o})

    # A new run on a (2, 4) mesh: `like` is its fresh state laid out there.
    fresh, params2, optimizer2, step2, x, y = _setup()
    p24, x24, y24 = _on(mesh24, params2, x, y)
    t0 = _place(fresh.trainable, mesh24)
    like = {"trainable": t0, "opt_state": _place(optimizer2.init(t0), mesh24)}
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), like)
    for target in (like, abstract):
        with fourierft_jax.TrainingCheckpoints(tmp_path / "run") as checkpoints:
            state = checkpoints.restore(target)
        for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(like)):
            assert got.sharding == want.sharding
        _bits_equal(state, saved_state)
    assert state["trainable"]["default"]["modules_to_save"]["classifier"]["kernel"].sharding.spec == P(None, "model")

    t, o = state["trainable"], state["opt_state"]
    resumed = []
    for _ in range(3):
        t, o, loss = step2(t, o, p24, x24, y24)
        resumed.append(float(loss))
    # Exactly what the same (2, 4) run gives from the in-memory state, and the (4, 2) run's losses up to the
    # order of the cross-device sums.
    t, o = _place(saved_state["trainable"], mesh24), _place(saved_state["opt_state"], mesh24)
    direct = []
    for _ in range(3):
        t, o, loss = step2(t, o, p24, x24, y24)
        direct.append(float(loss))
    assert resumed == direct
    np.testing.assert_allclose(resumed, uninterrupted[3:], rtol=1e-5, atol=1e-6)
