"""fourierft_jax training step on a DenseGeneral-attention encoder (BERT-base widths, random weights, CPU).

q/k/v are ``nn.DenseGeneral((heads, head_dim))`` with kernels ``(768, 12, 64)``, the attention output is
``nn.DenseGeneral(768, axis=(-2, -1))`` with kernel ``(12, 64, 768)``, the MLP is ``nn.Dense``. Every projection
(query, key, value, out, intermediate, output) is adapted, n_frequency 1000; AdamW, batch 8x128 (1024 tokens).

Variants, each in its own subprocess (so peak RSS is per variant), interleaved over ``--rounds`` rounds:
  floor     the DenseGeneral encoder, every kernel frozen, only LayerNorm trainable
  auto      FourierFT, default mode: apply(..., trace=lambda p: model.apply(p, ids)), make_apply(model.apply)
  merge     FourierFT, make_apply(model.apply, mode="merge") (W + ΔW, autodiff forms xᵀdy per layer)
  lora      LoRA r=8 on the same projections (N-D kernels: A (in, r), B (r, out) on their 2-D view)
  dense2d   the same encoder with 2-D nn.Dense q/k/v/out (reshapes around them), FourierFT auto mode
  floor2d   the 2-D encoder, frozen (the floor for dense2d; same FLOPs as floor)
Prints min and median step times over all rounds, their ratios to the floor of the same run, and peak RSS.

    flock /tmp/bench.lock python benchmarks/jax_general.py --layers 2 --steps 5 --rounds 3
    python benchmarks/jax_general.py --layers 2 --cost   # XLA's FLOP/byte counts per variant, no timing
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from jax_step import _RssSampler  # noqa: E402  (the step-time RSS sampler of the 2-D benchmark)

TARGETS = ["query", "key", "value", "out", "intermediate", "output"]
VARIANTS = "floor,auto,merge,lora,dense2d,floor2d"


def build_model(layers: int, hidden: int, heads: int, inter: int, general: bool):
    """A post-LN BERT-style encoder; ``general``: DenseGeneral attention projections, else 2-D Dense + reshapes."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    head_dim = hidden // heads

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, h):
            b, t, _ = h.shape
            if general:
                q, k, v = (nn.DenseGeneral((heads, head_dim), name=n)(h) for n in ("query", "key", "value"))
            else:
                q, k, v = (nn.Dense(hidden, name=n)(h).reshape(b, t, heads, head_dim)
                           for n in ("query", "key", "value"))
            w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(h.dtype), -1)
            ctx = jnp.einsum("bhqk,bkhd->bqhd", w, v)
            if general:
                a = nn.DenseGeneral(hidden, axis=(-2, -1), name="out")(ctx)
            else:
                a = nn.Dense(hidden, name="out")(ctx.reshape(b, t, hidden))
            a = nn.LayerNorm(epsilon=1e-12, name="attention_LayerNorm")(a + h)
            m = nn.Dense(hidden, name="output")(nn.gelu(nn.Dense(inter, name="intermediate")(a), approximate=False))
            return nn.LayerNorm(epsilon=1e-12, name="output_LayerNorm")(m + a)

    class Encoder(nn.Module):
        @nn.compact
        def __call__(self, ids):
            h = nn.Embed(30522, hidden, name="word_embeddings")(ids)
            h = nn.LayerNorm(epsilon=1e-12, name="embeddings_LayerNorm")(h)
            for i in range(layers):
                h = Layer(name=f"layer_{i}")(h)
            return nn.Dense(2, name="classifier")(jnp.tanh(h[:, 0]))

    return Encoder()


