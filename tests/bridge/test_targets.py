"""``bridge.select_targets`` against the layers ``peft.get_peft_model`` adapts in tiny random transformers models."""

from __future__ import annotations

import warnings

import peft
import pytest
import transformers
from peft.tuners.fourierft.layer import FourierFTLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

import bridge
from bridge._src.targets import DEFAULT_TARGET_MODULES, layer_index


def bert(head: bool = False):
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(config) if head else transformers.BertModel(config)


def gpt2():
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


def llama():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(config)


MODELS = {"bert": bert, "bert_cls": lambda: bert(head=True), "gpt2": gpt2, "llama": llama}


def describe(model: nn.Module) -> tuple[list[bridge.ModuleInfo], str | None]:
    """Every named module as a ModuleInfo, and the name of the output embedding layer (if any)."""
    infos = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            infos.append(bridge.ModuleInfo(name, bridge.LINEAR, (module.out_features, module.in_features)))
        elif isinstance(module, Conv1D):
            infos.append(bridge.ModuleInfo(name, bridge.CONV1D, (module.weight.shape[1], module.weight.shape[0])))
        else:
            infos.append(bridge.ModuleInfo(name, type(module).__name__))
    output = model.get_output_embeddings()
    output_layer = next((n for n, m in model.named_modules() if m is output), None) if output is not None else None
    return infos, output_layer


def ours(model_name: str, kwargs: dict) -> dict[str, tuple]:
    model = MODELS[model_name]()
    infos, output_layer = describe(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers = bridge.select_targets(bridge.FourierFTConfig(**kwargs), infos, model_type=model.config.model_type,
                                       output_layer=output_layer)
    assert [layer.name for layer in layers] == [i.name for i in infos if i.name in {t.name for t in layers}]  # order
    return {t.name: (t.n_frequency, t.out_features, t.in_features, t.kind) for t in layers}


def peft_adapts(model_name: str, kwargs: dict) -> dict[str, tuple]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(MODELS[model_name](), peft.FourierFTConfig(**kwargs))
    return {
        name: (module.fourierft_n_frequency["default"], module.out_features, module.in_features,
               bridge.CONV1D if isinstance(module.get_base_layer(), Conv1D) else bridge.LINEAR)
        for name, module in model.base_model.model.named_modules()
        if isinstance(module, FourierFTLayer)
    }


N = dict(n_frequency=40)
CASES = [
    ("bert", dict(target_modules=["query", "value"])),
    ("bert", dict(target_modules=r".*\.layer\.[01]\..*\.(query|key)")),
    ("bert", dict(target_modules=["dense"], exclude_modules=["pooler.dense", "intermediate.dense"])),
    ("bert", dict(target_modules=["dense"], exclude_modules=r".*intermediate.*")),
    ("bert", dict(target_modules=r".*dense", exclude_modules=r".*\.layer\.1\..*")),
    ("bert", dict(target_modules=["query"], layers_to_transform=1)),
    ("bert", dict(target_modules=["query", "value"], layers_to_transform=[0, 2], layers_pattern="layer")),
    ("bert", dict(target_modules=["dense"], layers_to_transform=[1])),  # pooler.dense has no layer index
    ("bert", dict(target_modules=["dense"], layers_to_transform=[])),  # empty list: every layer
    ("bert", dict(target_modules=["query", "encoder.layer.0.attention.self.value"], layers_to_transform=[1])),
    ("bert", dict(target_modules=["output.dense", "key"],
                  n_frequency_pattern={"key": 7, "encoder.layer.1.attention.output.dense": 9, "output.dense": 11})),
    ("bert", dict(target_modules=["dense"], modules_to_save=["pooler"])),
    ("bert", dict(target_modules="all-linear")),
    ("bert", dict(target_modules="ALL-LINEAR", exclude_modules=["query"])),
    ("bert", dict(target_modules=None)),
    ("bert", dict(target_modules=["query", "key"], exclude_modules=["nothing"])),
    ("bert_cls", dict(target_modules="all-linear")),
    ("bert_cls", dict(target_modules="all-linear", task_type="SEQ_CLS")),
    ("bert_cls", dict(target_modules=["query", "classifier"], task_type="SEQ_CLS")),
    ("bert_cls", dict(target_modules=["query", "classifier"], modules_to_save=["classifier"])),
    ("bert_cls", dict(target_modules=["dense", "score"], task_type="SEQ_CLS", modules_to_save=["pooler"])),
    ("bert_cls", dict(target_modules=["dense"], task_type="TOKEN_CLS")),
    ("gpt2", dict(target_modules=None)),
    ("gpt2", dict(target_modules=["c_attn"], fan_in_fan_out=True)),
    ("gpt2", dict(target_modules="all-linear")),
    ("gpt2", dict(target_modules=["c_attn", "c_proj"], layers_to_transform=[0, 2], layers_pattern="h")),
    ("gpt2", dict(target_modules=["c_fc"], layers_to_transform=2)),
    ("gpt2", dict(target_modules=r"transformer\.h\.[12]\.mlp\.c_.*")),
    ("gpt2", dict(target_modules=["c_proj"], exclude_modules=["mlp.c_proj"])),
    ("gpt2", dict(target_modules=["c_attn", "c_fc", "lm_head"],
                  n_frequency_pattern={"c_attn": 50, "transformer.h.1.mlp.c_fc": 20})),
    ("llama", dict(target_modules=None)),
    ("llama", dict(target_modules="all-linear", n_frequency_pattern={"(q|k)_proj": 64})),
    ("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=1)),
    ("llama", dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 1], layers_pattern=["layers"])),
    ("llama", dict(target_modules=["k_proj", "o_proj"], exclude_modules=r".*\.layers\.0\..*")),
    ("llama", dict(target_modules=["gate_proj", "q_proj"], modules_to_save=["mlp"])),
    ("llama", dict(target_modules=r"model\.layers\.\d+\.self_attn\.(q|k|v)_proj", task_type="CAUSAL_LM")),
]


