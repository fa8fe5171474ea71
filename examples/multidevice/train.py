"""FourierFT training on a JAX device mesh: data parallel, FSDP-style or tensor-parallel kernels, one or many hosts.

A small linen MLP-block model with random frozen weights learns to imitate a "teacher": the same model with a
hidden FourierFT update at the same spectral positions, so the task is learnable and made in code (no download).
The frozen kernels are placed on a mesh built from ``jax.devices()`` with ``NamedSharding``; the spectra and the
optimizer state are replicated; each process feeds its own rows of the global batch. The step is jitted once
with in/out shardings and never recompiles. At the end the adapter is saved with ``fourierft_jax.save_adapter``.

On CPU the script asks XLA for 8 host devices unless ``XLA_FLAGS`` already sets a count::

    python examples/multidevice/train.py --mesh 2x4 --spec tp
    python examples/multidevice/train.py --mesh 8 --spec fsdp --steps 200

Several hosts: run the same command on every host with ``--multihost`` on a cluster ``jax.distributed`` detects
(SLURM, Open MPI, Cloud TPU), or with ``--coordinator HOST:PORT --num-processes N --process-id I`` (defaults:
``$JAX_COORDINATOR_ADDRESS``, ``$JAX_NUM_PROCESSES``, ``$JAX_PROCESS_ID``); the mesh then spans the devices of
all hosts::

    python examples/multidevice/train.py --mesh 2x4 --spec fsdp \
        --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0   # --process-id 1 on the other host

Specs (mesh axes ``("data",)`` or ``("data", "model")``):
  dp    kernels replicated, batch on "data"
  fsdp  kernels sharded on "data" along their larger axis, batch on "data"
  tp    Megatron: "up" kernels P(None, "model") (+ bias P("model")), "down" kernels P("model", None); batch on
        "data" (on a 1-D mesh "data" plays "model" and the batch is replicated)
"""

from __future__ import annotations

import os
import sys

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Only the CPU ("host") platform reads this; it must be set before jax initialises its backends.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import fourierft_jax  # noqa: E402
import fourierft_jax._src  # noqa: E402

TARGETS = ["up", "down"]


class Block(nn.Module):
    """``LayerNorm(h + down(gelu(up(h))))``: one column-parallel and one row-parallel kernel under TP."""

    hidden: int
    ffn: int

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        up = nn.Dense(self.ffn, name="up")(h)
        return nn.LayerNorm(name="norm")(h + nn.Dense(self.hidden, name="down")(nn.gelu(up)))


class Model(nn.Module):
    hidden: int = 64
    ffn: int = 256
    layers: int = 2
    outputs: int = 8

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.hidden, name="embed")(x)
        for i in range(self.layers):
            h = Block(self.hidden, self.ffn, name=f"block_{i}")(h)
        return nn.Dense(self.outputs, name="head")(h)


def make_mesh(text: str) -> jax.sharding.Mesh:
    """``"8"`` -> a ("data",) mesh, ``"2x4"`` -> a ("data", "model") mesh, over all devices of all processes."""
    shape = tuple(int(s) for s in text.lower().split("x"))
    if len(shape) not in (1, 2) or int(np.prod(shape)) != jax.device_count():
        raise SystemExit(f"--mesh {text}: needs 1 or 2 axes whose product is the {jax.device_count()} devices")
    names = ("data",) if len(shape) == 1 else ("data", "model")
    # Auto axes: the shardings are given on the parameters and jit's in/out shardings, XLA propagates the rest.
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def param_specs(params: Any, spec: str, mesh: jax.sharding.Mesh) -> Any:
    """A ``NamedSharding`` per leaf of ``params`` for ``spec`` (dp | fsdp | tp)."""
    data = mesh.shape["data"]
    model_axis = "model" if "model" in mesh.shape else "data"
    model = mesh.shape[model_axis]

    def one(path: tuple, leaf: Any) -> NamedSharding:
        keys = [str(getattr(k, "key", k)) for k in path]
        module, kind = keys[-2], keys[-1]
        pspec = P()
        if spec == "fsdp" and kind == "kernel":
            big = int(np.argmax(leaf.shape))
            if leaf.shape[big] % data == 0:
                pspec = P(*["data" if i == big else None for i in range(leaf.ndim)])
        elif spec == "tp" and module == "up" and leaf.shape[-1] % model == 0:
            pspec = P(None, model_axis) if kind == "kernel" else P(model_axis)
        elif spec == "tp" and module == "down" and kind == "kernel" and leaf.shape[0] % model == 0:
            pspec = P(model_axis, None)
        return NamedSharding(mesh, pspec)

    return jax.tree_util.tree_map_with_path(one, params)


def local_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> slice:
    """The rows of the global batch that this process's devices hold (contiguous for meshes from make_mesh)."""
    rows = [index[0] for index in sharding.addressable_devices_indices_map(global_shape).values()]
    starts = [r.start or 0 for r in rows]
    stops = [global_shape[0] if r.stop is None else r.stop for r in rows]
    return slice(min(starts), max(stops))


