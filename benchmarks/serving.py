"""Serving many FourierFT adapters in one batch: throughput against the merged single-adapter model and PEFT LoRA.

A batch of ``--batch`` sequences (64) in which row ``b`` of call ``c`` uses adapter ``(c·batch + b) mod K`` of
``K`` loaded adapters, for each ``K`` of ``--adapters`` (1, 8, 64, 1000; a batch of 64 rows holds at most 64
distinct adapters, so at K = 1000 every call draws 64 new ones from the 1000 loaded). Random weights, nothing
downloaded; n_frequency 1000 (scaling 150) / LoRA r=8 on the query and value projections.

- **PyTorch** (``fourierft_torch``): a Llama decoder at MiniLM's widths (6 layers, hidden 384, 12 heads,
  intermediate 1536, vocabulary 8192), built from a transformers ``LlamaConfig``. Passes: ``forward`` (logits
  of ``batch × seq`` tokens) and ``generate`` (greedy, ``--new-tokens`` new tokens after a ``--prompt``-token
  prompt, transformers' KV cache; tokens/s counts the generated tokens). Variants: ``merged`` (one FourierFT
  adapter merged into the weights: a plain model, the upper bound), ``fourierft`` (``adapter_names=`` over K
  FourierFT adapters), ``peft-lora`` (PEFT's own LoRA mixed-batch inference, ``adapter_names=`` over K LoRA
  adapters).
- **JAX** (``fourierft_jax``): the Flax BERT of ``examples/minilm`` at MiniLM's widths. Passes: ``forward``
  (``batch × seq`` tokens) and ``step`` (``batch × 1`` token: the token count of one decoding step, without a
  KV cache). Variants: ``merged`` (``merge_and_unload``, jitted ``model.apply``) and ``bank`` (an
  ``AdapterBank`` of capacity K filled from K PEFT folders, jitted ``make_bank_apply``).

Every variant is timed once per round, rounds interleaved (the variant order rotates each round); min and median
over rounds; ratios are against ``merged`` of the same framework and pass in the same run. Also: bytes per
adapter in the bank / in PEFT's LoRA, and the time to load the K PEFT folders. Runs unchanged on a GPU (torch
on ``cuda`` when available, JAX on its default backend).

    flock /tmp/bench.lock python benchmarks/serving.py                # the real run
    python benchmarks/serving.py --small                              # seconds: tiny model, to check it runs
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples", "minilm"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bridge  # noqa: E402
from _common import header, load, markdown, min_median, rotated  # noqa: E402

TORCH_TARGETS = ["q_proj", "v_proj"]
JAX_TARGETS = ["query", "value"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", default=None, help="numbers of distinct adapters K (default 1,8,64,1000; "
                        "1,4,16 with --small)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=32, help="tokens per sequence of the forward pass")
    parser.add_argument("--prompt", type=int, default=8, help="prompt tokens before generation")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per sequence")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 3; 2 with --small)")
    parser.add_argument("--frameworks", default="torch,jax")
    parser.add_argument("--passes", default="forward,generate,step", help="torch: forward, generate; jax: forward, step")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary of the torch decoder")
    parser.add_argument("--n-frequency", type=int, default=1000)
    parser.add_argument("--scaling", type=float, default=150.0)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--no-lora", action="store_true", help="skip PEFT LoRA")
    parser.add_argument("--small", action="store_true", help="a tiny model and batch: checks that everything runs")
    args = parser.parse_args(argv)
    if args.small:
        args.batch, args.seq, args.prompt, args.new_tokens = 8, 8, 4, 4
        args.layers, args.hidden, args.heads, args.intermediate, args.vocab = 2, 64, 4, 128, 256
        args.n_frequency = 64
    args.rounds = args.rounds or (2 if args.small else 3)
    args.adapters = args.adapters or ("1,4,16" if args.small else "1,8,64,1000")
    args.adapter_counts = [int(k) for k in args.adapters.split(",") if k.strip()]
    return args


# -- the timing loop ------------------------------------------------------------------------------------------------
def interleaved(cases: dict[str, Callable[[int], None]], rounds: int, sync: Callable[[], None],
                min_seconds: float = 0.2) -> dict[str, list]:
    """Seconds per call of every case, one measurement per round; the order rotates each round. Each case is
    warmed up first (compilation, caches); a measurement repeats a fast call until it lasts ``min_seconds``.
    Each call gets a running number, so the adapters drawn change from call to call."""
    names = list(cases)
    repeats = {}
    for name in names:
        cases[name](-1)
        sync()
        start = time.perf_counter()
        cases[name](-1)
        sync()
        repeats[name] = max(1, int(np.ceil(min_seconds / max(time.perf_counter() - start, 1e-6))))
    times: dict[str, list] = {name: [] for name in names}
    calls = 0
    for r in range(rounds):
        for name in rotated(names, r):
            sync()
            start = time.perf_counter()
            for _ in range(repeats[name]):
                cases[name](calls)
                calls += 1
            sync()
            times[name].append((time.perf_counter() - start) / repeats[name])
    return times


def rows_adapters(call: int, batch: int, k: int) -> np.ndarray:
    """The adapter of each row for call ``call``: ``(call·batch + b) mod k`` (call -1: the warm-ups')."""
    return ((call + 1) * batch + np.arange(batch)) % k


def write_folders(root: str, k: int, config: bridge.FourierFTConfig, layers: dict[str, int], seed: int) -> list[str]:
    """K PEFT FourierFT folders with random spectra (small, like trained ones) for ``layers`` (name -> n)."""
    rng = np.random.default_rng(seed)
    folders = []
    for i in range(k):
        tensors = {bridge.spectrum_key(name): rng.normal(0, 0.02, n).astype(np.float32) for name, n in layers.items()}
        folders.append(bridge.write_adapter(os.path.join(root, f"adapter{i:04d}"), config, tensors))
    return folders


# -- PyTorch --------------------------------------------------------------------------------------------------------
def torch_cases(args, tmp: str, report: dict) -> dict[str, dict[str, Callable[[int], None]]]:
    import torch
    import transformers

    import fourierft_torch

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(512, args.seq, args.prompt + args.new_tokens), eos_token_id=None,
        bos_token_id=None, pad_token_id=0)
    base = transformers.LlamaForCausalLM(config).eval()
    k_max = max(args.adapter_counts)
    ff_config = bridge.FourierFTConfig(n_frequency=args.n_frequency, scaling=args.scaling,
                                       target_modules=TORCH_TARGETS)
    names = [f"model.layers.{i}.self_attn.{t}" for i in range(args.layers) for t in TORCH_TARGETS]
    start = time.perf_counter()
    folders = write_folders(os.path.join(tmp, "torch"), k_max, ff_config, {n: args.n_frequency for n in names}, 1)
    report[f"torch: write {k_max} PEFT folders (s)"] = time.perf_counter() - start

    merged = fourierft_torch.FourierFTModel.from_pretrained(copy.deepcopy(base), folders[0]).merge_and_unload()
    merged = merged.to(device).eval()
    start = time.perf_counter()
    served = fourierft_torch.FourierFTModel.from_pretrained(copy.deepcopy(base), folders[0],
                                                            adapter_name=os.path.basename(folders[0]))
    served.load_adapters(folders[1:], progress=False)
    report[f"torch: load {k_max} FourierFT folders (s)"] = time.perf_counter() - start
    served = served.to(device).eval()
    adapter_names = [os.path.basename(f) for f in folders]
    spectra = sum(p.numel() * p.element_size() for n, p in served.named_parameters() if "fourierft_spectrum" in n)
    report["bytes per adapter: FourierFT (torch parameters)"] = spectra / k_max
    with torch.inference_mode():  # the first mixed batch stacks every loaded adapter's coefficients per layer
        served(input_ids=torch.ones((1, 2), dtype=torch.long, device=device), adapter_names=adapter_names[:1])
    stacks = sum(group.stack.numel() * group.stack.element_size() for m in served.modules()
                 if getattr(m, "_mixed_bank", None) is not None for group in m._mixed_bank.groups)
    report["bytes per adapter: FourierFT (torch mixed-batch stacks, besides the parameters)"] = stacks / k_max

    lora = None
    if not args.no_lora:
        import peft

        lora_config = peft.LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=TORCH_TARGETS,
                                      init_lora_weights=False, task_type="CAUSAL_LM")
        start = time.perf_counter()
        lora = peft.get_peft_model(copy.deepcopy(base), lora_config, adapter_name="lora0000")
        layers = [m for m in lora.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
        # PEFT's add_adapter walks the whole model, and each layer's update_layer ends with a device check and a
        # set_adapter that visit every adapter the layer holds (quadratic in K: minutes for 1000). Same
        # per-layer update; the two O(K) steps once at the end (everything is on the CPU until .to(device)).
        skipped = ("set_adapter", "_move_adapter_to_device_of_base_layer")
        for layer in layers:
            for method in skipped:
                setattr(layer, method, lambda *a, **k: None)
        for i in range(1, k_max):
            name = f"lora{i:04d}"
            lora.peft_config[name] = lora_config
            for layer in layers:
                layer.update_layer(name, args.lora_rank, 2 * args.lora_rank, config=lora_config)
        for layer in layers:
            for method in skipped:
                delattr(layer, method)  # PEFT's own methods again
            layer.set_adapter(layer.active_adapters)
        report[f"peft: create {k_max} LoRA adapters (s)"] = time.perf_counter() - start
        lora = lora.to(device).eval()
        lora_bytes = sum(p.numel() * p.element_size() for n, p in lora.named_parameters() if "lora_" in n)
        report["bytes per adapter: LoRA r=%d (peft)" % args.lora_rank] = lora_bytes / k_max

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, args.vocab, (args.batch, args.seq), generator=g).to(device)
    prompt = torch.randint(1, args.vocab, (args.batch, args.prompt), generator=g).to(device)
    mask = torch.ones_like(ids)
    prompt_mask = torch.ones_like(prompt)
    generate = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    def run(model, pass_, names_of=None):
        def call(c):
            extra = {} if names_of is None else {"adapter_names": names_of(c)}
            with torch.inference_mode():
                if pass_ == "forward":
                    model(input_ids=ids, attention_mask=mask, **extra)
                else:
                    model.generate(input_ids=prompt, attention_mask=prompt_mask, **generate, **extra)
        return call

    cases: dict[str, dict[str, Callable[[int], None]]] = {}
    for pass_ in ("forward", "generate"):
        if pass_ not in args.passes:
            continue
        group = {"merged": run(merged, pass_)}
        for k in args.adapter_counts:
            group[f"fourierft K={k}"] = run(served, pass_, lambda c, k=k: [adapter_names[i] for i in
                                                                            rows_adapters(c, args.batch, k)])
            if lora is not None:
                group[f"peft-lora K={k}"] = run(lora, pass_, lambda c, k=k: [f"lora{i:04d}" for i in
                                                                           rows_adapters(c, args.batch, k)])
        cases[pass_] = group
    report["torch device"] = device
    sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    return cases, sync


