"""fourierft_jax on a device mesh: step time and bytes moved between devices, FourierFT vs the frozen-model floor.

Runs on CPU with 8 forced host devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, set here before jax
is imported). A small BERT-shaped linen encoder (the builder of benchmarks/jax_step.py; random weights), AdamW.
Variants, each placement in its own subprocess (so peak RSS is per run):
  floor   every kernel frozen, only LayerNorm trainable (gradients still flow through every layer)
  auto    FourierFT, make_apply's default mode (fused at these batch sizes)
  merge   FourierFT, mode="merge" (model.apply on W + ΔW)
Placements (the issue-7 contract's specs; mesh axes ("data",) or ("data", "model")):
  single  one device, the same global batch
  dp:8    mesh (8,): kernels replicated, batch on "data"
  fsdp:S  kernels sharded on "data" along their larger axis (the other axis if that does not divide), batch on "data"
  tp:S    Megatron: query/key/value/intermediate kernels P(None, "model"), attention/layer output kernels
          P("model", None), batch on "data" (on a 1-D mesh "data" plays "model" and the batch is replicated)
Spectra, optimizer state, LayerNorms, embeddings and the classifier are replicated. The params' shardings are
passed to ``make_apply(..., shardings=...)`` unless ``--no-shardings``.

Bytes between devices come from the compiled HLO (``jax.jit(step).lower(...).compile().as_text()``): every
all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute and collective-broadcast (and their
``-start`` async forms), counted once per instruction (there is no loop in this step), summing the per-device
shapes of its operands ("in") and of its result ("out"), in bytes per device per step.

    flock /tmp/bench.lock /work/venv/bin/python benchmarks/jax_mesh.py --steps 10
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8
TARGETS = ["query", "key", "value", "dense"]
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute", "collective-broadcast")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
               "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
COLUMN_PARALLEL = ("query", "key", "value", "intermediate")  # parent module names (kernel is (in, out))


# -- HLO collectives ----------------------------------------------------------------------------------------------
def _shape_bytes(shape: str) -> int:
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape):
        size = DTYPE_BYTES.get(dtype, 0)
        for dim in filter(None, dims.split(",")):
            size *= int(dim)
        total += size
    return total


def _split_balanced(text: str) -> tuple[str, str]:
    """``text`` starts with "(": the parenthesised part and what follows it."""
    depth = 0
    for i, char in enumerate(text):
        depth += char == "("
        depth -= char == ")"
        if depth == 0:
            return text[: i + 1], text[i + 1:]
    raise ValueError(f"unbalanced HLO text: {text[:80]!r}")


def collectives(hlo: str) -> list[dict]:
    """Every collective of a compiled HLO module: opcode, result shape, per-device operand/result bytes."""
    shapes, found = {}, []
    for line in hlo.splitlines():
        match = re.match(r"\s*(?:ROOT\s+)?%([\w.\-]+) = ", line)
        if not match:
            continue
        rest = line[match.end():]
        if rest.startswith("("):
            shape, rest = _split_balanced(rest)
        else:
            shape, _, rest = rest.partition(" ")
        shapes[match.group(1)] = shape
        op = re.match(r"\s*([\w\-]+)\(", rest)
        if not op:
            continue
        opcode = op.group(1)
        base = opcode[: -len("-start")] if opcode.endswith("-start") else opcode
        if base not in COLLECTIVES:
            continue
        args, _ = _split_balanced(rest[op.end() - 1:])
        names = re.findall(r"%([\w.\-]+)", args)
        found.append({"op": base, "shape": shape, "operands": names, "name": match.group(1)})
    for entry in found:
        operands = [shapes.get(name, "") for name in entry.pop("operands")]
        # Per-operand shapes without layouts: a combined (tuple) all-reduce counts as its parts in the diff.
        entry["operand_shapes"] = [re.sub(r"\{[^}]*\}", "", s) for s in operands]
        entry["in_bytes"] = sum(_shape_bytes(s) for s in operands)
        out = _shape_bytes(entry["shape"])
        # An async "-start" returns (operands, results[, scratch]); its operand bytes are the honest size then.
        entry["out_bytes"] = out if not entry["name"].endswith("start") else max(out - entry["in_bytes"], 0)
    return found


# -- shardings ----------------------------------------------------------------------------------------------------
def parse_placement(text: str) -> tuple[str, tuple[int, ...]]:
    if text == "single":
        return "single", ()
    spec, _, shape = text.partition(":")
    if spec not in ("dp", "fsdp", "tp") or not shape:
        raise ValueError(f"placement {text!r}: expected single, dp:8, fsdp:2x4, tp:2x4, ...")
    return spec, tuple(int(s) for s in shape.split("x"))


def kernel_spec(path: tuple[str, ...], shape: tuple[int, ...], spec: str, mesh_shape: tuple[int, ...]):
    """PartitionSpec of one parameter under ``spec`` (None entries = replicated along that dim)."""
    from jax.sharding import PartitionSpec as P

    data = mesh_shape[0]
    model_axis = "model" if len(mesh_shape) > 1 else "data"
    model = mesh_shape[-1]
    if spec == "dp" or len(shape) != 2 or path[-1] != "kernel" or "word_embeddings" in path or "classifier" in path:
        return P()
    if spec == "fsdp":
        order = (0, 1) if shape[0] >= shape[1] else (1, 0)
        for axis in order:
            if shape[axis] % data == 0:
                return P(*["data" if i == axis else None for i in range(2)])
        return P()
    parent = path[-2]
    grand = path[-3] if len(path) > 2 else ""
    if parent in COLUMN_PARALLEL or grand in COLUMN_PARALLEL:
        return P(None, model_axis) if shape[1] % model == 0 else P()
    if parent == "dense" and grand == "output":
        return P(model_axis, None) if shape[0] % model == 0 else P()
    return P()


def param_shardings(params, spec: str, mesh):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    def one(path, leaf):
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        pspec = kernel_spec(keys, leaf.shape, spec, tuple(mesh.shape.values()))
        if spec == "tp" and keys[-1] == "bias" and len(keys) > 1:
            parent = keys[-2]
            grand = keys[-3] if len(keys) > 2 else ""
            if parent in COLUMN_PARALLEL or grand in COLUMN_PARALLEL:
                pspec = P("model" if len(mesh.shape) > 1 else "data")
        return NamedSharding(mesh, pspec)

    return jax.tree_util.tree_map_with_path(one, params)


def batch_spec(spec: str, mesh_shape: tuple[int, ...]):
    from jax.sharding import PartitionSpec as P

    if spec == "tp" and len(mesh_shape) == 1:
        return P()
    return P("data")


# -- one run ------------------------------------------------------------------------------------------------------
def run(variant: str, placement: str, args) -> dict:
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import resource

    import jax
    import numpy as np
    import optax
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

    import fourierft_jax
    from jax_step import _RssSampler, build_model

    spec, mesh_shape = parse_placement(placement)
    model = build_model(args.layers, args.hidden, args.heads, args.intermediate)
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, 30522)
    labels = jax.random.randint(jax.random.key(2), (args.batch,), 0, 2)
    params = jax.jit(model.init)(jax.random.key(0), ids)
    tx = optax.adamw(1e-3)

    def loss_of(logits, labels):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    shardings_passed = False
    if variant == "floor":
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        is_ln = lambda path: any("LayerNorm" in str(getattr(p, "key", "")) for p in path)  # noqa: E731
        trainable = {jax.tree_util.keystr(p): v for p, v in flat if is_ln(p)}

        def forward(trainable, variables, ids):
            flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
            leaves = [trainable.get(jax.tree_util.keystr(p), v) for p, v in flat]
            return model.apply(jax.tree_util.tree_unflatten(treedef, leaves), ids)
    else:
        config = fourierft_jax.FourierFTConfig(n_frequency=args.n_frequency, scaling=150.0, target_modules=TARGETS)
        adapter = fourierft_jax.apply(params, config, key=jax.random.key(3))
        trainable = adapter.trainable

    if spec == "single":
        device = jax.devices()[0]
        mesh = Mesh(np.array([device]), ("data",), axis_types=(AxisType.Auto,))
        param_sh = jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
        data_sh = NamedSharding(mesh, P())
    else:
        names = ("data",) if len(mesh_shape) == 1 else ("data", "model")
        devices = np.array(jax.devices()[: int(np.prod(mesh_shape))]).reshape(mesh_shape)
        mesh = Mesh(devices, names, axis_types=(AxisType.Auto,) * len(names))
        param_sh = param_shardings(params, spec, mesh)
        data_sh = NamedSharding(mesh, batch_spec(spec, mesh_shape))
    replicated = NamedSharding(mesh, P())

    if variant != "floor":
        kwargs = {} if spec == "single" or args.no_shardings else {"shardings": param_sh}
        shardings_passed = bool(kwargs)
        forward = adapter.make_apply(model.apply, mode=variant, **kwargs)

    params = jax.device_put(params, param_sh)
    trainable = jax.device_put(trainable, replicated)
    opt_state = jax.device_put(tx.init(trainable), replicated)
    ids, labels = jax.device_put(ids, data_sh), jax.device_put(labels, data_sh)
    state_sh = jax.tree.map(lambda _: replicated, (trainable, opt_state))

    def step(trainable, opt_state, params, ids, labels):
        loss, grads = jax.value_and_grad(lambda t: loss_of(forward(t, params, ids), labels))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    step = jax.jit(step, in_shardings=(*state_sh, param_sh, data_sh, data_sh),
                   out_shardings=(*state_sh, replicated))
    start = time.perf_counter()
    compiled = step.lower(trainable, opt_state, params, ids, labels).compile()
    hlo = compiled.as_text()
    lower_compile_s = time.perf_counter() - start
    found = collectives(hlo)

    for _ in range(args.warmup):
        trainable, opt_state, loss = jax.block_until_ready(step(trainable, opt_state, params, ids, labels))
    sampler = _RssSampler()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        trainable, opt_state, loss = jax.block_until_ready(step(trainable, opt_state, params, ids, labels))
        times.append(time.perf_counter() - start)
    step_rss = sampler.stop()
    return {
        "variant": variant, "placement": placement, "times": times, "min_s": min(times),
        "median_s": statistics.median(times), "compile_s": lower_compile_s, "loss": float(loss),
        "compilations": step._cache_size(), "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "step_rss_gb": step_rss, "collectives": found, "shardings_passed": shardings_passed,
        "in_bytes": sum(c["in_bytes"] for c in found), "out_bytes": sum(c["out_bytes"] for c in found),
        "trainable": sum(int(x.size) for x in jax.tree.leaves(trainable)),
    }


def _mib(n: float) -> str:
    return f"{n / 2**20:.3f}"


def _parts(result: dict) -> collections.Counter:
    return collections.Counter(f"{c['op']} {s}" for c in result["collectives"] for s in c["operand_shapes"])


def _listing(counter: collections.Counter) -> str:
    items = sorted(counter.items(), key=lambda kv: -_shape_bytes(kv[0]) * kv[1])
    return ", ".join(f"{n}× {k}" for k, n in items) or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--n-frequency", type=int, default=1000)
    parser.add_argument("--variants", default="floor,auto,merge")
    parser.add_argument("--placements", default="single,dp:8,fsdp:8,tp:8,fsdp:2x4,tp:2x4")
    parser.add_argument("--no-shardings", action="store_true",
                        help="never pass shardings= to make_apply (XLA alone partitions the FourierFT step)")
    parser.add_argument("--json", help="also write every result (collectives included) to this file")
    parser.add_argument("--from-json", help="print the tables of a run saved with --json (no new runs)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        variant, _, placement = args.child.partition("@")
        print("RESULT " + json.dumps(run(variant, placement, args)))
        return

    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES}".strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    results = {}
    if args.from_json:
        with open(args.from_json) as stream:
            saved = json.load(stream)
        for r in saved["results"] if isinstance(saved, dict) else saved:
            results[r["variant"], r["placement"]] = r
    for placement in [] if args.from_json else args.placements.split(","):
        for variant in args.variants.split(","):
            cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child", f"{variant}@{placement}"]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not line:
                # Keep going: a run XLA cannot compile or execute is a result too (reported in the table).
                errors = [l for l in proc.stderr.splitlines() if "Error" in l or "RET_CHECK" in l or "INTERNAL" in l]
                reason = (errors or proc.stderr.strip().splitlines()[-1:] or ["no output"])[0].strip()[:200]
                print(f"{variant}@{placement} failed (rc {proc.returncode}): {reason}", file=sys.stderr, flush=True)
                results[variant, placement] = {"variant": variant, "placement": placement, "failed": reason}
                continue
            result = json.loads(line[0][7:])
            results[variant, placement] = result
            brief = {k: v for k, v in result.items() if k not in ("collectives", "times")}
            print(json.dumps(brief), file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as stream:
            json.dump({"args": vars(args), "results": list(results.values())}, stream, indent=1)

    import jax

    def ok(result):
        return result if result and "failed" not in result else None

    passed = any(r.get("shardings_passed") for r in results.values())
    print(f"BERT-shaped encoder: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, intermediate "
          f"{args.intermediate}, batch {args.batch}x{args.seq}; FourierFT n_frequency {args.n_frequency} on "
          f"{'/'.join(TARGETS)} ({6 * args.layers} layers); AdamW; {args.warmup} warm-up + "
          f"{args.steps} timed steps; {DEVICES} forced CPU devices; jax {jax.__version__}; {os.cpu_count()} CPUs; "
          f"make_apply shardings= {'passed' if passed else 'not passed'}")
    print("| variant | placement | min step (s) | median step (s) | × 1 device, same variant (min / median) | "
          "× floor, same placement (min / median) | peak RSS (GB) | collectives | in MiB/device/step | "
          "out MiB/device/step | compilations |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (variant, placement), r in results.items():
        if "failed" in r:
            print(f"| {variant} | {placement} | failed: {r['failed']} ||||||||||")
            continue
        single = ok(results.get((variant, "single")))
        floor = ok(results.get(("floor", placement)))

        def ratio(base):
            if not base:
                return "-"
            return f"{r['min_s'] / base['min_s']:.2f}× / {r['median_s'] / base['median_s']:.2f}×"

        print(f"| {variant} | {placement} | {r['min_s']:.3f} | {r['median_s']:.3f} | {ratio(single)} | "
              f"{ratio(floor)} | {r['peak_rss_gb']:.2f} | {len(r['collectives'])} | {_mib(r['in_bytes'])} | "
              f"{_mib(r['out_bytes'])} | {r['compilations']} |")
    print()
    print("FourierFT − floor, collective bytes per device per step (same placement):")
    for (variant, placement), r in results.items():
        floor = ok(results.get(("floor", placement)))
        if variant == "floor" or not floor or "failed" in r:
            continue
        mine, base = _parts(r), _parts(floor)
        print(f"  {variant} @ {placement}: in {r['in_bytes'] - floor['in_bytes']:+,} B, out "
              f"{r['out_bytes'] - floor['out_bytes']:+,} B; extra operands (per device): {_listing(mine - base)}; "
              f"floor's not in FourierFT: {_listing(base - mine)}")


if __name__ == "__main__":
    main()
