"""Tiny models shared by the torch tests (built from configs, no downloads)."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """PEFT's custom-model test MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sm(self.lin1(self.relu(self.lin0(x))))


def bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                        vocab_size=100, max_position_embeddings=64)
    return BertModel(config).eval()


def gpt2():
    from transformers import GPT2Config, GPT2Model

    return GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)).eval()


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=48, vocab_size=100, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def inputs(kind: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return {"x": torch.randn(5, 10, generator=generator)}
    return {"input_ids": torch.randint(0, 100, (2, 7), generator=generator)}


def output(model, batch) -> torch.Tensor:
    out = model(**batch)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


FACTORIES = {"mlp": MLP, "bert": bert, "gpt2": gpt2, "llama": llama}
