"""Tiny twins for the conversion tests: linen models and torch models holding the same weights (kernel = weightᵀ).

``Net`` is named like a transformers encoder (``layer.0.query``), so the default name map holds; ``OddNet`` is
the same network named ``layers_0.attn.q`` in Flax, for the regex name-map tests; ``GptNet`` uses transformers'
``Conv1D`` on the torch side (weight stored ``(in, out)``, PEFT's ``fan_in_fan_out``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers.pytorch_utils import Conv1D

D_IN, D, N_CLASSES, N_LAYERS = 10, 16, 3, 2


class Block(nn.Module):
    q_name: str = "query"
    v_name: str = "value"

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(D, name=self.q_name)(x))
        return x + nn.Dense(D, name=self.v_name)(h)


class Layers(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(N_LAYERS):
            x = Block(name=str(i))(x)
        return x


class Net(nn.Module):
    """embed (10→16), layer.{0,1}.{query,value} (16→16), norm (LayerNorm), classifier (16→3)."""

    @nn.compact
    def __call__(self, x):
        h = Layers(name="layer")(nn.Dense(D, name="embed")(x))
        return nn.Dense(N_CLASSES, name="classifier")(nn.LayerNorm(name="norm")(h))


class OddNet(nn.Module):
    """``Net`` with other names: ``layers_{i}.attn.{q,v}``, ``inp``, ``ln``, ``out``."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(D, name="inp")(x)
        for i in range(N_LAYERS):
            h = OddBlock(name=f"layers_{i}")(h)
        return nn.Dense(N_CLASSES, name="out")(nn.LayerNorm(name="ln")(h))


class OddAttn(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(D, name="v")(jnp.tanh(nn.Dense(D, name="q")(x)))


class OddBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return OddAttn(name="attn")(x)


def init(model: nn.Module, seed: int = 0, dtype=jnp.float32):
    params = model.init(jax.random.key(seed), jnp.ones((1, D_IN)))
    # Non-zero biases, so that bias handling shows.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [(a + 0.1 * jax.random.normal(k, a.shape)).astype(dtype) for a, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, leaves)


class TorchBlock(torch.nn.Module):
    def __init__(self, q="query", v="value"):
        super().__init__()
        self.q_name, self.v_name = q, v
        setattr(self, q, torch.nn.Linear(D, D))
        setattr(self, v, torch.nn.Linear(D, D))

    def forward(self, x):
        return x + getattr(self, self.v_name)(torch.tanh(getattr(self, self.q_name)(x)))


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(D_IN, D)
        self.layer = torch.nn.ModuleList([TorchBlock() for _ in range(N_LAYERS)])
        self.norm = torch.nn.LayerNorm(D, eps=1e-6)
        self.classifier = torch.nn.Linear(D, N_CLASSES)

    def forward(self, x):
        h = self.embed(x)
        for block in self.layer:
            h = block(h)
        return self.classifier(self.norm(h))


class TorchAttn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj = torch.nn.Linear(D, D), torch.nn.Linear(D, D)

    def forward(self, x):
        return x + self.v_proj(torch.tanh(self.q_proj(x)))


class TorchOddBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = TorchAttn()

    def forward(self, x):
        return self.self_attn(x)


class TorchOddNet(torch.nn.Module):
    """The torch naming of ``OddNet``: ``layers.{i}.self_attn.{q,v}_proj``, ``embed``, ``norm``, ``head``."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(D_IN, D)
        self.layers = torch.nn.ModuleList([TorchOddBlock() for _ in range(N_LAYERS)])
        self.norm = torch.nn.LayerNorm(D, eps=1e-6)
        self.head = torch.nn.Linear(D, N_CLASSES)

    def forward(self, x):
        h = self.embed(x)
        for block in self.layers:
            h = block(h)
        return self.head(self.norm(h))


ODD_RULES = {
    "to_torch": [[r"^layers_(\d+)\.attn\.(q|v)$", r"layers.\1.self_attn.\2_proj"], [r"^inp$", "embed"],
                 [r"^ln$", "norm"], [r"^out$", "head"]],
    "to_flax": [[r"^layers\.(\d+)\.self_attn\.(q|v)_proj$", r"layers_\1.attn.\2"], [r"^embed$", "inp"],
                [r"^norm$", "ln"], [r"^head$", "out"]],
}


def _t(array) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.float32))


def _copy_dense(linear, tree) -> None:
    linear.weight.copy_(_t(tree["kernel"]).T)
    linear.bias.copy_(_t(tree["bias"]))


def _copy_norm(norm, tree) -> None:
    norm.weight.copy_(_t(tree["scale"]))
    norm.bias.copy_(_t(tree["bias"]))


def torch_twin(params) -> TorchNet:
    p = params["params"]
    model = TorchNet()
    with torch.no_grad():
        _copy_dense(model.embed, p["embed"])
        for i, block in enumerate(model.layer):
            _copy_dense(block.query, p["layer"][str(i)]["query"])
            _copy_dense(block.value, p["layer"][str(i)]["value"])
        _copy_norm(model.norm, p["norm"])
        _copy_dense(model.classifier, p["classifier"])
    return model.eval()


def torch_odd_twin(params) -> TorchOddNet:
    p = params["params"]
    model = TorchOddNet()
    with torch.no_grad():
        _copy_dense(model.embed, p["inp"])
        for i, block in enumerate(model.layers):
            _copy_dense(block.self_attn.q_proj, p[f"layers_{i}"]["attn"]["q"])
            _copy_dense(block.self_attn.v_proj, p[f"layers_{i}"]["attn"]["v"])
        _copy_norm(model.norm, p["ln"])
        _copy_dense(model.head, p["out"])
    return model.eval()


class GptNet(nn.Module):
    """GPT-2 names: ``h.{i}.attn.c_attn`` (16→16), ``h.{i}.mlp.c_proj`` (16→16), ``lm_head`` (16→3)."""

    @nn.compact
    def __call__(self, x):
        h = GptStack(name="h")(nn.Dense(D, name="wte")(x))
        return nn.Dense(N_CLASSES, name="lm_head")(h)


class GptBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = x + nn.Dense(D, name="c_attn")(x)
        return h + nn.Dense(D, name="c_proj")(jnp.tanh(h))


class GptStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(N_LAYERS):
            x = GptBlock(name=str(i))(x)
        return x


class TorchGptBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn, self.c_proj = Conv1D(D, D), Conv1D(D, D)

    def forward(self, x):
        h = x + self.c_attn(x)
        return h + self.c_proj(torch.tanh(h))


class TorchGptNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = torch.nn.Linear(D_IN, D)
        self.h = torch.nn.ModuleList([TorchGptBlock() for _ in range(N_LAYERS)])
        self.lm_head = torch.nn.Linear(D, N_CLASSES)

    def forward(self, x):
        h = self.wte(x)
        for block in self.h:
            h = block(h)
        return self.lm_head(h)


def torch_gpt_twin(params) -> TorchGptNet:
    p = params["params"]
    model = TorchGptNet()
    with torch.no_grad():
        _copy_dense(model.wte, p["wte"])
        for i, block in enumerate(model.h):
            for name in ("c_attn", "c_proj"):
                conv = getattr(block, name)
                conv.weight.copy_(_t(p["h"][str(i)][name]["kernel"]))  # Conv1D stores (in, out), like Flax
                conv.bias.copy_(_t(p["h"][str(i)][name]["bias"]))
        _copy_dense(model.lm_head, p["lm_head"])
    return model.eval()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def inputs(n: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D_IN)).astype(np.float32)
