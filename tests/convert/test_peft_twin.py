"""JAX ↔ PEFT ↔ fourierft_torch on twin models (kernel = weightᵀ): trained adapters give the same logits on the
other side, and every merge (JAX, fourierft_torch, PEFT, ``fourierft merge``) gives the same weights."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fourierft_jax

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
import fourierft_torch  # noqa: E402
from convert_models import GptNet, Net, inputs, init, rel_err, torch_gpt_twin, torch_twin  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from bridge._src.cli import main  # noqa: E402

TARGETS = ["query", "value"]


def train_jax(model, params, config, steps=4, seed=0):
    """A few AdamW steps on a random regression target; returns the trained adapter."""
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(seed))
    forward = adapter.make_apply(model.apply)
    x = jnp.asarray(inputs(16, seed=seed + 1))
    target = jnp.asarray(np.random.default_rng(seed).standard_normal((16, 3)).astype(np.float32))
    optimizer = optax.adamw(1e-2)
    trainable = adapter.trainable
    opt_state = optimizer.init(trainable)

    @jax.jit
    def step(trainable, opt_state):
        loss, grads = jax.value_and_grad(lambda t: jnp.mean((forward(t, params, x) - target) ** 2))(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    losses = []
    for _ in range(steps):
        trainable, opt_state, loss = step(trainable, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]  # it trained
    adapter.set_trainable(trainable)
    return adapter


def jax_logits(adapter, model, params, x):
    return np.asarray(adapter.make_apply(model.apply)(adapter.trainable, params, x))


def torch_logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("extra", [
    dict(bias="all", modules_to_save=["classifier"]),
    dict(bias="fourier_only", n_frequency_pattern={"value": 40}),
])
def test_jax_trained_adapter_loads_in_peft_and_fourierft_torch(tmp_path, extra):
    params = init(Net())
    config = fourierft_jax.FourierFTConfig(n_frequency=24, scaling=60.0, target_modules=TARGETS, **extra)
    adapter = train_jax(Net(), params, config)
    folder = fourierft_jax.export_peft(adapter, tmp_path / "peft", params=params)
    x = inputs()
    want = jax_logits(adapter, Net(), params, x)
    assert rel_err(torch_logits(torch_twin(params), x), want) > 1e-3  # the adapter matters

    got_peft = torch_logits(peft.PeftModel.from_pretrained(torch_twin(params), folder).eval(), x)
    assert rel_err(got_peft, want) <= 1e-5
    got_ours = torch_logits(fourierft_torch.FourierFTModel.from_pretrained(torch_twin(params), folder).eval(), x)
    assert rel_err(got_ours, want) <= 1e-5


@pytest.mark.parametrize("library", ["peft", "fourierft_torch"])
def test_torch_trained_adapter_loads_in_jax(tmp_path, library):
    params = init(Net(), seed=3)
    fields = dict(n_frequency=24, scaling=60.0, target_modules=TARGETS, bias="fourier_only",
                  modules_to_save=["classifier"])
    torch.manual_seed(0)
    if library == "peft":
        model = peft.get_peft_model(torch_twin(params), peft.FourierFTConfig(**fields))
    else:
        model = fourierft_torch.get_fourierft_model(torch_twin(params), fourierft_torch.FourierFTConfig(**fields))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.from_numpy(inputs(16, seed=5))
    target = torch.randn(16, 3)
    for _ in range(4):
        optimizer.zero_grad()
        loss = ((model(x) - target) ** 2).mean()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(tmp_path / "peft")
    x_test = inputs()
    want = torch_logits(model, x_test)

    adapter = fourierft_jax.import_peft(tmp_path / "peft", params)
    assert rel_err(jax_logits(adapter, Net(), params, x_test), want) <= 1e-5
    # The trained head arrived transposed into the Dense layout.
    head = adapter.trainable["default"]["modules_to_save"]["classifier"]["kernel"]
    trained_head = [p for n, p in model.named_parameters() if "classifier.modules_to_save" in n and "weight" in n]
    assert len(trained_head) == 1
    np.testing.assert_array_equal(np.asarray(head), trained_head[0].detach().numpy().T)


def test_conv1d_twin(tmp_path):
    """GPT-2 style: torch keeps c_attn/c_proj as Conv1D (weight (in, out)); PEFT runs them with fan_in_fan_out."""
    params = init(GptNet(), seed=7)
    config = fourierft_jax.FourierFTConfig(n_frequency=30, scaling=40.0, target_modules=["c_attn"],
                                           modules_to_save=["c_proj"], bias="fourier_only")
    adapter = train_jax(GptNet(), params, config)
    # c_proj is a Conv1D in torch: its trained kernel is stored (in, out) there too, not transposed.
    folder = fourierft_jax.export_peft(adapter, tmp_path / "peft", conv1d=["c_proj"])
    x = inputs()
    want = jax_logits(adapter, GptNet(), params, x)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        loaded = peft.PeftModel.from_pretrained(torch_gpt_twin(params), folder).eval()
    assert rel_err(torch_logits(loaded, x), want) <= 1e-5
    back = fourierft_jax.import_peft(folder, params, conv1d=["c_proj"])
    for a, b in zip(jax.tree.leaves(back.trainable), jax.tree.leaves(adapter.trainable)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_every_merge_gives_the_same_weights(tmp_path):
    params = init(Net(), seed=11)
    config = fourierft_jax.FourierFTConfig(n_frequency=24, scaling=60.0, target_modules=TARGETS, bias="all",
                                           modules_to_save=["classifier"])
    adapter = train_jax(Net(), params, config)
    folder = str(fourierft_jax.export_peft(adapter, tmp_path / "peft", params=params))
    merged_jax = adapter.merge_and_unload(params)["params"]

    twin = torch_twin(params)
    base_file = str(tmp_path / "model.safetensors")
    save_file({k: v.contiguous() for k, v in twin.state_dict().items()}, base_file)
    assert main(["merge", "--base", base_file, "--adapter", folder, "--out", str(tmp_path / "merged"), "-q"]) == 0
    from safetensors.numpy import load_file

    merged_cli = load_file(str(tmp_path / "merged" / "model.safetensors"))
    merged_peft = peft.PeftModel.from_pretrained(torch_twin(params), folder).merge_and_unload().state_dict()
    merged_ours = fourierft_torch.FourierFTModel.from_pretrained(torch_twin(params), folder).merge_and_unload()
    merged_ours = merged_ours.state_dict()

    def jax_weight(name):
        node = merged_jax
        for key in name.split(".")[:-1]:
            node = node[key]
        leaf = name.split(".")[-1]
        if leaf == "weight":
            value = node["kernel"] if "kernel" in node else node["scale"]
            return np.asarray(value).T if np.ndim(value) == 2 else np.asarray(value)
        return np.asarray(node[leaf])

    names = [name for name in twin.state_dict()]
    adapted = [f"layer.{i}.{t}.weight" for i in range(2) for t in TARGETS]
    for name in adapted:  # the adapter changed these
        assert rel_err(twin.state_dict()[name].numpy(), merged_cli[name]) > 1e-4
    for name in names:
        want = merged_peft[name].numpy()
        for got in (merged_cli[name], merged_ours[name].detach().numpy(), jax_weight(name)):
            assert got.shape == want.shape, name
            assert rel_err(got, want) <= 1e-6, name
    assert os.path.exists(tmp_path / "merged" / "model.safetensors")
