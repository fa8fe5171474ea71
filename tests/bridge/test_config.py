"""``bridge.FourierFTConfig`` against ``peft.FourierFTConfig``: file round trips both ways, validation, errors."""

from __future__ import annotations

import json
import os
import warnings

import peft
import pytest

import bridge

SET_FIELDS = ("target_modules", "exclude_modules")  # PEFT keeps these as sets and writes them in hash order

CONFIGS = [
    dict(target_modules=["query"]),
    dict(target_modules=["query", "value"], n_frequency=500, scaling=100.0),
    dict(target_modules=r".*\.(query|value)$", random_loc_seed=0),
    dict(target_modules=["q_proj", "v_proj", "k_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"], bias="all"),
    dict(target_modules=["c_attn"], exclude_modules=r".*\.h\.0\..*", fan_in_fan_out=True, bias="fourier_only"),
    dict(target_modules=["query"], modules_to_save=["classifier", "pooler"], task_type="SEQ_CLS"),
    dict(target_modules=["q_proj"], layers_to_transform=1),
    dict(target_modules=["q_proj", "o_proj"], layers_to_transform=[0, 2], layers_pattern="layers"),
    dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern=["layers", "h"]),
    dict(target_modules="all-linear", n_frequency_pattern={"q_proj": 100, "model.layers.0.mlp.up_proj": 7},
         init_weights=True, random_loc_seed=-5),
    dict(task_type="CAUSAL_LM", base_model_name_or_path="org/model", revision="main", inference_mode=True),
    dict(target_modules=["dense"], exclude_modules=["pooler.dense", "intermediate.dense"], random_loc_seed=2**40,
         n_frequency_pattern={"dense": 3}),
]
IDS = [f"config{i}" for i in range(len(CONFIGS))]


def normalized(data: dict) -> dict:
    """A config dict with the set-valued fields sorted, the only freedom PEFT's writer has."""
    data = dict(data)
    for field in SET_FIELDS:
        if isinstance(data.get(field), (list, set, frozenset)):
            data[field] = sorted(data[field])
    return data


def read_json(directory) -> tuple[str, dict]:
    with open(os.path.join(directory, "adapter_config.json"), encoding="utf-8") as handle:
        text = handle.read()
    return text, json.loads(text)


@pytest.mark.parametrize("kwargs", CONFIGS, ids=IDS)
def test_round_trip_peft_to_bridge_to_peft(tmp_path, kwargs):
    peft_dir, our_dir, again_dir = tmp_path / "peft", tmp_path / "ours", tmp_path / "again"
    original = peft.FourierFTConfig(**kwargs)
    original.save_pretrained(str(peft_dir))
    peft_text, peft_data = read_json(peft_dir)

    ours = bridge.FourierFTConfig.from_pretrained(peft_dir)
    assert normalized(ours.to_dict()) == normalized(peft_data)
    assert ours.save_pretrained(our_dir) == os.path.join(str(our_dir), "adapter_config.json")
    our_text, our_data = read_json(our_dir)
    assert our_data == normalized(peft_data)  # we write the sets sorted

    # The text is PEFT's byte for byte, once PEFT's set order is replaced by the sorted one. Without sets of two or
    # more names the raw bytes are equal.
    assert our_text == json.dumps(normalized(peft_data), indent=2, sort_keys=True)
    if all(not isinstance(peft_data.get(f), list) or len(peft_data[f]) <= 1 for f in SET_FIELDS):
        assert our_text == peft_text

    for reader in (peft.PeftConfig.from_pretrained, peft.FourierFTConfig.from_pretrained):
        loaded = reader(str(our_dir))
        assert isinstance(loaded, peft.FourierFTConfig)
        assert normalized(loaded.to_dict()) == normalized(original.to_dict())
    peft.FourierFTConfig.from_pretrained(str(our_dir)).save_pretrained(str(again_dir))
    assert normalized(read_json(again_dir)[1]) == normalized(peft_data)


@pytest.mark.parametrize("kwargs", CONFIGS, ids=IDS)
def test_bridge_written_config_reads_in_peft(tmp_path, kwargs):
    ours = bridge.FourierFTConfig(**kwargs)
    ours.save_pretrained(tmp_path)
    loaded = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(loaded, peft.FourierFTConfig)
    assert normalized(loaded.to_dict()) == normalized(peft.FourierFTConfig(**kwargs).to_dict())
    assert bridge.FourierFTConfig.from_pretrained(tmp_path).to_dict() == ours.to_dict()


