"""A jitted FourierFT train step on 8 CPU devices (DP / FSDP / TP on three meshes) equals the one-device step,
compiles once for several optax steps, and adds no kernel-sized collective to the model's own."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from mesh_models import HIDDEN, MESHES, SPECS, batch_sharding, collectives, make_mesh, param_shardings, setup


def loss_fn(forward, trainable, params, x, target):
    return jnp.mean((forward(trainable, params, x) - target) ** 2)


def both_modes(forward_of, trainable, params, x, target):
    """(loss, gradient) of the "merge" and the default "auto" forward, in one program (one compilation)."""
    return {mode: jax.value_and_grad(functools.partial(loss_fn, forward_of(mode)))(trainable, params, x, target)
            for mode in ("merge", "auto")}


@functools.lru_cache(maxsize=None)
def single_device(mode):
    model, params, adapter, x, target = setup()
    if mode == "both":
        return jax.jit(functools.partial(both_modes, lambda m: adapter.make_apply(model.apply, mode=m)))(
            adapter.trainable, params, x, target)
    forward = adapter.make_apply(model.apply, mode=mode)
    return jax.jit(jax.value_and_grad(functools.partial(loss_fn, forward)))(adapter.trainable, params, x, target)


def sharded_step(mesh_name, spec, mode):
    """The jitted step on the mesh and its (sharded) arguments; mode "both" runs merge and auto together."""
    model, params, adapter, x, target = setup()
    mesh = make_mesh(mesh_name)
    shardings = param_shardings(params, mesh, spec)
    forward_of = lambda m: adapter.make_apply(model.apply, mode=m, shardings=shardings)  # noqa: E731
    body = (functools.partial(both_modes, forward_of) if mode == "both"
            else jax.value_and_grad(functools.partial(loss_fn, forward_of(mode))))
    replicated = NamedSharding(mesh, P())
    step = jax.jit(body, in_shardings=(replicated, shardings, batch_sharding(mesh, spec), batch_sharding(mesh, spec)))
    return step, (adapter.trainable, jax.device_put(params, shardings), x, target)


def assert_close(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(np.abs(want).max(), 1e-3), err_msg=what)


def assert_same_step(got, want):
    (loss, grads), (want_loss, want_grads) = got, want
    assert_close(loss, want_loss, "loss")
    for name, grad in grads["default"]["spectra"].items():
        assert grad.sharding.is_fully_replicated, name
        assert_close(grad, want_grads["default"]["spectra"][name], f"gradient of {name}")


# dp replicates every kernel, so its ΔW takes the same replicated path on every mesh: one mesh is enough.
@pytest.mark.parametrize("mesh_name,spec", [(m, s) for m in MESHES for s in SPECS if s != "dp" or m == "8"])
def test_sharded_step_equals_single_device(mesh_name, spec):
    step, args = sharded_step(mesh_name, spec, "both")
    got, want = step(*args), single_device("both")
    for mode in ("merge", "auto"):
        assert_same_step(got[mode], want[mode])


@pytest.mark.parametrize("mesh_name,spec,mode", [("2x4", "tp", "fused"), ("2x4", "fsdp", "spectral")])
def test_sharded_fused_and_spectral_steps(mesh_name, spec, mode):
    step, args = sharded_step(mesh_name, spec, mode)
    assert_same_step(step(*args), single_device(mode))


@pytest.mark.parametrize("mesh_name,spec,mode", [("2x4", "tp", "auto"), ("8", "fsdp", "merge")])
def test_optax_steps_compile_once(mesh_name, spec, mode):
    model, params, adapter, x, target = setup()
    traces = []

    def make_update(shardings, out_shardings=None):
        forward = adapter.make_apply(model.apply, mode=mode, shardings=shardings)
        optimizer = optax.adam(1e-2)

        def update(trainable, opt_state, params, x, target):
            traces.append(1)  # runs once per trace, not per call
            loss, grads = jax.value_and_grad(functools.partial(loss_fn, forward))(trainable, params, x, target)
            updates, opt_state = optimizer.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state, loss

        return jax.jit(update, out_shardings=out_shardings), optimizer

    def run(update, optimizer, params, x, target, place=lambda tree: tree):
        trainable = place(adapter.trainable)
        opt_state, losses = place(optimizer.init(trainable)), []
        for _ in range(3):
            trainable, opt_state, loss = update(trainable, opt_state, params, x, target)
            losses.append(float(loss))
        return trainable, losses

    want, want_losses = run(*make_update(None), params, x, target)
    traces.clear()
    mesh = make_mesh(mesh_name)
    shardings = param_shardings(params, mesh, spec)
    # The state stays replicated on the mesh, so every step after the first hits the same executable.
    update, optimizer = make_update(shardings, NamedSharding(mesh, P()))
    got, losses = run(update, optimizer, jax.device_put(params, shardings), jax.device_put(x, batch_sharding(mesh, spec)),
                      jax.device_put(target, batch_sharding(mesh, spec)),
                      place=lambda tree: jax.device_put(tree, NamedSharding(mesh, P())))
    assert len(traces) == 1 and update._cache_size() == 1
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    for name, value in got["default"]["spectra"].items():
        assert_close(value, want["default"]["spectra"][name], name)


def _floor_collectives(mesh_name, spec, frozen):
    """The plain model's step: gradient of the biases and LayerNorms (frozen) or of every parameter."""
    model, params, _, x, target = setup()
    mesh = make_mesh(mesh_name)
    shardings = param_shardings(params, mesh, spec)

    def loss(small, params, x, target):
        if frozen:
            inner = {layer: dict(params["params"][layer], **small[layer]) for layer in params["params"]}
            params = {"params": inner}
        else:
            params = small
        return jnp.mean((model.apply(params, x) - target) ** 2)

    small = {layer: {k: v for k, v in leaves.items() if k != "kernel"} for layer, leaves in params["params"].items()}
    small_shardings = {layer: {k: shardings["params"][layer][k] for k in leaves} for layer, leaves in small.items()}
    first, first_sharding = (small, small_shardings) if frozen else (params, shardings)
    step = jax.jit(jax.value_and_grad(loss), in_shardings=(first_sharding, shardings, batch_sharding(mesh, spec),
                                                            batch_sharding(mesh, spec)))
    return collectives(step.lower(first, params, x, target).compile().as_text())


