"""Stacked (``nn.scan``) adapters in files: PEFT export loads in PEFT itself onto the unrolled torch model, PEFT files
load back onto the stack (some rows only, too), JAX → PEFT → JAX and Orbax round trips are bit-identical, and a
stacked export imports onto the unrolled JAX tree with the same merged kernels."""

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bridge
from bridge._src.config import CONFIG_NAME
from bridge._src.peft_format import WEIGHTS_NAME, read_shapes
import fourierft_jax
import fourierft_jax._src
from fourierft_jax._src.saved import AdapterMismatchError

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

L, D_IN, D, H, C = 3, 6, 8, 12, 4


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _=None):
        a = jnp.tanh(nn.Dense(H, name="fc1")(h))
        return nn.LayerNorm(name="norm")(h + nn.Dense(D, name="fc2")(a)), None


class Encoder(nn.Module):
    axis: int = 0

    @nn.compact
    def __call__(self, h):
        stack = nn.scan(Block, variable_axes={"params": self.axis}, split_rngs={"params": True}, length=L)
        return stack(name="layer")(h, None)[0]


class Scanned(nn.Module):
    axis: int = 0

    @nn.compact
    def __call__(self, x):
        return nn.Dense(C, name="head")(Encoder(self.axis, name="encoder")(nn.Dense(D, name="embed")(x)))


class Unrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(D, name="embed")(x)

        class Layers(nn.Module):
            @nn.compact
            def __call__(self, h):
                for i in range(L):
                    h, _ = Block(name=str(i))(h)
                return h

        class Enc(nn.Module):
            @nn.compact
            def __call__(self, h):
                return Layers(name="layer")(h)

        return nn.Dense(C, name="head")(Enc(name="encoder")(h))


class TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(D, H), torch.nn.Linear(H, D)
        self.norm = torch.nn.LayerNorm(D, eps=1e-6)

    def forward(self, h):
        return self.norm(h + self.fc2(torch.tanh(self.fc1(h))))


class TorchEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.ModuleList([TorchBlock() for _ in range(L)])

    def forward(self, h):
        for block in self.layer:
            h = block(h)
        return h


class TorchNet(torch.nn.Module):
    """The unrolled torch twin: ``embed``, ``encoder.layer.<i>.{fc1,fc2,norm}``, ``head``."""

    def __init__(self):
        super().__init__()
        self.embed, self.encoder, self.head = torch.nn.Linear(D_IN, D), TorchEncoder(), torch.nn.Linear(D, C)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)))


STACK = "encoder.layer"


def _perturbed(tree, scale, seed, dtype=None):
    # numpy noise: jax.random would compile a kernel per shape, which costs more than the whole test
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float32) + scale * rng.standard_normal(a.shape)
                                              .astype(np.float32), dtype or a.dtype), tree)


@functools.lru_cache(maxsize=None)
def _init(axis):
    params = jax.jit(lambda: Scanned(axis).init(jax.random.key(1), jnp.ones((1, D_IN))))()  # eager scan is slow
    return _perturbed(params, 0.1, 2)  # non-zero biases and norms, so that their handling shows


def _unroll_params(params, axis):
    stacked = params["params"]["encoder"]["layer"]
    rows = {str(i): jax.tree.map(lambda a: jnp.take(a, i, axis=axis), stacked) for i in range(L)}
    return {"params": dict(params["params"], encoder={"layer": rows})}


def _t(array):
    return torch.from_numpy(np.array(array, dtype=np.float32))


def torch_twin(params, axis) -> TorchNet:
    p = _unroll_params(params, axis)["params"]
    model = TorchNet()

    def dense(linear, tree):
        linear.weight.copy_(_t(tree["kernel"]).T)
        linear.bias.copy_(_t(tree["bias"]))

    with torch.no_grad():
        dense(model.embed, p["embed"])
        dense(model.head, p["head"])
        for i, block in enumerate(model.encoder.layer):
            row = p["encoder"]["layer"][str(i)]
            dense(block.fc1, row["fc1"])
            dense(block.fc2, row["fc2"])
            block.norm.weight.copy_(_t(row["norm"]["scale"]))
            block.norm.bias.copy_(_t(row["norm"]["bias"]))
    return model.eval()