def test_defaults_equal_peft():
    ours, theirs = bridge.FourierFTConfig().to_dict(), peft.FourierFTConfig().to_dict()
    assert set(ours) == set(theirs)
    assert normalized(ours) == normalized(theirs)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(n_frequency=0), "n_frequency"),
        (dict(n_frequency=-3), "n_frequency"),
        (dict(n_frequency=2.5), "n_frequency"),
        (dict(bias="lora_only"), "bias"),
        (dict(target_modules=["q"], layers_pattern="layers"), "layers_pattern"),
        (dict(target_modules=r".*q", layers_to_transform=[0]), "layers_to_transform"),
        (dict(target_modules=r".*q", layers_to_transform=0, layers_pattern="layers"), "layers_to_transform"),
        (dict(target_modules=r".*q", layers_pattern="layers"), "layers_pattern"),
        (dict(n_frequency_pattern={"q": 0}), "n_frequency_pattern"),
        (dict(n_frequency_pattern={"q": -1}), "n_frequency_pattern"),
        (dict(n_frequency_pattern={"q": 1.5}), "n_frequency_pattern"),
        (dict(n_frequency_pattern={"q": "10"}), "n_frequency_pattern"),
        (dict(n_frequency_pattern={3: 10}), "n_frequency_pattern"),
        (dict(n_frequency_pattern=[("q", 10)]), "n_frequency_pattern"),
        (dict(n_frequency_pattern="q"), "n_frequency_pattern"),
        (dict(target_modules=["q", 3]), "target_modules"),
        (dict(target_modules=5), "target_modules"),
        (dict(layers_to_transform=["0"]), "layers_to_transform"),
        (dict(random_loc_seed=None), "random_loc_seed"),
        (dict(random_loc_seed=2**64), "random_loc_seed"),  # torch.manual_seed overflows too
        (dict(scaling="150"), "scaling"),
    ],
)
def test_invalid_config_names_field(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}"):
        bridge.FourierFTConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [dict(target_modules=["q"], layers_pattern="layers"), dict(target_modules=r".*q", layers_to_transform=[0]),
     dict(target_modules=r".*q", layers_pattern="layers", layers_to_transform=0)],
)
def test_peft_rejects_the_same_layer_configs(kwargs):
    with pytest.raises(ValueError):
        peft.FourierFTConfig(**kwargs)


def test_missing_and_foreign_peft_type(tmp_path):
    with pytest.raises(ValueError, match="peft_type"):
        bridge.FourierFTConfig.from_dict({"n_frequency": 10})
    with pytest.raises(ValueError, match="LORA"):
        bridge.FourierFTConfig.from_dict({"peft_type": "LORA", "r": 8})
    # A LoRA adapter directory written by PEFT itself.
    peft.LoraConfig(target_modules=["q"]).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="LORA") as error:
        bridge.FourierFTConfig.from_pretrained(tmp_path)
    assert "adapter_config.json" in str(error.value)


def test_unknown_keys_warn_and_are_ignored(tmp_path):
    data = bridge.FourierFTConfig(target_modules=["q"], n_frequency=12).to_dict()
    data.update(future_field=1, another={"x": 2})
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"another.*future_field"):
        config = bridge.FourierFTConfig.from_pretrained(tmp_path)
    assert config.n_frequency == 12 and not hasattr(config, "future_field")
    assert "future_field" not in config.to_dict()


def test_corrupt_and_missing_file_errors_name_the_file(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text('{"peft_type": "FOURIERFT", "n_frequency": ')
    with pytest.raises(ValueError, match="not valid JSON") as error:
        bridge.FourierFTConfig.from_pretrained(tmp_path)
    assert str(path) in str(error.value)
    path.write_text('["not", "a", "dict"]')
    with pytest.raises(ValueError, match="expected a dict") as error:
        bridge.FourierFTConfig.from_pretrained(tmp_path)
    assert str(path) in str(error.value)
    path.write_text('{"peft_type": "FOURIERFT", "bias": "lora_only"}')
    with pytest.raises(ValueError, match="`bias`") as error:
        bridge.FourierFTConfig.from_pretrained(tmp_path)
    assert str(path) in str(error.value)
    with pytest.raises(FileNotFoundError, match="missing"):
        bridge.FourierFTConfig.from_pretrained(tmp_path / "missing")


def test_subfolder_and_json_path(tmp_path):
    bridge.FourierFTConfig(n_frequency=7, target_modules=["q"]).save_pretrained(tmp_path / "second")
    assert bridge.FourierFTConfig.from_pretrained(tmp_path, subfolder="second").n_frequency == 7
    assert bridge.FourierFTConfig.from_pretrained(tmp_path / "second" / "adapter_config.json").n_frequency == 7


def test_save_pretrained_is_atomic_and_rejects_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        bridge.FourierFTConfig().save_pretrained(target)
    bridge.FourierFTConfig().save_pretrained(tmp_path / "dir")
    assert os.listdir(tmp_path / "dir") == ["adapter_config.json"]  # no temporary left behind


def test_n_frequency_for_follows_peft_rule():
    config = bridge.FourierFTConfig(
        n_frequency=10, n_frequency_pattern={"q_proj": 3, "model.layers.1.self_attn.v_proj": 4, "up.proj": 5})
    assert config.n_frequency_for("model.layers.0.self_attn.q_proj") == 3
    assert config.n_frequency_for("model.layers.1.self_attn.v_proj") == 4  # exact full name
    assert config.n_frequency_for("model.layers.0.self_attn.v_proj") == 10
    assert config.n_frequency_for("model.layers.0.mlp.up_proj") == 5  # keys are regexes: "." matches "_"
    assert config.n_frequency_for("q_proj") == 3  # no dot before the key, but the exact-name lookup finds it
    assert config.n_frequency_for("xq_proj") == 10  # the regex needs a dot before the key
    first = bridge.FourierFTConfig(n_frequency_pattern={"proj": 1, "q_proj": 2})
    assert first.n_frequency_for("a.q_proj") == 2 and first.n_frequency_for("a.proj") == 1  # first matching key
    ordered = bridge.FourierFTConfig(n_frequency_pattern={".*proj": 1, "q_proj": 2})
    assert ordered.n_frequency_for("a.q_proj") == 1


def test_sets_are_written_sorted_and_deduplicated():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = bridge.FourierFTConfig(target_modules=("v", "q", "v"), exclude_modules={"b", "a"})
    assert config.to_dict()["target_modules"] == ["q", "v"]
    assert config.to_dict()["exclude_modules"] == ["a", "b"]