def global_batch(step: int, batch: int, features: int, seed: int) -> np.ndarray:
    # Every process can name the whole batch; each one only materialises its own rows (see local_rows).
    return np.random.default_rng((seed, step)).standard_normal((batch, features), dtype=np.float32)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mesh", default=None, help="8 or 2x4 (default: all devices on one 'data' axis)")
    parser.add_argument("--spec", choices=("dp", "fsdp", "tp"), default="dp")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64, help="global batch (rows)")
    parser.add_argument("--lr", type=float, default=5e-2)
    parser.add_argument("--n-frequency", type=int, default=200)
    parser.add_argument("--mode", default=fourierft_jax._src.DEFAULT_MODE, help="make_apply mode")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/multidevice_adapter", help="where save_adapter writes")
    parser.add_argument("--multihost", action="store_true", help="call jax.distributed.initialize() first")
    parser.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                        help="host:port of process 0 (default $JAX_COORDINATOR_ADDRESS; unset: cluster detection)")
    parser.add_argument("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"))
    parser.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"))
    args = parser.parse_args(argv)

    if args.multihost or args.coordinator or args.num_processes is not None:
        # Before any other jax call. Unset arguments are detected from the cluster (SLURM, Open MPI, Cloud TPU).
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    lead = jax.process_index() == 0
    mesh = make_mesh(args.mesh or str(jax.device_count()))
    say = print if lead else (lambda *a, **k: None)
    say(f"{jax.process_count()} process(es), {jax.device_count()} devices ({jax.devices()[0].platform}), "
        f"mesh {dict(mesh.shape)}, spec {args.spec}, mode {args.mode}")

    model, features = Model(), 32
    params = jax.jit(model.init)(jax.random.key(args.seed), jnp.zeros((1, features)))
    config = fourierft_jax.FourierFTConfig(n_frequency=args.n_frequency, scaling=150.0, target_modules=TARGETS)
    # The teacher: the frozen model plus a hidden FourierFT update; the student starts at zero spectra.
    secret = fourierft_jax.apply(params, config, key=jax.random.key(args.seed + 1))
    secret.set_trainable(jax.tree.map(lambda c: 0.5 * c, secret.trainable))
    teacher = jax.jit(secret.merge_and_unload)(params)
    adapter = fourierft_jax.apply(params, fourierft_jax.FourierFTConfig(
        n_frequency=args.n_frequency, scaling=150.0, target_modules=TARGETS, init_weights=True))

    param_sh = param_specs(params, args.spec, mesh)
    replicated = NamedSharding(mesh, P())
    data_sh = NamedSharding(mesh, P() if args.spec == "tp" and len(mesh.shape) == 1 else P("data"))
    tx = optax.adam(args.lr)
    params, teacher = jax.device_put(params, param_sh), jax.device_put(teacher, param_sh)
    trainable = jax.device_put(adapter.trainable, replicated)
    opt_state = jax.device_put(tx.init(trainable), replicated)
    state_sh = jax.tree.map(lambda _: replicated, (trainable, opt_state))
    # shardings=: each ΔW is built with its kernel's own sharding, the spectrum gradient reduced as n floats.
    forward = adapter.make_apply(model.apply, mode=args.mode, shardings=param_sh)

    def step(trainable, opt_state, params, teacher, x):
        target = model.apply(teacher, x)
        loss, grads = jax.value_and_grad(lambda t: jnp.mean((forward(t, params, x) - target) ** 2))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    step = jax.jit(step, in_shardings=(*state_sh, param_sh, param_sh, data_sh), out_shardings=(*state_sh, replicated))
    shape = (args.batch, features)
    rows = local_rows(data_sh, shape)
    start, first = time.perf_counter(), None
    for i in range(args.steps):
        local = global_batch(i, *shape, seed=args.seed)[rows]
        x = jax.make_array_from_process_local_data(data_sh, local, shape)
        trainable, opt_state, loss = step(trainable, opt_state, params, teacher, x)
        if i == 0:
            first = float(loss)
        if (i + 1) % args.log_every == 0 or i == 0:
            say(f"step {i + 1:5d}  loss {float(loss):.6f}")
    final = float(loss)
    say(f"final loss {final:.6f} (first {first:.6f}); {args.steps} steps in {time.perf_counter() - start:.1f} s; "
        f"compilations {step._cache_size()}")

    adapter.set_trainable(trainable)
    # Every process calls save_adapter (Orbax's rule for global arrays); the replicated spectra are written once.
    # load_adapter(folder, sharding=...) restores them onto any mesh, or by default onto one device.
    folder = fourierft_jax.save_adapter(args.out, adapter, overwrite=True)
    say(f"adapter saved to {folder} ({len(adapter.layers())} layers)")
    return final


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


if __name__ == "__main__":
    main()
