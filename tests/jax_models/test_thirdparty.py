"""fourierft_jax on third-party JAX models (keras-hub, gemma, EasyDeL/MaxText layouts): the kernels that a
traced forward contracts are found with their N-D layouts, the adapted forward and its spectrum gradients equal
the merge and a float64 numpy reference (``bridge.delta_weight`` per layer), ``init_weights=True`` is the base
model, and a JAX-trained adapter exported to PEFT gives the same logits on the transformers twin.

Expected layouts are the literals in ``thirdparty_models`` (read off each library's documented equations);
``test_fixture_layouts_are_the_librarys`` checks them against the arrays the libraries really build.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bridge
import fourierft_jax
import thirdparty_models as tm
import twins
from thirdparty_models import get_path, set_path

MODEL_IDS = list(tm.MODELS)
N_FREQUENCY, SCALING, SEED = 12, 50.0, 777
# Besides the default mode ("auto") and "merge", which every model runs, each explicit path runs on one model.
EXTRA_INIT_MODES = {"keras_llama": ("spectral",), "gemma_gqa": ("fused",), "maxtext_llama": ("spectral", "fused")}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.fixture(scope="module", params=MODEL_IDS)
def model_id(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def record(model_id) -> tm.ThirdPartyModel:
    return tm.MODELS[model_id]()


def build(record, **fields):
    fields = dict(n_frequency=N_FREQUENCY, scaling=SCALING, random_loc_seed=SEED, **fields)
    config = fourierft_jax.FourierFTConfig(**fields)
    adapter = fourierft_jax.apply(record.params, config, key=jax.random.key(1), trace=record.trace,
                                  output_layer=record.output_layer, stacked=record.stacked)
    return adapter, config


@functools.lru_cache(maxsize=None)
def _all_linear(model_id):
    """The all-linear adapter of a model, built once (the tests only read it)."""
    return build(tm.MODELS[model_id](), target_modules="all-linear")


@functools.lru_cache(maxsize=None)
def _base_output(model_id) -> np.ndarray:
    record = tm.MODELS[model_id]()
    return np.asarray(record.jit_fn(record.params, *record.inputs))


@functools.lru_cache(maxsize=None)
def _runner(model_id, mode):
    """The all-linear adapter's forward in ``mode``, compiled once with its spectrum gradients (see below)."""
    return _output_and_spectrum_grads(_all_linear(model_id)[0].make_apply(tm.MODELS[model_id]().fn, mode=mode))


def layer_specs(adapter):
    return {layer.name: layer for layer in adapter.specs["default"].layers}


def _probe(shape, seed=3):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# -- the fixtures themselves (no fourierft) --------------------------------------------------------------------
def test_fixture_layouts_are_the_librarys(record, model_id):
    for name, layout in record.layouts.items():
        leaf = get_path(record.params, layout.kernel_path)
        assert tuple(leaf.shape) == layout.stored_shape, name
        assert layout.in_features * layout.out_features == int(np.prod(layout.layer_shape))
    out = _base_output(model_id)
    assert np.all(np.isfinite(out))
    out64, _ = record.run64_vjp(record.params, _probe(out.shape))
    assert rel_err(out64, out) < 1e-5  # the float64 twin is the same model


# -- target selection --------------------------------------------------------------------------------------------
def test_all_linear_selects_exactly_the_projections(record, model_id):
    adapter, _ = _all_linear(model_id)
    specs = layer_specs(adapter)
    assert sorted(specs) == sorted(record.layouts)
    assert not set(specs) & set(record.never)
    if record.stacked is None:
        assert sorted(adapter.layers()) == sorted(record.layouts)
    for name, layout in record.layouts.items():
        layer = specs[name]
        assert tuple(layer.dims) == layout.layer_shape, name
        assert (layer.in_features, layer.out_features) == (layout.in_features, layout.out_features), name
        if len(layout.layer_shape) > 2:
            assert tuple(layer.in_axes) == layout.in_axes, name
        assert layer.stack_axis == layout.stack_axis, name
        if layout.stack_axis is not None:
            assert tuple(layer.stack_ids) == tuple(range(layout.stack_size))
        want_shape = (N_FREQUENCY,) if layout.stack_axis is None else (layout.stack_size, N_FREQUENCY)
        assert adapter.trainable["default"]["spectra"][name].shape == want_shape


