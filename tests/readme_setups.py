"""Tiny stand-ins for the README's placeholders, and the runner that executes its blocks (``tests/test_readme.py``).

A README block is preceded by ``<!-- readme-test: ... -->``; ``setup=NAME`` runs ``SETUPS[NAME]`` on the block's
namespace just before it (defining ``model``, ``params``, ``x`` ... as the prose around the block describes them),
``then=NAME`` runs ``CHECKS[NAME]`` right after it (a call the block only defines, such as one training step, and
a look at what it produced). Blocks run with the chain's folder as the working directory, so the paths they
write (``ckpt``, ``peft_dir`` ...) land there. Run as a script (``python readme_setups.py CHAIN.json``) for the
chains that need a fresh process.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import shlex
import sys
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
Namespace = dict[str, Any]


# -- stand-ins ----------------------------------------------------------------------------------------------------
def _linen_qv(ns: Namespace) -> None:
    """A linen model with 32x32 ``query``/``value`` Dense layers (n_frequency=1000 fits in 1024) and a head."""
    import flax.linen as nn
    import jax
    import numpy as np
    import optax

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.tanh(nn.Dense(32, name="query")(x))
            return nn.Dense(2, name="classifier")(nn.tanh(nn.Dense(32, name="value")(h)))

    rng = np.random.default_rng(0)
    ns["model"] = Model()
    ns["x"] = rng.standard_normal((8, 32)).astype(np.float32)
    ns["y"] = rng.integers(0, 2, size=8)
    ns["loss_fn"] = lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    del jax


def _train_step(ns: Namespace) -> None:
    import numpy as np

    before = float(ns["loss_fn"](ns["forward"](ns["trainable"], ns["params"], ns["x"]), ns["y"]))
    trainable, opt_state = ns["trainable"], ns["opt_state"]
    for _ in range(3):
        trainable, opt_state, loss = ns["step"](trainable, opt_state, ns["params"], ns["x"], ns["y"])
    assert np.isfinite(float(loss)) and float(loss) < before, (before, float(loss))
    assert ns["merged"] is not None


def _nnx_qv(ns: Namespace) -> None:
    import numpy as np
    import optax
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.query, self.value = nnx.Linear(32, 32, rngs=rngs), nnx.Linear(32, 32, rngs=rngs)
            self.classifier = nnx.Linear(32, 2, rngs=rngs)

        def __call__(self, x):
            return self.classifier(nnx.tanh(self.value(nnx.tanh(self.query(x)))))

    rng = np.random.default_rng(0)
    ns["model"] = Model(nnx.Rngs(0))
    ns["x"] = rng.standard_normal((8, 32)).astype(np.float32)
    ns["y"] = rng.integers(0, 2, size=8)
    ns["loss_fn"] = lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _nnx_step(ns: Namespace) -> None:
    """The step trains, the adapter was saved and exported, and the merged model is plain ``nnx.Linear`` again."""
    import optax
    from flax import nnx

    import bridge
    import fourierft_jax

    assert type(ns["model"].query) is nnx.Linear
    _, tensors = bridge.read_adapter("peft_dir")
    assert sorted(tensors) == sorted(bridge.spectrum_key(n) for n in ("query", "value")), sorted(tensors)
    assert [layer.name for layer in fourierft_jax.load_adapter("ckpt").spec.layers] == ["query", "value"]
    # The block merged at its end; its step runs on a freshly adapted model.
    model = fourierft_jax.nnx.apply(type(ns["model"])(nnx.Rngs(0)), ns["config"], rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, optax.adamw(5e-2), wrt=nnx.LoRAParam)
    losses = [float(ns["step"](model, optimizer, ns["x"], ns["y"])) for _ in range(4)]
    assert losses[-1] < losses[0], losses


def _gemma(ns: Namespace) -> None:
    """A tiny ``gm.nn.Transformer`` (1 layer, width 32, 4 query / 2 key-value heads)."""
    import jax
    import jax.numpy as jnp
    from gemma import gm

    import fourierft_jax

    config = gm.nn.config.TransformerConfig(
        num_embed=64, embed_dim=32, hidden_dim=48, num_heads=4, head_dim=8, num_kv_heads=2,
        final_logit_softcap=None, use_post_attn_norm=True, use_post_ffw_norm=True,
        attention_types=(gm.nn.config.AttentionType.GLOBAL,),
    )
    ns["model"] = gm.nn.Transformer(config=config, dtype=jnp.float32)
    ns["tokens"] = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % 64 + 1
    ns["params"] = ns["model"].init(jax.random.key(0), ns["tokens"])
    ns["key"] = jax.random.key(1)
    ns["config"] = fourierft_jax.FourierFTConfig(n_frequency=50, scaling=150.0,
                                                 target_modules=["q_einsum", "kv_einsum"])
    ns["fourierft_jax"] = fourierft_jax


def _bert_mesh(ns: Namespace) -> None:
    """A tiny transformers-named Flax BERT (hidden 16, 1 layer), a batch of 8 token rows and a step."""
    import jax
    import numpy as np
    import optax

    sys.path.insert(0, os.path.join(ROOT, "examples", "minilm"))
    from flax_bert import BertConfig, BertModel

    import fourierft_jax

    bert = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                      intermediate_size=32, max_position_embeddings=16)
    rng = np.random.default_rng(0)
    ns["model"] = BertModel(bert)
    ns["x"] = rng.integers(1, 40, size=(8, 6)).astype(np.int32)
    ns["y"] = rng.standard_normal((8, 16)).astype(np.float32)
    ns["params"] = jax.jit(ns["model"].init)(jax.random.key(0), ns["x"])  # one compile, not op by op
    ns["config"] = fourierft_jax.FourierFTConfig(n_frequency=64, scaling=150.0, target_modules=["query", "value"])
    ns["loss_fn"] = lambda out, y: ((out[:, 0] - y) ** 2).mean()

    # The linen quick start's step without its @jax.jit, as the block's prose says.
    def step(trainable, opt_state, params, x, y):
        forward, tx, loss_fn = ns["forward"], ns["tx"], ns["loss_fn"]
        loss, grads = jax.value_and_grad(lambda t: loss_fn(forward(t, params, x), y))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    ns["step"] = step


def _mesh_step(ns: Namespace) -> None:
    import jax
    import numpy as np

    assert len(jax.devices()) == 8, jax.devices()
    x = jax.device_put(ns["x"], ns["batch"])
    y = jax.device_put(ns["y"], ns["batch"])
    trainable, opt_state, loss = ns["step"](ns["trainable"], ns["opt_state"], ns["params"], x, y)
    assert np.isfinite(float(loss))
    query = ns["params"]["params"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"]
    assert query.sharding.spec == jax.sharding.PartitionSpec(None, "model"), query.sharding


def _keras_backend(ns: Namespace) -> None:
    import keras

    assert keras.backend.backend() == "jax", keras.backend.backend()
    assert ns["hidden"].shape == (2, 8, 32), ns["hidden"].shape
    assert len(ns["adapter"].layers()) == 4, ns["adapter"].layers()  # query and value of both layers


def _bert_torch(ns: Namespace) -> None:
    """``path``: a tiny transformers BERT saved to ``./base`` (the block loads it with two labels)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=16)
    transformers.BertModel(config).save_pretrained("base")
    ns["path"] = "base"


