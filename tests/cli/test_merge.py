"""`fourierft merge` against PEFT's own `merge_and_unload()` on tiny transformers models."""

from __future__ import annotations

import copy
import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

sys.path.insert(0, os.path.dirname(__file__))
import _cli_util  # noqa: E402

import bridge  # noqa: E402
from bridge._src.cli import main  # noqa: E402
from bridge._src.merge import delta_weight_float32  # noqa: E402
from bridge._src.tensor_io import bfloat16_to_float32, float32_to_bfloat16  # noqa: E402


def merge(case, out, *extra):
    return main(["merge", "--base", case.base, "--adapter", case.adapter, "--out", str(out), "-q", *extra])


def reference_state(case):
    """PEFT's merge_and_unload() on a copy of the PEFT model."""
    return {k: v.detach() for k, v in copy.deepcopy(case.model).merge_and_unload().state_dict().items()}


def check_against_peft(case, out, tolerance=1e-6):
    got = _cli_util.load_folder(str(out))
    want = reference_state(case)
    assert set(got) <= set(want), sorted(set(got) - set(want))
    # Every tensor of the base checkpoint is present (tied weights are absent from both).
    assert set(got) == set(_cli_util.load_folder(case.base))
    adapted = 0
    for key, tensor in got.items():
        assert tensor.dtype == want[key].dtype, key
        assert tensor.shape == want[key].shape, key
        assert _cli_util.relative_error(tensor, want[key]) <= tolerance, key
        adapted += not torch.equal(tensor, _cli_util.load_folder(case.base)[key])
    assert adapted > 0
    return got


def check_outputs(case, out, tolerance=1e-5):
    merged = case.auto_class.from_pretrained(str(out)).eval()
    reference = copy.deepcopy(case.model).merge_and_unload().eval()
    batch = {"input_ids": torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        got, want = merged(**batch), reference(**batch)
    got = got.logits if getattr(got, "logits", None) is not None else got.last_hidden_state
    want = want.logits if getattr(want, "logits", None) is not None else want.last_hidden_state
    assert _cli_util.relative_error(got.float(), want.float()) <= tolerance
    # and the adapter did change the model
    base = case.auto_class.from_pretrained(case.base).eval()
    with torch.no_grad():
        plain = base(**batch)
    plain = plain.logits if getattr(plain, "logits", None) is not None else plain.last_hidden_state
    assert not torch.allclose(plain.float(), want.float())


def test_bert_classifier_bias_all_modules_to_save(bert_cls, tmp_path):
    out = tmp_path / "merged"
    assert merge(bert_cls, out) == 0
    got = check_against_peft(bert_cls, out)
    # bias="all": biases of non-adapted layers and the classifier head come from the adapter
    trained = bert_cls.model.base_model.model
    assert torch.equal(got["classifier.weight"], trained.classifier.modules_to_save["default"].weight.detach())
    assert torch.equal(got["bert.encoder.layer.0.attention.self.key.bias"],
                       trained.bert.encoder.layer[0].attention.self.key.bias.detach())
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    check_outputs(bert_cls, out)


def test_bert_bare_fourier_only_seed(bert_bare, tmp_path):
    out = tmp_path / "merged"
    assert merge(bert_bare, out) == 0
    check_against_peft(bert_bare, out)
    check_outputs(bert_bare, out)


def test_gpt2_conv1d_sharded(gpt2_sharded, tmp_path):
    out = tmp_path / "merged"
    assert merge(gpt2_sharded, out) == 0
    base_files = sorted(os.listdir(gpt2_sharded.base))
    assert sum(name.endswith(".safetensors") for name in base_files) > 1  # really sharded
    assert sorted(os.listdir(out)) == base_files
    with open(os.path.join(out, "model.safetensors.index.json")) as stream:
        index = json.load(stream)["weight_map"]
    with open(os.path.join(gpt2_sharded.base, "model.safetensors.index.json")) as stream:
        assert index == json.load(stream)["weight_map"]
    check_against_peft(gpt2_sharded, out)
    check_outputs(gpt2_sharded, out)


def test_gpt2_forced_linear_layout_differs(gpt2_sharded, tmp_path):
    # The Conv1D transpose matters: reading the weights as nn.Linear gives a different (wrong) result.
    out = tmp_path / "merged"
    assert merge(gpt2_sharded, out, "--fan-in-fan-out", "false") == 0
    got, want = _cli_util.load_folder(str(out)), reference_state(gpt2_sharded)
    assert _cli_util.relative_error(got["transformer.h.0.mlp.c_fc.weight"], want["transformer.h.0.mlp.c_fc.weight"]) > 1e-3


def test_llama_bfloat16(llama_bf16, tmp_path):
    out = tmp_path / "merged"
    assert merge(llama_bf16, out) == 0
    got, want = _cli_util.load_folder(str(out)), reference_state(llama_bf16)
    base = _cli_util.load_folder(llama_bf16.base)
    assert set(got) == set(base)
    for key, tensor in got.items():
        assert tensor.dtype == torch.bfloat16, key
        if not torch.equal(tensor, want[key]):
            # PEFT's float32 ifft2 and ours round differently in the last bits of ΔW; after rounding to
            # bfloat16 that can flip a rare tie: at most one bfloat16 step, on a tiny fraction of entries.
            diff = (tensor.float() - want[key].float()).abs()
            ulp = want[key].float().abs().clamp_min(1e-30) * 2.0**-7
            assert bool((diff <= ulp).all()), key
            assert float((diff > 0).float().mean()) < 0.01, key
    assert torch.equal(got["lm_head.weight"], llama_bf16.model.base_model.model.lm_head.modules_to_save["default"].weight)
    # one bfloat16 step in a weight moves bfloat16 logits by about 1e-2 relative
    check_outputs(llama_bf16, out, tolerance=3e-2)


def test_adapter_on_bare_model_into_headed_checkpoint(tmp_path):
    # An adapter made on BertModel (keys `encoder...`) merged into a BertForSequenceClassification checkpoint
    # (keys `bert.encoder...`), and one made on the classifier model merged into a bare BertModel checkpoint.
    torch.manual_seed(11)
    headed = transformers.BertForSequenceClassification(bert_config_small()).eval()
    headed.save_pretrained(tmp_path / "headed", safe_serialization=True)
    headed.bert.save_pretrained(tmp_path / "bare", safe_serialization=True)
    config = peft.FourierFTConfig(n_frequency=20, target_modules=["query"], init_weights=False)
    bare_peft = peft.get_peft_model(copy.deepcopy(headed.bert), config)
    bare_peft.save_pretrained(tmp_path / "bare_adapter")
    headed_peft = peft.get_peft_model(copy.deepcopy(headed), copy.deepcopy(config))
    headed_peft.save_pretrained(tmp_path / "headed_adapter")
    want_bare = bare_peft.merge_and_unload().state_dict()
    want_headed = headed_peft.merge_and_unload().state_dict()

    assert main(["merge", "--base", str(tmp_path / "headed"), "--adapter", str(tmp_path / "bare_adapter"),
                 "--out", str(tmp_path / "m1"), "-q"]) == 0
    got = _cli_util.load_folder(str(tmp_path / "m1"))
    for key, tensor in want_bare.items():
        assert _cli_util.relative_error(got["bert." + key], tensor) <= 1e-6, key
    assert torch.equal(got["classifier.weight"], headed.classifier.weight)

    assert main(["merge", "--base", str(tmp_path / "bare"), "--adapter", str(tmp_path / "headed_adapter"),
                 "--out", str(tmp_path / "m2"), "-q"]) == 0
    got = _cli_util.load_folder(str(tmp_path / "m2"))
    assert set(got) == set(want_bare)
    for key, tensor in got.items():
        assert _cli_util.relative_error(tensor, want_headed["bert." + key]) <= 1e-6, key


def bert_config_small():
    return transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                                   vocab_size=50, max_position_embeddings=32, num_labels=2)


