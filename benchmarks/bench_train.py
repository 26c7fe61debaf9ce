"""Training speed and memory: the plain transformers + PEFT + bitsandbytes loop vs lima-lightning's step.

    python benchmarks/make_random_llama.py --out /tmp/llama2-7b-random --tokenizer ../shared/llama2-tokenizer
    python benchmarks/bench_train.py --model /tmp/llama2-7b-random --lima ../shared/lima/train.jsonl --out bench.json
    python benchmarks/bench_train.py --smoke        # CPU, the tiny model, every code path in seconds

One process, one model load per method (QLoRA: NF4 + double quantization; LoRA: bf16), shared by every
configuration of that method. The data are LIMA's training conversations tokenized with the Llama-2
tokenizer and chat template, capped at 2048 tokens (701k real tokens), on a random Llama-2-7B-shaped model
(speed and memory do not depend on the weights' values).

- plain (reference.py): the loop a user writes: AdamW (lr 2e-4), bf16 autocast, the loss from
  `model(..., labels=...)`, an optimizer step per batch, shuffled batches of 4 padded to the longest (or
  2048-token rows of concatenated conversations at batch 1), gradient checkpointing for QLoRA.
- ours (train_rows.py): a shipped configs/*.yaml plus overrides, read by `lima-lightning fit`'s own parser;
  the real `LIMALoRAModule` (training_step -> masked_nll -> loss.py, the token-weighted step,
  configure_optimizers, gradient clipping) fed by the real `LIMADataModule` loader, driven by a real
  Lightning Trainer for a limited number of steps, with the config's gradient accumulation (timed over whole
  optimizer steps: 8-bit AdamW's step is ~256 ms for 7B r=64, a share that accumulation divides).

Each configuration runs a few warmup batches, then is timed (cuda.synchronize at both ends) over its next
batches until --timed-tokens real tokens have trained; batches come in the configuration's own shuffled
epoch order. real tok/s = real (non-padding) tokens / seconds; LIMA epoch = 701k real tokens / that rate;
peak = torch.cuda.max_memory_allocated over the configuration (reset between configurations; it includes
the model). MFU counts model FLOPs of the real tokens (measure.model_flops), not padding or recomputation.
A loss-parity check first compares, on one identical batch, the plain path's per-token loss and LoRA
gradients with ours (parity.py: padded and packed batches; again with flex_attention before a flex row).
The report (train_report.py) is rewritten after every configuration.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from measure import TimedWindow, deadline, model_flops, release, smoke_threads  # noqa: E402
from parity import parity_check  # noqa: E402
from reference import plain_batches, plain_loop, prepare_model  # noqa: E402
from train_report import environment, fmt, summarize, write_report  # noqa: E402
from train_rows import ROWS, TEMPLATE, Setup, ours_fit, parse_rows  # noqa: E402

SHARED = REPO.parent / "shared"
GRACE_S = 60.0  # a configuration running past the budget is stopped this many seconds after it
MODEL_LOAD_S = {"qlora": 45.0, "lora": 25.0}  # H200 estimates, for the time budget
SYNTHETIC_CONVERSATIONS = 64  # without --lima (the smoke and GPU-test runs): 35-81 tokens each


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory from make_random_llama.py (with the tokenizer); `tiny` with --smoke")
    parser.add_argument("--lima", help="LIMA train.jsonl (default ../shared/lima/train.jsonl; synthetic data with --smoke if absent)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    parser.add_argument("--configs", help=f"comma-separated subset, run in this order, of: {', '.join(r.name for r in ROWS)}")
    parser.add_argument("--out", help="write the results here: X.json gets JSON and X.md the table")
    parser.add_argument("--smoke", action="store_true", help="CPU, the tiny model, 128-token cap, 100-token windows: checks the code paths")
    parser.add_argument("--timed-tokens", type=int, help="real tokens timed per configuration (default 32,000; 100 with --smoke)")
    parser.add_argument(
        "--time-budget", type=float, help="seconds (default 400 on a GPU, none with --smoke); configurations that would overrun are skipped"
    )
    parser.add_argument("--max-seq-length", type=int, default=2048, help="below the configs' 2048, token budgets scale with it")
    parser.add_argument("--lora-r", type=int, help="override every config's model.lora_r (default: the configs', 64; 8 with --smoke)")
    parser.add_argument("--lora-alpha", type=int, help="override model.lora_alpha (default: the configs')")
    parser.add_argument("--lora-dropout", type=float, help="override model.lora_dropout (default: the configs')")
    parser.add_argument("--gpu-memory-gib", type=float, help="cap the process's GPU memory, as `fit --gpu_memory_gib` does")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 dense peak for MFU (790: measured on the H200)")
    parser.add_argument(
        "--no-parity", action="store_true", help="skip the loss-parity check (a whole batch without checkpointing: over a small budget)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the plain loop's order, the parity batch, the random LoRA B")
    parser.add_argument(
        "--profile-steps", type=int, default=0, help="after each timed window, profile this many more steps (kernel vs wall time, top ops)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.model = args.model or "tiny"
        args.max_seq_length = min(args.max_seq_length, 128)
        args.timed_tokens = args.timed_tokens or 100
        args.lora_r = min(args.lora_r or 8, 8)
    args.timed_tokens = args.timed_tokens or 32_000
    if args.lima is None and not args.smoke and (SHARED / "lima" / "train.jsonl").is_file():
        args.lima = str(SHARED / "lima" / "train.jsonl")  # the smoke run uses synthetic data unless --lima is given
    if not args.model:
        parser.error("--model is required (a directory written by make_random_llama.py), or use --smoke")
    args.wanted = args.configs.split(",") if args.configs else [r.name for r in ROWS]
    unknown = set(args.wanted) - {r.name for r in ROWS}
    if unknown:
        parser.error(f"unknown --configs {sorted(unknown)}; choose from {[r.name for r in ROWS]}")
    args.budget = args.time_budget if args.time_budget is not None else float("inf") if args.smoke else 400.0
    return args


def common_overrides(args) -> list[str]:
    """`fit` arguments every row gets after its own: the benchmark's model, and the LoRA shape if given."""
    overrides = ["--model.base_model", args.model]
    for name in ("lora_r", "lora_alpha", "lora_dropout"):
        if getattr(args, name) is not None:
            overrides += [f"--model.{name}", str(getattr(args, name))]
    return overrides