# -- JAX ------------------------------------------------------------------------------------------------------------
def jax_cases(args, tmp: str, report: dict):
    import jax
    import jax.numpy as jnp

    import fourierft_jax
    from flax_bert import BertConfig, BertModel

    config = BertConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                        intermediate_size=args.intermediate, max_position_embeddings=max(512, args.seq))
    model = BertModel(config)
    ids = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 1, config.vocab_size)
    frozen = model.init(jax.random.key(1), ids)
    ff_config = bridge.FourierFTConfig(n_frequency=args.n_frequency, scaling=args.scaling, target_modules=JAX_TARGETS,
                                       init_weights=False)
    adapter = fourierft_jax.apply(frozen, ff_config, key=jax.random.key(2))
    k_max = max(args.adapter_counts)
    names = list(adapter.trainable["default"]["spectra"])  # the layers' dotted names (PEFT's module names)
    folders = write_folders(os.path.join(tmp, "jax"), k_max, ff_config, {n: args.n_frequency for n in names}, 2)
    bank = fourierft_jax.AdapterBank.create(adapter, capacity=k_max)
    start = time.perf_counter()
    bank = bank.load_peft(folders, progress=False)
    jax.block_until_ready(bank.spectra)
    report[f"jax: load {k_max} FourierFT folders into the bank (s)"] = time.perf_counter() - start
    report["bytes per adapter: FourierFT (jax bank)"] = sum(v.nbytes for v in bank.spectra.values()) / k_max

    merged = jax.jit(model.apply)
    merged_params = fourierft_jax.import_peft(folders[0], frozen).merge_and_unload(frozen)
    serve = jax.jit(fourierft_jax.make_bank_apply(model.apply, bank))
    inputs = {"forward": ids, "step": ids[:, :1]}

    def run_merged(x):
        return lambda c: jax.block_until_ready(merged(merged_params, x))

    def run_bank(x, k):
        def call(c):
            index = jnp.asarray(rows_adapters(c, args.batch, k), jnp.int32)
            jax.block_until_ready(serve(bank.spectra, frozen, index, x))
        return call

    cases = {}
    for pass_, x in inputs.items():
        if pass_ not in args.passes:
            continue
        group = {"merged": run_merged(x)}
        for k in args.adapter_counts:
            group[f"bank K={k}"] = run_bank(x, k)
        cases[pass_] = group
    report["jax device"] = str(jax.devices()[0])
    return cases, lambda: None


