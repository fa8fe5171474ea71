"""Cross-framework: a Flax MLP and its torch twin (kernel = weightᵀ) with the same spectra give the same outputs
through fourierft_jax and through PEFT. torch and peft are test-only imports."""

import jax
import numpy as np
import pytest

import fourierft_jax
from fftjax_models import D_HID, D_IN, D_OUT, MLP, N_CLASSES, init_mlp, rel_err

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


class TorchEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(D_IN, D_HID), torch.nn.Linear(D_HID, D_OUT)

    def forward(self, x):
        return torch.tanh(self.fc2(torch.tanh(self.fc1(x))))


class TorchMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.head = TorchEncoder(), torch.nn.Linear(D_OUT, N_CLASSES)

    def forward(self, x):
        return self.head(self.encoder(x))


def _torch_twin(params):
    model = TorchMLP()
    p = params["params"]
    with torch.no_grad():
        for linear, tree in ((model.encoder.fc1, p["encoder"]["fc1"]), (model.encoder.fc2, p["encoder"]["fc2"]),
                             (model.head, p["head"])):
            linear.weight.copy_(torch.from_numpy(np.asarray(tree["kernel"]).T.copy()))
            linear.bias.copy_(torch.from_numpy(np.asarray(tree["bias"]).copy()))
    return model


@pytest.mark.parametrize("fields", [
    dict(n_frequency=30, scaling=150.0, target_modules=["fc1", "fc2", "head"]),
    dict(n_frequency=200, scaling=20.0, random_loc_seed=-3, target_modules=["fc1", "fc2"],
         n_frequency_pattern={"fc2": 320}),
])
def test_same_outputs_as_peft(fields):
    params = init_mlp()
    config = fourierft_jax.FourierFTConfig(**fields)
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(0))
    peft_config = peft.FourierFTConfig(**fields)
    torch_model = peft.get_peft_model(_torch_twin(params), peft_config).eval()
    peft_layers = {
        name.removeprefix("base_model.model."): module
        for name, module in torch_model.named_modules()
        if isinstance(module, peft.tuners.fourierft.FourierFTLayer)
    }
    assert sorted(peft_layers) == sorted(adapter.layers())
    spectra = adapter.trainable["default"]["spectra"]
    with torch.no_grad():
        for layer in adapter.specs["default"].layers:
            module = peft_layers[layer.name]
            np.testing.assert_array_equal(module.indices["default"].numpy(), layer.torch_indices)
            module.fourierft_spectrum["default"].copy_(torch.from_numpy(np.asarray(spectra[layer.name]).copy()))
    x = np.random.default_rng(0).standard_normal((5, D_IN)).astype(np.float32)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(x)).numpy()
        assert rel_err(_torch_twin(params)(torch.from_numpy(x)).numpy(), expected) > 1e-3  # the adapter acts
    for mode in ("spectral", "merge"):
        got = adapter.make_apply(MLP().apply, mode=mode)(adapter.trainable, params, x)
        assert rel_err(got, expected) < 1e-5, mode
    merged_torch = torch_model.merge_and_unload()
    merged = adapter.merge_and_unload(params)
    np.testing.assert_allclose(np.asarray(merged["params"]["encoder"]["fc1"]["kernel"]),
                               merged_torch.encoder.fc1.weight.detach().numpy().T, rtol=1e-5, atol=1e-6)
