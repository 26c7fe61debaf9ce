"""What bench_train.py measures with, for the plain loop and our step alike: clocks, memory, FLOPs, the profiler."""

from __future__ import annotations

import contextlib
import gc
import signal
import time

import torch

GIB = 2**30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Free what the last configuration left, so the next one's peak memory is its own (CUDA only: on the CPU
    smoke run nothing is measured, and a full collection in a large test process costs ~0.4 s a call)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def compiled_graphs() -> int:
    """Graphs torch.compile has produced so far in this process (its own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


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


@contextlib.contextmanager
def smoke_threads(enabled: bool = True):
    """One intra-op thread while a tiny model runs on the CPU (the --smoke runs): its ops are too small to gain
    from splitting, and on a busy machine each split op waits for its second thread to be scheduled (a smoke
    run took 2-4x longer with two threads on a loaded 2-core machine). The previous count is restored."""
    previous = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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


class TimedWindow:
    """The timed part of a run: `warmup` steps first, then steps until `target_tokens` real tokens trained,
    then (--profile-steps) `profile_steps` more under torch.profiler. The plain loop and our Trainer callback
    both drive one: `begin_step(i)` before step i, `end_step(i, tokens, cells, lengths)` after it; `end_step`
    returns True when the run should stop.

    The warmup goes on, by whole optimizer steps and at most `settle_steps` of them, while the last one still
    compiled a graph: compiled layers meet new graph variants in the first batches of each kind (an attention mask
    or none; S13-1), and which row met them first used to decide which row paid for them while timed (S13-3)."""

    def __init__(
        self, warmup: int, target_tokens: int, profile_steps: int, device: torch.device, accumulation: int = 1, settle_steps: int = 4
    ) -> None:
        # With gradient accumulation a step here is a micro-batch: the window starts and ends at optimizer steps,
        # so it holds whole ones and the optimizer's share of the time (256 ms a step for 8-bit AdamW on 7B r=64).
        self.accumulation = accumulation
        self.warmup = -(-warmup // accumulation) * accumulation
        self.last_start = self.warmup + settle_steps * accumulation
        self.target_tokens, self.device = target_tokens, device
        self.tokens = self.cells = self.batches = self.graphs = 0
        self.graphs_at_step: int | None = None  # graphs compiled so far, at the last optimizer-step boundary
        self.lengths: list[int] = []
        self.start = self.seconds = self.started_at_step = None
        self.profile = StepProfile(profile_steps * accumulation, device)

    def begin_step(self, step: int) -> None:
        if self.start is not None or step % self.accumulation:
            return
        graphs, last = compiled_graphs(), self.graphs_at_step
        self.graphs_at_step = graphs
        if step >= self.warmup and (graphs == last or step >= self.last_start):
            sync(self.device)
            self.start, self.started_at_step = time.perf_counter(), step
            self.graphs = graphs

    def end_step(self, step: int, tokens: int, cells: int, lengths: list[int]) -> bool:
        if self.profile.active:
            return self.profile.step_done()
        if self.start is None or self.seconds is not None:
            return False
        self.tokens, self.cells, self.batches = self.tokens + tokens, self.cells + cells, self.batches + 1
        self.lengths += lengths
        if self.tokens < self.target_tokens or (step + 1) % self.accumulation:
            return False
        self.close()
        if not self.profile.steps:
            return True
        self.profile.begin()
        return False

    def close(self) -> None:
        if self.start is None:
            raise RuntimeError(f"the data ran out during the warmup ({self.last_start} micro-batches at most): use more of it")
        sync(self.device)
        self.seconds = time.perf_counter() - self.start
        self.graphs = compiled_graphs() - self.graphs

    def result(self) -> dict:
        """What summarize() needs; closes the window first if the data ran out before the target."""
        if self.seconds is None:
            self.close()
        return {
            "seconds": self.seconds,
            "tokens": self.tokens,
            "cells": self.cells,
            "lengths": self.lengths,
            "batches": self.batches,
            "graphs_compiled_while_timed": self.graphs,  # > 0: a recompile polluted the timing
            "warmup_steps": self.started_at_step,
            "profile": self.profile.finish(),
        }


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
        """Count one step; True once the last one is done (and the profiler stopped)."""
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
        return profile_summary(self.profiler.key_averages(), self.steps, self.wall, self.SYNC_EVENTS)


def profile_summary(events, steps: int, wall_s: float, sync_events: tuple[str, ...]) -> dict:
    """Per-step kernel time, launches, CPU op time, host syncs and the top kernels and CPU ops of `events`."""
    from torch.autograd import DeviceType

    cpu_ops = [e for e in events if e.device_type == DeviceType.CPU]
    # A record_function range (e.g. Optimizer.step#AdamW.step, which holds Lightning's whole forward and
    # backward closure) shows on the GPU timeline under the same name: a span, not a kernel.
    ranges = {e.key for e in cpu_ops}
    kernels = [e for e in events if e.device_type != DeviceType.CPU and e.key not in ranges]

    def device_us(e) -> float:
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

    per_step = 1000.0 * steps  # µs totals -> ms per step
    kernel_ms = sum(device_us(e) for e in kernels) / per_step
    wall_ms = 1000.0 * wall_s / steps
    return {
        "steps": steps,
        "wall_ms_per_step": wall_ms,
        "kernel_ms_per_step": kernel_ms,
        "gpu_busy": kernel_ms / wall_ms if kernels else None,
        "kernels_per_step": sum(e.count for e in kernels) / steps,
        "cpu_op_ms_per_step": sum(e.self_cpu_time_total for e in cpu_ops) / per_step,
        "syncs_per_step": {e.key: e.count / steps for e in cpu_ops if e.key in sync_events},
        "top_kernels_ms": [(e.key[:70], device_us(e) / per_step) for e in sorted(kernels, key=device_us, reverse=True)[:8]],
        "top_cpu_ops_ms": [
            (e.key[:70], e.self_cpu_time_total / per_step, e.count // steps)
            for e in sorted(cpu_ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
        ],
    }