def load_examples(args, tokenizer) -> list[dict]:
    from lima_lightning.data.conversations import read_conversations
    from lima_lightning.data.synthetic import synthetic_conversations
    from lima_lightning.data.tokenization import tokenize_for_training

    conversations = read_conversations(args.lima) if args.lima else synthetic_conversations("train", SYNTHETIC_CONVERSATIONS)
    examples, _ = tokenize_for_training(conversations, tokenizer, TEMPLATE, args.max_seq_length)
    return examples


def load_model(setup: Setup, seed: int, device: torch.device):
    """The PEFT model every row of `setup`'s method trains: its config's base, quantization and LoRA shape."""
    from lima_lightning.models.loading import add_lora, load_base_model

    m = setup.model
    base = load_base_model(m["base_model"], m["quantization"], device)
    model = add_lora(base, m["lora_r"], m["lora_alpha"], m["lora_dropout"], m["target_modules"])
    # LoRA B starts at zero, which would make every A gradient zero; random B gives the parity check
    # gradients to compare. Speed and memory do not depend on the values.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.01)
    return model


@dataclass
class Bench:
    """One benchmark run: its inputs, the report being filled, and the time budget."""

    args: argparse.Namespace
    device: torch.device
    tokenizer: object
    examples: list[dict]
    setups: list[Setup]
    report: dict
    started: float = field(default_factory=time.perf_counter)
    done: set[str] = field(default_factory=set)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def fits(self, setup: Setup, loading: bool = False) -> bool:
        """Essential rows run while they fit the budget; extras only if every pending essential one still fits."""
        row = setup.row
        pending = [s for s in self.setups if s.row.essential and s.row.name not in self.done | {row.name}]
        reserve = sum(s.row.expected_s for s in pending) + sum(MODEL_LOAD_S[m] for m in {s.method for s in pending} - {setup.method})
        load = MODEL_LOAD_S[setup.method] if loading else 0
        return self.elapsed() + load + row.expected_s + (0 if row.essential else reserve) <= self.args.budget

    def hard_limit(self) -> float:
        """Seconds until a running row is stopped: for what the budget cannot foresee (a compile taking minutes)."""
        return max(30.0, self.args.budget + GRACE_S - self.elapsed()) if self.args.budget != float("inf") else 0

    def add(self, row: dict) -> None:
        self.report["results"].append(row)
        self.done.add(row["config"])
        write_report(self.report, self.args.out, self.started)

    def skip(self, setup: Setup) -> None:
        self.add({"config": setup.row.name, "skipped": f"time budget ({self.elapsed():.0f} s elapsed)"})

    def parity(self, model, setup: Setup, attentions: tuple[str, ...] = ("sdpa",)) -> list[dict]:
        from lima_lightning.module import LIMALoRAModule

        module = LIMALoRAModule.around(model, self.tokenizer, **setup.model)
        return parity_check(model, module, self.examples, self.args.seed, self.args.max_seq_length, self.device, attentions)


