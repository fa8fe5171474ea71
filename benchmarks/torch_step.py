"""fourierft_torch training step against the frozen model, by tokens per step: ours vs PEFT's FourierFT vs LoRA.

transformers' ``BertModel`` with random weights and no pooler (``add_pooling_layer=False``, so no adapted layer
is left out of the loss), ``--layers`` blocks, at BERT-base widths (hidden 768, 12 heads, intermediate 3072) and
MiniLM widths (hidden 384, 12 heads, intermediate 1536); batch x 128 tokens, ``model.train()`` (dropout on),
loss ``last_hidden_state.pow(2).mean()``, AdamW, n_frequency 1000 (scaling 150). Targets: "all" = query, key,
value and every dense (6 linear layers per block), "qv" = query and value.

Variants (``--variants``; each in its own worker process, see ``benchmarks/_common.py``; every worker imports
torch, transformers, peft and fourierft_torch, so libraries weigh the same in every variant's memory):
  floor            every weight frozen, only the LayerNorms trainable: the backward runs through every layer
                   down to the embeddings' LayerNorm (dx of every linear layer, no weight gradient). The floor of
                   the earlier versions of this script, kept as is.
  fourierft_torch  ``get_fourierft_model``, default settings (``forward_mode="auto"``); ``fourierft_torch:MODE``
                   sets ``forward_mode`` (auto, fused, spectral) on every ``FourierFTLinear``; a ``+keep`` /
                   ``+rebuild`` suffix sets ``keep_delta`` where the layer still has that attribute
  peft_fourierft   PEFT's FourierFT (``peft.FourierFTConfig``, same n_frequency, scaling and targets)
  peft_lora        PEFT's LoRA, r=8, alpha 16, same targets
and the limit: per adapted layer one ΔW build (the n coefficients scattered into a half spectrum, one ``irfft2``),
``rfft(x)`` and ``rfft(dy)`` along the features and the ``n x tokens`` gather-multiply-sum of the spectrum
gradient, each layer shape timed alone in its own worker; the table shows ``(floor + Σ layers' work) / floor``.
That is what a ΔW-building FourierFT step must add to a frozen step; it leaves out what the floor already does (x
Wᵀ, dx), and the input spectra are not shared between query/key/value. It is no bound where the default mode goes
spectral instead (no ΔW: few tokens per step, e.g. under ~300 at 768x3072). The limit kernels are plain eager
torch ops (token-major gather), not tuned; the per-layer table printed last shows their parts.

Timing. All variants of one model are started together (imports and model construction only); then, for each token
count in turn, ``--rounds`` rounds run every worker once, in an order rotated by one per round. A run is
``--steps`` timed steps (``torch.cuda.synchronize`` around each on a GPU), preceded by one untimed step on a
worker's first run, on a new token count and after its heap was trimmed (see ``benchmarks/_common.py``), and by
``--warmup`` more if asked. Ratios to the floor use the min and the median over all timed steps of all rounds.
CPU: ``--threads`` threads.

Peak memory, per variant in its own process, median over rounds: on CPU the resident-memory high-water mark of
that worker's timed steps (reset through /proc/self/clear_refs before each run, so neither model construction
nor other variants count); on CUDA ``torch.cuda.max_memory_allocated`` over each run's steps (reset before).

Runs unchanged on a CUDA machine (the device is printed). The whole issue-15 table (BERT and MiniLM widths, 1,024
and 8,192 tokens, all and qv, floor / ours / PEFT FourierFT / PEFT LoRA / limit), on a quiet 2-core CPU, about
7-9 minutes:

    flock /tmp/bench.lock .venv/bin/python benchmarks/torch_step.py
    flock /tmp/bench.lock .venv/bin/python benchmarks/torch_step.py --layers 1 --tokens 128 --rounds 2  # smoke

``--create`` also times adapter creation on a Llama-2-7B-shaped stack (meta weights), ours against PEFT's.
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

from _common import (  # noqa: E402
    half_bins, half_spectrum_scatter, header, layer_shapes, load, peak_rss_gb, report, reset_peak_rss, run_models,
    serve,
)

TARGETS = {"qv": ["query", "value"], "all": ["query", "key", "value", "dense"]}
MODELS = {"bert": (768, 12, 3072), "minilm": (384, 12, 1536)}  # hidden, heads, intermediate
LABELS = {"floor": "floor", "fourierft_torch": "fourierft_torch (auto)", "peft_fourierft": "PEFT FourierFT",
          "peft_lora": "PEFT LoRA r=8"}
N_FREQUENCY, SCALING = 1000, 150.0


def _device(torch, threads: int) -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"cpu: {os.cpu_count()} cores, {threads} torch threads, torch {torch.__version__}"


def _build(variant: str, targets: str, spec: dict):
    import peft
    import torch
    from transformers import BertConfig, BertModel

    import fourierft_torch

    torch.manual_seed(0)
    config = BertConfig(hidden_size=spec["hidden"], num_attention_heads=spec["heads"],
                        intermediate_size=spec["intermediate"], num_hidden_layers=spec["layers"])
    model = BertModel(config, add_pooling_layer=False)
    names = TARGETS.get(targets)
    if variant == "floor":
        for name, param in model.named_parameters():
            param.requires_grad_("LayerNorm" in name)
        return model, 0
    if variant == "peft_fourierft":
        model = peft.get_peft_model(model, peft.FourierFTConfig(n_frequency=spec["n_frequency"], scaling=SCALING,
                                                                target_modules=names))
    elif variant == "peft_lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=names))
    elif variant.startswith("fourierft_torch"):
        model = fourierft_torch.get_fourierft_model(
            model, fourierft_torch.FourierFTConfig(n_frequency=spec["n_frequency"], scaling=SCALING,
                                                   target_modules=names))
        # "fourierft_torch[:mode][+keep|+rebuild]"
        mode, _, keep = variant.partition(":")[2].partition("+")
        layers = [m for m in model.modules() if isinstance(m, fourierft_torch.FourierFTLinear)]
        for layer in layers:
            if mode:
                layer.forward_mode = mode
            if keep:
                if not hasattr(layer, "keep_delta"):
                    raise ValueError(f"variant {variant!r}: FourierFTLinear has no keep_delta any more")
                layer.keep_delta = keep == "keep"
        return model, len(layers)
    else:
        raise ValueError(f"unknown variant {variant!r}; known: floor, fourierft_torch[:mode][+keep|+rebuild], "
                         f"peft_fourierft, peft_lora")
    from peft.tuners.tuners_utils import BaseTunerLayer

    return model, sum(isinstance(m, BaseTunerLayer) for m in model.modules())


def setup_variant(spec: dict):
    """A worker's model and optimizer; ``run`` does warm-up and timed steps and reports times and memory."""
    import torch

    torch.set_num_threads(spec["threads"])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model, adapted = _build(spec["variant"], spec.get("targets"), spec)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    inputs = {t: torch.randint(0, 30522, (t // spec["seq"], spec["seq"]), generator=generator).to(device)
              for t in spec["tokens"]}
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def one_step(ids):
        loss = model(input_ids=ids).last_hidden_state.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def run(request: dict) -> dict:
        ids = inputs[request["tokens"]]
        for _ in range(request["warmup"] + request["settle"]):  # settle: see _common.serve
            one_step(ids)
        sync()
        exact = reset_peak_rss()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(request["steps"]):
            start = time.perf_counter()
            loss = one_step(ids)
            sync()
            times.append(time.perf_counter() - start)
        device_gb = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        return {"times": times, "loss": float(loss), "rss_gb": peak_rss_gb(), "rss_exact": exact,
                "device_gb": device_gb, "memory_gb": device_gb if cuda else peak_rss_gb()}

    info = {"device": _device(torch, spec["threads"]), "trainable": sum(p.numel() for p in params),
            "adapted": adapted}
    return info, run


def setup_limit(spec: dict):
    """The limit work of each adapted layer shape (weight layout (out, in)), on the variants' device."""
    import numpy as np
    import torch

    import bridge

    torch.set_num_threads(spec["threads"])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n, fns = spec["n_frequency"], {}
    generator = torch.Generator().manual_seed(0)
    for shape in layer_shapes(spec["hidden"], spec["intermediate"], 1, "all"):
        n_in, n_out = map(int, shape.split("x"))
        rows, cols = bridge.spectral_indices(n_out, n_in, n, 777)
        target, source = half_spectrum_scatter(rows, cols, n_out, n_in)
        col_half, col_conj = half_bins(cols, n_in)
        row_half, row_conj = half_bins(rows, n_out)
        as_index = lambda a: torch.as_tensor(np.asarray(a, np.int64), device=device)  # noqa: E731
        target2, source = as_index(2 * target), as_index(source)
        col_half, row_half = as_index(col_half), as_index(row_half)
        sign = torch.as_tensor(np.where(col_conj ^ row_conj, -1.0, 1.0), dtype=torch.float32, device=device)
        scale = SCALING / (n_in * n_out)

        def build(c, target2=target2, source=source, n_in=n_in, n_out=n_out):
            # (re, im) pairs: the real coefficients go to the even slots, no complex temporary.
            half = torch.zeros(n_out * (n_in // 2 + 1) * 2, device=device)
            half.index_add_(0, target2, (0.5 * SCALING) * c[source])
            return torch.fft.irfft2(torch.view_as_complex(half.view(n_out, n_in // 2 + 1, 2)), s=(n_out, n_in))

        def grad(x, dy, col_half=col_half, row_half=row_half, sign=sign, scale=scale):
            xs = torch.fft.rfft(x, dim=-1).index_select(1, col_half)
            ys = torch.fft.rfft(dy, dim=-1).index_select(1, row_half)
            return scale * ((ys.real * xs.real).sum(0) - sign * (ys.imag * xs.imag).sum(0))

        c = torch.randn(n, generator=generator).to(device)
        for t in spec["tokens"]:
            x = torch.randn(t, n_in, generator=generator).to(device)
            dy = torch.randn(t, n_out, generator=generator).to(device)
            fns.setdefault(t, {})[shape] = {"ΔW build": (build, (c,)),
                                            "rfft x + rfft dy + gather-sum": (grad, (x, dy))}

    def run(request: dict) -> dict:
        out = {}
        with torch.no_grad():
            for shape, parts in fns[request["tokens"]].items():
                out[shape] = {}
                for name, (fn, operands) in parts.items():
                    fn(*operands)
                    sync()
                    times = []
                    for _ in range(request["repeats"]):
                        start = time.perf_counter()
                        fn(*operands)
                        sync()
                        times.append(time.perf_counter() - start)
                    out[shape][name] = [min(times), statistics.median(times)]
        return {"parts": out}

    return {"device": _device(torch, spec["threads"]), "trainable": 0}, run


def run_create(kind: str, blocks: int) -> dict:
    import torch
    from torch import nn

    hidden, inter, layers = 4096, 11008, blocks

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj = nn.Linear(hidden, hidden, bias=False), nn.Linear(hidden, hidden, bias=False)
            self.v_proj, self.o_proj = nn.Linear(hidden, hidden, bias=False), nn.Linear(hidden, hidden, bias=False)
            self.gate_proj, self.up_proj = nn.Linear(hidden, inter, bias=False), nn.Linear(hidden, inter, bias=False)
            self.down_proj = nn.Linear(inter, hidden, bias=False)

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block() for _ in range(layers)])

    with torch.device("meta"):
        model = Stack()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    start = time.perf_counter()
    if kind == "peft":
        from peft import FourierFTConfig, get_peft_model

        get_peft_model(model, FourierFTConfig(n_frequency=1000, target_modules=targets))
    else:
        import fourierft_torch

        fourierft_torch.get_fourierft_model(model, fourierft_torch.FourierFTConfig(n_frequency=1000, target_modules=targets))
    return {"create_s": time.perf_counter() - start}


def _subprocess(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _print_create(args) -> None:
    # PEFT pays a full torch.randperm(out*in) per layer (seconds each): time it on a few blocks and extrapolate
    # linearly to 32 (every block has the same 7 layers, so the cost per block is constant).
    peft = _subprocess(["--_create", "peft", "--create-blocks", str(args.peft_create_blocks)])["create_s"]
    ours = _subprocess(["--_create", "ours", "--create-blocks", str(args.create_blocks)])["create_s"]
    peft_full = peft * args.create_blocks / args.peft_create_blocks
    print("\nAdapter creation, Llama-2-7B-shaped stack (7 linear layers per block, meta weights, n_frequency=1000):")
    print(f"| | blocks timed | time | per block | {args.create_blocks} blocks |")
    print("|---|---|---|---|---|")
    print(f"| PEFT | {args.peft_create_blocks} | {peft:.2f} s | {peft / args.peft_create_blocks:.2f} s | "
          f"{peft_full:.1f} s (extrapolated) |")
    print(f"| fourierft_torch | {args.create_blocks} | {ours:.2f} s | {ours / args.create_blocks:.3f} s | "
          f"{ours:.2f} s (measured) |")
    print(f"fourierft_torch is {peft_full / ours:.0f}x faster")


def _int_list(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def main() -> None:
    if "--_worker" in sys.argv:
        serve(lambda spec: (setup_limit if spec["variant"] == "limit" else setup_variant)(spec))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=_int_list, default=[1024, 8192],
                        help="tokens per step, comma-separated (batch = tokens / seq)")
    parser.add_argument("--targets", default="all,qv", help="comma-separated: all, qv")
    parser.add_argument("--variants", default="floor,fourierft_torch,peft_fourierft,peft_lora",
                        help="comma-separated (the limit always runs); see the module docstring")
    parser.add_argument("--models", default="bert,minilm", help="comma-separated widths: bert, minilm")
    parser.add_argument("--layers", type=int, default=2, help="encoder blocks")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every variant")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=0, help="extra untimed steps before them in every round "
                        "(one is always taken first on a new token count or after the heap was trimmed)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each limit part per round")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per worker")
    parser.add_argument("--n-frequency", type=int, default=N_FREQUENCY)
    parser.add_argument("--json", help="also write every worker's results to this file")
    parser.add_argument("--create", action="store_true", help="also time adapter creation (Llama-2-7B shapes)")
    parser.add_argument("--no-create", action="store_true", help="(kept for old commands; creation is off "
                        "unless --create)")
    parser.add_argument("--create-blocks", type=int, default=32, help="Llama-2-7B blocks for our creation timing")
    parser.add_argument("--peft-create-blocks", type=int, default=2, help="blocks PEFT is timed on (extrapolated)")
    parser.add_argument("--_create", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._create:
        print(json.dumps(run_create(args._create, args.create_blocks)))
        return

    targets, variants = args.targets.split(","), args.variants.split(",")
    if "floor" not in variants:
        variants.insert(0, "floor")  # every ratio is to the floor
    for t in args.tokens:
        if t % args.seq:
            parser.error(f"--tokens {t} is not a multiple of --seq {args.seq}")
    print("\n".join(header("fourierft_torch training step vs the frozen floor, by tokens per step")), flush=True)
    groups = run_models(__file__, {m: MODELS[m] for m in args.models.split(",")}, targets, variants, args,
                        extra={"threads": args.threads})
    report(groups, variants, LABELS,
           f"{args.layers} encoder layers, 12 heads, n_frequency {args.n_frequency}, scaling {SCALING:g}, AdamW, "
           f"dropout on; {args.rounds} interleaved rounds x {args.steps} timed steps (+{args.warmup} untimed); "
           f"limit parts: best and median of {args.repeats} calls per round",
           "torch.cuda.max_memory_allocated per worker")
    if args.create:
        _print_create(args)
    print(f"\nload average at end (1/5/15 min): {load()}")


if __name__ == "__main__":
    main()