# -- the report -----------------------------------------------------------------------------------------------------
HEAD = ["framework", "pass", "variant", "adapters K", "tokens", "min s", "median s", "tokens/s (median)",
        "× merged (median)", "× merged (min)"]


def table_rows(framework: str, pass_: str, times: dict[str, list], tokens: int) -> list[list[str]]:
    """One row per variant; the ratios are throughput against ``merged`` of the same group (higher is better)."""
    base = min_median(times["merged"])
    rows = []
    for name, values in times.items():
        variant, _, k = name.partition(" K=")
        low, mid = min_median(values)
        rows.append([framework, pass_, variant, k or "-", f"{tokens:,}", f"{low:.4f}", f"{mid:.4f}",
                     f"{tokens / mid:,.0f}", f"{base[1] / mid:.2f}×", f"{base[0] / low:.2f}×"])
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    print("\n".join(header("# benchmarks/serving.py: many FourierFT adapters in one batch")))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}")
    print(f"model: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, intermediate {args.intermediate}; "
          f"batch {args.batch}, seq {args.seq}, prompt {args.prompt} + {args.new_tokens} new tokens; "
          f"n_frequency {args.n_frequency}, LoRA r={args.lora_rank}; K = {args.adapter_counts}; {args.rounds} rounds",
          flush=True)
    report: dict[str, Any] = {}
    rows = []
    tokens = {"forward": args.batch * args.seq, "generate": args.batch * args.new_tokens, "step": args.batch}
    with tempfile.TemporaryDirectory() as tmp:
        for framework in frameworks:
            build = {"torch": torch_cases, "jax": jax_cases}[framework]
            cases, sync = build(args, tmp, report)
            for pass_, group in cases.items():
                print(f"  timing {framework} {pass_}: {len(group)} variants x {args.rounds} rounds", flush=True)
                times = interleaved(group, args.rounds, sync)
                rows += table_rows(framework, pass_, times, tokens[pass_])
    versions = []
    for module in ("torch", "jax", "peft"):
        if module in sys.modules:
            versions.append(f"{module} {sys.modules[module].__version__}")
    print(f"versions: {', '.join(versions)}; devices: "
          + ", ".join(f"{k.split()[0]} {v}" for k, v in report.items() if k.endswith("device")))
    print(f"load average at the end (1/5/15 min): {load()}\n")
    print(markdown(HEAD, rows))
    print()
    for key, value in report.items():
        if not key.endswith("device"):
            print(f"- {key}: {value:,.0f}" if "bytes" in key else f"- {key}: {value:.2f}")


if __name__ == "__main__":
    main()