def test_target_list_selects_those_layers_only(record):
    adapter, _ = build(record, target_modules=list(record.targets))
    assert sorted(layer_specs(adapter)) == sorted(record.selected_by_targets)


def test_embeddings_and_norms_are_never_targets(record):
    """Asking for them by name is refused: they are not linear layers of the traced model."""
    for name in record.never:
        with pytest.raises((TypeError, bridge.NoTargetError)):
            build(record, target_modules=[name])


# -- numerics ----------------------------------------------------------------------------------------------------
def _deltas(record, adapter, config):
    """Per layer: the float64 ΔW in the stored kernel layout, from the adapter's spectra and bridge's reference."""
    spectra = adapter.trainable["default"]["spectra"]
    out = {}
    for name, layout in record.layouts.items():
        idx = bridge.spectral_indices(layout.out_features, layout.in_features, config.n_frequency,
                                      config.random_loc_seed)
        rows = np.asarray(spectra[name], np.float64).reshape(-1, config.n_frequency)
        blocks = [layout.torch_to_kernel(bridge.delta_weight(c, idx, layout.out_features, layout.in_features,
                                                             config.scaling)) for c in rows]
        out[name] = blocks[0] if layout.stack_axis is None else np.stack(blocks, axis=layout.stack_axis)
    return out


def _with_deltas(record, deltas):
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), record.params)
    for name, delta in deltas.items():
        path = record.layouts[name].kernel_path
        params = set_path(params, path, get_path(params, path) + delta)
    return params


def _spectrum_grads_from_kernel_grads(record, config, grads):
    """dL/dc in float64: ⟨dL/dW, ∂W/∂c_k⟩ with ∂W/∂c_k = bridge.delta_weight(e_k) in the kernel layout."""
    out = {}
    for name, layout in record.layouts.items():
        idx = bridge.spectral_indices(layout.out_features, layout.in_features, config.n_frequency,
                                      config.random_loc_seed)
        g_kernel = get_path(grads, layout.kernel_path)
        rows = [g_kernel] if layout.stack_axis is None else [np.take(g_kernel, i, axis=layout.stack_axis)
                                                             for i in range(layout.stack_size)]
        basis = [layout.torch_to_kernel(bridge.delta_weight(np.eye(config.n_frequency)[k], idx, layout.out_features,
                                                            layout.in_features, config.scaling))
                 for k in range(config.n_frequency)]
        g = np.array([[np.sum(row * b) for b in basis] for row in rows])
        out[name] = g[0] if layout.stack_axis is None else g
    return out


def _output_and_spectrum_grads(forward):
    """One compiled program: ``forward``'s output and d sum(output · probe) / d trainable."""
    def run(trainable, params, inputs, probe):
        out, pull = jax.vjp(lambda t: forward(t, params, *inputs), trainable)
        return out, pull(probe)[0]

    return jax.jit(run)


