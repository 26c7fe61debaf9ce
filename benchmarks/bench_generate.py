"""Generation speed: lima-lightning's predict path against plain transformers + PEFT, in one process.

    python benchmarks/make_random_llama.py --out /tmp/llama2-7b-random --tokenizer .gpu/llama2-tokenizer
    PYTHONPATH=. python benchmarks/bench_generate.py --model /tmp/llama2-7b-random --prompts .gpu/lima/test.jsonl
    PYTHONPATH=. python benchmarks/bench_generate.py --smoke     # CPU, the built-in tiny model, seconds

Every configuration answers the same prompts (LIMA's 300 test prompts in the Llama-2 chat template) with
the same sampling (temperature 0.8, top-p 0.9, seeded) and the same random LoRA adapter (r=64 on every
projection, as the QLoRA config trains):
  reference, batch 1     `model.generate` on the PEFT model over an NF4 base, one prompt at a time, as the
                         original project did; only --reference_prompts prompts are timed, and the time for all
                         prompts is extrapolated from them.
  reference, batched     the same model and call, --reference_batch_size prompts at a time in input order;
                         --reference_batches batches timed and extrapolated to all prompts.
                         Both reference rows may stop each sequence at --reference_new_tokens and scale the time
                         to --max_new_tokens (an underestimate of the reference: later steps are slower).
  predict ...            `Trainer.predict` on LIMALoRAModule + LIMADataModule, the path `lima-lightning predict`
                         runs (longest prompts first, the product's generation function, chunks that fit memory),
                         --batch_size prompts per batch (default 300: all of LIMA's), every batch timed unless
                         --batches limits them; NF4 or bf16 base, with and without model.generation.merge,
                         static or dynamic KV cache, compiled decoding (see PREDICT_CONFIGS).

The reference and the random adapter are in generate_reference.py.

A random-weight model almost never emits EOS, so nearly every sequence runs to max_new_tokens: these are
worst-case times (a fine-tuned model stops earlier, and a batch ends when its longest answer does).

On an H200 (torch 2.11, transformers 5.17, peft 0.21.0, bitsandbytes 0.50.2), with --reference_new_tokens 200,
all rows take about 8 minutes; --configs picks a subset of the predict rows, --skip_reference drops the
reference. Results and the table are rewritten after every row (--out), so a run cut short keeps its rows.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
from generate_reference import Result, bench_reference, free, peak_memory, sync, write_random_adapter
from measure import smoke_threads

from lima_lightning.data.datamodule import LIMADataModule
from lima_lightning.data.sources import load_conversations
from lima_lightning.data.tokenization import prompts_for_generation
from lima_lightning.generation import GenerationSettings
from lima_lightning.models.loading import LLAMA_PROJECTIONS, load_tokenizer, resolve_base_model
from lima_lightning.module import LIMALoRAModule

SYNTHETIC_SIZE = 80  # --smoke: the synthetic predict set is a tenth of this, 8 prompts


@dataclass(frozen=True)
class PredictConfig:
    quantization: str  # model.quantization
    merge: bool  # model.generation.merge
    cache: str = "static"  # model.generation.cache
    compile: bool = False  # model.generation.compile


PREDICT_CONFIGS = {  # run in this order: the product's defaults first, so a run cut short still has them
    "predict, bf16 base, merge": PredictConfig("none", True),
    "predict, NF4 base, merge": PredictConfig("nf4", True),
    "predict, NF4 base": PredictConfig("nf4", False),
    "predict, bf16 base, merge, dynamic cache": PredictConfig("none", True, cache="dynamic"),
    "predict, bf16 base": PredictConfig("none", False),
    "predict, bf16 base, merge, compiled": PredictConfig("none", True, compile=True),  # last: compiled graphs stay cached
}


class BatchTimer(L.Callback):
    """Wall time and completions of each predict batch: generation only, loading excluded."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: list[float] = []
        self.rows: list[dict] = []

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        sync(self.device)
        self.started = time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        sync(self.device)
        self.seconds.append(time.perf_counter() - self.started)
        self.rows.extend(outputs)


def bench_predict(args, name: str, model_dir: str, adapter: Path, prompts: str, n_prompts: int, device) -> Result:
    """`lima-lightning predict` without the CLI: the same module, data module and Trainer.predict."""
    config = PREDICT_CONFIGS[name]
    free(device)
    if device.type == "cuda":  # what earlier configurations left behind shrinks generation's memory budget
        print(f"  {name}: {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB allocated before loading", flush=True)
    module = LIMALoRAModule(
        base_model=model_dir,
        quantization=config.quantization,
        adapter_path=str(adapter),
        generation=GenerationSettings(
            max_new_tokens=args.max_new_tokens,
            do_sample=True,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            cache=config.cache,
            merge=config.merge,
            compile=config.compile,
        ),
    )
    data = LIMADataModule(tokenizer=model_dir, predict_dataset=prompts, predict_batch_size=args.batch_size, synthetic_size=SYNTHETIC_SIZE)
    timer = BatchTimer(device)
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        precision="bf16-mixed" if device.type == "cuda" else "32-true",  # as the 7B configs / the demo
        logger=False,
        callbacks=[timer],
        limit_predict_batches=args.batches or None,  # 0: every batch, nothing extrapolated
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    started = time.perf_counter()
    trainer.predict(module, datamodule=data, return_predictions=False)
    total_s = time.perf_counter() - started
    generate_s = sum(timer.seconds)
    estimated = generate_s / len(timer.seconds) * math.ceil(n_prompts / args.batch_size)
    eos = sum(r["finish_reason"] == "eos" for r in timer.rows)
    new_tokens = sum(r["new_tokens"] for r in timer.rows)
    result = Result(name, len(timer.rows), generate_s, new_tokens, eos, estimated, total_s - generate_s, peak_memory(device))
    print(f"  {name}: {generate_s:.1f} s for {len(timer.rows)} prompts", flush=True)
    del module, trainer
    return result


