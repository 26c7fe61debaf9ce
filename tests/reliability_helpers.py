"""Helpers of the reliability tests: callbacks they inject into runs (`--trainer.callbacks+=tests.reliability_helpers.X`,
also into real `python -m lima_lightning` processes), a TensorBoard reader and a subprocess launcher."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch

from lima_lightning.data.tokenization import IGNORE_INDEX
from tests.conftest import REPO


class HangAtStep(L.Callback):
    def __init__(self, step: int, marker: str) -> None:
        """Stand still at the start of optimizer step `step` (after touching `marker`), to be killed there."""
        self.step = step
        self.marker = marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            from lima_lightning.checkpointing import wait_for_checkpoint

            # Killed well after the last save: its file is on disk (killed while it is written, the one before it is).
            wait_for_checkpoint(trainer)
            Path(self.marker).write_text(str(trainer.global_step))
            time.sleep(600)


class MemoryProbe(L.Callback):
    """Per-epoch resident memory and live tensor count, taken after validation and sample generation."""

    def __init__(self) -> None:
        self.rss_mib: list[float] = []
        self.live_tensors: list[int] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        import psutil

        from lima_lightning.checkpointing import finish_checkpoint_write

        finish_checkpoint_write(trainer)  # a snapshot still being written is not a leak; one kept after its write is
        gc.collect()
        self.rss_mib.append(psutil.Process().memory_info().rss / 2**20)
        self.live_tensors.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor)))


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) pairs of a TensorBoard tag, as TensorBoard shows them (orphaned steps purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return [(e.step, e.value) for e in EventAccumulator(str(run_dir)).Reload().Scalars(tag)]


def lima_subprocess(*args: str, env: dict | None = None, **popen):
    """`python -m lima_lightning ...` in the repository root, as a user would run it (stdout, stderr piped, text)."""
    return subprocess.Popen(
        [sys.executable, "-m", "lima_lightning", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


class ZeroTokenBatches(L.Callback):
    def __init__(self, every: int = 2) -> None:
        """Mask out every label of every `every`-th training batch: a micro-batch with nothing to train."""
        self.every = every

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx % self.every == 0:
            batch["labels"].fill_(IGNORE_INDEX)


def _stop_signal_seen(trainer) -> bool:
    from lima_lightning.checkpointing import ResumableCheckpoint

    return any(isinstance(c, ResumableCheckpoint) and c._signal is not None for c in trainer.callbacks)


class PauseAtStep(L.Callback):
    def __init__(self, step: int, marker: str) -> None:
        """At the start of optimizer step `step`, touch `marker` and wait until the run has received a stop signal
        (SIGTERM, Ctrl-C), as a run preempted in the middle of that step; then let the step go on."""
        self.step = step
        self.marker = marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not Path(self.marker).exists():
            Path(self.marker).write_text(str(trainer.global_step))
            deadline = time.monotonic() + 600
            while not _stop_signal_seen(trainer) and time.monotonic() < deadline:
                time.sleep(0.05)


class SignalAtBatch(L.Callback):
    def __init__(self, batch: int, signum: int = 2, times: int = 1) -> None:
        """Send `signum` (default SIGINT, as Ctrl-C) to this very process `times` times at the start of training
        batch `batch` (counted over the whole fit, from 0), in the middle of whatever optimizer step it belongs to."""
        self.batch = batch
        self.signum = signum
        self.times = times
        self.seen = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen == self.batch:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)
                time.sleep(0.05)  # let the handler run before the next signal
        self.seen += 1


class RemountReadOnlyAtStep(L.Callback):
    def __init__(self, step: int, mountpoint: str) -> None:
        """Remount the filesystem at `mountpoint` read-only at the start of optimizer step `step` (root, tmpfs)."""
        self.step = step
        self.mountpoint = mountpoint

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            subprocess.run(["mount", "-o", "remount,ro", self.mountpoint], check=True)


# What a CUDA allocator says when it runs out (the text of a real torch.cuda.OutOfMemoryError on a 24 GB GPU).
CUDA_OOM_TEXT = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.53 GiB of which 1.06 GiB is free. "
    "Including non-PyTorch memory, this process has 22.46 GiB memory in use. Of the allocated memory 21.80 GiB is allocated "
    "by PyTorch, and 210.13 MiB is reserved by PyTorch but unallocated."
)


class PlannedMemory(L.Callback):
    """What `gradient_checkpointing: auto` measured on a 24 GB GPU (a CPU run plans nothing), for the OOM line to quote."""

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.speed_settings["memory_estimate"] = {
            "fixed_bytes": 6.0 * 2**30,
            "bytes_per_token": 2.0 * 2**20,
            "checkpointed_bytes_per_token": 0.5 * 2**20,
            "num_layers": 32,
            "optimizer_bytes": 1.0 * 2**30,
            "max_tokens": 8192,
            "budget_bytes": 23.5 * 2**30,
            "checkpointed_layers": 0,
            "predicted_peak_gib": 23.0,
            "fits": True,
        }
