"""A first look at FourierFT: which layers a config adapts, where their trainable frequencies sit, what it costs.

Runs offline in seconds, with numpy alone (no jax, no torch):  python examples/quickstart.py
"""

from __future__ import annotations

import numpy as np

import bridge


def bert_base_modules(num_layers: int = 12, hidden: int = 768, intermediate: int = 3072) -> list[bridge.ModuleInfo]:
    """The linear layers of a BERT-base encoder, named as in transformers' ``BertModel``."""
    modules = [bridge.ModuleInfo("embeddings.word_embeddings", "Embedding")]
    for i in range(num_layers):
        prefix = f"encoder.layer.{i}"
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            modules.append(bridge.ModuleInfo(f"{prefix}.{name}", bridge.LINEAR, (hidden, hidden)))
        modules.append(bridge.ModuleInfo(f"{prefix}.intermediate.dense", bridge.LINEAR, (intermediate, hidden)))
        modules.append(bridge.ModuleInfo(f"{prefix}.output.dense", bridge.LINEAR, (hidden, intermediate)))
    return modules


def main() -> None:
    config = bridge.FourierFTConfig(n_frequency=1000, scaling=150.0, target_modules=["query", "value"])
    layers = bridge.select_targets(config, bert_base_modules())
    print(f"FourierFT on BERT-base, target_modules={config.target_modules}: {len(layers)} adapted layers")
    first = layers[0]
    indices = bridge.spectral_indices(first.out_features, first.in_features, first.n_frequency, config.random_loc_seed)
    print(f"  {first.name} ({first.out_features}x{first.in_features}): first positions (row, col) =",
          list(zip(indices[0, :5].tolist(), indices[1, :5].tolist())))

    spectrum = np.random.default_rng(0).standard_normal(first.n_frequency)
    delta = bridge.delta_weight(spectrum, indices, first.out_features, first.in_features, config.scaling)
    print(f"  a random spectrum gives a dense ΔW of shape {delta.shape}, rank {np.linalg.matrix_rank(delta)}, "
          f"std {delta.std():.4f}")

    fourier = sum(layer.n_frequency for layer in layers)
    lora = sum(8 * (layer.in_features + layer.out_features) for layer in layers)
    print(f"  trainable parameters: FourierFT {fourier:,} vs LoRA r=8 {lora:,} ({lora / fourier:.1f}x more)")


if __name__ == "__main__":
    main()