def _torch_train(ns: Namespace) -> None:
    import peft
    import torch
    import transformers

    merged = ns["merged"]
    assert not any("fourierft" in name for name, _ in merged.named_parameters())
    base = transformers.AutoModelForSequenceClassification.from_pretrained("base", num_labels=2)
    loaded = peft.PeftModel.from_pretrained(base, "adapter/").eval()
    ids = torch.arange(1, 13).reshape(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, merged.eval()(input_ids=ids).logits)


# The "move an adapter" section: JAX names that need no rules on a torch model named the same, plus the rule
# the section shows (layers_<i>.attn.q -> layers.<i>.self_attn.q_proj) having something to rename.
def _odd_models():
    import flax.linen as nn
    import jax
    import numpy as np
    import torch

    class Attn(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(24, name="v")(nn.tanh(nn.Dense(24, name="q")(x)))

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x + Attn(name="attn")(x)

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(2):
                x = Block(name=f"layers_{i}")(x)
            return x

    class TorchAttn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.v = torch.nn.Linear(24, 24), torch.nn.Linear(24, 24)

        def forward(self, x):
            return self.v(torch.tanh(self.q(x)))

    class TorchBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = TorchAttn()

        def forward(self, x):
            return x + self.attn(x)

    class TorchModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers_0, self.layers_1 = TorchBlock(), TorchBlock()

        def forward(self, x):
            return self.layers_1(self.layers_0(x))

    x = np.random.default_rng(0).standard_normal((4, 24)).astype(np.float32)
    model = Model()
    params = model.init(jax.random.key(0), x)
    torch_model = TorchModel()
    with torch.no_grad():
        for i in range(2):
            for p in "qv":
                dense = params["params"][f"layers_{i}"]["attn"][p]
                linear = getattr(getattr(torch_model, f"layers_{i}").attn, p)
                linear.weight.copy_(torch.from_numpy(np.array(dense["kernel"]).T.copy()))
                linear.bias.copy_(torch.from_numpy(np.array(dense["bias"])))
    return model, params, torch_model.eval(), x


def _odd_adapter(model, params, x):
    import jax

    import fourierft_jax

    config = fourierft_jax.FourierFTConfig(n_frequency=60, scaling=150.0, target_modules=["q", "v"])
    adapter = fourierft_jax.apply(params, config, key=jax.random.key(1))
    trained = jax.tree.map(lambda a: a * 0.01, adapter.trainable)  # small, so the torch logits stay comparable
    adapter.set_trainable(trained)
    return adapter


def _odd_pair(ns: Namespace) -> None:
    model, params, torch_model, x = _odd_models()
    ns.update(model=model, params=params, torch_model=torch_model, x=x, adapter=_odd_adapter(model, params, x))
    ns["_want"] = ns["adapter"].make_apply(model.apply)(ns["adapter"].trainable, params, x)


def _torch_loaded(ns: Namespace) -> None:
    import numpy as np
    import torch

    import bridge

    with torch.no_grad():
        got = ns["model"](torch.from_numpy(ns["x"])).numpy()
    np.testing.assert_allclose(got, np.asarray(ns["_want"]), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the copies kept the base model untouched
        base = ns["torch_model"](torch.from_numpy(ns["x"])).numpy()
    assert np.abs(base - got).max() > 1e-4
    config, tensors = bridge.read_adapter("peft_torch")
    assert bridge.spectrum_key("layers.1.self_attn.q_proj") in tensors, sorted(tensors)
    assert bridge.spectrum_key("layers_1.attn.v") in tensors, sorted(tensors)


def _serving_pair(ns: Namespace) -> None:
    """The odd pair plus three PEFT folders ``tasks/a|b|c`` (three spectra of one config), a fresh ``adapter``
    of that config, and per-row references: each task's merged model and the base model."""
    import jax
    import numpy as np

    import fourierft_jax

    model, params, torch_model, x = _odd_models()
    ns.update(model=model, params=params, torch_model=torch_model, x=x)
    folders, want = [], {}
    for i, task in enumerate("abc"):
        trained = _odd_adapter(model, params, x)
        trained.set_trainable(jax.tree.map(lambda a, i=i: a * (i + 1), trained.trainable))
        fourierft_jax.export_peft(trained, f"tasks/{task}")
        folders.append(f"tasks/{task}")
        want[task] = np.asarray(trained.make_apply(model.apply, mode="merge")(trained.trainable, params, x))
    want["__base__"] = np.asarray(model.apply(params, x))
    ns.update(folders=folders, adapter=_odd_adapter(model, params, x), _want=want)


def _served(ns: Namespace) -> None:
    """Row b of the mixed batch equals row b of its task's merged model (base rows: the base model)."""
    import numpy as np
    import torch

    rows = ["a", "__base__", "c", "b"]  # the README block's adapter_index / adapter_names
    got_jax = np.asarray(ns["logits"])
    with torch.no_grad():
        got_torch = ns["torch_logits"].detach().numpy()
    for b, task in enumerate(rows):
        np.testing.assert_allclose(got_jax[b], ns["_want"][task][b], rtol=1e-5, atol=1e-5, err_msg=f"jax row {b}")
        np.testing.assert_allclose(got_torch[b], ns["_want"][task][b], rtol=1e-5, atol=1e-5, err_msg=f"torch row {b}")
    assert np.abs(ns["_want"]["a"] - ns["_want"]["__base__"]).max() > 1e-3  # the adapters change the rows
    assert "b" not in ns["bank"].names  # evicted


def _cli_files(ns: Namespace) -> None:
    """``ckpt/`` (an Orbax adapter), ``model/`` (the torch model's safetensors) and ``rules.json`` as the README
    block's comment gives it."""
    import re

    import torch
    from safetensors.torch import save_file

    import fourierft_jax

    model, params, torch_model, x = _odd_models()
    fourierft_jax.save_adapter("ckpt", _odd_adapter(model, params, x))
    os.makedirs("model")
    save_file({k: v.contiguous() for k, v in torch_model.state_dict().items()}, "model/model.safetensors")
    rules = re.search(r"#\s+rules\.json: (.*)$", ns["_block"], re.M)
    assert rules, "the block's `#   rules.json: {...}` line is gone"
    with open("rules.json", "w", encoding="utf-8") as stream:
        stream.write(rules.group(1).strip())
    del torch


def _cli_outputs(ns: Namespace) -> None:
    import bridge

    for path in ("peft_dir", "ckpt2", "merged", "spectra.png", "peft_torch"):
        assert os.path.exists(path), f"the shell block did not write {path}"
    assert "layers_0.attn.q" in ns["_stdout"], ns["_stdout"][-2000:]  # what inspect printed
    _, tensors = bridge.read_adapter("peft_torch")
    assert bridge.spectrum_key("layers.0.self_attn.q_proj") in tensors, sorted(tensors)


def _spectrum(ns: Namespace) -> None:
    import numpy as np

    ns["spectrum"] = np.random.default_rng(0).standard_normal(1000)


def _delta_shape(ns: Namespace) -> None:
    import numpy as np

    layer = ns["layers"][0]
    assert (layer.name, layer.out_features, layer.in_features) == ("layer.0.query", 768, 768), layer
    assert ns["delta"].shape == (768, 768) and ns["delta"].dtype == np.float64
    # ΔW from the dense formula: the spectrum scattered at (rows, cols), then the real part of its 2-D inverse FFT.
    dense = np.zeros((768, 768), np.complex128)
    dense[ns["rows"], ns["cols"]] = ns["spectrum"]
    np.testing.assert_allclose(ns["delta"], np.fft.ifft2(dense).real * 150.0, rtol=1e-10, atol=1e-12)


SETUPS: dict[str, Callable[[Namespace], None]] = {
    "linen_qv": _linen_qv, "nnx_qv": _nnx_qv, "gemma": _gemma, "bert_mesh": _bert_mesh, "bert_torch": _bert_torch,
    "odd_pair": _odd_pair, "cli_files": _cli_files, "spectrum": _spectrum, "serving_pair": _serving_pair,
}
CHECKS: dict[str, Callable[[Namespace], None]] = {
    "train_step": _train_step, "keras_backend": _keras_backend, "nnx_step": _nnx_step, "mesh_step": _mesh_step, "torch_train": _torch_train,
    "torch_loaded": _torch_loaded, "cli_outputs": _cli_outputs, "delta_shape": _delta_shape, "served": _served,
}


# -- the runner ---------------------------------------------------------------------------------------------------
class BlockError(AssertionError):
    """A README block (or its stand-in / check) failed; the message names the block's heading and line."""


def _where(block: dict) -> str:
    return f"README.md line {block['line']} (section {block['heading']!r})"


def _run_shell(block: dict, ns: Namespace) -> None:
    from bridge._src.cli import main

    out = io.StringIO()
    for offset, text in enumerate(block["code"].splitlines()):
        words = shlex.split(text, comments=True)
        if not words:
            continue
        line = block["line"] + 1 + offset
        with contextlib.redirect_stdout(out):
            if words[0] == "fourierft":
                status = main(words[1:])
            elif words[0] == "python" and len(words) >= 2 and words[1].endswith(".py"):
                argv = sys.argv
                sys.argv = words[1:]
                try:
                    runpy.run_path(os.path.join(ROOT, words[1]), run_name="__main__")
                    status = 0
                finally:
                    sys.argv = argv
            else:
                raise BlockError(f"README.md line {line}: no runner for the command {text.strip()!r}")
        if status != 0:
            raise BlockError(f"README.md line {line}: {text.strip()!r} exited with status {status}")
    ns["_stdout"] = ns.get("_stdout", "") + out.getvalue()


def run_chain(blocks: list[dict], ns: Namespace | None = None) -> Namespace:
    """Run ``blocks`` in order in one namespace (the current folder as working directory)."""
    ns = {"__name__": "__readme__"} if ns is None else ns
    for block in blocks:
        ns["_block"] = block["code"]
        step = "setup " + str(block.get("setup"))
        try:
            if block.get("setup"):
                SETUPS[block["setup"]](ns)
            step = "the block"
            if block["lang"] == "python":
                # Padding puts the traceback's line numbers on the README's own lines.
                exec(compile("\n" * block["line"] + block["code"], README, "exec"), ns)
            else:
                _run_shell(block, ns)
            step = "check " + str(block.get("then"))
            if block.get("then"):
                CHECKS[block["then"]](ns)
        except BlockError:
            raise
        except BaseException as error:
            raise BlockError(f"{_where(block)}, {step}: {type(error).__name__}: {error}") from error
    return ns


if __name__ == "__main__":
    import traceback

    sys.path[0] = ROOT  # not tests/, whose bridge/ folder would shadow the package

    with open(sys.argv[1], encoding="utf-8") as stream:
        chain = json.load(stream)
    try:
        run_chain(chain)
    except BlockError as error:
        traceback.print_exception(error.__cause__ or error)
        print(f"READMEFAIL {error}", file=sys.stderr)
        sys.exit(1)
