"""Training speed and memory: the plain transformers + PEFT + bitsandbytes loop vs lima-lightning's step.

    python benchmarks/make_random_llama.py --out /tmp/llama2-7b-random --tokenizer ../shared/llama2-tokenizer
    python benchmarks/bench_train.py --model /tmp/llama2-7b-random --lima ../shared/lima/train.jsonl --out bench.json
    python benchmarks/bench_train.py --smoke        # CPU, the tiny model, every code path in seconds

One process, one model load per method (QLoRA: NF4 + double quantization; LoRA: bf16), shared by every
configuration of that method. The data are LIMA's training conversations tokenized with the Llama-2
tokenizer and chat template, capped at 2048 tokens (701k real tokens), on a random Llama-2-7B-shaped model
(speed and memory do not depend on the weights' values).

- plain: the loop a user writes, spelled out in `plain_loop`: AdamW (lr 2e-4), bf16 autocast, the loss from
  `model(..., labels=...)`, an optimizer step per batch, shuffled batches of 4 padded to the longest (or
  2048-token rows of concatenated conversations at batch 1), gradient checkpointing for QLoRA.
- ours: the real `LIMALoRAModule` (training_step -> masked_nll -> loss.py, on_before_optimizer_step's
  token-weighted scaling, configure_optimizers, gradient clipping 1.0) fed by the real `LIMADataModule`
  loader for `data.batching`, driven by a real Lightning Trainer for a limited number of steps
  (accumulate_grad_batches=1: the configs' accumulation of 2 only halves the optimizer's small share).

Each configuration runs a few warmup batches, then is timed (cuda.synchronize at both ends) over its next
batches until --timed-tokens real tokens have trained; batches come in the configuration's own shuffled
epoch order. real tok/s = real (non-padding) tokens / seconds; LIMA epoch = 701k real tokens / that rate;
peak = torch.cuda.max_memory_allocated over the configuration (reset between configurations; it includes
the model). MFU counts model FLOPs of the real tokens (see `model_flops`), not padding or recomputation.
A loss-parity check first compares, on one identical batch, the plain path's per-token loss and LoRA
gradients with ours (padded and packed batches; again with flex_attention before a flex configuration).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import random
import signal
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lima_lightning.data.collate import collate_rows  # noqa: E402
from lima_lightning.data.tokenization import IGNORE_INDEX  # noqa: E402

GIB = 2**30
SHARED = REPO.parent / "shared"


@dataclass(frozen=True)
class Config:
    name: str
    method: str  # qlora | lora
    path: str  # plain | ours
    batching: str  # plain: padded | rows; ours: padded | length_grouped | packed
    batch_size: int = 4  # plain padded
    max_tokens: int = 8192  # ours: data.max_tokens_per_batch
    checkpointing: bool | str = False
    attn: str = "sdpa"
    compile: bool = False
    optimizer: str = "adamw"
    lora_dtype: str = "float32"
    loss_chunk_size: int = 0
    reference: str | None = None
    goal: str = ""
    essential: bool = False  # run even when time is short; extras run only if the essentials still fit
    expected_s: float = 12.0  # H200 estimate of its duration, for the time budget
    warmup: int = 2


OURS_QLORA = {"method": "qlora", "path": "ours", "reference": "qlora-plain"}
OURS_LORA = {"method": "lora", "path": "ours", "reference": "lora-plain"}
# configs/llama2-7b-qlora-lowmem.yaml: <= 2048 tokens per micro-batch, checkpointing, 8-bit AdamW, bf16 adapters
# (and there: packed rows, compiled layers; the rows below vary those two).
LOWMEM_QLORA = {
    **OURS_QLORA,
    "reference": "qlora-plain-2048x1",
    "max_tokens": 2048,
    "checkpointing": True,
    "optimizer": "adamw_8bit",
    "lora_dtype": "bfloat16",
    "loss_chunk_size": 1024,
    "goal": "speed>=1,peak<=6",
}
# In running order. Essential ones run while they fit --time-budget; the others only when every pending
# essential one still fits after them. Compiled layers stay compiled: compile comes last for its method.
CONFIGS = [
    Config("qlora-plain", "qlora", "plain", "padded", checkpointing=True, essential=True, expected_s=22),
    Config("qlora-plain-2048x1", "qlora", "plain", "rows", batch_size=1, checkpointing=True, essential=True, expected_s=12),
    Config("qlora-fast", batching="length_grouped", checkpointing="auto", goal="speed>=6", essential=True, **OURS_QLORA),
    # The memory mode uncompiled: each step is bound by Python and kernel launches (the GPU is busy ~1/3 of it).
    Config("qlora-lowmem-grouped", batching="length_grouped", expected_s=20, **LOWMEM_QLORA),
    Config("qlora-lowmem-eager", batching="packed", expected_s=20, **LOWMEM_QLORA),
    Config("qlora-packed", batching="packed", checkpointing="auto", essential=True, **OURS_QLORA),
    Config("qlora-fast-gc", batching="length_grouped", checkpointing=True, expected_s=15, **OURS_QLORA),
    Config("qlora-padded-ours", batching="padded", checkpointing=True, expected_s=16, **OURS_QLORA),
    Config("qlora-packed-flex", batching="packed", checkpointing="auto", attn="flex_attention", expected_s=60, warmup=3, **OURS_QLORA),
    Config(
        "qlora-fast-compile",
        batching="length_grouped",
        checkpointing="auto",
        compile=True,
        essential=True,
        expected_s=120,
        warmup=4,
        **OURS_QLORA,
    ),
    # The memory mode as configs/llama2-7b-qlora-lowmem.yaml ships it: full packed 2048-token rows, compiled layers.
    Config("qlora-lowmem", batching="packed", compile=True, essential=True, expected_s=120, warmup=4, **LOWMEM_QLORA),
    Config("lora-plain", "lora", "plain", "padded", checkpointing=False, essential=True, expected_s=14),
    Config("lora-fast", batching="length_grouped", checkpointing="auto", goal="speed>=5", essential=True, expected_s=10, **OURS_LORA),
    Config("lora-packed-flex", batching="packed", checkpointing="auto", attn="flex_attention", expected_s=40, warmup=3, **OURS_LORA),
    Config(
        "lora-fast-compile",
        batching="length_grouped",
        checkpointing="auto",
        compile=True,
        essential=True,
        expected_s=90,
        warmup=4,
        **OURS_LORA,
    ),
]
GRACE_S = 60.0  # a configuration running past the budget is stopped this many seconds after it
MODEL_LOAD_S = {"qlora": 45.0, "lora": 25.0}  # H200 estimates, for the time budget


# ----------------------------------------------------------------------------- data
def load_examples(args, tokenizer) -> list[dict]:
    from lima_lightning.data.conversations import read_conversations
    from lima_lightning.data.synthetic import synthetic_conversations
    from lima_lightning.data.tokenization import tokenize_for_training

    conversations = read_conversations(args.lima) if args.lima else synthetic_conversations("train", 200)
    examples, _ = tokenize_for_training(conversations, tokenizer, "llama2-chat", args.max_seq_length)
    return examples


def shuffled(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def plain_padded_batch(examples: list[dict], pad_id: int) -> dict:
    """What a plain loop feeds the model: examples right-padded to the longest, with an attention mask."""
    longest = max(len(e["input_ids"]) for e in examples)
    pad = [longest - len(e["input_ids"]) for e in examples]
    return {
        "input_ids": torch.tensor([e["input_ids"] + [pad_id] * p for e, p in zip(examples, pad, strict=True)]),
        "labels": torch.tensor([e["labels"] + [IGNORE_INDEX] * p for e, p in zip(examples, pad, strict=True)]),
        "attention_mask": torch.tensor([[1] * len(e["input_ids"]) + [0] * p for e, p in zip(examples, pad, strict=True)]),
    }


def plain_batches(examples: list[dict], config: Config, pad_id: int, seed: int, max_seq_length: int) -> list[tuple[dict, list[int]]]:
    """(batch, lengths of the conversations or pieces in it) in a plain shuffled order."""
    order = shuffled(len(examples), seed)
    if config.batching == "padded":
        out = []
        for k in range(0, len(order), config.batch_size):
            chunk = [examples[i] for i in order[k : k + config.batch_size]]
            out.append((plain_padded_batch(chunk, pad_id), [len(e["input_ids"]) for e in chunk]))
        return out
    # "rows": the shuffled conversations concatenated and cut into full rows (no mask: plain causal attention).
    ids = [t for i in order for t in examples[i]["input_ids"]]
    labels = [t for i in order for t in examples[i]["labels"]]
    bounds, at = [], 0
    for i in order:
        at += len(examples[i]["input_ids"])
        bounds.append(at)
    out = []
    for start in range(0, len(ids) - max_seq_length + 1, max_seq_length):
        end = start + max_seq_length
        cuts = sorted({start, end, *(b for b in bounds if start < b < end)})
        batch = {"input_ids": torch.tensor([ids[start:end]]), "labels": torch.tensor([labels[start:end]])}
        out.append((batch, [b - a for a, b in zip(cuts[:-1], cuts[1:], strict=True)]))
    return out


# ----------------------------------------------------------------------------- model
def load_model(args, method: str, device: torch.device):
    from lima_lightning.models.loading import add_lora, load_base_model

    base = load_base_model(args.model, "nf4" if method == "qlora" else "none", device)
    model = add_lora(
        base, args.lora_r, args.lora_alpha, args.lora_dropout, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # LoRA B starts at zero, which would make every A gradient zero; random B gives the parity check
    # gradients to compare. Speed and memory do not depend on the values.
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.01)
    return model


def model_flops(config, trainable: int) -> tuple[float, float]:
    """(FLOPs per token, FLOPs per squared sequence length) of LoRA training.

    Frozen base: forward 2N + input gradient 2N = 4N (no weight gradient), N = parameters of every matmul
    (attention and MLP projections, LM head; not the embedding lookup). Adapters: 6 x their parameters.
    Attention (no parameters): QK^T and AV cost 4d FLOPs per causal query-key pair forward, twice that
    backward; a length-l sequence has ~l^2/2 pairs per layer: 6 * d * layers * l^2. Padding and checkpoint
    recomputation are not counted: MFU credits useful model work only.
    """
    h, i, n_layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = h * config.num_key_value_heads // config.num_attention_heads
    matmul_params = n_layers * (2 * h * h + 2 * h * kv + 3 * h * i) + h * vocab
    return 4 * matmul_params + 6 * trainable, 6 * h * n_layers


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise TimeoutError in the main thread after `seconds` (0: no limit), so one slow configuration cannot
    take the whole run past the machine's time limit; the exception becomes that configuration's error row."""
    if seconds <= 0:
        yield
        return

    def stop(signum, frame):
        raise TimeoutError(f"stopped after {seconds:.0f} s: past --time-budget")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def compiled_graphs() -> int:
    """Graphs torch.compile has produced so far in this process (its own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


# ----------------------------------------------------------------------------- where a step's time goes
class StepProfile:
    """torch.profiler over a few steps after the timed window (--profile-steps): is a step GPU- or CPU-bound?

    gpu_busy = kernel time / wall time of the profiled steps; well under 1 means the GPU waits for the CPU
    (Python and kernel-launch overhead) or for a host sync. The profiler slows the CPU side somewhat, so the
    wall time here is not the timed window's.
    """

    SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::_local_scalar_dense", "cudaEventSynchronize")

    def __init__(self, steps: int, device: torch.device) -> None:
        self.steps, self.device, self.done, self.profiler, self.start, self.wall = steps, device, 0, None, 0.0, None

    @property
    def active(self) -> bool:
        return self.profiler is not None

    def begin(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        sync(self.device)
        self.profiler = profile(activities=activities)
        self.profiler.__enter__()
        self.start = time.perf_counter()

    def step_done(self) -> bool:
        """Count one step; True once the last one is done (and the profile summarized)."""
        self.done += 1
        if self.done < self.steps:
            return False
        sync(self.device)
        self.wall = time.perf_counter() - self.start
        self.profiler.__exit__(None, None, None)
        return True

    def finish(self) -> dict | None:
        """The summary once every planned step was profiled; None (and the profiler stopped) if the data ran out first."""
        if not self.active:
            return None
        if self.wall is None:
            self.profiler.__exit__(None, None, None)
            return None
        return self.summary()

    def summary(self) -> dict:
        from torch.autograd import DeviceType

        events = self.profiler.key_averages()
        cpu_ops = [e for e in events if e.device_type == DeviceType.CPU]
        # A record_function range (e.g. Optimizer.step#AdamW.step, which holds Lightning's whole forward and
        # backward closure) shows on the GPU timeline under the same name: a span, not a kernel.
        ranges = {e.key for e in cpu_ops}
        kernels = [e for e in events if e.device_type != DeviceType.CPU and e.key not in ranges]

        def device_us(e) -> float:
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

        per_step = 1000.0 * self.steps  # µs totals -> ms per step
        kernel_ms = sum(device_us(e) for e in kernels) / per_step
        wall_ms = 1000.0 * self.wall / self.steps
        return {
            "steps": self.steps,
            "wall_ms_per_step": wall_ms,
            "kernel_ms_per_step": kernel_ms,
            "gpu_busy": kernel_ms / wall_ms if kernels else None,
            "kernels_per_step": sum(e.count for e in kernels) / self.steps,
            "cpu_op_ms_per_step": sum(e.self_cpu_time_total for e in cpu_ops) / per_step,
            "syncs_per_step": {e.key: e.count / self.steps for e in cpu_ops if e.key in self.SYNC_EVENTS},
            "top_kernels_ms": [(e.key[:70], device_us(e) / per_step) for e in sorted(kernels, key=device_us, reverse=True)[:8]],
            "top_cpu_ops_ms": [
                (e.key[:70], e.self_cpu_time_total / per_step, e.count // self.steps)
                for e in sorted(cpu_ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
            ],
        }


# ----------------------------------------------------------------------------- the plain loop
def plain_loop(model, batches, warmup: int, target_tokens: int, device: torch.device, profile_steps: int = 0) -> dict:
    """What a user writes with transformers + PEFT + bitsandbytes: nothing here comes from lima-lightning."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    tokens = cells = 0
    lengths: list[int] = []
    start = seconds = None
    profile = StepProfile(profile_steps, device)
    timed_batches = 0
    for step, (batch, batch_lengths) in enumerate(batches):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            loss = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if seconds is not None:  # past the timed window: profiling
            if profile.step_done():
                break
        elif step >= warmup:
            tokens += sum(batch_lengths)
            cells += batch["input_ids"].numel()
            lengths += batch_lengths
            timed_batches += 1
            if tokens >= target_tokens:
                sync(device)
                seconds = time.perf_counter() - start
                if not profile_steps:
                    break
                profile.begin()
    if seconds is None:  # the batches ran out first
        sync(device)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "cells": cells, "lengths": lengths, "batches": timed_batches, "profile": profile.finish()}


