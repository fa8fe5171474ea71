"""fourierft_jax training step against the frozen model, by tokens per step (BERT-base-shaped Flax encoder).

A post-LN BERT encoder with random weights (hidden 768, 12 heads, intermediate 3072; ``--layers`` blocks),
batch x 128 tokens, softmax cross-entropy on a 2-way classifier, AdamW, n_frequency 1000 (scaling 150).
Targets: "all" = query, key, value and every dense (6 linear layers per block), "qv" = query and value.

Variants (``--variants``; each in its own worker process, see ``benchmarks/_common.py``):
  floor     every kernel frozen, only the LayerNorms trainable: the backward runs through every layer down to
            the embeddings' LayerNorm (dx of every linear layer, no kernel gradient). The floor of the earlier
            versions of this script, kept as is.
  auto      FourierFT, the default ``make_apply`` mode (fused or spectral per layer by token count)
  merge     FourierFT, ``mode="merge"`` (W + ΔW; autodiff forms xᵀdy per layer)
  spectral  FourierFT, ``mode="spectral"``
  fused     FourierFT, ``mode="fused"``
  lora      LoRA r=8 (alpha 16) on the same layers: a hand-written ``x A B`` added at each targeted Dense call
and the limit: per adapted layer one ΔW build (the n coefficients scattered into a half spectrum, one ``irfft2``),
``rfft(x)`` and ``rfft(dy)`` along the features and the ``n x tokens`` gather-multiply-sum of the spectrum
gradient, each layer shape jitted and timed alone in its own worker; the table shows ``(floor + Σ layers' work) /
floor``. That is what a ΔW-building FourierFT step must add to a frozen step; it leaves out what the floor already
does (x @ W, dx), and the input spectra are not shared between query/key/value. It is no bound where the default
mode goes spectral instead (no ΔW: few tokens per step, e.g. under ~300 at 768x3072). The limit kernels are plain
jitted jnp ops (token-major gather), not tuned; the per-layer table printed last shows their parts.

Timing. All variants of one model are started together (imports and compilation for every token count only); then,
for each token count in turn, ``--rounds`` rounds run every worker once, in an order rotated by one per round. A
run is ``--steps`` timed steps (``jax.block_until_ready``), preceded by one untimed step on a worker's first run,
on a new token count and after its heap was trimmed (see ``benchmarks/_common.py``), and by ``--warmup`` more if
asked. Ratios to the floor use the min and the median over all timed steps of all rounds.

Peak memory, per variant in its own process: on CPU the resident-memory high-water mark of that worker's timed
steps (reset through /proc/self/clear_refs before each run, so neither compilation nor other variants count),
median over rounds; on an accelerator the device's ``peak_bytes_in_use`` of that worker (workers run with
``XLA_PYTHON_CLIENT_PREALLOCATE=false``). Also printed: XLA's own ``memory_analysis`` of each compiled step
(arguments + outputs + temporaries - aliased), which no load can disturb.

Runs unchanged on GPU/TPU (the device is printed). The whole issue-15 table (1,024 and 8,192 tokens, all and
qv, floor / auto / LoRA / limit), on a quiet 2-core CPU, about 6-8 minutes:

    flock /tmp/bench.lock .venv/bin/python benchmarks/jax_step.py
    flock /tmp/bench.lock .venv/bin/python benchmarks/jax_step.py --layers 1 --tokens 128 --rounds 2  # smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import RssSampler as _RssSampler  # noqa: E402,F401  (imported from here by jax_general, jax_mesh)
from _common import (  # noqa: E402
    half_bins, half_spectrum_scatter, header, layer_shapes, load, markdown, peak_rss_gb, report, reset_peak_rss,
    run_models, serve,
)

TARGETS = {"qv": ["query", "value"], "all": ["query", "key", "value", "dense"]}
MODELS = {"bert": (768, 12, 3072), "minilm": (384, 12, 1536)}  # hidden, heads, intermediate
LABELS = {"floor": "floor", "auto": "FourierFT (auto)", "merge": "FourierFT merge", "spectral": "FourierFT spectral",
          "fused": "FourierFT fused", "lora": "LoRA r=8"}
FOURIERFT_MODES = ("auto", "merge", "spectral", "fused")
SCALING = 150.0


def build_model(layers: int, hidden: int, heads: int, inter: int):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class SelfAttention(nn.Module):
        @nn.compact
        def __call__(self, h):
            b, t, _ = h.shape
            q, k, v = (nn.Dense(hidden, name=n)(h).reshape(b, t, heads, hidden // heads) for n in ("query", "key", "value"))
            w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(hidden // heads).astype(h.dtype), -1)
            return jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, t, hidden)

    class DenseLN(nn.Module):
        @nn.compact
        def __call__(self, h, residual):
            return nn.LayerNorm(epsilon=1e-12, name="LayerNorm")(nn.Dense(hidden, name="dense")(h) + residual)

    class Attention(nn.Module):
        @nn.compact
        def __call__(self, h):
            return DenseLN(name="output")(SelfAttention(name="self")(h), h)

    class Intermediate(nn.Module):
        @nn.compact
        def __call__(self, h):
            return nn.gelu(nn.Dense(inter, name="dense")(h), approximate=False)

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, h):
            a = Attention(name="attention")(h)
            return DenseLN(name="output")(Intermediate(name="intermediate")(a), a)

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, h):
            for i in range(layers):
                h = Layer(name=str(i))(h)
            return h

    class Encoder(nn.Module):
        @nn.compact
        def __call__(self, h):
            return Stack(name="layer")(h)

    class Bert(nn.Module):
        @nn.compact
        def __call__(self, ids):
            h = nn.Embed(30522, hidden, name="word_embeddings")(ids)
            h = nn.LayerNorm(epsilon=1e-12, name="embeddings_LayerNorm")(h)
            h = Encoder(name="encoder")(h)
            return nn.Dense(2, name="classifier")(jnp.tanh(h[:, 0]))

    return Bert()


def lora_apply(apply_fn, paths, scale):
    """A minimal LoRA: x A B · scale added at each targeted Dense call (A, B trainable)."""
    import flax.linen as nn

    def forward(trainable, variables, *args):
        def interceptor(next_fun, fargs, kwargs, context):
            if context.method_name != "__call__" or not isinstance(context.module, nn.Dense):
                return next_fun(*fargs, **kwargs)
            key = ".".join(context.module.path)
            y = next_fun(*fargs, **kwargs)
            if key in paths:
                a, b = trainable[key]["A"], trainable[key]["B"]
                y = y + ((fargs[0] @ a) @ b) * scale
            return y

        with nn.intercept_methods(interceptor):
            return apply_fn(variables, *args)

    return forward


def _device(jax) -> str:
    d = jax.devices()[0]
    cpu = f", {os.cpu_count()} CPU cores" if d.platform == "cpu" else ""
    return f"{d.platform}: {d.device_kind} x{jax.device_count()}{cpu}, jax {jax.__version__}"


def _device_peak_gb(jax):
    stats = jax.devices()[0].memory_stats() if jax.devices()[0].platform != "cpu" else None
    return stats["peak_bytes_in_use"] / 2**30 if stats and "peak_bytes_in_use" in stats else None


def setup_variant(spec: dict):
    """A worker's model and compiled step; ``run`` does warm-up and timed steps and reports times and memory."""
    import jax
    import jax.numpy as jnp
    import optax

    import fourierft_jax

    variant, targets = spec["variant"], spec.get("targets")
    model = build_model(spec["layers"], spec["hidden"], spec["heads"], spec["intermediate"])
    inputs = {t: (jax.random.randint(jax.random.key(1), (t // spec["seq"], spec["seq"]), 0, 30522),
                  jax.random.randint(jax.random.key(2), (t // spec["seq"],), 0, 2)) for t in spec["tokens"]}
    params = jax.jit(model.init)(jax.random.key(0), inputs[spec["tokens"][0]][0])
    tx = optax.adamw(1e-3)
    adapted = 0

    if variant == "floor":
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        is_ln = lambda path: any("LayerNorm" in str(getattr(p, "key", "")) for p in path)  # noqa: E731
        trainable = {jax.tree_util.keystr(p): v for p, v in flat if is_ln(p)}

        def forward(trainable, variables, ids):
            flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
            leaves = [trainable.get(jax.tree_util.keystr(p), v) for p, v in flat]
            return model.apply(jax.tree_util.tree_unflatten(treedef, leaves), ids)

    elif variant in FOURIERFT_MODES:
        config = fourierft_jax.FourierFTConfig(n_frequency=spec["n_frequency"], scaling=SCALING,
                                               target_modules=TARGETS[targets])
        adapter = fourierft_jax.apply(params, config, key=jax.random.key(3))
        trainable, adapted = adapter.trainable, len(adapter.layers())
        forward = adapter.make_apply(model.apply, mode=variant)
    elif variant == "lora":
        # The layers FourierFT adapts (public matching), with their kernels' shapes read from the params.
        config = fourierft_jax.FourierFTConfig(n_frequency=1, target_modules=TARGETS[targets])
        names = fourierft_jax.apply(params, config, key=jax.random.key(3)).layers()
        keys = jax.random.split(jax.random.key(4), len(names))
        trainable = {}
        for name, k in zip(names, keys):
            node = params["params"]
            for part in name.split("."):
                node = node[part]
            n_in, n_out = node["kernel"].shape
            trainable[name] = {"A": jax.random.normal(k, (n_in, 8)) / 8.0, "B": jnp.zeros((8, n_out))}
        forward, adapted = lora_apply(model.apply, set(trainable), 16.0 / 8), len(trainable)
    else:
        raise ValueError(f"unknown variant {variant!r}; known: floor, lora, {', '.join(FOURIERFT_MODES)}")

    opt_state = tx.init(trainable)
    n_trainable = sum(int(x.size) for x in jax.tree.leaves(trainable))

    def step(trainable, opt_state, params, ids, labels):
        def loss_of(t):
            logits = forward(t, params, ids)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_of)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    compiled = {}
    for t, (ids, labels) in inputs.items():
        start = time.perf_counter()
        exe = jax.jit(step).lower(trainable, opt_state, params, ids, labels).compile()
        ma = exe.memory_analysis()
        xla_gb = None if ma is None else (ma.argument_size_in_bytes + ma.output_size_in_bytes
                                          + ma.temp_size_in_bytes - ma.alias_size_in_bytes) / 2**30
        compiled[t] = {"exe": exe, "compile_s": time.perf_counter() - start, "xla_gb": xla_gb}
    state = {"trainable": trainable, "opt_state": opt_state}

    def one_step(t):
        state["trainable"], state["opt_state"], loss = jax.block_until_ready(
            compiled[t]["exe"](state["trainable"], state["opt_state"], params, *inputs[t]))
        return loss

    def run(request: dict) -> dict:
        t, c = request["tokens"], compiled[request["tokens"]]
        for _ in range(request["warmup"] + request["settle"]):  # settle: see _common.serve
            one_step(t)
        exact = reset_peak_rss()
        times = []
        for _ in range(request["steps"]):
            start = time.perf_counter()
            loss = one_step(t)
            times.append(time.perf_counter() - start)
        device_gb = _device_peak_gb(jax)
        return {"times": times, "loss": float(loss), "rss_gb": peak_rss_gb(), "rss_exact": exact,
                "device_gb": device_gb, "memory_gb": device_gb if device_gb is not None else peak_rss_gb(),
                "xla_gb": c["xla_gb"], "compile_s": c["compile_s"]}

    return {"device": _device(jax), "trainable": n_trainable, "adapted": adapted}, run


def setup_limit(spec: dict):
    """The limit work of each adapted layer shape (kernel layout (in, out), ΔW built in that layout), jitted."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import bridge

    n, fns = spec["n_frequency"], {}
    for shape in layer_shapes(spec["hidden"], spec["intermediate"], 1, "all"):
        n_in, n_out = map(int, shape.split("x"))
        rows, cols = bridge.spectral_indices(n_out, n_in, n, 777)  # (out, in) layout, PEFT's positions
        target, source = half_spectrum_scatter(cols, rows, n_in, n_out)  # the kernel ΔWᵀ: (in, out)
        col_half, col_conj = half_bins(cols, n_in)
        row_half, row_conj = half_bins(rows, n_out)
        sign = jnp.asarray(np.where(col_conj ^ row_conj, -1.0, 1.0), jnp.float32)
        scale = SCALING / (n_in * n_out)

        def build(c, target=target, source=source, n_in=n_in, n_out=n_out):
            half = jnp.zeros(n_in * (n_out // 2 + 1), jnp.float32).at[target].add(0.5 * SCALING * c[source])
            return jnp.fft.irfft2(half.reshape(n_in, n_out // 2 + 1).astype(jnp.complex64), s=(n_in, n_out))

        def grad(x, dy, col_half=col_half, row_half=row_half, sign=sign, scale=scale):
            xs, ys = jnp.fft.rfft(x, axis=-1)[:, col_half], jnp.fft.rfft(dy, axis=-1)[:, row_half]
            return scale * (jnp.sum(ys.real * xs.real, 0) - sign * jnp.sum(ys.imag * xs.imag, 0))

        keys = jax.random.split(jax.random.key(0), 3)
        c, build, grad = jax.random.normal(keys[0], (n,)), jax.jit(build), jax.jit(grad)
        for t in spec["tokens"]:
            x, dy = jax.random.normal(keys[1], (t, n_in)), jax.random.normal(keys[2], (t, n_out))
            fns.setdefault(t, {})[shape] = {"ΔW build": (build, (c,)),
                                            "rfft x + rfft dy + gather-sum": (grad, (x, dy))}
    for per_shape in fns.values():
        for parts in per_shape.values():
            for fn, operands in parts.values():
                jax.block_until_ready(fn(*operands))

    def run(request: dict) -> dict:
        out = {}
        for shape, parts in fns[request["tokens"]].items():
            out[shape] = {}
            for name, (fn, operands) in parts.items():
                times = []
                for _ in range(request["repeats"]):
                    start = time.perf_counter()
                    jax.block_until_ready(fn(*operands))
                    times.append(time.perf_counter() - start)
                out[shape][name] = [min(times), statistics.median(times)]
        return {"parts": out}

    return {"device": _device(jax), "trainable": 0}, run


def _worker() -> None:
    serve(lambda spec: (setup_limit if spec["variant"] == "limit" else setup_variant)(spec))


def _int_list(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def main() -> None:
    if "--_worker" in sys.argv:
        _worker()
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=_int_list, help="tokens per step, comma-separated (default 1024,8192; "
                        "batch = tokens / seq)")
    parser.add_argument("--targets", default="all,qv", help="comma-separated: all, qv")
    parser.add_argument("--variants", default="floor,auto,lora",
                        help="comma-separated: floor, auto, lora, merge, spectral, fused (the limit always runs)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of every variant")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=0, help="extra untimed steps before them in every round "
                        "(one is always taken first on a new token count or after the heap was trimmed)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each limit part per round")
    parser.add_argument("--layers", type=int, default=2, help="encoder blocks")
    parser.add_argument("--models", default="bert", help="comma-separated widths: bert (768/3072), minilm (384/1536)")
    parser.add_argument("--hidden", type=int, help="custom width (overrides --models; with --heads, --intermediate)")
    parser.add_argument("--heads", type=int)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--batch", type=int, help="batch size; without --tokens, the one token count batch x seq")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--n-frequency", type=int, default=1000)
    parser.add_argument("--no-layers", action="store_true", help="(kept for old commands; no effect: the per-layer "
                        "figures are now the limit parts table)")
    parser.add_argument("--json", help="also write every worker's results to this file")
    args = parser.parse_args()

    tokens = args.tokens or ([args.batch * args.seq] if args.batch else [1024, 8192])
    targets, variants = args.targets.split(","), args.variants.split(",")
    if "floor" not in variants:
        variants.insert(0, "floor")  # every ratio is to the floor
    if args.hidden or args.heads or args.intermediate:
        models = {"custom": (args.hidden or 768, args.heads or 12, args.intermediate or 3072)}
    else:
        models = {m: MODELS[m] for m in args.models.split(",")}
    for t in tokens:
        if t % args.seq:
            parser.error(f"--tokens {t} is not a multiple of --seq {args.seq}")

    lines = header("fourierft_jax training step vs the frozen floor, by tokens per step")
    print("\n".join(lines), flush=True)
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "false")}
    args.tokens = tokens
    groups = run_models(__file__, models, targets, variants, args, env=env)
    report(groups, variants, LABELS,
           f"{args.layers} encoder layers, heads {', '.join(str(m[1]) for m in models.values())}, n_frequency "
           f"{args.n_frequency}, scaling {SCALING:g}, AdamW; {args.rounds} interleaved rounds x {args.steps} timed "
           f"steps (+{args.warmup} untimed); limit parts: best and median of {args.repeats} calls per round",
           "device peak_bytes_in_use per worker")
    xla = [[g["model"], g["tokens"], r["spec"].get("targets", "-"), LABELS.get(r["spec"]["variant"]),
            f"{r['runs'][0]['xla_gb']:.2f}", f"{r['runs'][0]['compile_s']:.1f}"]
           for g in groups for r in g["results"] if r["spec"]["variant"] != "limit" and r["runs"][0]["xla_gb"]]
    print("\nXLA memory_analysis of the compiled step (arguments + outputs + temporaries - aliased):\n"
          + markdown(["model", "tokens", "targets", "variant", "GiB", "compile s"], xla))
    print(f"\nload average at end (1/5/15 min): {load()}")


if __name__ == "__main__":
    main()
