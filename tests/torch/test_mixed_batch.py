"""Mixed-adapter batches (issue 16): every row of a batch with its own adapter, on the spectral path.

References are independent of the mixed path: each row run alone on a copy of the model with that adapter
merged (``merge_and_unload``, ΔW built by ``irfft2`` and added to the weight), the base model with adapters
disabled, and PEFT itself on folders PEFT wrote.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import torch_models as _models  # noqa: E402
from test_state_on_error import assert_unchanged, snapshot  # noqa: E402

import bridge  # noqa: E402
import fourierft_torch  # noqa: E402

peft = pytest.importorskip("peft")


class Odd(nn.Module):
    """Linear layers of non-square, odd and even shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(13, 22)
        self.b = nn.Linear(22, 7)
        self.c = nn.Linear(7, 31)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _gpt2_lm():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)).eval()


# (factory, targets, scaling, inputs of 5 rows): scalings make ΔW matter without swamping W.
MODELS = {
    "odd_mlp": (Odd, ["a", "b", "c"], 20.0, lambda g: {"x": torch.randn(5, 3, 13, generator=g)}),
    "bert": (_models.bert, ["query", "value", "dense"], 2.0,
             lambda g: {"input_ids": torch.randint(0, 100, (5, 7), generator=g)}),
    "gpt2": (_models.gpt2, ["c_attn", "c_proj", "c_fc"], 1.5,
             lambda g: {"input_ids": torch.randint(0, 100, (5, 7), generator=g)}),
}

NAMES = ["b", "__base__", "default", "c", "b"]


def _config(targets, scaling, **kwargs):
    return fourierft_torch.FourierFTConfig(target_modules=targets, scaling=scaling, **kwargs)


def _model(factory, targets, scaling):
    """Three adapters: two (n_frequency, seed) groups, one adapter on a subset of the layers."""
    torch.manual_seed(0)
    model = fourierft_torch.get_fourierft_model(factory().eval(), _config(targets, scaling, n_frequency=20))
    model.add_adapter("b", _config(targets, 0.7 * scaling, n_frequency=33, random_loc_seed=5))
    model.add_adapter("c", _config(targets[-1:], 1.3 * scaling, n_frequency=20))
    return model


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max()).item()


def _alone(model, name, batch):
    """Row by row reference: the model with only ``name`` merged (or the base model), on that row alone."""
    copied = copy.deepcopy(model)
    merged = copied.unload() if name == "__base__" else copied.merge_and_unload(adapter_names=[name])
    return lambda row: _models.output(merged, row)


def _rows(batch, i):
    return {key: value[i : i + 1] for key, value in batch.items()}


@pytest.mark.parametrize("kind", list(MODELS))
def test_each_row_equals_its_adapter_merged(kind):
    factory, targets, scaling, make_inputs = MODELS[kind]
    model = _model(factory, targets, scaling)
    batch = make_inputs(torch.Generator().manual_seed(1))
    with torch.inference_mode():
        mixed = _models.output(model, {**batch, "adapter_names": NAMES})
        with model.disable_adapter():
            base = _models.output(model, batch)
        for i, name in enumerate(NAMES):
            reference = _alone(model, name, batch)(_rows(batch, i))[0]
            assert _rel(mixed[i], reference) <= 1e-5, (kind, i, name)
            if name == "__base__":
                assert torch.equal(mixed[i], base[i])  # no delta at all on base rows
            else:  # the adapter really changes this row (the check above could not pass by accident)
                assert _rel(mixed[i], base[i]) > 1e-3, (kind, i, name)