def table(results: list[Result], n_prompts: int) -> str:
    reference = next((r.estimated_all_s for r in results if r.config == "reference, batch 1"), None)
    header = (
        f"{'configuration':42s} {'timed':>5s} {'gen s':>7s} {'new tok':>8s} {'EOS':>4s} {'tok/s':>8s} "
        f"{f'est. {n_prompts} prompts':>16s} {'vs ref':>7s} {'load s':>7s} {'peak GiB':>8s}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        memory = f"{r.peak_memory_gib:8.1f}" if r.peak_memory_gib is not None else f"{'-':>8s}"
        lines.append(
            f"{r.config:42s} {r.prompts_timed:5d} {r.generate_s:7.1f} {r.new_tokens:8d} {r.eos:4d} {r.tokens_per_s:8.1f} "
            f"{r.estimated_all_s:14.0f} s {f'{reference / r.estimated_all_s:6.1f}x' if reference else '      -'} {r.load_s:7.1f} {memory}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Llama model directory (benchmarks/make_random_llama.py writes one)")
    parser.add_argument("--prompts", help="LIMA test.jsonl (or any LIMA/chat-format file); default with --smoke: synthetic")
    parser.add_argument("--max_new_tokens", type=int, default=500)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--batch_size", type=int, default=300, help="prompts per predict batch (data.predict_batch_size in configs/predict.yaml)"
    )
    parser.add_argument("--batches", type=int, default=0, help="predict batches timed (0: all, nothing extrapolated)")
    parser.add_argument(
        "--reference_prompts", type=int, default=1, help="prompts timed one at a time for the batch-1 reference (~80 s each on an H200)"
    )
    parser.add_argument("--reference_batch_size", type=int, default=32, help="prompts per batch of the batched reference")
    parser.add_argument("--reference_batches", type=int, default=1, help="batches timed for the batched reference")
    parser.add_argument(
        "--reference_new_tokens", type=int, help="new tokens per reference sequence (default: --max_new_tokens); time scaled to the limit"
    )
    parser.add_argument("--skip_reference", action="store_true", help="predict rows only (no 'vs ref' column)")
    parser.add_argument("--lora_r", type=int, default=64)
    parser.add_argument("--lora_alpha", type=int, default=16)
    parser.add_argument("--configs", nargs="*", default=list(PREDICT_CONFIGS), help="predict configurations to run (default: all)")
    parser.add_argument("--work_dir", default="/tmp/bench_generate", help="where the random adapter is written")
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="CPU, the tiny model, synthetic prompts, a few tokens: checks that it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model = args.model or "tiny"
        args.prompts = args.prompts or "synthetic"
        args.max_new_tokens, args.batch_size, args.reference_batch_size, args.reference_prompts, args.lora_r = 4, 2, 2, 1, 8
    elif not args.model or not args.prompts:
        parser.error("--model and --prompts are required (or --smoke)")
    args.reference_new_tokens = min(args.reference_new_tokens or args.max_new_tokens, args.max_new_tokens)
    return args


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    with smoke_threads(args.smoke):
        return run(args)


def run(args) -> list[Result]:
    import peft
    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    model_dir = resolve_base_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    # Prompts exactly as predict builds them (the data module's own functions).
    examples = prompts_for_generation(load_conversations(args.prompts, "test", "--prompts", SYNTHETIC_SIZE), tokenizer, "llama2-chat")
    adapter = write_random_adapter(model_dir, Path(args.work_dir) / "adapter", args.lora_r, args.lora_alpha, args.seed)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(
        f"{gpu}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, lightning {L.__version__}\n"
        f"{args.model}: {len(examples)} prompts from {args.prompts}, up to {args.max_new_tokens} new tokens, "
        f"temperature {args.temperature}, top-p {args.top_p}, seed {args.seed}, LoRA r={args.lora_r} on {', '.join(LLAMA_PROJECTIONS)}",
        flush=True,
    )
    results = [] if args.skip_reference else bench_reference(args, model_dir, adapter, examples, tokenizer, device)
    report(args, results, len(examples), gpu)
    for name in args.configs:
        try:
            results.append(bench_predict(args, name, model_dir, adapter, args.prompts, len(examples), device))
        except Exception as error:  # one failing configuration (a compile error, say) must not lose the others
            if args.smoke:
                raise
            print(f"  {name}: FAILED: {type(error).__name__}: {str(error)[:300]}", flush=True)
        report(args, results, len(examples), gpu)
    return results


def report(args, results: list[Result], n_prompts: int, gpu: str) -> None:
    """Print the table and rewrite --out: called after every configuration, so a run cut short keeps its rows."""
    print()
    print(table(results, n_prompts))
    print(
        f"\ngen s: wall time of the timed prompts; est.: extrapolated to all {n_prompts} prompts (batch 1: per prompt; batched: per "
        f"batch; reference rows: scaled from {args.reference_new_tokens} to {args.max_new_tokens} new tokens per sequence); vs ref: "
        "est. time of 'reference, batch 1' / est. time. A random-weight model rarely emits EOS (column EOS), so sequences run to "
        "the limit: the worst case.",
        flush=True,
    )
    if args.out:
        rows = [{**asdict(r), "tokens_per_s": r.tokens_per_s} for r in results]
        Path(args.out).write_text(json.dumps({"args": vars(args), "device": gpu, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
