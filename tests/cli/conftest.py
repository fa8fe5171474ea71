"""Tiny transformers models and PEFT-made FourierFT adapters for the CLI tests (built from configs, no downloads).

Each case saves a base model with ``save_pretrained(safe_serialization=True)``, wraps a copy with
``peft.get_peft_model`` (random spectra, perturbed biases and ``modules_to_save`` so that replacing them
matters) and saves the adapter; the PEFT model stays in memory as the oracle.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from typing import Any, Callable

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

sys.path.insert(0, os.path.dirname(__file__))
from _cli_util import bert_config, gpt2_config, llama_config  # noqa: E402


@dataclasses.dataclass
class Case:
    base: str  # base model folder
    adapter: str  # adapter folder
    model: Any  # the PEFT model (not merged)
    auto_class: Any  # transformers Auto class that loads the merged folder


def perturb_trainables(model, seed: int) -> None:
    """Move every trainable tensor away from its initial value (biases, modules_to_save, spectra)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                noise = torch.randn(parameter.shape, generator=generator).to(parameter.dtype)
                parameter.add_(0.5 * noise)


def make_case(root: str, build: Callable[[], Any], peft_config, auto_class, seed: int = 0,
              save_kwargs: dict | None = None) -> Case:
    torch.manual_seed(seed)
    base_model = build().eval()
    base_dir = os.path.join(root, "base")
    base_model.save_pretrained(base_dir, safe_serialization=True, **(save_kwargs or {}))
    model = peft.get_peft_model(copy.deepcopy(base_model), peft_config).eval()
    perturb_trainables(model, seed + 1)
    adapter_dir = os.path.join(root, "adapter")
    model.save_pretrained(adapter_dir)
    return Case(base_dir, adapter_dir, model, auto_class)


def fourierft(**kwargs):
    kwargs.setdefault("init_weights", False)
    return peft.FourierFTConfig(**kwargs)


@pytest.fixture(scope="session")
def bert_cls(tmp_path_factory) -> Case:
    """BertForSequenceClassification, bias="all", classifier in modules_to_save (SEQ_CLS), n_frequency_pattern."""
    root = str(tmp_path_factory.mktemp("bert_cls"))
    config = fourierft(n_frequency=40, scaling=120.0, target_modules=["query", "value", "dense"], bias="all",
                       task_type="SEQ_CLS", n_frequency_pattern={"value": 70})
    return make_case(root, lambda: transformers.BertForSequenceClassification(bert_config(num_labels=3)), config,
                     transformers.AutoModelForSequenceClassification)


@pytest.fixture(scope="session")
def bert_bare(tmp_path_factory) -> Case:
    """BertModel without a head, bias="fourier_only", a non-default seed."""
    root = str(tmp_path_factory.mktemp("bert_bare"))
    config = fourierft(n_frequency=30, scaling=80.0, random_loc_seed=12345, target_modules=["key", "intermediate.dense"],
                       bias="fourier_only")
    return make_case(root, lambda: transformers.BertModel(bert_config()), config, transformers.AutoModel, seed=3)


@pytest.fixture(scope="session")
def gpt2_sharded(tmp_path_factory) -> Case:
    """GPT2LMHeadModel (Conv1D, tied lm_head) saved in several shards."""
    root = str(tmp_path_factory.mktemp("gpt2"))
    config = fourierft(n_frequency=60, scaling=150.0, target_modules=["c_attn", "mlp.c_proj", "c_fc"])
    return make_case(root, lambda: transformers.GPT2LMHeadModel(gpt2_config()), config,
                     transformers.AutoModelForCausalLM, seed=5, save_kwargs={"max_shard_size": "20KB"})


@pytest.fixture(scope="session")
def llama_bf16(tmp_path_factory) -> Case:
    """LlamaForCausalLM in bfloat16 with lm_head in modules_to_save."""
    root = str(tmp_path_factory.mktemp("llama"))
    config = fourierft(n_frequency=50, scaling=300.0, target_modules=["q_proj", "v_proj", "down_proj"],
                       modules_to_save=["lm_head"])
    return make_case(root, lambda: transformers.LlamaForCausalLM(llama_config()).to(torch.bfloat16), config,
                     transformers.AutoModelForCausalLM, seed=7)
