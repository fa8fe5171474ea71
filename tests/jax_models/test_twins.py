"""The torch twins of the third-party fixtures compute the same thing: weights converted with ``twins.convert``
give the same hidden states / logits in float32 (within 1e-4 relative). No fourierft involved."""

import jax
import numpy as np
import pytest

import thirdparty_models as tm
import twins


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _same_structure(converted, params):
    """The converted tree has exactly the fixture's paths and shapes."""
    flat = lambda t: {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_flatten_with_path(t)[0]}  # noqa: E731
    assert flat(converted) == flat(params)


def test_keras_llama_backbone_equals_transformers_llama_model():
    record = tm.keras_llama_backbone()
    torch_model = twins.torch_llama(seed=1)
    params = twins.keras_llama_params_from_torch(torch_model)  # the backbone holds the untied head too
    _same_structure(params, record.params)
    want = twins.torch_outputs(torch_model, record.inputs[0], hidden=True)
    got = np.asarray(jax.jit(record.fn)(params, *record.inputs))
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-4


def test_keras_llama_causal_lm_equals_transformers_llama_for_causal_lm():
    record = tm.keras_llama_causal_lm()
    torch_model = twins.torch_llama(seed=2)
    params = twins.keras_llama_params_from_torch(torch_model)
    _same_structure(params, record.params)
    want = twins.torch_outputs(torch_model, record.inputs[0])
    got = np.asarray(jax.jit(record.fn)(params, *record.inputs))
    assert got.shape == want.shape == (2, 7, tm.KERAS_LLAMA["vocabulary_size"])
    assert rel_err(got, want) < 1e-4


def test_keras_gemma_backbone_equals_transformers_gemma_model():
    record = tm.keras_gemma_backbone()
    torch_model = twins.torch_gemma(seed=3)
    params = twins.keras_gemma_params_from_torch(torch_model)
    _same_structure(params, record.params)
    want = twins.torch_outputs(torch_model, record.inputs[0], hidden=True)
    got = np.asarray(jax.jit(record.fn)(params, *record.inputs))
    assert rel_err(got, want) < 1e-4


def test_easydel_lookalike_equals_transformers_llama_for_causal_lm():
    record = tm.easydel_llama()
    torch_model = twins.torch_llama(seed=4, config=twins.easydel_torch_config())
    params = twins.easydel_params_from_torch(torch_model)
    _same_structure(params, record.params)
    want = twins.torch_outputs(torch_model, record.inputs[0])
    got = np.asarray(jax.jit(record.fn)(params, *record.inputs))
    assert rel_err(got, want) < 1e-4


def test_maxtext_lookalike_equals_transformers_llama_for_causal_lm():
    record = tm.maxtext_llama()
    torch_model = twins.torch_llama(seed=5, config=twins.easydel_torch_config())
    params = twins.maxtext_params_from_torch(torch_model)
    _same_structure(params, record.params)
    want = twins.torch_outputs(torch_model, record.inputs[0])
    got = np.asarray(jax.jit(record.fn)(params, *record.inputs))
    assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("build, rules", [
    (tm.keras_llama_causal_lm, tm.KERAS_LLAMA_TO_TORCH),
    (tm.keras_gemma_backbone, twins.KERAS_GEMMA_TO_TORCH),
    (tm.easydel_llama, tm.EASYDEL_TO_TORCH),
    (tm.maxtext_llama, tm.MAXTEXT_TO_TORCH),
])
def test_name_maps_reach_transformers_modules(build, rules):
    """Every projection's module name maps (layer rows for stacks) onto a distinct ``nn.Linear`` of the twin."""
    import re

    import torch

    record = build()
    gemma = "Gemma" in record.name
    config = twins.gemma_config() if gemma else (
        twins.easydel_torch_config() if "lookalike" in record.name else twins.llama_config())
    import transformers

    model = (transformers.GemmaForCausalLM if gemma else transformers.LlamaForCausalLM)(config)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    names = []
    for name, layout in record.layouts.items():
        rows = [name] if layout.stack_axis is None else [
            name.replace("decoder.layers.", f"decoder.layers.{i}.", 1) for i in range(layout.stack_size)]
        for row in rows:
            for pattern, repl in rules:
                row = re.sub(pattern, repl, row)
            names.append(row)
            assert row in linears, row
            weight = linears[row].weight
            assert tuple(weight.shape) == (layout.out_features, layout.in_features), row
    assert len(set(names)) == len(names)
