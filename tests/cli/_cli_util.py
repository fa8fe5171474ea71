"""Helpers of the CLI tests."""

from __future__ import annotations

import glob
import os

import torch
import transformers
from safetensors.torch import load_file


def load_folder(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in a folder."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        tensors.update(load_file(path))
    return tensors


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| in float64."""
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def bert_config(**kwargs):
    return transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                   vocab_size=100, max_position_embeddings=64, **kwargs)


def gpt2_config():
    return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)


def llama_config():
    return transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=48, vocab_size=100, max_position_embeddings=64)