@pytest.mark.parametrize("model_name,kwargs", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_same_layers_and_n_frequency_as_peft(model_name, kwargs):
    kwargs = {**N, **kwargs}
    expected = peft_adapts(model_name, kwargs)
    assert expected  # every case adapts something in PEFT
    assert ours(model_name, kwargs) == expected


ERROR_CASES = [
    ("bert", dict(target_modules=["nonexistent"]), bridge.NoTargetError, r"nonexistent.*encoder\.layer\.0\."),
    ("llama", dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="blocks"),
     bridge.NoTargetError, "layers_pattern='blocks'.*model.layers.0.self_attn.q_proj"),
    ("bert", dict(target_modules=["query"], exclude_modules=["query"]), bridge.NoTargetError, "exclude_modules"),
    ("bert", dict(target_modules=["attention"]), TypeError, r"'encoder\.layer\.0\.attention'.*BertAttention"),
    ("gpt2", dict(target_modules=["wte"]), TypeError, "'transformer.wte'.*Embedding"),
    ("bert", dict(target_modules=["query"], n_frequency=32 * 32 + 1), ValueError, r"1025.*encoder\.layer\.0"),
    ("gpt2", dict(target_modules=r"transformer\.h\.[12]\.mlp\..*"), TypeError, r"'transformer\.h\.1\.mlp\.act'"),
    ("llama", dict(target_modules=["k_proj"], n_frequency=300, n_frequency_pattern={"k_proj": 16 * 32 + 1}),
     ValueError, r"model\.layers\.0\.self_attn\.k_proj.*16x32"),
]


@pytest.mark.parametrize("model_name,kwargs,error,match", ERROR_CASES,
                         ids=[f"{m}-{e.__name__}-{i}" for i, (m, _, e, _) in enumerate(ERROR_CASES)])
def test_raises_where_peft_raises(model_name, kwargs, error, match):
    kwargs = {**N, **kwargs}
    peft_error = error if error is not bridge.NoTargetError else ValueError
    with pytest.raises(peft_error):
        peft_adapts(model_name, kwargs)
    with pytest.raises(error, match=match):
        ours(model_name, kwargs)


def test_no_target_message_lists_linear_layers():
    infos, _ = describe(bert())
    with pytest.raises(bridge.NoTargetError) as error:
        bridge.select_targets(bridge.FourierFTConfig(target_modules=["nothing"]), infos)
    linear = [i.name for i in infos if i.kind == bridge.LINEAR]
    assert len(linear) > 10
    for name in linear[:5]:
        assert name in str(error.value)
    assert "embeddings" not in str(error.value)


def test_fan_in_fan_out_warnings_like_peft():
    infos, _ = describe(gpt2())
    with pytest.warns(UserWarning, match="Conv1D"):
        bridge.select_targets(bridge.FourierFTConfig(target_modules=["c_attn"]), infos)
    infos, _ = describe(llama())
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        bridge.select_targets(bridge.FourierFTConfig(target_modules=["q_proj"], fan_in_fan_out=True), infos)


def test_target_modules_none_needs_a_known_model_type():
    infos, _ = describe(llama())
    with pytest.raises(ValueError, match="target_modules"):
        bridge.select_targets(bridge.FourierFTConfig(), infos)
    with pytest.raises(ValueError, match="'no-such-model'"):
        bridge.select_targets(bridge.FourierFTConfig(), infos, model_type="no-such-model")


def test_default_target_modules_equal_peft_mapping():
    from peft.utils import TRANSFORMERS_MODELS_TO_FOURIERFT_TARGET_MODULES_MAPPING as mapping

    assert DEFAULT_TARGET_MODULES == {key: value for key, value in mapping.items()}


@pytest.mark.parametrize(
    "name,pattern,expected",
    [("model.layers.1.experts.0.w1", None, 1), ("transformer.h.3.attn.c_attn", "h", 3),
     ("encoder.layer.12.output.dense", None, 12), ("pooler.dense", None, None), ("layers.2.q", "layers", 2),
     ("a.blocks.4.layers.5.q", ["layers", "blocks"], 5), ("a.blocks.4.q", ["layers"], None)],
)
def test_layer_index_like_peft(name, pattern, expected):
    assert layer_index(name, pattern) == expected