def test_rows_are_independent_of_their_neighbours():
    model = _model(*MODELS["odd_mlp"][:3])
    x = torch.randn(6, 13, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # no_grad as well as inference_mode
        one = model(x, adapter_names=["b", "c", "default", "__base__", "b", "c"])
        other = model(x.flip(0), adapter_names=["c", "b", "__base__", "default", "c", "b"]).flip(0)
    torch.testing.assert_close(one, other, rtol=1e-6, atol=1e-6)


def test_changed_or_added_adapters_are_seen():
    model = _model(*MODELS["odd_mlp"][:3])
    x = torch.randn(2, 13, generator=torch.Generator().manual_seed(3))
    names = ["b", "default"]
    with torch.inference_mode():
        model(x, adapter_names=names)  # builds the stacked coefficients
    with torch.no_grad():
        model.model.a.fourierft_spectrum["b"].mul_(-2.0)  # in place: a new _version
    model.add_adapter("d", _config(["a"], 9.0, n_frequency=20))
    with torch.inference_mode():
        mixed = model(x, adapter_names=names)
        mixed_d = model(x, adapter_names=["d", "b"])
        for i, name in enumerate(names):
            assert _rel(mixed[i], _alone(model, name, {"x": x})({"x": x[i : i + 1]})[0]) <= 1e-5
        assert _rel(mixed_d[0], _alone(model, "d", {"x": x})({"x": x[:1]})[0]) <= 1e-5


def test_bf16_base():
    model = _model(*MODELS["bert"][:3])
    batch = MODELS["bert"][3](torch.Generator().manual_seed(4))
    reference32 = {}
    with torch.inference_mode():
        for i, name in enumerate(NAMES):
            reference32[i] = _alone(model, name, batch)(_rows(batch, i))[0]
    model = model.to(torch.bfloat16)
    with torch.inference_mode():
        mixed = _models.output(model, {**batch, "adapter_names": NAMES})
        assert mixed.dtype == torch.bfloat16
        for i, name in enumerate(NAMES):
            if name == "__base__":
                with model.disable_adapter():
                    alone = _models.output(model, _rows(batch, i))[0]
            else:
                model.set_adapter(name)  # the same bf16 model, that adapter alone, the ordinary forward
                alone = _models.output(model, _rows(batch, i))[0]
            assert _rel(mixed[i], alone) <= 2e-2, (i, name)
            assert _rel(mixed[i], reference32[i]) <= 5e-2, (i, name)


def _generate_models(kind):
    torch.manual_seed(0)
    if kind == "llama":
        base, targets, scaling = _models.llama(), ["q_proj", "v_proj", "down_proj"], 2.5
    else:
        base, targets, scaling = _gpt2_lm(), ["c_attn", "c_fc"], 1.5
    model = fourierft_torch.get_fourierft_model(base, _config(targets, scaling, n_frequency=40))
    model.add_adapter("b", _config(targets, 0.8 * scaling, n_frequency=25, random_loc_seed=3))
    return model


@pytest.mark.parametrize("kind,beams", [("llama", 1), ("gpt2", 1), ("llama", 2)])
def test_generate_with_kv_cache_equals_each_adapter_merged(kind, beams):
    model = _generate_models(kind)
    names = ["b", "default", "__base__"]
    ids = torch.randint(1, 100, (3, 5), generator=torch.Generator().manual_seed(5))
    options = dict(max_new_tokens=4, do_sample=False, num_beams=beams, pad_token_id=0, use_cache=True,
                   return_dict_in_generate=True, output_scores=True)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mixed = model.generate(input_ids=ids, adapter_names=names, **options)
        for i, name in enumerate(names):
            copied = copy.deepcopy(model)
            if name == "__base__":
                with copied.disable_adapter():
                    alone = copied.generate(input_ids=ids[i : i + 1], **options)
            else:
                alone = copied.merge_and_unload(adapter_names=[name]).generate(input_ids=ids[i : i + 1], **options)
            assert torch.equal(mixed.sequences[i : i + 1], alone.sequences), (kind, name)
            rows = slice(i * beams, (i + 1) * beams)  # scores: one row per beam
            assert len(mixed.scores) == len(alone.scores) == 4
            for step_mixed, step_alone in zip(mixed.scores, alone.scores):
                assert _rel(step_mixed[rows], step_alone) <= 1e-5, (kind, name)


# ---------------------------------------------------------------------------------------------- loading many


def _peft_folders(tmp_path, count=20):
    """``count`` adapters written by PEFT itself on the shared MLP (other n_frequency, seeds, heads)."""
    folders = []
    for i in range(count):
        torch.manual_seed(100 + i)
        kwargs = dict(n_frequency=[6, 9][i % 2], scaling=[150.0, 40.0, 90.0][i % 3],
                      random_loc_seed=[777, 11][(i // 2) % 2], target_modules=["lin0"])
        if i % 4 == 0:
            kwargs["modules_to_save"] = ["lin1"]
        torch.manual_seed(7)
        base = _models.MLP().eval()
        torch.manual_seed(100 + i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.get_peft_model(base, peft.FourierFTConfig(**kwargs))
        if "modules_to_save" in kwargs:
            with torch.no_grad():  # a trained head: different from the original
                theirs.base_model.model.lin1.modules_to_save["default"].weight.add_(0.3 * torch.randn(2, 20))
        folder = os.path.join(tmp_path, f"task{i:02d}")
        theirs.save_pretrained(folder)
        folders.append(folder)
    return folders


def _base_mlp():
    torch.manual_seed(7)
    return _models.MLP().eval()


def test_load_adapters_from_peft_then_mixed_batch_equals_peft(tmp_path):
    folders = _peft_folders(str(tmp_path))
    model = fourierft_torch.FourierFTModel.from_pretrained(_base_mlp(), folders[0], adapter_name="first")
    rng = torch.random.get_rng_state()
    names = model.load_adapters(folders, progress=False)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert names == [f"task{i:02d}" for i in range(20)]
    assert model.active_adapter == "first"
    row_names = names[::-1] + ["__base__", "first"]
    x = torch.randn(len(row_names), 10, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        mixed = model(x, adapter_names=row_names)
        for i, name in enumerate(row_names):
            base = _base_mlp()
            if name == "__base__":
                reference = base(x[i : i + 1])
            else:
                folder = folders[0] if name == "first" else folders[names.index(name)]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    theirs = peft.PeftModel.from_pretrained(base, folder).eval()
                reference = theirs(x[i : i + 1])
            assert _rel(mixed[i], reference[0]) <= 1e-5, name


def test_load_adapters_is_all_or_nothing(tmp_path):
    folders = _peft_folders(str(tmp_path), count=4)
    # A folder for another model: its lin0 is 10 -> 30, so its spectrum fits but the head copy does not.
    torch.manual_seed(0)
    other = _models.MLP()
    other.lin1 = nn.Linear(20, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(other, peft.FourierFTConfig(n_frequency=6, target_modules=["lin0"],
                                                        modules_to_save=["lin1"])).save_pretrained(f"{tmp_path}/bad")
    model = fourierft_torch.FourierFTModel.from_pretrained(_base_mlp(), folders[1], adapter_name="first")
    before = snapshot(model)
    with pytest.raises(bridge.AdapterFormatError, match="'bad'.*lin1"):
        model.load_adapters(folders[:3] + [f"{tmp_path}/bad"], progress=False)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="already exist"):
        model.load_adapters([folders[0]], adapter_names=["first"], progress=False)
    with pytest.raises(ValueError, match="name"):
        model.load_adapters([folders[0], folders[1]], adapter_names=["x", "x"], progress=False)
    assert_unchanged(model, before)
    assert model.load_adapters(folders[:3], progress=False) == ["task00", "task01", "task02"]


# ---------------------------------------------------------------------------------------------- bad inputs


BAD = {
    "unknown name": (lambda m, x: m(x, adapter_names=["default", "nope"]), ValueError,
                     r"nope; loaded adapters: \['b', 'c', 'default'\]"),
    "wrong length": (lambda m, x: m(x, adapter_names=["default"]), ValueError, "Length of `adapter_names`"),
    "not a list": (lambda m, x: m(x, adapter_names="default"), TypeError, "list of str"),
    "training mode": (lambda m, x: m(x, adapter_names=["default", "b"]), ValueError, "training mode"),
    "merged": (lambda m, x: m(x, adapter_names=["default", "b"]), ValueError, "merged"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapter_names(case):
    call, error, match = BAD[case]
    model = _model(*MODELS["odd_mlp"][:3])
    x = torch.randn(2, 13, generator=torch.Generator().manual_seed(8))
    if case == "merged":
        model.merge_adapter(["b"])
    if case == "training mode":
        model.train()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        call(model, x)
    assert_unchanged(model, before)
    # no hook left behind: a plain forward still runs, and the layers see no adapter_names
    assert all(not m._forward_pre_hooks for m in model.modules())
