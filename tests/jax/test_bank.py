"""Adapter banks: every row of a mixed batch equals that row run alone with its adapter merged (``mode="merge"``,
numpy float64 with ``bridge.delta_weight``, PEFT itself), base rows equal the base model; one compilation for any
index mix and after slot writes; bad inputs are clear errors that leave the bank as it was."""

import copy
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bridge
import fourierft_jax
from fftjax_models import D_IN, MLP, init_mlp, nnx_twin, numpy_mlp, rel_err

CAPACITY = 6
CONFIG = dict(n_frequency=24, scaling=40.0, target_modules=["fc1", "fc2", "head"])


def _states(adapter, count, seed=0, scale=1.0):
    """``count`` random adapter states with the layers of ``adapter``'s active adapter."""
    layers = adapter.specs[adapter.active_adapters[0]].layers
    rng = np.random.default_rng(seed)
    return [{"spectra": {l.name: (scale * rng.standard_normal(l.spectrum_shape)).astype(np.float32) for l in layers},
             "bias": {}, "modules_to_save": {}} for _ in range(count)]


def _filled(adapter, states, slots):
    bank = fourierft_jax.AdapterBank.create(adapter, capacity=CAPACITY)
    for slot, state in zip(slots, states):
        bank = bank.load(slot, state)
    return bank


def _merged_rows(fn, adapter, params, index, slot_state, x):
    """Each row of ``x`` run alone on ``W + ΔW`` of its slot's adapter (the base model for -1)."""
    merged = jax.jit(fourierft_jax.make_apply(fn, adapter.static, mode="merge"))
    zeros = jax.tree.map(jnp.zeros_like, next(iter(slot_state.values())))  # the base model, same compilation
    rows = []
    for b, slot in enumerate(index):
        row = jax.tree.map(lambda a: a[b : b + 1], x)
        rows.append(merged({"default": zeros if slot == -1 else slot_state[slot]}, params, row))
    return np.concatenate([np.asarray(r) for r in rows])


def _check_rows(got, want, index):
    for b in range(len(index)):
        assert rel_err(got[b], want[b]) <= 1e-5, (b, index[b], rel_err(got[b], want[b]))


@pytest.fixture(scope="module")
def mlp():
    params = init_mlp()
    adapter = fourierft_jax.apply(params, fourierft_jax.FourierFTConfig(**CONFIG), key=jax.random.key(1))
    states = _states(adapter, 3)
    bank = _filled(adapter, states, [0, 3, 5])
    return params, adapter, states, bank


def test_mixed_batch_equals_merged_and_numpy(mlp):
    params, adapter, states, bank = mlp
    slot_state = {0: states[0], 3: states[1], 5: states[2]}
    index = np.array([3, -1, 0, 5, 3, 0, -1])
    x = np.random.default_rng(0).standard_normal((len(index), 4, D_IN)).astype(np.float32)
    serve = jax.jit(fourierft_jax.make_bank_apply(MLP().apply, bank))
    got = np.asarray(serve(bank.spectra, params, index, x))
    _check_rows(got, _merged_rows(MLP().apply, adapter, params, index, slot_state, x), index)
    base = np.asarray(MLP().apply(params, x))
    np.testing.assert_allclose(got[index == -1], base[index == -1], rtol=0, atol=1e-6)
    for b, slot in enumerate(index):  # numpy float64 with bridge's dense ΔW
        deltas = {} if slot == -1 else {
            l.name: bridge.delta_weight(np.asarray(slot_state[slot]["spectra"][l.name], np.float64), l.torch_indices,
                                        l.out_features, l.in_features, l.scaling)
            for l in adapter.specs["default"].layers}
        assert rel_err(got[b], numpy_mlp(params, x[b], deltas)) < 2e-5
    assert rel_err(got[0], base[0]) > 1e-3  # the adapters act