def run_method(bench: Bench, setups: list[Setup]) -> None:
    """Load the method's model once, check parity, then run each of its rows that fits the budget."""
    if not any(bench.fits(s, loading=True) for s in setups):
        for s in setups:
            bench.skip(s)
        return
    release(bench.device)
    t0 = time.perf_counter()
    method, model = setups[0].method, load_model(setups[0], bench.args.seed, bench.device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops = model_flops(model.get_base_model().config, trainable)
    print(f"{method}: model loaded in {time.perf_counter() - t0:.0f} s ({trainable:,} trainable parameters)", flush=True)
    bench.report["parity"][method] = [] if bench.args.no_parity else bench.parity(model, setups[0])
    for row in bench.report["parity"][method]:
        print(f"  parity {row}", flush=True)
    for setup in setups:
        if not bench.fits(setup):
            bench.skip(setup)
            continue
        row = run_row(bench, setup, model, flops)
        bench.add(row)
        padding, peak = f"{row.get('padding', 0):.1%}", fmt(row.get("peak_gib"))
        measured = row.get("error") or f"{row['tokens_per_s']:.0f} real tok/s, padding {padding}, peak {peak} GiB"
        print(f"  {setup.row.name}: {measured} ({row['wall_s']:.0f} s)", flush=True)
    del model
    torch._dynamo.reset()  # compiled graphs can hold the model; the next method must start from empty memory
    release(bench.device)


def run_row(bench: Bench, setup: Setup, model, flops: tuple[float, float]) -> dict:
    """One configuration's timed window and report row; an error becomes the row, so the others still run."""
    args, device, row = bench.args, bench.device, setup.row
    release(device)
    t0 = time.perf_counter()
    try:
        with deadline(bench.hard_limit()):
            attention = "sdpa" if row.plain else setup.model["attn_implementation"]
            if attention != "sdpa":  # parity of the other kernel first (it also compiles flex's kernels)
                rows = bench.parity(model, setup, (attention,))
                rows[0]["path"] += f" (again, before {row.name}: the adapters have trained since)"
                bench.report["parity"][setup.method] += rows
                release(device)
            accumulation = 1 if row.plain else setup.trainer["accumulate_grad_batches"]  # the plain loop steps every batch
            window = TimedWindow(1 if args.smoke else row.warmup, args.timed_tokens, args.profile_steps, device, accumulation)
            if row.plain:
                prepare_model(model, row.checkpointing, device)
                pad_id = bench.tokenizer.pad_token_id
                batches = plain_batches(bench.examples, row.plain, row.batch_size, pad_id, args.seed, args.max_seq_length)
                run = plain_loop(model, batches, window, device)
            else:
                run = ours_fit(model, bench.tokenizer, bench.examples, setup, window, device)
            result = summarize(setup, run, flops, bench.report["data"]["tokens"], device, args.peak_tflops)
    except Exception as e:  # noqa: BLE001 - one failed configuration must not lose the others
        traceback.print_exc()
        result = {"config": row.name, "error": f"{type(e).__name__}: {e}"[:300]}
    model.zero_grad(set_to_none=True)
    result["wall_s"] = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with smoke_threads(args.smoke):
        return run(args, argv)


def run(args, argv: list[str] | None) -> dict:
    started = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = torch.device("cuda", 0) if torch.cuda.is_available() and not args.smoke else torch.device("cpu")
    from lima_lightning.memory import apply_budget, request_budget

    request_budget(args.gpu_memory_gib)  # the same cap as the product's, so both loops meet the same card
    apply_budget(device)
    from lima_lightning.models.loading import load_tokenizer, resolve_base_model

    args.model = resolve_base_model(args.model) if args.model == "tiny" else args.model
    common = common_overrides(args)
    rows = {r.name: r for r in ROWS}
    setups = parse_rows([rows[name] for name in args.wanted], common, args.max_seq_length)  # in the order asked for
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    examples = load_examples(args, tokenizer)
    total_tokens = sum(len(e["input_ids"]) for e in examples)
    report = {
        "command": " ".join(["python", "benchmarks/bench_train.py", *(argv if argv is not None else sys.argv[1:])]),
        "environment": environment(device),
        "data": {"examples": len(examples), "tokens": total_tokens, "max_seq_length": args.max_seq_length},
        "common_overrides": common,
        "timed_tokens": args.timed_tokens,
        "peak_tflops": args.peak_tflops,
        "results": [],
        "parity": {},
    }
    report["data"]["source"] = args.lima or "synthetic"
    print(f"{len(examples)} conversations, {total_tokens} real tokens; device {report['environment']['device']}", flush=True)
    bench = Bench(args, device, tokenizer, examples, setups, report, started)
    for method in ("qlora", "lora"):
        group = [s for s in setups if s.method == method]
        if group:
            run_method(bench, group)
    print(write_report(report, args.out, started))
    return report


if __name__ == "__main__":
    main()
