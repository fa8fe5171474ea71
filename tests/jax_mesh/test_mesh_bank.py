"""Adapter banks on a device mesh: a mixed batch with the bank replicated or sharded by adapter (and the model
data- or tensor-parallel) gives the single-device outputs, and each row equals its adapter merged."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import fourierft_jax
from mesh_models import batch_sharding, make_mesh, param_shardings, setup

CAPACITY = 16


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def served():
    model, params, adapter, x, _ = setup()
    rng = np.random.default_rng(0)
    bank = fourierft_jax.AdapterBank.create(adapter, capacity=CAPACITY)
    states = {}
    for slot in (0, 5, 11, 15):
        states[slot] = {"spectra": {l.name: rng.standard_normal(l.spectrum_shape).astype(np.float32)
                                    for l in adapter.specs["default"].layers}, "bias": {}, "modules_to_save": {}}
        bank = bank.load(slot, states[slot])
    index = np.array([11, -1, 0, 15, 5, 11, -1, 0])
    serve = fourierft_jax.make_bank_apply(model.apply, bank)
    single = np.asarray(jax.jit(serve)(bank.spectra, params, index, x))
    return model, params, adapter, x, bank, states, index, serve, single


def test_single_device_rows_equal_merged(served):
    model, params, adapter, x, bank, states, index, _, single = served
    merged = jax.jit(fourierft_jax.make_apply(model.apply, adapter.static, mode="merge"))
    for b, slot in enumerate(index):
        row = x[b : b + 1]
        want = model.apply(params, row) if slot == -1 else merged({"default": states[slot]}, params, row)
        assert _rel(single[b], want[0]) <= 1e-5, b


@pytest.mark.parametrize("mesh_name, spec, bank_spec", [("8", "dp", P("data")), ("4x2", "tp", P()),
                                                         ("2x4", "fsdp", P("data"))])
def test_mesh_equals_single_device(served, mesh_name, spec, bank_spec):
    model, params, adapter, x, bank, states, index, serve, single = served
    mesh = make_mesh(mesh_name)
    param_sh = param_shardings(params, mesh, spec)
    batch = batch_sharding(mesh, spec)
    placed = bank.place(NamedSharding(mesh, bank_spec))  # replicated, or the slots split over "data"
    assert placed.spectra["query"].sharding.spec == bank_spec
    # Slot writes keep the placement, and a jitted forward compiles once across them.
    placed = placed.evict(1).load(1, states[5])
    assert placed.spectra["query"].sharding.spec == bank_spec
    bank_sh = jax.tree.map(lambda a: a.sharding, placed.spectra)
    step = jax.jit(serve, in_shardings=(bank_sh, param_sh, batch, batch))
    got = step(placed.spectra, jax.device_put(params, param_sh), jax.device_put(index, batch),
               jax.device_put(x, batch))
    assert _rel(got, single) <= 1e-5
    moved = jax.device_put(np.where(index == 5, 1, index), batch)  # slot 1 holds slot 5's adapter
    again = step(placed.spectra, jax.device_put(params, param_sh), moved, jax.device_put(x, batch))
    assert _rel(again, single) <= 1e-5
    assert step._cache_size() == 1