def test_forward_and_gradients_equal_merge_and_float64_reference(record, model_id):
    adapter, config = _all_linear(model_id)
    params = record.params
    base = _base_output(model_id)
    reference_params = _with_deltas(record, _deltas(record, adapter, config))
    probe = _probe(base.shape)
    want, kernel_grads = record.run64_vjp(reference_params, probe)  # the float64 model on W + ΔW, and dL/dW
    g_ref = _spectrum_grads_from_kernel_grads(record, config, kernel_grads)
    assert rel_err(base, want) > 1e-3  # the adapter acts

    outputs, grads = {}, {}
    for mode in ("auto", "merge"):  # "auto" is the default mode
        out, g = _runner(model_id, mode)(adapter.trainable, params, record.inputs, probe)
        outputs[mode], grads[mode] = np.asarray(out), g["default"]["spectra"]
        assert rel_err(outputs[mode], want) <= 1e-5, mode
        assert sorted(grads[mode]) == sorted(g_ref), mode
        for name in g_ref:
            assert np.shape(grads[mode][name]) == np.shape(g_ref[name]), (mode, name)
            assert rel_err(grads[mode][name], g_ref[name]) <= 1e-4, (mode, name)
    assert rel_err(outputs["auto"], outputs["merge"]) <= 1e-5

    merged = adapter.merge_and_unload(params)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    for name, layout in record.layouts.items():
        np.testing.assert_allclose(np.asarray(get_path(merged, layout.kernel_path), np.float64),
                                   get_path(reference_params, layout.kernel_path), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    assert rel_err(np.asarray(record.jit_fn(merged, *record.inputs)), want) <= 1e-5


def test_init_weights_true_is_the_base_model(record, model_id):
    adapter, _ = build(record, target_modules="all-linear", init_weights=True)
    base = _base_output(model_id)
    for mode in ("auto", "merge") + EXTRA_INIT_MODES.get(model_id, ()):  # "auto" is the default mode
        got = np.asarray(jax.jit(adapter.make_apply(record.fn, mode=mode))(adapter.trainable, record.params,
                                                                          *record.inputs))
        np.testing.assert_array_equal(got, base, err_msg=mode)
    merged = adapter.merge_and_unload(record.params)
    for name, layout in record.layouts.items():
        np.testing.assert_array_equal(np.asarray(get_path(merged, layout.kernel_path)),
                                      np.asarray(get_path(record.params, layout.kernel_path)), err_msg=name)


# -- JAX-trained adapter → PEFT on the transformers twin ---------------------------------------------------------
def _train(record, params, config, steps=2):
    """``steps`` adam steps; one compiled step, whose extra call gives the trained adapter's logits."""
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(2), trace=lambda p: record.fn(p, *record.inputs),
                                  output_layer=record.output_layer, stacked=record.stacked)
    forward = adapter.make_apply(record.fn)
    labels = jnp.asarray(np.random.default_rng(5).integers(0, 64, record.inputs[0].shape))
    trainable, logits = twins.train_default_mode(forward, params, record.inputs, labels, adapter.trainable, steps)
    adapter.set_trainable(trainable)
    return adapter, logits


@pytest.mark.parametrize("twin_id", sorted(twins.TORCH_TWINS))
@pytest.mark.parametrize("targets", ["list", "all-linear"])
def test_jax_trained_adapter_loads_in_peft_on_the_torch_twin(tmp_path, twin_id, targets):
    peft = pytest.importorskip("peft")
    record = tm.MODELS[twin_id]()
    make_torch, convert = twins.TORCH_TWINS[twin_id]
    torch_model = make_torch(11)
    params = jax.tree.map(jnp.asarray, convert(torch_model))
    assert jax.tree.structure(params) == jax.tree.structure(record.params)
    config = fourierft_jax.FourierFTConfig(
        n_frequency=N_FREQUENCY, scaling=SCALING, random_loc_seed=SEED,
        target_modules=list(record.targets) if targets == "list" else "all-linear")
    adapter, want = _train(record, params, config)
    folder = fourierft_jax.export_peft(adapter, tmp_path / "peft",
                                       name_map=fourierft_jax.NameMap(to_torch=record.to_torch or None))
    tokens = record.inputs[0]
    base = twins.torch_outputs(torch_model, tokens)
    assert rel_err(base, want) > 1e-3  # the adapter matters
    loaded = peft.PeftModel.from_pretrained(torch_model, str(folder)).eval()
    peft_layers = {n.removeprefix("base_model.model.") for n, m in loaded.named_modules()
                   if isinstance(m, peft.tuners.fourierft.FourierFTLayer)}
    assert len(peft_layers) == sum(layout.stack_size or 1 for name, layout in record.layouts.items()
                                   if targets == "all-linear" or name in record.selected_by_targets)
    assert rel_err(twins.torch_outputs(loaded, tokens), want) <= 1e-5
