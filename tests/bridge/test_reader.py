"""bridge's strict reader of PEFT adapter folders (peft_reader): each damage named with key, expected and found."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import bridge
from bridge._src.folders import CheckpointError, open_base
from bridge._src.peft_format import WEIGHTS_NAME, AdapterFormatError, read_shapes
from bridge._src.peft_reader import check_folder, nonfinite_keys, open_strict
from bridge._src.summary import lora_comparison
from bridge._src.tensor_io import SafetensorsError, SafetensorsFile

SPEC = {"q": 6, "v": 4}  # layer -> n_frequency (v through n_frequency_pattern)


@pytest.fixture()
def valid(tmp_path):
    """A consistent adapter (q and v targeted, bias='fourier_only') and a base model with q, k, v."""
    config = bridge.FourierFTConfig(n_frequency=6, n_frequency_pattern={"v": 4}, target_modules=["q", "v"],
                                    bias="fourier_only")
    rng = np.random.default_rng(0)
    tensors = {bridge.spectrum_key(f"enc.{name}"): rng.standard_normal(n).astype(np.float32)
               for name, n in SPEC.items()}
    tensors.update({f"base_model.model.enc.{name}.base_layer.bias": np.ones(5, np.float32) for name in SPEC})
    folder = tmp_path / "adapter"
    bridge.write_adapter(folder, config, tensors)
    base = tmp_path / "model.safetensors"
    save_file({f"enc.{name}.{leaf}": np.zeros((5, 3) if leaf == "weight" else (5,), np.float32)
               for name in ("q", "k", "v") for leaf in ("weight", "bias")}, str(base))
    return str(folder), str(base)


def rewrite(folder, change):
    path = os.path.join(folder, WEIGHTS_NAME)
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(folder, change):
    path = os.path.join(folder, "adapter_config.json")
    data = json.load(open(path))
    change(data)
    json.dump(data, open(path, "w"))


def problems_of(folder, base=None):
    with pytest.raises(AdapterFormatError) as info:
        open_strict(folder, base=open_base(base) if base else None, finite=True)
    return str(info.value)


def test_valid_adapter_passes(valid):
    folder, base = valid
    adapter, resolution = open_strict(folder, base=open_base(base), finite=True)
    assert sorted((layer.name, layer.n_frequency) for layer in adapter.layers) == [("enc.q", 6), ("enc.v", 4)]
    assert sorted(layer.key for layer in resolution.layers) == ["enc.q.weight", "enc.v.weight"]
    assert check_folder(folder)[0].n_frequency_pattern == {"v": 4}


def test_spectrum_length_must_match_the_config(valid):
    folder, _ = valid
    rewrite(folder, lambda t: t.update({bridge.spectrum_key("enc.v"): np.zeros(7, np.float32)}))
    message = problems_of(folder)
    assert "'base_model.model.enc.v.fourierft_spectrum' has shape (7,)" in message
    assert "n_frequency 4, so it must be (4,)" in message  # the n_frequency_pattern entry, not n_frequency=6


def test_key_for_a_layer_the_config_does_not_target(valid):
    folder, base = valid
    rewrite(folder, lambda t: t.update({bridge.spectrum_key("enc.k"): np.zeros(6, np.float32)}))
    assert "'enc.k', which adapter_config.json does not target (target_modules=['q', 'v'])" in problems_of(folder)


def test_key_for_an_untargeted_layer_on_the_base(valid):
    # target_modules "all-linear" matches any name: only the base model tells which layers PEFT adapted
    folder, base = valid
    edit_config(folder, lambda d: d.update(target_modules=["q"], n_frequency_pattern={}, n_frequency=6))
    rewrite(folder, lambda t: t.update({bridge.spectrum_key("enc.v"): np.zeros(6, np.float32)}))
    assert "does not target (target_modules=['q'])" in problems_of(folder)
    edit_config(folder, lambda d: d.update(target_modules="all-linear"))
    rewrite(folder, lambda t: t.pop(bridge.spectrum_key("enc.v")))
    message = problems_of(folder, base)
    assert "layer 'enc.k' is targeted by the config but its key 'base_model.model.enc.k.fourierft_spectrum'" in message
    assert "layer 'enc.v' is targeted" in message and "is missing from the file" in message


def test_targeted_layer_without_its_key(valid):
    folder, base = valid
    rewrite(folder, lambda t: t.pop(bridge.spectrum_key("enc.q")))
    open_strict(folder)  # the file alone cannot tell
    message = problems_of(folder, base)
    assert "layer 'enc.q' is targeted by the config but its key 'base_model.model.enc.q.fourierft_spectrum' " \
           "(shape (6,)) is missing from the file" in message


def test_bias_and_stray_keys(valid):
    folder, _ = valid
    edit_config(folder, lambda d: d.update(bias="none"))
    rewrite(folder, lambda t: t.update({"base_model.model.enc.q.lora_A.weight": np.zeros(2, np.float32)}))
    message = problems_of(folder)
    assert message.startswith("3 problems: ")  # two biases, the stray key
    assert "'base_model.model.enc.q.base_layer.bias' is a bias, but adapter_config.json says bias='none'" in message
    assert "'base_model.model.enc.q.lora_A.weight' is neither a spectrum, a bias nor part of a modules_to_save" \
           in message


def test_integer_spectrum_refused(valid):
    folder, _ = valid
    rewrite(folder, lambda t: t.update({bridge.spectrum_key("enc.q"): np.zeros(6, np.int32)}))
    assert "'base_model.model.enc.q.fourierft_spectrum' is I32, but a spectrum is a float tensor" in problems_of(folder)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_refused_when_asked(valid, value):
    folder, base = valid
    rewrite(folder, lambda t: t[bridge.spectrum_key("enc.v")].__setitem__(2, value))
    adapter, _ = open_strict(folder, base=open_base(base))  # a conversion may carry them
    assert nonfinite_keys(adapter) == [bridge.spectrum_key("enc.v")]
    assert "NaN or inf values in 'base_model.model.enc.v.fourierft_spectrum'" in problems_of(folder, base)


@pytest.mark.parametrize("change, fragment", [
    (lambda d: d.update(peft_type="LORA"), "this is a LORA adapter, not a FourierFT one"),
    (lambda d: d.pop("peft_type"), "has no `peft_type`"),
    (lambda d: d.update(n_frequency=-3), "`n_frequency` must be a positive integer, got -3"),
    (lambda d: d.update(n_frequency="6"), "`n_frequency` must be an integer, got '6'"),
    (lambda d: d.update(n_frequency_pattern={"v": 0}), "`n_frequency_pattern['v']` must be a positive integer"),
    (lambda d: d.update(init_weights="yes"), "`init_weights` must be true or false, got 'yes'"),
    (lambda d: d.update(bias="some"), "`bias` must be one of"),
])
def test_config_fields(valid, change, fragment):
    folder, _ = valid
    edit_config(folder, change)
    for read in (lambda: open_strict(folder), lambda: check_folder(folder)):
        with pytest.raises(ValueError) as info:
            read()
        assert fragment in str(info.value) and os.path.join(folder, "adapter_config.json") in str(info.value)


def test_config_not_json(valid):
    folder, _ = valid
    open(os.path.join(folder, "adapter_config.json"), "w").write('{"peft_type": "FOURIERFT",')
    with pytest.raises(ValueError, match="is not valid JSON"):
        check_folder(folder)


def _damage_header_length(path):
    data = open(path, "rb").read()
    open(path, "wb").write(struct.pack("<Q", 2**62) + data[8:])


def _damage_truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-5])


def _damage_trailing(path):
    open(path, "ab").write(b"\0" * 8)


def _damage_offsets(path):
    # a tensor claiming 2**62 bytes of data: the header parses, the offsets do not fit
    data = open(path, "rb").read()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    key = sorted(k for k in header if k != "__metadata__")[0]
    header[key]["data_offsets"][1] = 2**62
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    open(path, "wb").write(struct.pack("<Q", len(text)) + text + data[8 + length :])


@pytest.mark.parametrize("damage, fragment", [
    (_damage_header_length, "header of 4611686018427387904 bytes does not fit"),
    (_damage_truncate, "truncated"),
    (_damage_trailing, "the header describes"),
    (_damage_offsets, "ends at byte 4611686018427387904"),
])
def test_damaged_safetensors(valid, damage, fragment):
    folder, _ = valid
    path = os.path.join(folder, WEIGHTS_NAME)
    damage(path)
    for read in (lambda: open_strict(folder), lambda: check_folder(folder), lambda: read_shapes(path)):
        with pytest.raises((AdapterFormatError, CheckpointError, SafetensorsError)) as info:
            read()
        assert path in str(info.value) and fragment in str(info.value), str(info.value)
    with pytest.raises(SafetensorsError):
        SafetensorsFile(path)


class _Trap:
    """Unpickling this creates a file: proof that a reader unpickled it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_never_unpickled(valid, tmp_path):
    folder, _ = valid
    marker = str(tmp_path / "unpickled")
    os.remove(os.path.join(folder, WEIGHTS_NAME))
    with open(os.path.join(folder, "adapter_model.bin"), "wb") as stream:
        pickle.dump(_Trap(marker), stream)
    for read in (lambda: open_strict(folder), lambda: check_folder(folder)):
        with pytest.raises(AdapterFormatError, match="adapter_model.bin .a pickle.*never unpickled"):
            read()
    assert not os.path.exists(marker)


