"""Load: three epochs with validation and sample generation every epoch hold memory steady."""

from __future__ import annotations

from pathlib import Path

import pytest

from lima_lightning.checkpointing import AsyncAtomicCheckpointIO, AtomicCheckpointIO
from tests.conftest import demo_args, run_cli
from tests.reliability_helpers import MemoryProbe


@pytest.mark.slow
def test_three_epochs_with_validation_and_samples_do_not_grow_memory(tmp_path):
    probe = ("--trainer.callbacks+=tests.reliability_helpers.MemoryProbe",)
    cli = run_cli(
        "fit",
        *demo_args(tmp_path, "--data.synthetic_size", "64", "--trainer.max_epochs", "3", "--samples.num_prompts", "2"),
        *("--samples.max_new_tokens", "8", "--checkpoint.every_n_train_steps", "2", *probe),
    )
    (memory,) = [c for c in cli.trainer.callbacks if isinstance(c, MemoryProbe)]
    samples = (Path(cli.trainer.log_dir) / "samples.jsonl").read_text().splitlines()
    assert len(memory.rss_mib) == 3 and len(samples) == 6  # validation and 2 samples at every epoch
    # Every tensor made in an epoch (batches, activations, generations, checkpoints) is freed by the next:
    # measured 196 live tensors at the end of every epoch.
    assert memory.live_tensors[0] == memory.live_tensors[1] == memory.live_tensors[2], memory.live_tensors
    # Resident memory (measured: ~507 MiB, +6 MiB from epoch 1 to 3: allocator pages) must not grow by the epoch.
    assert memory.rss_mib[2] - memory.rss_mib[0] < 25, memory.rss_mib
    checkpoint_io = cli.trainer.strategy.checkpoint_io  # last.ckpt written behind training, its snapshot freed after
    assert isinstance(checkpoint_io, AsyncAtomicCheckpointIO) and isinstance(checkpoint_io.checkpoint_io, AtomicCheckpointIO)
