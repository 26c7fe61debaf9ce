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
            Path(self.marker).write_text(str(trainer.global_step))
            time.sleep(600)


class MemoryProbe(L.Callback):
    """Per-epoch resident memory and live tensor count, taken after validation and sample generation."""

    def __init__(self) -> None:
        self.rss_mib: list[float] = []
        self.live_tensors: list[int] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        import psutil

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