def lora_general(apply_fn, shapes, rank_scale):
    """LoRA at each targeted Dense/DenseGeneral call: y + (x_flat A B · scale) reshaped to the output features.

    ``shapes``: {module path: (number of contracted trailing input axes, output feature shape)}; A is
    (in, r) and B (r, out) on the kernel's 2-D view.
    """
    import flax.linen as nn

    def forward(trainable, variables, *args):
        def interceptor(next_fun, fargs, kwargs, context):
            y = next_fun(*fargs, **kwargs)
            if context.method_name != "__call__" or not isinstance(context.module, (nn.Dense, nn.DenseGeneral)):
                return y
            key = ".".join(context.module.path)
            if key not in trainable:
                return y
            n_in, out_shape = shapes[key]
            x = fargs[0]
            lead = x.shape[: x.ndim - n_in]
            flat = x.reshape(lead + (-1,))
            low = (flat @ trainable[key]["A"]) @ trainable[key]["B"]
            return y + (low * rank_scale).reshape(lead + tuple(out_shape)).astype(y.dtype)

        with nn.intercept_methods(interceptor):
            return apply_fn(variables, *args)

    return forward


def run_variant(variant: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import fourierft_jax

    general = variant not in ("dense2d", "floor2d")
    model = build_model(args.layers, args.hidden, args.heads, args.intermediate, general)
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, 30522)
    labels = jax.random.randint(jax.random.key(2), (args.batch,), 0, 2)
    params = jax.jit(model.init)(jax.random.key(0), ids)
    tx = optax.adamw(1e-3)
    config = fourierft_jax.FourierFTConfig(n_frequency=args.n_frequency, scaling=150.0, target_modules=TARGETS)

    def loss_of(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    if variant in ("floor", "floor2d"):
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        is_ln = lambda path: any("LayerNorm" in str(getattr(p, "key", "")) for p in path)  # noqa: E731
        trainable = {jax.tree_util.keystr(p): v for p, v in flat if is_ln(p)}

        def forward(trainable, variables, ids):
            flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
            leaves = [trainable.get(jax.tree_util.keystr(p), v) for p, v in flat]
            return model.apply(jax.tree_util.tree_unflatten(treedef, leaves), ids)

        adapted = 0
    elif variant in ("auto", "merge", "dense2d"):
        adapter = fourierft_jax.apply(params, config, key=jax.random.key(3), trace=lambda p: model.apply(p, ids))
        trainable = adapter.trainable
        forward = adapter.make_apply(model.apply, mode="merge" if variant == "merge" else "auto")
        adapted = len(adapter.layers())
    elif variant == "lora":
        # The same projections (their 2-D views) as FourierFT targets.
        adapter = fourierft_jax.apply(params, config, key=jax.random.key(3), trace=lambda p: model.apply(p, ids))
        specs = adapter.static.adapters[0][1].layers
        keys = jax.random.split(jax.random.key(4), len(specs))
        trainable, shapes = {}, {}
        for layer, k in zip(specs, keys):
            # DenseGeneral contracts the leading kernel axes with x's trailing ones (in_axes = (0,) or (0, 1)).
            n_in = len(layer.in_axes) if layer.in_axes else 1
            out_shape = layer.kernel_dims[n_in:] if layer.kernel_dims else (layer.out_features,)
            trainable[layer.name] = {"A": jax.random.normal(k, (layer.in_features, 8)) / 8.0,
                                     "B": jnp.zeros((8, layer.out_features))}
            shapes[layer.name] = (n_in, out_shape)
        forward = lora_general(model.apply, shapes, 16.0 / 8)
        adapted = len(trainable)
    else:
        raise ValueError(variant)

    opt_state = tx.init(trainable)
    n_trainable = sum(int(x.size) for x in jax.tree.leaves(trainable))

    @jax.jit
    def step(trainable, opt_state, params, ids):
        loss, grads = jax.value_and_grad(lambda t: loss_of(forward(t, params, ids)))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    if args.cost:  # XLA's own count for the compiled step: independent of the machine's load
        cost = step.lower(trainable, opt_state, params, ids).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return {"variant": variant, "gflops": cost.get("flops", float("nan")) / 1e9,
                "gbytes": cost.get("bytes accessed", float("nan")) / 1e9, "adapted": adapted}

    start = time.perf_counter()
    trainable, opt_state, loss = jax.block_until_ready(step(trainable, opt_state, params, ids))
    compile_s = time.perf_counter() - start
    sampler = _RssSampler()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        trainable, opt_state, loss = jax.block_until_ready(step(trainable, opt_state, params, ids))
        times.append(time.perf_counter() - start)
    step_rss = sampler.stop()
    import resource

    return {
        "variant": variant, "times": times, "first_step_s": compile_s, "trainable": n_trainable,
        "adapted": adapted, "loss": float(loss), "step_rss_gb": step_rss,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant and round (after compiling)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every variant")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=3072)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--n-frequency", type=int, default=1000)
    parser.add_argument("--variants", default=VARIANTS)
    parser.add_argument("--cost", action="store_true",
                        help="print XLA's cost analysis (GFLOP, GB accessed) of each compiled step instead of timing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print("RESULT " + json.dumps(run_variant(args.child, args)))
        return

    variants = args.variants.split(",")
    passthrough = [a for a in sys.argv[1:]]
    if args.cost:
        args.rounds = 1
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for round_ in range(args.rounds):
        for variant in variants:
            cmd = [sys.executable, os.path.abspath(__file__), *passthrough, "--child", variant]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"{variant} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                sys.exit(1)
            result = json.loads(line[0][7:])
            runs[variant].append(result)
            warned = [l for l in proc.stderr.splitlines() if "Warning" in l]
            print(f"round {round_} {json.dumps(result)}" + (f" warnings: {warned[:3]}" if warned else ""),
                  file=sys.stderr, flush=True)

    if args.cost:
        base = runs[variants[0]][0]
        print(f"XLA cost analysis of the compiled step, {args.layers} layers, batch {args.batch}x{args.seq} "
              f"(ratios to {variants[0]}):")
        print("| variant | GFLOP | ratio | GB accessed | ratio |")
        print("|---|---|---|---|---|")
        for v in variants:
            r = runs[v][0]
            print(f"| {v} | {r['gflops']:.1f} | {r['gflops'] / base['gflops']:.2f}× | {r['gbytes']:.2f} | "
                  f"{r['gbytes'] / base['gbytes']:.2f}× |")
        return

    def summary(variant):
        rs = runs[variant]
        times = [t for r in rs for t in r["times"]]
        return {"min": min(times), "median": statistics.median(times),
                "peak": statistics.median(r["peak_rss_gb"] for r in rs),
                "step_rss": statistics.median(r["step_rss_gb"] for r in rs),
                "compile": statistics.median(r["first_step_s"] for r in rs),
                "trainable": rs[0]["trainable"], "adapted": rs[0]["adapted"]}

    s = {v: summary(v) for v in variants}
    floor = s.get("floor")
    print(f"DenseGeneral encoder: {args.layers} layers, hidden {args.hidden}, {args.heads} heads x "
          f"{args.hidden // args.heads}, MLP {args.intermediate}, batch {args.batch}x{args.seq}, n_frequency "
          f"{args.n_frequency}, AdamW, {args.rounds} rounds x {args.steps} timed steps, "
          f"jax {__import__('jax').__version__}, {os.cpu_count()} CPUs")
    print("| variant | min step (ms) | × floor (min) | median step (ms) | × floor (median) | peak RSS (GB) | × floor | "
          "RSS while stepping (GB) | × floor | first step (s) | adapted kernels | trainable |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for v in variants:
        r = s[v]
        ratio = lambda key: r[key] / floor[key] if floor else nan  # noqa: E731
        print(f"| {v} | {r['min'] * 1e3:.0f} | {ratio('min'):.2f}× | {r['median'] * 1e3:.0f} | "
              f"{ratio('median'):.2f}× | {r['peak']:.2f} | {ratio('peak'):.2f}× | {r['step_rss']:.2f} | "
              f"{ratio('step_rss'):.2f}× | {r['compile']:.1f} | {r['adapted']} | {r['trainable']:,} |")
    if "dense2d" in s and "floor2d" in s:
        d, f2 = s["dense2d"], s["floor2d"]
        print(f"dense2d / floor2d: {d['min'] / f2['min']:.2f}× (min), {d['median'] / f2['median']:.2f}× (median)")
    if "auto" in s and "dense2d" in s:
        print(f"auto (N-D) / dense2d: {s['auto']['min'] / s['dense2d']['min']:.2f}× (min), "
              f"{s['auto']['median'] / s['dense2d']['median']:.2f}× (median)")


if __name__ == "__main__":
    main()
