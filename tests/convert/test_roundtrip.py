"""Round trips JAX → PEFT → JAX → Orbax → JAX keep every array bit for bit (dtypes included); NNX models save,
attach and export the same way; an adapter that does not fit is refused naming the path and both shapes."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bridge
from bridge._src.peft_format import WEIGHTS_NAME, read_shapes
import fourierft_jax
import fourierft_jax._src
from convert_models import D, D_IN, N_CLASSES, Net, inputs, init

from fourierft_jax._src.saved import AdapterMismatchError


def _bits(array) -> np.ndarray:
    array = np.asarray(array)
    return array.view(np.uint8)


def assert_same_tree(got, want):
    got_leaves, got_tree = jax.tree.flatten(got)
    want_leaves, want_tree = jax.tree.flatten(want)
    assert got_tree == want_tree
    for a, b in zip(got_leaves, want_leaves):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        assert np.asarray(a).shape == np.asarray(b).shape
        np.testing.assert_array_equal(_bits(a), _bits(b))


def _random_state(adapter, dtype):
    # Random values everywhere (biases and heads too), then the requested dtype.
    leaves, tree = jax.tree.flatten(adapter.trainable)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    return jax.tree.unflatten(tree, [jax.random.normal(k, a.shape).astype(dtype) for a, k in zip(leaves, keys)])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_jax_peft_jax_orbax_jax_is_bit_identical(tmp_path, dtype):
    params = init(Net(), dtype=dtype)
    config = fourierft_jax.FourierFTConfig(n_frequency=20, target_modules=["query", "value"], bias="all",
                                           modules_to_save=["classifier"], n_frequency_pattern={"value": 33})
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(0))
    adapter.set_trainable(_random_state(adapter, dtype))
    original = adapter.trainable

    folder = fourierft_jax.export_peft(adapter, tmp_path / "peft", params=params)
    shapes, dtypes = read_shapes(os.path.join(folder, WEIGHTS_NAME))
    assert set(dtypes.values()) == {"BF16" if dtype == jnp.bfloat16 else "F32"}
    again = fourierft_jax.import_peft(folder, params)
    assert_same_tree(again.trainable, original)

    checkpoint = fourierft_jax.save_adapter(tmp_path / "orbax", again, params=params)
    saved = fourierft_jax.load_adapter(checkpoint)
    assert saved.config.to_dict() == fourierft_jax.FourierFTConfig.from_pretrained(folder).to_dict()
    final = saved.attach(params)
    assert_same_tree(final.trainable, original)
    assert [layer for layer in final.specs["default"].layers] == list(adapter.specs["default"].layers)

    # PEFT keeps the untrained original of the head's bias too (bias="all"): without the base it is unknown.
    with pytest.raises(bridge.AdapterFormatError, match=r"original.*'classifier\.bias'.*params="):
        fourierft_jax.export_peft(again, tmp_path / "no_base")
    assert not os.path.exists(tmp_path / "no_base")
    # A PEFT file carries it, so PEFT → SavedAdapter → PEFT needs no base either.
    from_file = fourierft_jax.read_peft(folder, params)
    assert sorted(from_file.originals) == ["classifier"]
    assert_same_tree(from_file.originals["classifier"]["bias"], params["params"]["classifier"]["bias"])

    # Orbax → PEFT again writes the same file content as the first export.
    second = fourierft_jax.export_peft(saved, tmp_path / "peft2")
    first_tensors = _load(folder)
    second_tensors = _load(second)
    assert sorted(first_tensors) == sorted(second_tensors)
    for key in first_tensors:
        np.testing.assert_array_equal(first_tensors[key], second_tensors[key])


def _load(folder):
    from bridge._src.tensor_io import SafetensorsFile

    file = SafetensorsFile(os.path.join(folder, WEIGHTS_NAME))
    return {key: np.array(file.array(key)) for key in file.keys()}


def test_bf16_file_loads_in_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    params = init(Net())
    adapter = fourierft_jax.apply(params, fourierft_jax.FourierFTConfig(n_frequency=8, target_modules=["query"]),
                                  key=jax.random.key(1))
    adapter.set_trainable(jax.tree.map(lambda a: a.astype(jnp.bfloat16), adapter.trainable))
    folder = fourierft_jax.export_peft(adapter, tmp_path / "peft")
    tensors = load_file(os.path.join(folder, WEIGHTS_NAME))
    spectrum = tensors[bridge.spectrum_key("layer.0.query")]
    assert spectrum.dtype == torch.bfloat16
    want = np.asarray(adapter.trainable["default"]["spectra"]["layer.0.query"]).astype(np.float32)
    np.testing.assert_array_equal(spectrum.float().numpy(), want)


def test_attach_refuses_a_mismatch_naming_path_and_shapes(tmp_path):
    params = init(Net())
    config = fourierft_jax.FourierFTConfig(n_frequency=8, target_modules=["query"], bias="fourier_only",
                                           modules_to_save=["classifier"])
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(0))
    saved = fourierft_jax.load_adapter(fourierft_jax.save_adapter(tmp_path / "c", adapter))

    wrong = jax.tree.map(lambda a: a, params)
    wrong["params"]["layer"]["1"]["query"] = {"kernel": jnp.zeros((D, D + 1)), "bias": jnp.zeros(D + 1)}
    with pytest.raises(AdapterMismatchError, match=r"layer 'layer\.1\.query'.*\(16, 17\).*\(16, 16\)"):
        saved.attach(wrong)
    missing = jax.tree.map(lambda a: a, params)
    del missing["params"]["classifier"]
    with pytest.raises(AdapterMismatchError, match="module_to_save 'classifier'"):
        fourierft_jax.attach(saved, missing)
    # A PEFT file records no layer shapes: the params give them, and everything recorded is checked.
    folder = fourierft_jax.export_peft(adapter, tmp_path / "peft")
    with pytest.raises(AdapterMismatchError, match=r"bias 'layer\.1\.query' has shape \(17,\).*\(16,\)"):
        fourierft_jax.import_peft(folder, wrong)
    tiny = jax.tree.map(lambda a: a, params)
    tiny["params"]["layer"]["0"]["query"] = {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(16)}
    with pytest.raises(bridge.AdapterFormatError, match=r"layer 'layer\.0\.query'.*\(8,\).*room for 4"):
        fourierft_jax.import_peft(folder, tiny)


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Linear(D_IN, D, rngs=rngs)
        self.query = nnx.Linear(D, D, rngs=rngs)
        self.value = nnx.Linear(D, D, rngs=rngs)
        self.classifier = nnx.Linear(D, N_CLASSES, rngs=rngs)

    def __call__(self, x):
        h = self.embed(x)
        h = h + self.value(jnp.tanh(self.query(h)))
        return self.classifier(h)


def _nnx_pair():
    """Two NnxNets with the same weights and a linen-style view of them."""
    return NnxNet(nnx.Rngs(0)), NnxNet(nnx.Rngs(0))


@pytest.mark.parametrize("bias", ["fourier_only", "all"])
def test_nnx_save_attach_and_export(tmp_path, bias):
    config = fourierft_jax.FourierFTConfig(n_frequency=12, scaling=30.0, target_modules=["query", "value"],
                                           bias=bias, modules_to_save=["classifier"])
    model, twin = _nnx_pair()
    fourierft_jax.nnx.apply(model, config, rngs=nnx.Rngs(3))
    # Give the trained biases and the head new values, as training would.
    model.query.base.bias.set_value(model.query.base.bias[...] + 1.0)
    if bias == "all":
        model.embed.bias.set_value(model.embed.bias[...] + 1.0)
    model.classifier.kernel.set_value(model.classifier.kernel[...] * 2.0)
    x = jnp.asarray(inputs())
    want = np.asarray(model(x))

    checkpoint = fourierft_jax.save_adapter(tmp_path / "orbax", model, config=config)
    attached = fourierft_jax.load_adapter(checkpoint).attach(twin)
    np.testing.assert_array_equal(np.asarray(attached(x)), want)

    # NNX → PEFT → a fresh NNX model, and → the same numbers in the saved state.
    # bias="all": PEFT also stores the head's original bias, read from the untouched base model.
    base = NnxNet(nnx.Rngs(0)) if bias == "all" else None
    folder = fourierft_jax.export_peft(model, tmp_path / "peft", config=config, params=base)
    fresh = fourierft_jax.import_peft(folder, NnxNet(nnx.Rngs(0)))
    np.testing.assert_array_equal(np.asarray(fresh(x)), want)
    # A model whose layer has another shape is refused before it is touched.
    other = NnxNet(nnx.Rngs(0))
    other.value = nnx.Linear(D, D, use_bias=True, rngs=nnx.Rngs(0))
    other.query = nnx.Linear(D, D + 2, rngs=nnx.Rngs(0))
    with pytest.raises(AdapterMismatchError, match=r"layer 'query'.*\(16, 18\).*\(16, 16\)"):
        fourierft_jax.load_adapter(checkpoint).attach(other)
    assert type(other.value).__name__ == "Linear"


def test_corrupt_checkpoints_are_refused(tmp_path):
    params = init(Net())
    adapter = fourierft_jax.apply(params, fourierft_jax.FourierFTConfig(n_frequency=8, target_modules=["query"]),
                                  key=jax.random.key(0))
    checkpoint = fourierft_jax.save_adapter(tmp_path / "c", adapter)
    with pytest.raises(FileExistsError, match="already exists"):
        fourierft_jax.save_adapter(tmp_path / "c", adapter)
    fourierft_jax.save_adapter(tmp_path / "c", adapter, overwrite=True)  # allowed with overwrite

    from bridge._src.folders import CheckpointError

    meta = os.path.join(checkpoint, "fourierft_adapter.json")
    text = open(meta).read()
    with open(meta, "w") as stream:
        stream.write(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="not readable JSON"):
        fourierft_jax.load_adapter(checkpoint)
    with open(meta, "w") as stream:
        data = json.loads(text)
        data["format"] = "something else"
        json.dump(data, stream)
    with pytest.raises(CheckpointError, match="format tag"):
        fourierft_jax.load_adapter(checkpoint)
    with open(meta, "w") as stream:
        stream.write(text)
    # Tensors gone: the metadata alone is not a checkpoint.
    import shutil

    shutil.rmtree(os.path.join(checkpoint, "state"))
    with pytest.raises(CheckpointError, match="state/ is missing"):
        fourierft_jax.load_adapter(checkpoint)
    with pytest.raises(CheckpointError, match="not a fourierft_jax adapter checkpoint"):
        fourierft_jax.load_adapter(tmp_path)


def test_peft_side_error_paths(tmp_path):
    from bridge._src.folders import CheckpointError

    params = init(Net())
    adapter = fourierft_jax.apply(params, fourierft_jax.FourierFTConfig(n_frequency=8, target_modules=["query"]),
                                  key=jax.random.key(0))
    folder = fourierft_jax.export_peft(adapter, tmp_path / "peft")
    with pytest.raises(FileExistsError, match="already holds an adapter"):
        fourierft_jax.export_peft(adapter, tmp_path / "peft")
    fourierft_jax.export_peft(adapter, tmp_path / "peft", overwrite=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a PEFT adapter directory"):
        fourierft_jax.import_peft(tmp_path / "empty", params)
    with pytest.raises(CheckpointError, match="does not record its layer shapes"):
        fourierft_jax.read_peft(folder)
    weights = os.path.join(folder, WEIGHTS_NAME)
    data = open(weights, "rb").read()
    with open(weights, "wb") as stream:
        stream.write(data[: len(data) - 7])
    with pytest.raises(CheckpointError, match="truncated"):
        fourierft_jax.import_peft(folder, params)