# ----------------------------------------------------------------------------- our training step
def ours_fit(model, tokenizer, examples, config: Config, args, device: torch.device) -> dict:
    """A real Trainer on a real LIMALoRAModule and LIMADataModule, stopped after the timed window."""
    import lightning as L
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from lima_lightning.data.datamodule import LIMADataModule
    from lima_lightning.module import LIMALoRAModule

    class KeepOnDevice(SingleDeviceStrategy):
        """Lightning moves the model to the CPU after fit; the benchmark trains the loaded model again instead."""

        def teardown(self) -> None:
            self.precision_plugin.teardown()
            self.accelerator.teardown()

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.tokens = self.cells = self.batches = 0
            self.lengths: list[int] = []
            self.start = self.seconds = None
            self.profile = StepProfile(args.profile_steps, device)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == config.warmup:
                sync(device)
                self.start = time.perf_counter()
                self.graphs = compiled_graphs()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self.profile.active:
                trainer.should_stop = self.profile.step_done()
                return
            if batch_idx < config.warmup or self.seconds is not None:
                return
            self.tokens += batch["num_tokens"]
            self.cells += batch["input_ids"].numel()
            self.batches += 1
            self.lengths += [len(examples[i]["input_ids"]) for row in plan[batch_idx] for i in row] if plan else []
            if self.tokens >= args.timed_tokens:
                sync(device)
                self.seconds = time.perf_counter() - self.start
                self.graphs = compiled_graphs() - self.graphs
                if args.profile_steps:
                    self.profile.begin()
                else:
                    trainer.should_stop = True

    dm = LIMADataModule.from_examples(  # tokenized once for all configurations
        examples,
        loaded_tokenizer=tokenizer,
        max_seq_length=args.max_seq_length,
        batch_size=config.batch_size,
        batching=config.batching,
        max_tokens_per_batch=config.max_tokens,
        val_fraction=0.0,
        seed=args.seed,
    )
    module = LIMALoRAModule.around(
        model,
        tokenizer,
        base_model=args.model,
        quantization="nf4" if config.method == "qlora" else "none",
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        gradient_checkpointing=config.checkpointing,
        attn_implementation=config.attn,
        compile=config.compile,
        lora_dtype=config.lora_dtype,
        loss_chunk_size=config.loss_chunk_size,
        optimizer=config.optimizer,
    )
    module.compile_backend = "inductor" if device.type == "cuda" else "aot_eager"  # no C++ compile on the CPU smoke run
    loader = dm.train_dataloader()
    plan = loader.sampler.epoch_batches(0)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        strategy=KeepOnDevice(device=device),
        precision="bf16-mixed" if device.type == "cuda" else "32-true",
        max_epochs=1,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=dm)
    if timer.seconds is None:  # the epoch ended first (small smoke data)
        sync(device)
        timer.seconds = time.perf_counter() - timer.start
        timer.graphs = compiled_graphs() - timer.graphs
    result = {"seconds": timer.seconds, "tokens": timer.tokens, "cells": timer.cells, "lengths": timer.lengths, "batches": timer.batches}
    result["graphs_compiled_while_timed"] = timer.graphs  # > 0: a recompile polluted the timing
    result["profile"] = timer.profile.finish()
    result["settings"] = module.speed_settings
    del trainer, module
    return result