@pytest.mark.parametrize("mesh_name,spec,mode", [("2x4", "tp", "auto"), ("2x4", "fsdp", "auto"),
                                                 ("2x4", "tp", "merge")])
def test_no_kernel_sized_collective_beyond_the_floor(mesh_name, spec, mode):
    """Fused/auto against the frozen model; merge (autodiff forms and reduces xᵀdy) against full fine-tuning."""
    step, args = sharded_step(mesh_name, spec, mode)
    ours = collectives(step.lower(*args).compile().as_text())
    floor = _floor_collectives(mesh_name, spec, frozen=mode != "merge")
    _, params, adapter, x, _ = setup()
    kernel = min(params["params"][name]["kernel"].size for name in adapter.layers())
    spectra = sum(int(np.prod(v.shape)) for v in adapter.trainable["default"]["spectra"].values())
    # "Kernel-sized": over half the smallest adapted kernel (a half spectrum is that), which no activation is.
    threshold = kernel // 2
    assert x.size // x.shape[-1] * HIDDEN <= threshold

    big = lambda found: sorted((kind, size) for kind, size in found if size > threshold)  # noqa: E731
    extra = list(big(ours))
    for item in big(floor):
        if item in extra:
            extra.remove(item)
    assert not extra, f"kernel-sized collectives beyond the floor: {extra}\nours {ours}\nfloor {floor}"
    # Whatever else is reduced is the spectrum gradient: n floats per layer (plus scalars).
    volume = lambda found: sum(size for _, size in found)  # noqa: E731
    assert volume(ours) <= volume(floor) + 2 * spectra + 16, (ours, floor)