def test_one_compilation_for_index_mixes_and_slot_writes(mlp):
    params, adapter, states, bank = mlp
    traces = []

    def fn(variables, x):
        traces.append(1)
        return MLP().apply(variables, x)

    serve = jax.jit(fourierft_jax.make_bank_apply(fn, bank))
    x = np.random.default_rng(1).standard_normal((4, D_IN)).astype(np.float32)
    first = serve(bank.spectra, params, np.array([0, 3, 5, -1]), x)
    serve(bank.spectra, params, np.array([5, 5, 5, 5]), x)
    serve(bank.spectra, params, np.array([-1, -1, 0, 3]), x)
    # Replacing slot 3 changes its rows only; evicting slot 0 turns its rows into the base model.
    other = _states(adapter, 1, seed=7)[0]
    replaced = bank.load(3, other)
    index = np.array([0, 3, 5, -1])
    second = np.asarray(serve(replaced.spectra, params, index, x))
    evicted = np.asarray(serve(bank.evict(0).spectra, params, index, x))
    assert len(traces) == 1
    first = np.asarray(first)
    np.testing.assert_array_equal(second[[0, 2, 3]], first[[0, 2, 3]])
    assert rel_err(second[1], first[1]) > 1e-3
    _check_rows(second[1:2], _merged_rows(MLP().apply, adapter, params, [3], {3: other}, x[1:2]), [3])
    np.testing.assert_allclose(evicted[0], np.asarray(MLP().apply(params, x[:1]))[0], atol=1e-6)
    np.testing.assert_array_equal(evicted[1:], first[1:])
    assert bank.names[3] == "3" and replaced.names[3] == "3" and bank.evict(0).names[0] is None


def test_out_of_range_index(mlp):
    params, _, _, bank = mlp
    serve = fourierft_jax.make_bank_apply(MLP().apply, bank)
    x = np.ones((3, D_IN), np.float32)
    for bad in ([0, CAPACITY, 1], [-2, 0, 0]):
        with pytest.raises(ValueError, match=rf"out of range.*0 \.\. {CAPACITY - 1}"):
            serve(bank.spectra, params, np.array(bad), x)
    with pytest.raises(ValueError, match="out of range"):
        serve(bank.spectra, params, jnp.array([0, 99, 0]), x)  # a concrete jax array is checked too
    # Under jit the index is not known: the row of a bad index is NaN, the others are served.
    jitted = jax.jit(serve)
    got = np.asarray(jitted(bank.spectra, params, jnp.array([0, CAPACITY, -1]), x))
    assert np.isnan(got[1]).all() and np.isfinite(got[[0, 2]]).all()
    np.testing.assert_array_equal(got[[0, 2]], np.asarray(jitted(bank.spectra, params, jnp.array([0, 0, -1]), x))[[0, 2]])
    with pytest.raises(ValueError, match="'encoder.fc1'.*leading free axis.*adapter_index has 2"):
        serve(bank.spectra, params, np.array([0, 1]), x)