# ----------------------------------------------------------------------------- parity
def parity_check(model, tokenizer, examples, args, device: torch.device, attentions: tuple[str, ...] = ("sdpa",)) -> list[dict]:
    """One identical batch of 4 conversations: the plain path's per-token loss and LoRA gradients vs ours.

    Dropout is off (eval mode), so both paths compute the same function; differences are bf16 rounding.
    """
    from lima_lightning.models.speed import set_attention
    from lima_lightning.module import LIMALoRAModule

    chunk = [examples[i] for i in shuffled(len(examples), args.seed)[:4]]
    pad_id = tokenizer.pad_token_id
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    module = LIMALoRAModule.around(model, tokenizer, base_model=args.model, lora_dropout=args.lora_dropout)
    model.eval()

    def on_device(batch: dict) -> dict:
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def run(loss_fn) -> tuple[float, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with autocast:
            nll, count = loss_fn()
        nll.backward()
        return float(nll) / float(count), torch.cat([params[n].grad.float().flatten() for n in sorted(params)])

    def plain() -> tuple[torch.Tensor, torch.Tensor]:
        batch = on_device(plain_padded_batch(chunk, pad_id))
        count = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        return model(**batch).loss * count, count  # transformers' loss is the mean over trained tokens

    rows_of_two = [chunk[:2], chunk[2:]]
    fits = all(sum(len(e["input_ids"]) for e in row) <= args.max_seq_length for row in rows_of_two)
    variants = [("padded, no mask, LM head at trained positions", collate_rows([[e] for e in chunk], pad_id))]
    variants.append(("packed rows (position restarts)", collate_rows(rows_of_two if fits else [[e] for e in chunk], pad_id)))
    reference_loss, reference_grads = run(plain)
    rows = [{"path": "plain: padded + attention mask, full logits, labels= loss", "loss": reference_loss}]
    base = model.get_base_model()
    for attention in attentions:
        for label, batch in variants:
            label = f"ours ({attention}): {label}"
            try:
                used = set_attention(base, attention, device)
                loss, grads = run(lambda batch=batch: module.masked_nll(on_device(batch)))
                rel = float((grads - reference_grads).norm() / reference_grads.norm().clamp(min=1e-30))
                label += "" if used == attention else f" [{used}: fallback]"
                rows.append({"path": label, "loss": loss, "loss_diff": loss - reference_loss, "grad_rel_diff": rel})
            except Exception as e:  # noqa: BLE001 - report it and keep measuring
                rows.append({"path": label, "error": f"{type(e).__name__}: {e}"[:300]})
            finally:
                set_attention(base, "sdpa", device)
    model.zero_grad(set_to_none=True)
    model.train()
    return rows


# ----------------------------------------------------------------------------- orchestration
def summarize(config: Config, run: dict, flops: tuple[float, float], total_tokens: int, device, args) -> dict:
    tok_s = run["tokens"] / run["seconds"]
    model_flops_done = flops[0] * run["tokens"] + flops[1] * sum(n * n for n in run["lengths"])
    row = {
        "config": config.name,
        "method": config.method,
        "path": config.path,
        "batching": config.batching if config.path == "ours" else f"{config.batching} x{config.batch_size}",
        "tokens_per_batch": config.max_tokens if config.path == "ours" and config.batching != "padded" else None,
        "checkpointing": run.get("settings", {}).get("gradient_checkpointing", config.checkpointing),
        "checkpointing_setting": config.checkpointing,
        "attn": run.get("settings", {}).get("attn_implementation", config.attn),
        "compile": config.compile,
        "optimizer": config.optimizer,
        "lora_dtype": config.lora_dtype,
        "loss_chunk_size": config.loss_chunk_size,
        "timed_batches": run["batches"],
        "timed_tokens": run["tokens"],
        "seconds": run["seconds"],
        "tokens_per_s": tok_s,
        "padding": 1 - run["tokens"] / run["cells"],
        "epoch_s": total_tokens / tok_s,
        "peak_gib": peak_gib(device),
        "mfu": model_flops_done / run["seconds"] / (args.peak_tflops * 1e12) if device.type == "cuda" else None,
        "memory_estimate": run.get("settings", {}).get("memory_estimate"),
        "graphs_compiled_while_timed": run.get("graphs_compiled_while_timed", 0),
        "reference": config.reference,
        "goal": config.goal,
    }
    if run.get("profile"):
        row["profile"] = run["profile"]
    return row


def judge(rows: list[dict]) -> None:
    """Ratios against the reference measured in this run, and whether each goal is met."""
    by_name = {r["config"]: r for r in rows if "tokens_per_s" in r}
    for row in rows:
        reference = by_name.get(row.get("reference"))
        if "tokens_per_s" not in row or reference is None:
            continue
        row["speedup"] = row["tokens_per_s"] / reference["tokens_per_s"]
        if row["peak_gib"] is not None and reference["peak_gib"]:
            row["memory_ratio"] = row["peak_gib"] / reference["peak_gib"]
        checks = []
        for term in filter(None, row["goal"].split(",")):
            key, bound = term.split("<=") if "<=" in term else term.split(">=")
            value = row["speedup"] if key == "speed" else row["peak_gib"]
            checks.append(None if value is None else value <= float(bound) if "<=" in term else value >= float(bound))
        if checks and None not in checks:  # a goal is judged only when every part was measured (no GPU memory on CPU)
            row["goal_met"] = all(checks)


def fmt(value, spec: str = ".2f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def result_line(r: dict) -> str:
    if "error" in r or "skipped" in r:
        return f"| {r['config']} | {r.get('error') or 'skipped: ' + r['skipped']} |" + " |" * 11
    extras = [
        f"{r['tokens_per_batch']} tok/batch" if r["tokens_per_batch"] else "",
        "compile" if r["compile"] else "",
        r["optimizer"] if r["optimizer"] != "adamw" else "",
        "bf16 LoRA" if r["lora_dtype"] == "bfloat16" else "",
        f"loss chunk {r['loss_chunk_size']}" if r["loss_chunk_size"] else "",
        f"**{r['graphs_compiled_while_timed']} graphs compiled while timed**" if r.get("graphs_compiled_while_timed") else "",
    ]
    versus = ""
    if "speedup" in r:
        memory = f", {r['memory_ratio']:.2f}x mem" if "memory_ratio" in r else ""
        versus = f"{r['speedup']:.2f}x speed{memory} vs {r['reference']}"
    cells = [
        r["config"],
        r["path"],
        r["batching"],
        str(r["checkpointing"]).lower() + (" (auto)" if r["checkpointing_setting"] == "auto" else ""),
        r["attn"],
        ", ".join(e for e in extras if e),
        f"{r['tokens_per_s']:.0f}",
        f"{r['padding']:.1%}",
        f"{r['epoch_s']:.0f}",
        fmt(r["peak_gib"]),
        fmt(r["mfu"], ".1%"),
        versus,
        r["goal"] + (" ✓" if r.get("goal_met") else " ✗" if "goal_met" in r else ""),
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(report: dict) -> str:
    env, data = report["environment"], report["data"]
    lines = [
        f"## bench_train: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
        f"bitsandbytes {env['bitsandbytes']}, lightning {env['lightning']}",
        "",
        f"command: `{report['command']}`  ",
        f"data: {data['examples']} conversations, {data['tokens']} real tokens (max_seq_length {data['max_seq_length']}); "
        f"each configuration timed over >= {report['timed_tokens']} real tokens; MFU against {report['peak_tflops']:.0f} "
        f"TFLOP/s; whole run {report['wall_s']:.0f} s",
        "",
        "| config | path | batching | ckpt | attn | extras | real tok/s | padding | LIMA epoch s | peak GiB | MFU | vs reference | goal |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---|---|",
        *(result_line(r) for r in report["results"]),
    ]
    estimates = [r for r in report["results"] if r.get("memory_estimate")]
    if estimates:
        lines += ["", "gradient_checkpointing=auto: the probe's prediction without checkpointing vs the measured peak", ""]
        for r in estimates:
            e = r["memory_estimate"]
            lines.append(
                f"- {r['config']}: {e['max_tokens']}-token micro-batches -> {e['predicted_peak_gib']:.1f} GiB predicted "
                f"({e['bytes_per_token'] / 2**20:.2f} MiB/token), {e['budget_bytes'] / GIB:.1f} GiB available -> checkpointing "
                f"{'off' if e['fits'] else 'on'}; measured peak {fmt(r['peak_gib'])} GiB"
            )
    profiled = [r for r in report["results"] if r.get("profile")]
    if profiled:
        lines += ["", "where a step's time goes (torch.profiler, steps after the timed window; busy = kernel time / wall time)", ""]
        for r in profiled:
            p = r["profile"]
            busy = f" ({p['gpu_busy']:.0%} busy)" if p["gpu_busy"] is not None else ""
            syncs = ", ".join(f"{k} {v:g}" for k, v in p["syncs_per_step"].items()) or "none"
            kernels = "; ".join(f"{k} {ms:.1f}" for k, ms in p["top_kernels_ms"][:5])
            cpu = "; ".join(f"{k} {ms:.1f} (x{n})" for k, ms, n in p["top_cpu_ops_ms"][:6])
            lines.append(
                f"- {r['config']}: {p['wall_ms_per_step']:.0f} ms/step, kernels {p['kernel_ms_per_step']:.0f} ms{busy}, "
                f"{p['kernels_per_step']:.0f} kernels/step, CPU ops {p['cpu_op_ms_per_step']:.0f} ms; syncs/step: {syncs}; "
                f"top kernels (ms/step): {kernels or '-'}; top CPU ops (ms/step): {cpu}"
            )
    for method, rows in report["parity"].items():
        lines += ["", f"loss parity, {method}: one identical batch of 4 conversations, dropout off (bf16 autocast on GPU)", ""]
        for row in rows:
            if "error" in row:
                lines.append(f"- {row['path']}: {row['error']}")
            elif "loss_diff" in row:
                diff = f"(diff {row['loss_diff']:+.2e}), LoRA gradients rel. diff {row['grad_rel_diff']:.2e}"
                lines.append(f"- {row['path']}: loss {row['loss']:.5f} {diff}")
            else:
                lines.append(f"- {row['path']}: loss {row['loss']:.5f}")
    return "\n".join(lines) + "\n"


def environment(device: torch.device) -> dict:
    import bitsandbytes
    import lightning
    import peft
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    return {
        "device": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "lightning": lightning.__version__,
        "cuda": torch.version.cuda,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory from make_random_llama.py (with the tokenizer); `tiny` with --smoke")
    parser.add_argument("--lima", help="LIMA train.jsonl (default ../shared/lima/train.jsonl; synthetic data with --smoke if absent)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    parser.add_argument("--configs", help=f"comma-separated subset of: {', '.join(c.name for c in CONFIGS)}")
    parser.add_argument("--out", help="write the results here: X.json gets JSON and X.md the table")
    parser.add_argument("--smoke", action="store_true", help="CPU, the tiny model, small windows: checks every code path")
    parser.add_argument("--timed-tokens", type=int, default=32_000, help="real tokens timed per configuration")
    parser.add_argument(
        "--time-budget", type=float, help="seconds (default 400 on a GPU, none with --smoke); configurations that would overrun are skipped"
    )
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 dense peak for MFU (790: measured on the H200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile-steps", type=int, default=0, help="after each timed window, profile this many more steps (kernel vs wall time, top ops)"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if args.smoke:
        args.model = args.model or "tiny"
        args.max_seq_length = min(args.max_seq_length, 256)
        args.timed_tokens = min(args.timed_tokens, 500)
        args.lora_r = min(args.lora_r, 8)
    if args.lima is None and not args.smoke and (SHARED / "lima" / "train.jsonl").is_file():
        args.lima = str(SHARED / "lima" / "train.jsonl")  # the smoke run uses synthetic data unless --lima is given
    budget = args.time_budget if args.time_budget is not None else float("inf") if args.smoke else 400.0
    if not args.model:
        parser.error("--model is required (a directory written by make_random_llama.py), or use --smoke")
    device = torch.device("cuda", 0) if torch.cuda.is_available() and not args.smoke else torch.device("cpu")
    wanted = args.configs.split(",") if args.configs else [c.name for c in CONFIGS]
    unknown = set(wanted) - {c.name for c in CONFIGS}
    if unknown:
        parser.error(f"unknown --configs {sorted(unknown)}; choose from {[c.name for c in CONFIGS]}")
    configs = [c for c in CONFIGS if c.name in wanted]  # canonical order: compile last per method
    if args.smoke:  # token budgets scaled to the 256-token cap, one warmup batch
        configs = [replace(c, max_tokens=min(c.max_tokens, 4 * args.max_seq_length), warmup=1) for c in configs]

    from lima_lightning.models.loading import load_tokenizer, resolve_base_model

    args.model = resolve_base_model(args.model) if args.model == "tiny" else args.model
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    examples = load_examples(args, tokenizer)
    total_tokens = sum(len(e["input_ids"]) for e in examples)
    report = {
        "command": " ".join(["python", "benchmarks/bench_train.py", *(argv if argv is not None else sys.argv[1:])]),
        "environment": environment(device),
        "data": {
            "examples": len(examples),
            "tokens": total_tokens,
            "max_seq_length": args.max_seq_length,
            "source": args.lima or "synthetic",
        },
        "timed_tokens": args.timed_tokens,
        "peak_tflops": args.peak_tflops,
        "results": [],
        "parity": {},
    }
    print(f"{len(examples)} conversations, {total_tokens} real tokens; device {report['environment']['device']}", flush=True)

    def time_left_for(config: Config, done: set[str], loading: bool = False) -> bool:
        """Essential configurations run while they fit the budget; extras only if every pending essential still fits."""
        elapsed = time.perf_counter() - started + (MODEL_LOAD_S[config.method] if loading else 0)
        pending = [c for c in configs if c.name not in done and c.name != config.name and c.essential]
        reserve = sum(c.expected_s for c in pending) + sum(MODEL_LOAD_S[m] for m in {c.method for c in pending} - {config.method})
        return elapsed + config.expected_s + (0 if config.essential else reserve) <= budget

    done: set[str] = set()
    for method in ("qlora", "lora"):
        group = [c for c in configs if c.method == method]
        if not any(time_left_for(c, done, loading=True) for c in group):
            for config in group:
                report["results"].append({"config": config.name, "skipped": f"time budget ({time.perf_counter() - started:.0f} s elapsed)"})
                done.add(config.name)
            continue
        release(device)
        t0 = time.perf_counter()
        model = load_model(args, method, device)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        flops = model_flops(model.get_base_model().config, trainable)
        print(f"{method}: model loaded in {time.perf_counter() - t0:.0f} s ({trainable:,} trainable parameters)", flush=True)
        report["parity"][method] = parity_check(model, tokenizer, examples, args, device)
        for row in report["parity"][method]:
            print(f"  parity {row}", flush=True)
        for config in group:
            if not time_left_for(config, done):
                report["results"].append({"config": config.name, "skipped": f"time budget ({time.perf_counter() - started:.0f} s elapsed)"})
                done.add(config.name)
                continue
            release(device)
            t0 = time.perf_counter()
            # A hard stop for what the budget cannot foresee (a compile that takes minutes): the row reports it.
            limit = max(30.0, budget + GRACE_S - (time.perf_counter() - started)) if budget != float("inf") else 0
            try:
                with deadline(limit):
                    if config.attn != "sdpa":  # parity of the other kernel first (it also compiles flex's kernels)
                        rows = parity_check(model, tokenizer, examples, args, device, (config.attn,))
                        rows[0]["path"] += f" (again, before {config.name}: the adapters have trained since)"
                        report["parity"][method] += rows
                        release(device)
                    if config.path == "plain":
                        from lima_lightning.models.speed import cast_adapters, set_attention, set_gradient_checkpointing

                        cast_adapters(model, torch.float32)
                        set_attention(model.get_base_model(), "sdpa", device)
                        set_gradient_checkpointing(model.get_base_model(), bool(config.checkpointing))
                        batches = plain_batches(examples, config, tokenizer.pad_token_id, args.seed, args.max_seq_length)
                        run = plain_loop(model, batches, config.warmup, args.timed_tokens, device, args.profile_steps)
                    else:
                        run = ours_fit(model, tokenizer, examples, config, args, device)
                    row = summarize(config, run, flops, total_tokens, device, args)
            except Exception as e:  # noqa: BLE001 - one failed configuration must not lose the others
                traceback.print_exc()
                row = {"config": config.name, "error": f"{type(e).__name__}: {e}"[:300]}
            model.zero_grad(set_to_none=True)
            row["wall_s"] = time.perf_counter() - t0
            report["results"].append(row)
            done.add(config.name)
            write_report(report, args.out, started)
            print(
                f"  {config.name}: "
                + (
                    row.get("error")
                    or f"{row['tokens_per_s']:.0f} real tok/s, padding {row['padding']:.1%}, peak {fmt(row['peak_gib'])} GiB"
                )
                + f" ({row['wall_s']:.0f} s)",
                flush=True,
            )
        del model
        torch._dynamo.reset()  # compiled graphs can hold the model; the next method must start from empty memory
        release(device)

    print(write_report(report, args.out, started))
    return report


def write_report(report: dict, out: str | None, started: float) -> str:
    """Judge, render and (with --out) write the report; called after every configuration, so a run cut short keeps its rows."""
    judge(report["results"])
    report["wall_s"] = time.perf_counter() - started
    text = markdown(report)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
        path.with_suffix(".md").write_text(text)
    return text


if __name__ == "__main__":
    main()