def _inputs(n=5, seed=0):
    return np.random.default_rng(seed).standard_normal((n, D_IN)).astype(np.float32)


def _randomize(adapter, dtype=jnp.float32, seed=5):
    adapter.set_trainable(_perturbed(adapter.trainable, 0.3, seed, dtype))
    return adapter


def _bits(array):
    return np.asarray(array).view(np.uint8)


def assert_same_tree(got, want):
    got_leaves, got_tree = jax.tree.flatten(got)
    want_leaves, want_tree = jax.tree.flatten(want)
    assert got_tree == want_tree
    for a, b in zip(got_leaves, want_leaves):
        assert np.asarray(a).dtype == np.asarray(b).dtype and np.shape(a) == np.shape(b)
        np.testing.assert_array_equal(_bits(a), _bits(b))


def _torch_out(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


CASES = {
    "all-rows": dict(target_modules=["fc1", "fc2", "head"], bias="fourier_only", modules_to_save=["norm"]),
    "some-rows": dict(target_modules=["fc2"], layers_to_transform=[0, 2], bias="all", modules_to_save=["head"]),
}


@pytest.mark.parametrize("case,axis", [("all-rows", 0), ("some-rows", 1)])
def test_scanned_export_loads_in_peft_on_the_unrolled_torch_model(tmp_path, case, axis):
    params = _init(axis)
    config = fourierft_jax.FourierFTConfig(n_frequency=30, scaling=40.0, **CASES[case])
    adapter = _randomize(fourierft_jax.apply(params, config, key=jax.random.key(0), stacked={STACK: axis}))
    x = _inputs()
    want = np.asarray(adapter.make_apply(Scanned(axis).apply, mode="merge")(adapter.trainable, params, x))
    base = _torch_out(torch_twin(params, axis), x)
    assert np.abs(base - want).max() > 1e-2  # the adapter matters

    folder = fourierft_jax.export_peft(adapter, tmp_path / "peft", params=params)
    keys = read_shapes(os.path.join(folder, WEIGHTS_NAME))[0]
    spectra = sorted(k for k in keys if k.endswith(".fourierft_spectrum"))
    rows = [0, 2] if case == "some-rows" else range(L)
    layers = [f"encoder.layer.{i}.{m}" for i in rows for m in (["fc1", "fc2"] if case == "all-rows" else ["fc2"])]
    assert spectra == sorted(bridge.spectrum_key(n) for n in layers + (["head"] if case == "all-rows" else []))
    # The config is what PEFT writes for the unrolled model: the user's matching fields, unchanged.
    written = json.load(open(os.path.join(folder, CONFIG_NAME)))
    assert sorted(written["target_modules"]) == sorted(CASES[case]["target_modules"])
    assert written.get("layers_to_transform") == CASES[case].get("layers_to_transform")

    model = peft.PeftModel.from_pretrained(torch_twin(params, axis), folder).eval()
    got = _torch_out(model, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The state PEFT loaded is what it would save again: the same keys.
    resaved = tmp_path / "resaved"
    model.save_pretrained(resaved)
    assert set(read_shapes(os.path.join(resaved, WEIGHTS_NAME))[0]) == set(keys)


def test_peft_file_with_some_rows_imports_as_those_stack_ids(tmp_path):
    axis = 1
    params = _init(axis)
    model = torch_twin(params, axis)
    config = peft.FourierFTConfig(n_frequency=25, scaling=30.0, target_modules=["fc1", "fc2"],
                                  layers_to_transform=[1, 2], bias="fourier_only", init_weights=False,
                                  random_loc_seed=11)
    peft_model = peft.get_peft_model(model, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    peft_model.save_pretrained(tmp_path / "peft")
    folder = str(tmp_path / "peft")

    adapter = fourierft_jax.import_peft(folder, params, stacked={STACK: axis})
    layers = {layer.name: layer for layer in adapter.specs["default"].layers}
    assert sorted(layers) == ["encoder.layer.fc1", "encoder.layer.fc2"]
    spectra = adapter.trainable["default"]["spectra"]
    state = peft_model.state_dict()
    for name, layer in layers.items():
        assert layer.stack_ids == (1, 2) and layer.stack_axis == axis and layer.seed == 11
        want = np.stack([state[f"base_model.model.{n}.fourierft_spectrum.default"].numpy()
                         for n in layer.torch_names])
        np.testing.assert_array_equal(np.asarray(spectra[name]), want)
        # Rows the file holds are PEFT's trained biases; row 0 (not adapted) stays the base model's.
        bias = np.asarray(adapter.trainable["default"]["bias"][name])
        for i in range(L):
            torch_bias = state[f"base_model.model.encoder.layer.{i}.{name.split('.')[-1]}"
                               + (".base_layer.bias" if i in (1, 2) else ".bias")].numpy()
            np.testing.assert_array_equal(np.take(bias, i, axis=axis), torch_bias)
    x = _inputs()
    got = adapter.make_apply(Scanned(axis).apply, mode="merge")(adapter.trainable, params, x)
    np.testing.assert_allclose(np.asarray(got), _torch_out(peft_model.eval(), x), rtol=1e-5, atol=1e-5)

    with pytest.raises(Exception, match="encoder.layer"):  # without stacked= the rows have no kernel to land on
        fourierft_jax.import_peft(folder, params)


@pytest.mark.parametrize("axis,dtype", [(0, jnp.float32), (1, jnp.bfloat16)], ids=["axis0-f32", "axis1-bf16"])
def test_stacked_peft_and_orbax_round_trips_are_bit_identical(tmp_path, axis, dtype):
    params = jax.tree.map(lambda a: a.astype(dtype), _init(axis))
    config = fourierft_jax.FourierFTConfig(n_frequency=20, target_modules=["fc1", "fc2"], bias="all",
                                           layers_to_transform=[0, 1], modules_to_save=["norm", "head"])
    adapter = _randomize(fourierft_jax.apply(params, config, key=jax.random.key(0), stacked={STACK: axis}), dtype)
    original = adapter.trainable

    folder = fourierft_jax.export_peft(adapter, tmp_path / "peft", params=params)
    again = fourierft_jax.import_peft(folder, params, stacked={STACK: axis})
    assert_same_tree(again.trainable, original)
    assert again.specs["default"].layers == adapter.specs["default"].layers

    checkpoint = fourierft_jax.save_adapter(tmp_path / "orbax", adapter, params=params)
    meta = json.load(open(os.path.join(checkpoint, "fourierft_adapter.json")))
    assert {(e["name"], e["stack_axis"], e["stack_size"], tuple(e["stack_ids"]), e["stack_depth"])
            for e in meta["layers"]} == {(f"{STACK}.{m}", axis, L, (0, 1), 2) for m in ("fc1", "fc2")}
    saved = fourierft_jax.load_adapter(checkpoint)
    assert saved.spec == adapter.specs["default"]
    assert_same_tree(saved.attach(params).trainable, original)
    # ...and it exports to the same PEFT file as the adapter it came from.
    again_folder = fourierft_jax.export_peft(saved, tmp_path / "peft2")
    a = read_shapes(os.path.join(folder, WEIGHTS_NAME))
    b = read_shapes(os.path.join(again_folder, WEIGHTS_NAME))
    assert a == b

    # The unrolled tree (or a stack of another size) is refused, naming the layer and both shapes.
    unrolled = _unroll_params(params, axis)
    with pytest.raises(AdapterMismatchError, match=r"encoder\.layer\.fc1.*no Dense kernel"):
        saved.attach(unrolled)
    wrong = jax.tree.map(lambda a: a, params)
    kernel = wrong["params"]["encoder"]["layer"]["fc1"]["kernel"]
    wrong["params"]["encoder"]["layer"]["fc1"]["kernel"] = jnp.concatenate([kernel, kernel], axis=axis)
    expected = [D, H]
    expected.insert(axis, L)
    with pytest.raises(AdapterMismatchError, match=rf"'encoder\.layer\.fc1'.*{tuple(expected)}".replace("(", r"\(")
                       .replace(")", r"\)")):
        saved.attach(wrong)


def test_spectrum_shape_mismatch_names_both_shapes(tmp_path):
    params = _init(0)
    config = fourierft_jax.FourierFTConfig(n_frequency=10, target_modules=["fc1"], layers_to_transform=[0, 2])
    saved = fourierft_jax.load_adapter(fourierft_jax.save_adapter(
        tmp_path / "o", fourierft_jax.apply(params, config, key=jax.random.key(0), stacked=STACK)))
    saved.state["spectra"][f"{STACK}.fc1"] = np.zeros((3, 10), np.float32)
    with pytest.raises(AdapterMismatchError, match=r"spectrum has shape \(3, 10\).*needs \(2, 10\)"):
        saved.attach(params)


@pytest.mark.parametrize("axis", [1], ids=["axis1"])
def test_stacked_export_imports_onto_the_unrolled_tree_with_the_same_merged_kernels(tmp_path, axis):
    params = _init(axis)
    config = fourierft_jax.FourierFTConfig(n_frequency=30, scaling=25.0, target_modules=["fc1", "fc2", "head"],
                                           layers_to_transform=[0, 2], bias="fourier_only")
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(0), stacked={STACK: axis})
    # Train the stacked biases only where PEFT trains them (the adapted rows), so the file holds everything.
    state = adapter.trainable["default"]
    biases = dict(state["bias"])
    for layer in adapter.specs["default"].layers:
        if layer.stacked:
            bump = np.zeros(np.shape(biases[layer.name]), np.float32)
            idx = [slice(None)] * bump.ndim
            idx[axis] = list(layer.stack_ids)
            bump[tuple(idx)] = 0.5
            biases[layer.name] = biases[layer.name] + bump
    adapter.set_trainable({"default": dict(state, bias=biases)})
    folder = fourierft_jax.export_peft(adapter, tmp_path / "peft")

    unrolled_params = _unroll_params(params, axis)
    flat = fourierft_jax.import_peft(folder, unrolled_params)
    assert sorted(flat.layers()) == sorted(n for layer in adapter.specs["default"].layers for n in layer.torch_names)
    stacked_merged = _unroll_params(adapter.merge_and_unload(params), axis)
    flat_merged = flat.merge_and_unload(unrolled_params)
    assert jax.tree.structure(stacked_merged) == jax.tree.structure(flat_merged)
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(stacked_merged),
                                 jax.tree_util.tree_leaves_with_path(flat_merged)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6, err_msg=str(path))
    x = _inputs()
    want = Scanned(axis).apply(adapter.merge_and_unload(params), x)
    np.testing.assert_allclose(np.asarray(Unrolled().apply(flat_merged, x)), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_stacked_module_to_save_without_adapted_layer_needs_stacked(tmp_path):
    params = _init(0)
    config = fourierft_jax.FourierFTConfig(n_frequency=10, target_modules=["head"], modules_to_save=["norm"])
    adapter = _randomize(fourierft_jax.apply(params, config, key=jax.random.key(0), stacked=STACK))
    folder = fourierft_jax.export_peft(adapter, tmp_path / "peft", stacked=STACK)
    keys = set(read_shapes(os.path.join(folder, WEIGHTS_NAME))[0])
    assert not any(key.endswith(".scale") for key in keys)  # torch calls it weight
    assert {f"base_model.model.encoder.layer.{i}.norm.weight" for i in range(L)} <= keys
    again = fourierft_jax.import_peft(folder, params, stacked=STACK)
    assert_same_tree(again.trainable, adapter.trainable)


def test_rows_peft_would_not_train_keep_the_base_bias_and_base_originals_stack(tmp_path):
    from fourierft_jax._src.convert import with_base_originals

    params = _init(0)
    partial = fourierft_jax.FourierFTConfig(n_frequency=10, target_modules=["fc2"], layers_to_transform=[1],
                                            bias="fourier_only")
    adapter = _randomize(fourierft_jax.apply(params, partial, key=jax.random.key(0), stacked=STACK))
    # Whatever the state holds in rows 0 and 2 of the stacked bias, the model uses the base rows there (PEFT
    # trains and saves the adapted row's bias only), so the export loses nothing.
    folder = fourierft_jax.export_peft(adapter, tmp_path / "partial", params=params)
    keys = set(read_shapes(os.path.join(folder, WEIGHTS_NAME))[0])
    assert {key for key in keys if key.endswith("bias")} == {"base_model.model.encoder.layer.1.fc2.base_layer.bias"}
    again = fourierft_jax.import_peft(folder, params, stacked=STACK)
    np.testing.assert_array_equal(again.merge_and_unload(params)["params"]["encoder"]["layer"]["fc2"]["bias"],
                                  adapter.merge_and_unload(params)["params"]["encoder"]["layer"]["fc2"]["bias"])

    # bias="all" with a stacked module_to_save: PEFT also stores each row's original bias; a checkpoint saved
    # without the base gets them from the base model's torch tensors, per row.
    config = fourierft_jax.FourierFTConfig(n_frequency=10, target_modules=["fc1"], bias="all",
                                           modules_to_save=["norm"])
    adapter = _randomize(fourierft_jax.apply(params, config, key=jax.random.key(0), stacked=STACK))
    want = fourierft_jax.export_peft(adapter, tmp_path / "with_params", params=params)
    saved = fourierft_jax.load_adapter(fourierft_jax.save_adapter(tmp_path / "orbax", adapter))
    base = {name: value.numpy() for name, value in torch_twin(params, 0).state_dict().items()}
    completed = with_base_originals(saved, base.get)
    got = fourierft_jax.export_peft(completed, tmp_path / "from_base")
    a = bridge.read_adapter(want)[1]
    b = bridge.read_adapter(got)[1]
    assert sorted(a) == sorted(b) and any(".original_module." in key for key in a)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_name_map_applies_to_each_row(tmp_path):
    params = _init(0)
    config = fourierft_jax.FourierFTConfig(n_frequency=12, target_modules=["fc1"], layers_to_transform=[0, 2],
                                           bias="fourier_only")
    adapter = _randomize(fourierft_jax.apply(params, config, key=jax.random.key(0), stacked=STACK))
    # Keep the unsaved bias row as the base has it (PEFT saves the adapted rows only).
    bias = adapter.trainable["default"]["bias"]["encoder.layer.fc1"]
    base = params["params"]["encoder"]["layer"]["fc1"]["bias"]
    state = adapter.trainable["default"]
    adapter.set_trainable({"default": dict(state, bias={"encoder.layer.fc1": bias.at[1].set(base[1])})})
    names = fourierft_jax.NameMap(to_torch=[(r"^encoder\.layer\.(\d+)\.fc1$", r"blocks.\1.mlp.up")])
    folder = fourierft_jax.export_peft(adapter, tmp_path / "peft", name_map=names, params=params)
    keys = set(read_shapes(os.path.join(folder, WEIGHTS_NAME))[0])
    assert keys == {f"base_model.model.blocks.{i}.mlp.up.{leaf}" for i in (0, 2)
                    for leaf in ("fourierft_spectrum", "base_layer.bias")}
    assert bridge.FourierFTConfig.from_pretrained(folder).target_modules == ["blocks.0.mlp.up", "blocks.2.mlp.up"]
    again = fourierft_jax.import_peft(folder, params, name_map=names, stacked=STACK)
    assert_same_tree(again.trainable, adapter.trainable)
    assert again.specs["default"].layers == adapter.specs["default"].layers


def test_inspect_counts_each_row_of_a_stacked_orbax_checkpoint_like_its_peft_export(tmp_path):
    from bridge._src.summary import summarize

    params = _init(0)
    config = fourierft_jax.FourierFTConfig(n_frequency=10, target_modules=["fc1", "head"], layers_to_transform=[0, 2])
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(0), stacked=STACK)
    orbax = summarize(fourierft_jax.save_adapter(tmp_path / "orbax", adapter))[0]
    peft = summarize(fourierft_jax.export_peft(adapter, tmp_path / "peft"))[0]
    assert sorted(layer.name for layer in orbax.layers) == sorted(layer.name for layer in peft.layers)
    assert orbax.spectrum_params == peft.spectrum_params == 10 * len(peft.layers)