def test_several_adapters_pick_by_name(tmp_path, capsys):
    torch.manual_seed(2)
    model = transformers.BertModel(bert_config_small()).eval()
    model.save_pretrained(tmp_path / "base", safe_serialization=True)
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.FourierFTConfig(n_frequency=10, target_modules=["query"]))
    wrapped.add_adapter("other", peft.FourierFTConfig(n_frequency=25, scaling=50.0, target_modules=["value"]))
    wrapped.save_pretrained(tmp_path / "adapters")
    assert os.path.isdir(tmp_path / "adapters" / "other")
    wrapped.set_adapter("other")
    want = wrapped.merge_and_unload(adapter_names=["other"]).state_dict()
    assert main(["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapters"),
                 "--adapter-name", "other", "--out", str(tmp_path / "m"), "-q"]) == 0
    got = _cli_util.load_folder(str(tmp_path / "m"))
    for key, tensor in got.items():
        assert _cli_util.relative_error(tensor, want[key]) <= 1e-6, key
    assert not torch.equal(got["encoder.layer.0.attention.self.value.weight"], model.encoder.layer[0].attention.self.value.weight)
    assert torch.equal(got["encoder.layer.0.attention.self.query.weight"], model.encoder.layer[0].attention.self.query.weight)


@pytest.mark.parametrize("shape", [(6, 5), (8, 8), (7, 9), (16, 33), (1, 4), (3, 1)])
def test_delta_float32_matches_float64_reference(shape):
    out_features, in_features = shape
    n = min(out_features * in_features, 13)
    indices = bridge.spectral_indices(out_features, in_features, n, 777)
    spectrum = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    got = delta_weight_float32(spectrum, indices, out_features, in_features, 150.0)
    want = bridge.delta_weight(spectrum, indices, out_features, in_features, 150.0)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-6 * np.abs(want).max())


def test_bfloat16_rounding_matches_torch():
    rng = np.random.default_rng(0)
    values = np.concatenate([
        rng.standard_normal(20000).astype(np.float32) * 10.0 ** rng.integers(-40, 38, 20000),
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4028235e38, -3.4028235e38, 1e-45, 1e-39], np.float32),
        # exact ties between two bfloat16 values, both parities
        (np.arange(1, 200, dtype=np.uint32) << 16 | 0x8000).view(np.float32),
    ]).astype(np.float32)
    want = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = float32_to_bfloat16(values)
    finite = ~np.isnan(values)
    np.testing.assert_array_equal(got[finite], want[finite])
    assert np.isnan(bfloat16_to_float32(got[~finite])).all()
    round_trip = torch.from_numpy(want.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(bfloat16_to_float32(want)[finite], round_trip[finite])