def test_check_folder_leaves_the_folder_unchanged(valid):
    folder, _ = valid
    rewrite(folder, lambda t: t.update({bridge.spectrum_key("enc.v"): np.zeros(7, np.float32)}))
    before = {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}
    with pytest.raises(AdapterFormatError):
        check_folder(folder)
    assert {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)} == before
    shutil.rmtree(folder)


def test_lora_comparison_says_which_is_smaller():
    # r*(in+out) for two 64x64 layers at r=8 is 2048; FourierFT with 96 coefficients stores 2048-96 fewer
    assert lora_comparison(2048, 96, 2, 8).endswith("FourierFT stores 21.3x fewer (1,952 saved)")
    line = lora_comparison(96, 2048, 2, 8)
    assert "LoRA r=8 would store 1,952 fewer" in line and "saved" not in line and "-" not in line.split(":")[-1]


def test_reader_puts_back_a_folder_left_between_two_renames(valid):
    # a writer killed inside replace_directory's fallback: the old adapter sits in .adapter.old-<hex>, no adapter
    folder, base = valid
    os.rename(folder, os.path.join(os.path.dirname(folder), ".adapter.old-00ff"))
    adapter, _ = open_strict(folder, base=open_base(base))
    assert os.path.isdir(folder) and sorted(layer.name for layer in adapter.layers) == ["enc.q", "enc.v"]
    assert sorted(os.listdir(os.path.dirname(folder))) == ["adapter", "model.safetensors"]
