"""Training checkpoints (Orbax CheckpointManager): exact resume, keep-last-N, keep-best, and saves killed part-way
(SIGKILL in a child process) that leave the previous checkpoint restorable."""

import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fourierft_jax
from convert_models import Net, inputs, init

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _setup():
    params = init(Net())
    config = fourierft_jax.FourierFTConfig(n_frequency=16, scaling=50.0, target_modules=["query", "value"],
                                           modules_to_save=["classifier"])
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(0))
    forward = adapter.make_apply(Net().apply)
    optimizer = optax.adamw(optax.linear_schedule(1e-2, 1e-3, 8))  # the schedule's count lives in opt_state
    data = jnp.asarray(inputs(32, seed=4))
    targets = jnp.asarray(np.random.default_rng(1).standard_normal((32, 3)).astype(np.float32))

    @jax.jit
    def step(trainable, opt_state, index):
        x, y = jax.lax.dynamic_slice_in_dim(data, index * 8, 8), jax.lax.dynamic_slice_in_dim(targets, index * 8, 8)
        loss, grads = jax.value_and_grad(lambda t: jnp.mean((forward(t, params, x) - y) ** 2))(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return adapter.trainable, optimizer.init(adapter.trainable), step


def test_resume_reproduces_the_uninterrupted_losses(tmp_path):
    trainable, opt_state, step = _setup()
    uninterrupted = []
    t, o = trainable, opt_state
    for i in range(8):
        t, o, loss = step(t, o, i % 4)
        uninterrupted.append(float(loss))

    t, o = trainable, opt_state
    resumed = []
    with fourierft_jax.TrainingCheckpoints(tmp_path / "run", max_to_keep=2) as checkpoints:
        for i in range(5):
            t, o, loss = step(t, o, i % 4)
            resumed.append(float(loss))
            checkpoints.save(i, {"trainable": t, "opt_state": o, "step": jnp.asarray(i)})
    del t, o  # "crash"; a new process would start from fresh initial values:
    fresh_t, fresh_o, step = _setup()
    with fourierft_jax.TrainingCheckpoints(tmp_path / "run", max_to_keep=2) as checkpoints:
        assert checkpoints.all_steps() == [3, 4]  # the last two are kept
        # Resume from step 3 (after four updates), as if step 4 had never been saved.
        state = checkpoints.restore({"trainable": fresh_t, "opt_state": fresh_o, "step": jnp.asarray(0)}, step=3)
    t, o = state["trainable"], state["opt_state"]
    assert int(state["step"]) == 3
    resumed = resumed[:4]
    for i in range(4, 8):
        t, o, loss = step(t, o, i % 4)
        resumed.append(float(loss))
    assert resumed == uninterrupted  # exactly, not approximately


def test_keep_last_n_and_keep_best(tmp_path):
    state = {"w": jnp.zeros(3)}
    with fourierft_jax.TrainingCheckpoints(tmp_path / "last", max_to_keep=3) as checkpoints:
        for i in range(6):
            checkpoints.save(i, {"w": jnp.full(3, float(i))})
        assert checkpoints.all_steps() == [3, 4, 5] and checkpoints.latest_step() == 5
        assert checkpoints.restore(state)["w"].tolist() == [5.0] * 3
        assert checkpoints.restore(state, step=3)["w"].tolist() == [3.0] * 3
    losses = {0: 0.9, 1: 0.4, 2: 0.7, 3: 0.2, 4: 0.8, 5: 0.6}
    with fourierft_jax.TrainingCheckpoints(tmp_path / "best", max_to_keep=2, best_metric="loss") as checkpoints:
        for i, loss in losses.items():
            checkpoints.save(i, {"w": jnp.full(3, float(i))}, metrics={"loss": loss})
        assert checkpoints.all_steps() == [1, 3]
        assert checkpoints.best_step() == 3
        with pytest.raises(ValueError, match="pass metrics"):
            checkpoints.save(6, {"w": jnp.zeros(3)})
    with fourierft_jax.TrainingCheckpoints(tmp_path / "max", max_to_keep=1, best_metric="acc", best_mode="max") as c:
        for i, acc in enumerate([0.1, 0.9, 0.5]):
            c.save(i, {"w": jnp.full(3, float(i))}, metrics={"acc": acc})
        assert c.all_steps() == [1]
    from bridge._src.folders import CheckpointError

    with fourierft_jax.TrainingCheckpoints(tmp_path / "empty") as checkpoints:
        with pytest.raises(CheckpointError, match="holds no training checkpoint"):
            checkpoints.restore(state)


_CHILD_MANAGER = """
import sys, time, jax.numpy as jnp
import orbax.checkpoint._src.path.atomicity as atomicity
import fourierft_jax

checkpoints = fourierft_jax.TrainingCheckpoints(sys.argv[1], max_to_keep=3)
checkpoints.save(1, {"w": jnp.full(1000, 1.0)})
checkpoints.wait()

async def stuck(self, *args, **kwargs):  # step 2's data is written; block before it is committed
    print("READY", flush=True)
    time.sleep(600)

atomicity.AtomicRenameTemporaryPath.finalize = stuck
checkpoints.save(2, {"w": jnp.full(1000, 2.0)})
"""

_CHILD_ADAPTER = """
import sys, time, jax, numpy as np
import fourierft_jax
from fourierft_jax._src import checkpoint

params = {"q": {"kernel": np.zeros((8, 4), np.float32)}}
config = fourierft_jax.FourierFTConfig(n_frequency=3, target_modules=["q"])
adapter = fourierft_jax.apply(params, config, key=jax.random.key(int(sys.argv[2])))

def stuck(temporary, target):  # the new checkpoint is complete in its temporary folder; die before the rename
    print("READY", flush=True)
    time.sleep(600)

checkpoint.replace_directory = stuck
fourierft_jax.save_adapter(sys.argv[1], adapter, overwrite=True)
"""


def _run_and_kill(script, *args):
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.strip() == "READY", child.stderr.read()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
    assert child.returncode == -signal.SIGKILL


def test_killed_manager_save_leaves_previous_checkpoint(tmp_path):
    _run_and_kill(_CHILD_MANAGER, tmp_path / "run")
    leftovers = os.listdir(tmp_path / "run")
    assert any("tmp" in name for name in leftovers), leftovers  # it really died mid-save
    with fourierft_jax.TrainingCheckpoints(tmp_path / "run", max_to_keep=3) as checkpoints:
        assert checkpoints.all_steps() == [1]
        assert checkpoints.restore({"w": jnp.zeros(1000)})["w"].tolist() == [1.0] * 1000
        checkpoints.save(2, {"w": jnp.full(1000, 2.0)})  # and training can go on
        assert checkpoints.all_steps() == [1, 2]


def test_killed_adapter_save_leaves_previous_checkpoint(tmp_path):
    params = {"q": {"kernel": np.zeros((8, 4), np.float32)}}
    config = fourierft_jax.FourierFTConfig(n_frequency=3, target_modules=["q"])
    old = fourierft_jax.apply(params, config, key=jax.random.key(1))
    target = fourierft_jax.save_adapter(tmp_path / "adapter", old)
    _run_and_kill(_CHILD_ADAPTER, target, 2)
    restored = fourierft_jax.load_adapter(target).attach(params)
    np.testing.assert_array_equal(np.asarray(restored.trainable["default"]["spectra"]["q"]),
                                  np.asarray(old.trainable["default"]["spectra"]["q"]))
    # Killed while writing a first checkpoint: nothing appears under the name.
    _run_and_kill(_CHILD_ADAPTER, tmp_path / "fresh", 3)
    assert not os.path.exists(tmp_path / "fresh")


def test_async_saves_keep_the_last_steps_and_leave_no_set_aside_folder(tmp_path):
    # Dropped steps go through a hidden folder (Orbax's todelete_subdir); with async saves Orbax fills it from its
    # background thread, so it is emptied only once the saves are finished.
    values = {step: np.random.default_rng(step).standard_normal(5).astype(np.float32) for step in range(1, 5)}
    with fourierft_jax.TrainingCheckpoints(tmp_path / "run", max_to_keep=2, async_save=True) as checkpoints:
        for step, value in values.items():
            checkpoints.save(step, {"w": jnp.asarray(value)})
        checkpoints.wait()
        assert checkpoints.all_steps() == [3, 4]
        for step in (3, 4):
            restored = checkpoints.restore({"w": jnp.zeros(5)}, step)["w"]
            assert np.asarray(restored).tobytes() == values[step].tobytes()
        assert not [name for name in os.listdir(tmp_path / "run") if name.startswith(".")]