def test_bad_sources_leave_the_bank_unchanged(mlp, tmp_path):
    params, adapter, states, bank = mlp
    before = {k: np.asarray(v) for k, v in bank.spectra.items()}

    def variant(**fields):
        return fourierft_jax.apply(params, fourierft_jax.FourierFTConfig(**dict(CONFIG, **fields)),
                                   key=jax.random.key(2))

    with pytest.raises(ValueError, match=r"slot 1.*'encoder.fc1'.*n_frequency is 10, the bank's is 24"):
        bank.load(1, variant(n_frequency=10))
    with pytest.raises(ValueError, match=r"slot 1.*random_loc_seed is 5, the bank's is 777"):
        bank.load(1, variant(random_loc_seed=5))
    with pytest.raises(ValueError, match=r"slot 2: layers do not fit.*lacks \['head'\]"):
        bank.load(2, variant(target_modules=["fc1", "fc2"]))
    with pytest.raises(ValueError, match=r"slot 2.*'encoder.fc2'.*n_frequency.*\(7,\)"):
        bank.load(2, {"spectra": dict(states[0]["spectra"], **{"encoder.fc2": np.ones(7, np.float32)})})
    with pytest.raises(ValueError, match=r"slot 4.*trains bias.*spectra_only=True"):
        bank.load(4, variant(bias="all"))
    with pytest.raises(ValueError, match=r"slot 9 is not in 0 \.\. 5"):
        bank.load(9, states[0])
    with pytest.raises(ValueError, match="name 'x' is already used by slot 0"):
        bank.load(0, states[0], name="x").load(1, states[1], name="x")
    with pytest.raises(TypeError, match="adapter.trainable\\[name\\]"):
        bank.load(1, adapter.trainable)
    # A PEFT folder the strict reader refuses (a spectrum of the wrong length for its config).
    good, bad = str(tmp_path / "good"), str(tmp_path / "bad")
    fourierft_jax.export_peft(adapter, good)
    bridge.write_adapter(bad, bridge.FourierFTConfig(**CONFIG),
                         {bridge.spectrum_key(l.name): np.ones(l.n_frequency + 1, np.float32)
                          for l in adapter.specs["default"].layers})
    with pytest.raises(bridge.AdapterFormatError, match="adapter 1 \\('bad'\\)"):
        bank.load_peft([good, bad], progress=False)
    with pytest.raises(bridge.AdapterFormatError, match="bad"):
        bank.load(1, bad)
    for name, value in bank.spectra.items():
        np.testing.assert_array_equal(np.asarray(value), before[name])
    assert bank.names == ("0", None, None, "3", None, "5")


def test_folders_scaling_and_two_configs_in_one_batch(tmp_path):
    params = init_mlp()
    a = fourierft_jax.apply(params, fourierft_jax.FourierFTConfig(**CONFIG), key=jax.random.key(1))
    # Another seed and n_frequency on fewer layers: its own bank, served in the same batch.
    b = fourierft_jax.apply(params, fourierft_jax.FourierFTConfig(n_frequency=40, scaling=10.0, random_loc_seed=3,
                                                                  target_modules=["fc1", "fc2"]), key=jax.random.key(2))
    # The same layers at another scaling load into bank a exactly (coefficients rescaled).
    c = fourierft_jax.apply(params, fourierft_jax.FourierFTConfig(**dict(CONFIG, scaling=7.0)), key=jax.random.key(3))
    fourierft_jax.save_adapter(str(tmp_path / "orbax_c"), c)
    fourierft_jax.export_peft(a, str(tmp_path / "peft_a"))
    bank_a = fourierft_jax.AdapterBank.create(a, capacity=4).load_peft([tmp_path / "peft_a"], progress=False)
    bank_a = bank_a.load(2, str(tmp_path / "orbax_c"))
    bank_b = fourierft_jax.AdapterBank.create(b, capacity=3).load(1, b)
    assert bank_a.names == ("peft_a", None, "orbax_c", None)
    serve = jax.jit(fourierft_jax.make_bank_apply(MLP().apply, [bank_a, bank_b]))
    assert serve.offsets == (0, 4)
    index = np.array([5, 0, -1, 2, 5, 0])
    x = np.random.default_rng(2).standard_normal((len(index), 3, D_IN)).astype(np.float32)
    got = np.asarray(serve([bank_a.spectra, bank_b.spectra], params, index, x))
    for row, (slot, who) in enumerate(zip(index, [b, a, None, c, b, a])):
        want = MLP().apply(params if who is None else who.merge_and_unload(params), x[row : row + 1])[0]
        assert rel_err(got[row], want) <= 1e-5, row


class Attention(nn.Module):
    """flax attention (DenseGeneral query/key/value (16, 2, 4), out (2, 4, 16)), an N-D DenseGeneral pair."""

    @nn.compact
    def __call__(self, x):
        h = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, name="attn")(x, x)
        h = nn.DenseGeneral((2, 6), name="proj")(h)                         # kernel (16, 2, 6)
        return nn.DenseGeneral(5, axis=(-2, -1), name="down")(jnp.tanh(h))  # kernel (2, 6, 5), 2 axes contracted


