"""FourierFT for Flax NNX: swap targeted ``nnx.Linear`` modules for ``FourierFTLinear`` -- and ``nnx.LinearGeneral`` /
``nnx.Einsum`` modules (what ``nnx.MultiHeadAttention`` holds) for ``FourierFTGeneral`` -- and back.

Layer stacks built with ``nnx.vmap`` and run with ``nnx.scan`` are adapted with ``apply(..., stacked="path")``: each
stacked ``nnx.Linear`` gets one ``FourierFTLinear`` whose spectrum holds one row per layer, ``(L, n)``.

Example:
    >>> import jax, jax.numpy as jnp, optax, fourierft_jax
    >>> from flax import nnx
    >>> class MLP(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.fc1, self.fc2 = nnx.Linear(6, 8, rngs=rngs), nnx.Linear(8, 4, rngs=rngs)
    ...     def __call__(self, x):
    ...         return self.fc2(nnx.relu(self.fc1(x)))
    >>> model = fourierft_jax.nnx.apply(MLP(nnx.Rngs(0)), fourierft_jax.FourierFTConfig(n_frequency=10,
    ...                                 target_modules=["fc1", "fc2"]), rngs=nnx.Rngs(1))
    >>> optimizer = nnx.Optimizer(model, optax.adamw(5e-2), wrt=nnx.LoRAParam)
    >>> sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    20

An N-D kernel's contraction is read from its module (``LinearGeneral``'s features, ``Einsum``'s equation), so
attention projections are adapted without an example input:

    >>> attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=nnx.Rngs(0))
    >>> attn = fourierft_jax.nnx.apply(attn, fourierft_jax.FourierFTConfig(n_frequency=6, target_modules=["query",
    ...                                "value"]), rngs=nnx.Rngs(1), mode="fused")
    >>> type(attn.query).__name__, attn.query.layer.dims, attn(jnp.ones((1, 3, 8))).shape
    ('FourierFTGeneral', (8, 2, 4), (1, 3, 8))
"""

from ._src.nnx_layer import FourierFTGeneral, FourierFTLinear, FourierFTSpectrum, FourierFTTrainable
from ._src.nnx_model import apply, merge_and_unload, set_disabled, unload
from ._src.nnx_model import select_nnx_layers as select_layers

__all__ = [
    "FourierFTGeneral",
    "FourierFTLinear",
    "FourierFTSpectrum",
    "FourierFTTrainable",
    "apply",
    "merge_and_unload",
    "select_layers",
    "set_disabled",
    "unload",
]
