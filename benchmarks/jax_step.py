"""fourierft_jax training-step benchmark on a BERT-base-shaped Flax encoder (random weights, CPU).

Variants, each in its own subprocess (so peak RSS is per variant):
  floor     every kernel frozen, only LayerNorm trainable (gradients still flow through every layer)
  merge     FourierFT, model.apply on W + ΔW (ΔW via irfft2; autodiff forms xᵀdy per layer)
  spectral  FourierFT, adapter output in the spectral domain at each targeted Dense (no ΔW)
  fused     FourierFT, x @ (W + ΔW) with the FFT-based spectrum gradient (no xᵀdy)
  auto      FourierFT, the default: fused or spectral per layer by fourierft_jax's choose_path
  lora      LoRA r=8 (a minimal JAX LoRA added at each targeted Dense call)
for targets {query,value} and {query,key,value,dense}; AdamW, batch 8x128, n_frequency 1000.
Prints min and median jitted step times, their ratios to the floor measured in the same run, and peak RSS;
then a per-layer breakdown (forward + backward of one adapted Dense, and its parts) at the benchmark's shapes.

    flock /tmp/bench.lock python benchmarks/jax_step.py --steps 5
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
TARGETS = {"qv": ["query", "value"], "all": ["query", "key", "value", "dense"]}


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


def run_variant(variant: str, targets: str, steps: int, args) -> dict:
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp
    import optax

    import fourierft_jax

    import fourierft_jax._src

    model = build_model(args.layers, args.hidden, args.heads, args.intermediate)
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, 30522)
    labels = jax.random.randint(jax.random.key(2), (args.batch,), 0, 2)
    params = jax.jit(model.init)(jax.random.key(0), ids)
    tx = optax.adamw(1e-3)

    def loss_of(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    if variant == "floor":
        ln = {k: v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        is_ln = lambda path: any("LayerNorm" in str(getattr(p, "key", "")) for p in path)  # noqa: E731
        trainable = {jax.tree_util.keystr(p): v for p, v in ln.items() if is_ln(p)}

        def forward(trainable, variables, ids):
            flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
            leaves = [trainable.get(jax.tree_util.keystr(p), v) for p, v in flat]
            return model.apply(jax.tree_util.tree_unflatten(treedef, leaves), ids)

    elif variant in ("merge", "spectral", "fused", "auto"):
        config = fourierft_jax.FourierFTConfig(n_frequency=args.n_frequency, scaling=150.0,
                                               target_modules=TARGETS[targets])
        adapter = fourierft_jax.apply(params, config, key=jax.random.key(3))
        trainable = adapter.trainable
        forward = adapter.make_apply(model.apply, mode=variant)
    elif variant == "lora":
        config = fourierft_jax.FourierFTConfig(n_frequency=1, target_modules=TARGETS[targets])
        layers = fourierft_jax._src.select_layers(params["params"], config)
        keys = jax.random.split(jax.random.key(3), len(layers))
        trainable = {
            l.name: {"A": jax.random.normal(k, (l.in_features, 8)) / 8.0, "B": jnp.zeros((8, l.out_features))}
            for l, k in zip(layers, keys)
        }
        forward = lora_apply(model.apply, set(trainable), 16.0 / 8)
    else:
        raise ValueError(variant)

    opt_state = tx.init(trainable)
    n_trainable = sum(int(x.size) for x in jax.tree.leaves(trainable))

    @jax.jit
    def step(trainable, opt_state, params, ids):
        loss, grads = jax.value_and_grad(lambda t: loss_of(forward(t, params, ids)))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    start = time.perf_counter()
    trainable, opt_state, loss = jax.block_until_ready(step(trainable, opt_state, params, ids))
    compile_s = time.perf_counter() - start
    # ru_maxrss also counts XLA's compiler; a sampler gives the peak while the compiled steps run.
    sampler = _RssSampler()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainable, opt_state, loss = jax.block_until_ready(step(trainable, opt_state, params, ids))
        times.append(time.perf_counter() - start)
    step_rss = sampler.stop()
    import resource

    return {
        "variant": variant, "targets": targets, "median_s": statistics.median(times), "times": times,
        "first_step_s": compile_s, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "trainable": n_trainable, "loss": float(loss), "step_rss_gb": step_rss,
    }


class _RssSampler:
    """Peak VmRSS of this process, sampled every 5 ms on a thread."""

    def __init__(self) -> None:
        import threading

        self.peak, self._done = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        self.peak = max(self.peak, int(line.split()[1]))
            self._done.wait(0.005)

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        return self.peak / 2**20


def run_delta(args) -> dict:
    sys.path.insert(0, ROOT)
    import jax

    import fourierft_jax

    out = {"variant": "delta"}
    for shape in ((args.hidden, args.hidden), (args.hidden, args.intermediate)):
        layer = fourierft_jax._src.LayerSpec(("x",), shape[0], shape[1], args.n_frequency, 150.0, 777)
        c = jax.random.normal(jax.random.key(0), (args.n_frequency,))
        for method in ("irfft2", "ifft2"):
            f = jax.jit(lambda c, m=method: fourierft_jax._src.delta_kernel(c, layer, m))
            jax.block_until_ready(f(c))
            times = []
            for _ in range(20):
                start = time.perf_counter()
                jax.block_until_ready(f(c))
                times.append(time.perf_counter() - start)
            out[f"{method} {shape[0]}x{shape[1]}"] = statistics.median(times)
    return out


def _timed(f, *operands, repeats: int = 10) -> float:
    import jax

    f = jax.jit(f)
    jax.block_until_ready(f(*operands))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(*operands))
        times.append(time.perf_counter() - start)
    return min(times)


def run_layers(args) -> dict:
    """Forward + backward of one Dense (tokens = batch·seq) per path, and the parts of the FourierFT paths."""
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp

    import fourierft_jax
    from fourierft_jax._src.fused import _grad_plan, fused_dense
    from fourierft_jax._src.spectral import spectral_delta

    tokens = args.batch * args.seq
    out = {"variant": "layers", "tokens": tokens}
    shapes = ((args.hidden, args.hidden), (args.hidden, args.intermediate), (args.intermediate, args.hidden))
    for n_in, n_out in shapes:
        layer = fourierft_jax._src.LayerSpec(("x",), n_in, n_out, args.n_frequency, 150.0, 777)
        keys = jax.random.split(jax.random.key(0), 4)
        x = jax.random.normal(keys[0], (tokens, n_in))
        w = jax.random.normal(keys[1], (n_in, n_out)) / n_in**0.5
        c = jax.random.normal(keys[2], (args.n_frequency,))
        dy = jax.random.normal(keys[3], (tokens, n_out))

        def vjp_of(fn):
            # What a training step needs from this layer: the output, dx, and (if adapted) dc.
            def run(x, c, dy):
                y, pull = jax.vjp(fn, x, c)
                return y, pull(dy)
            return run

        paths = {
            "floor": vjp_of(lambda x, c: x @ w),
            "fused": vjp_of(lambda x, c: fused_dense(x, w, c, layer)),
            "spectral": vjp_of(lambda x, c: x @ w + spectral_delta(x, c, layer)),
            "merge": vjp_of(lambda x, c: x @ (w + fourierft_jax._src.delta_kernel(c, layer))),
        }
        col_half, row_half, sign, _ = _grad_plan(layer)

        def grad_gather(x, dy):  # the fused backward's spectrum gradient (same layout as fused.py)
            xh, yh = jnp.fft.rfft(x, axis=-1), jnp.fft.rfft(dy, axis=-1)
            xt = jnp.stack([xh.real.T, xh.imag.T], 1)
            yt = jnp.stack([yh.real.T, yh.imag.T], 1)
            p = jnp.sum(yt[row_half] * xt[col_half], 2)
            return p[:, 0] - sign * p[:, 1]

        parts = {
            "matmul x@W": (lambda x: x @ w, x),
            "irfft2 ΔW build": (lambda c: fourierft_jax._src.delta_kernel(c, layer), c),
            "rfft x": (lambda x: jnp.fft.rfft(x, axis=-1), x),
            "rfft dy": (lambda dy: jnp.fft.rfft(dy, axis=-1), dy),
            "rffts + gather-sum (dc)": (grad_gather, x, dy),
            "weight grad xᵀdy": (lambda x, dy: x.T @ dy, x, dy),
        }
        label = f"{n_in}x{n_out}"
        for name, fn in paths.items():
            out[f"{label} {name} fwd+bwd"] = _timed(fn, x, c, dy)
        for name, (fn, *operands) in parts.items():
            out[f"{label} {name}"] = _timed(fn, *operands)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one compile step)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=3072)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--n-frequency", type=int, default=1000)
    parser.add_argument("--variants", default="floor,merge,spectral,fused,auto,lora")
    parser.add_argument("--no-layers", action="store_true", help="skip the per-layer breakdown")
    parser.add_argument("--targets", default="qv,all")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        variant, _, targets = args.child.partition(":")
        runners = {"delta": run_delta, "layers": run_layers}
        result = runners[variant](args) if variant in runners else run_variant(variant, targets, args.steps, args)
        print("RESULT " + json.dumps(result))
        return

    jobs = [("floor", "-")] if "floor" in args.variants.split(",") else []
    jobs += [(v, t) for t in args.targets.split(",") for v in args.variants.split(",") if v != "floor"]
    jobs.append(("delta", "-"))
    if not args.no_layers:
        jobs.append(("layers", "-"))
    passthrough = [a for a in sys.argv[1:]]
    results = []
    for variant, targets in jobs:
        cmd = [sys.executable, os.path.abspath(__file__), *passthrough, "--child", f"{variant}:{targets}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{variant}:{targets} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            sys.exit(1)
        results.append(json.loads(line[0][7:]))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)

    floor = next((r for r in results if r["variant"] == "floor"), None)
    print(f"BERT-base shape: {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
          f"batch {args.batch}x{args.seq}, n_frequency {args.n_frequency}, AdamW, {args.steps} timed steps, "
          f"jax {__import__('jax').__version__}, {os.cpu_count()} CPUs")
    print("| variant | targets | median step (s) | × floor | min step (s) | × floor (min) | peak RSS (GB) | "
          "× floor | RSS while stepping (GB) | × floor | trainable |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if r["variant"] in ("delta", "layers"):
            continue
        ratio = r["median_s"] / floor["median_s"] if floor else float("nan")
        rss = r["peak_rss_gb"] / floor["peak_rss_gb"] if floor else float("nan")
        low = min(r["times"]) / min(floor["times"]) if floor else float("nan")
        running = r["step_rss_gb"] / floor["step_rss_gb"] if floor else float("nan")
        print(f"| {r['variant']} | {r['targets']} | {r['median_s']:.3f} | {ratio:.2f}× | {min(r['times']):.3f} | "
              f"{low:.2f}× | {r['peak_rss_gb']:.2f} | {rss:.2f}× | {r['step_rss_gb']:.2f} | {running:.2f}× | "
              f"{r['trainable']:,} |")
    delta = next(r for r in results if r["variant"] == "delta")
    print("ΔW build (jitted, median of 20): " + ", ".join(
        f"{k} {v * 1e3:.2f} ms" for k, v in delta.items() if k != "variant"))
    layers = next((r for r in results if r["variant"] == "layers"), None)
    if layers:
        print(f"Per adapted layer, {layers['tokens']} tokens (jitted, min of 10, ms):")
        for k, v in layers.items():
            if k not in ("variant", "tokens"):
                print(f"  {k}: {v * 1e3:.2f}")


if __name__ == "__main__":
    main()