def test_attention_and_nd_kernels():
    model, x = Attention(), np.random.default_rng(3).standard_normal((5, 3, 16)).astype(np.float32)
    params = jax.jit(model.init)(jax.random.key(0), x)  # jitted: eager init compiles op by op
    config = fourierft_jax.FourierFTConfig(n_frequency=20, scaling=30.0,
                                           target_modules=["query", "value", "out", "proj", "down"],
                                           init_weights=True)  # the slots get their own spectra
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(1), trace=lambda p: model.apply(p, x))
    assert {l.name for l in adapter.specs["default"].layers} == {"attn.query", "attn.value", "attn.out", "proj",
                                                                 "down"}
    states = _states(adapter, 2, seed=4, scale=0.3)
    bank = _filled(adapter, states, [1, 4])
    index = np.array([4, 1, -1, 1, 4])
    got = np.asarray(jax.jit(fourierft_jax.make_bank_apply(model.apply, bank))(bank.spectra, params, index, x))
    _check_rows(got, _merged_rows(model.apply, adapter, params, index, {1: states[0], 4: states[1]}, x), index)


def test_nnx_linear_through_split_merge():
    model = nnx_twin(init_mlp(3))  # built abstractly, then filled (an eager nnx init compiles op by op)
    graphdef, state = nnx.split(model)
    run = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    x = np.random.default_rng(4).standard_normal((4, D_IN)).astype(np.float32)
    adapter = fourierft_jax.apply(state, fourierft_jax.FourierFTConfig(**CONFIG, init_weights=True),
                                  trace=lambda s: run(s, x))
    states = _states(adapter, 2, seed=5)
    bank = _filled(adapter, states, [2, 0])
    index = np.array([0, -1, 2, 0])
    got = np.asarray(jax.jit(fourierft_jax.make_bank_apply(run, bank))(bank.spectra, state, index, x))
    _check_rows(got, _merged_rows(run, adapter, state, index, {2: states[0], 0: states[1]}, x), index)


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _=None):
        return nn.LayerNorm(name="norm")(h + nn.Dense(10, name="fc2")(nn.gelu(nn.Dense(14, name="fc1")(h)))), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return stack(name="layer")(nn.Dense(10, name="embed")(x), None)[0]


def test_stacked_scan_and_split_kernel():
    model, x = Scanned(), np.random.default_rng(5).standard_normal((4, 2, 6)).astype(np.float32)
    params = jax.jit(model.init)(jax.random.key(0), x)
    config = fourierft_jax.FourierFTConfig(n_frequency=16, scaling=20.0, target_modules=["fc1", "fc2"],
                                           layers_to_transform=[0, 2], layers_pattern="layer", init_weights=True)
    adapter = fourierft_jax.apply(params, config, stacked={"layer": 0})
    states = _states(adapter, 2, seed=6)
    bank = _filled(adapter, states, [1, 2])
    assert bank.spectra["layer.fc1"].shape == (CAPACITY, 2, 16)  # (capacity, adapted rows of the stack, n)
    index = np.array([2, -1, 1, 2])
    got = np.asarray(jax.jit(fourierft_jax.make_bank_apply(model.apply, bank))(bank.spectra, params, index, x))
    _check_rows(got, _merged_rows(model.apply, adapter, params, index, {1: states[0], 2: states[1]}, x), index)
    # A kernel holding two torch layers side by side (split=), contracted whole by one einsum.
    kv = {"kv": {"kernel": np.random.default_rng(9).standard_normal((2, 8, 6)).astype(np.float32)}}
    fn = lambda p, x: jnp.tanh(jnp.einsum("btd,kdh->btkh", x, p["kv"]["kernel"]))  # noqa: E731
    xs = np.random.default_rng(6).standard_normal((3, 2, 8)).astype(np.float32)
    split = fourierft_jax.apply(kv, fourierft_jax.FourierFTConfig(n_frequency=9, target_modules=["kv"],
                                                                  init_weights=True),
                                split={"kv": 0}, trace=lambda p: fn(p, xs))
    states = _states(split, 2, seed=8, scale=0.1)
    bank = _filled(split, states, [0, 1])
    index = np.array([1, 0, -1])
    got = np.asarray(jax.jit(fourierft_jax.make_bank_apply(fn, bank))(bank.spectra, kv, index, xs))
    _check_rows(got, _merged_rows(fn, split, kv, index, {0: states[0], 1: states[1]}, xs), index)


class Decoder(nn.Module):
    decode: bool = False

    @nn.compact
    def __call__(self, x):
        mask = None if self.decode else nn.make_causal_mask(jnp.ones(x.shape[:2]))
        h = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, decode=self.decode, name="attn")(
            x, x, mask=mask)
        return nn.Dense(6, name="mlp")(h)


def test_decoding_loop_with_kv_cache():
    steps, batch = 4, 3
    x = np.random.default_rng(7).standard_normal((batch, steps, 6)).astype(np.float32)
    params = jax.jit(Decoder().init)(jax.random.key(0), x)
    cache = jax.jit(Decoder(decode=True).init)(jax.random.key(0), x)["cache"]
    config = fourierft_jax.FourierFTConfig(n_frequency=12, scaling=25.0, target_modules=["query", "value", "mlp"],
                                           init_weights=True)
    adapter = fourierft_jax.apply(params, config, trace=lambda p: Decoder().apply(p, x))
    states = _states(adapter, 2, seed=9, scale=0.3)
    bank = _filled(adapter, states, [0, 4])
    serve = fourierft_jax.make_bank_apply(Decoder(decode=True).apply, bank)
    index = np.array([4, -1, 0])

    @jax.jit
    def step(spectra, cache, index, token):
        out, mutated = serve(spectra, {"params": params["params"], "cache": cache}, index, token, mutable=["cache"])
        return out, mutated["cache"]

    outs = []
    for t in range(steps):  # one token per step, the keys and values of earlier tokens from the cache
        out, cache = step(bank.spectra, cache, index, x[:, t : t + 1])
        outs.append(np.asarray(out))
    got = np.concatenate(outs, axis=1)
    want = _merged_rows(Decoder().apply, adapter, params, index, {0: states[0], 4: states[1]}, x)
    _check_rows(got, want, index)
    assert step._cache_size() == 1


# -- PEFT folders written by PEFT itself -----------------------------------------------------------------------
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from test_peft_twin import _torch_twin  # noqa: E402  (the torch twin of fftjax_models.MLP: weight = kernelᵀ)


def test_load_peft_folders_written_by_peft(tmp_path):
    params = init_mlp()
    base = _torch_twin(params).eval()
    folders, models = [], []
    for i in range(3):
        torch.manual_seed(i)  # PEFT draws each spectrum from N(0, 1)
        model = peft.get_peft_model(copy.deepcopy(base), peft.FourierFTConfig(**CONFIG)).eval()
        folders.append(str(tmp_path / f"task{i}"))
        model.save_pretrained(folders[-1])
        models.append(model)
    adapter = fourierft_jax.apply(params, fourierft_jax.FourierFTConfig(**CONFIG), key=jax.random.key(0))
    bank = fourierft_jax.AdapterBank.create(adapter, capacity=CAPACITY).load(0, adapter, name="jax")
    bank = bank.load_peft(folders, progress=False)
    assert bank.names[:4] == ("jax", "task0", "task1", "task2")
    index = np.array([bank.slot_of("task2"), -1, bank.slot_of("task0"), bank.slot_of("task1"), 3])
    x = np.random.default_rng(8).standard_normal((len(index), D_IN)).astype(np.float32)
    got = np.asarray(jax.jit(fourierft_jax.make_bank_apply(MLP().apply, bank))(bank.spectra, params, index, x))
    with torch.no_grad():
        for row, slot in enumerate(index):
            reference = base if slot == -1 else models[slot - 1]
            want = reference(torch.from_numpy(x[row : row + 1])).numpy()[0]
            assert rel_err(got[row], want) <= 1e-5, row
    assert os.path.isdir(folders[0])
