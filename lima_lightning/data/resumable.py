"""A train loader that can start in the middle of an epoch, for exact resume after a kill.

Lightning restores the loop counters from a checkpoint but restarts a map-style DataLoader at the
start of its epoch (and our earlier `RandomSampler` drew each epoch's order from a generator that a
fresh process re-seeds, so even the epoch's order differed). Exact resume needs two things:

1. The batches of epoch `e` are a pure function of (data, seed, `e`): the sampler gets the epoch
   through `set_epoch` (as DistributedSampler does), never from how often it was iterated.
2. The first iteration after a resume skips the batches already trained in that epoch.

`LIMADataModule.state_dict` records where training stands (`train_position`). Lightning restores it
(`load_state_dict`) before it asks for the train loader on one device or under DDP, so the loader is
built in place; FSDP and DeepSpeed restore later, and `ResumableDataLoader.resume_at` moves the
existing loader before its first batch.
"""

from __future__ import annotations

import itertools

import torch
from torch.utils.data import DataLoader, Sampler

from lima_lightning.errors import UserError


class EpochShuffle(Sampler[int]):
    """A random permutation of `range(size)` drawn from (`seed`, epoch) alone, the same in every process."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        # seed + epoch, as torch's DistributedSampler does: epoch e of a resumed run is epoch e of the original.
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


def set_sampler_epoch(loader: DataLoader, epoch: int) -> None:
    """`set_epoch` on every sampler of `loader` that has one (sampler, batch sampler, the batch sampler's sampler)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    candidates = (getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None))
    for sampler in {id(s): s for s in candidates if s is not None}.values():
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(epoch)


class ResumableDataLoader(DataLoader):
    def __init__(self, *args, start_epoch: int = 0, skip_batches: int = 0, **kwargs) -> None:
        """A DataLoader whose first iteration can start mid-epoch.

        Args:
            start_epoch: Epoch the samplers are set to now, before Lightning's own `set_epoch` (which comes
                only after the first iterator exists, too late for worker processes that prefetch at once).
            skip_batches: Batches of `start_epoch` already trained; the first iteration skips them (they
                are still collated, which costs milliseconds per batch here, but the order stays whatever
                the sampler makes it: plain, length-grouped or packed).
        """
        # Its own generator, so creating an iterator (which draws a worker base seed) never consumes the
        # global RNG that LoRA dropout draws from: a resumed run's dropout masks stay those of the original.
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        super().__init__(*args, **kwargs)
        self.start_epoch = start_epoch
        self.skip_batches = skip_batches
        set_sampler_epoch(self, start_epoch)

    def resume_at(self, position: dict[str, int]) -> None:
        """Continue at `position` (see `train_position`) when the loader exists before the checkpoint is restored."""
        check_position(position, len(self))
        self.start_epoch, self.skip_batches = position["epoch"], position["batches"]
        set_sampler_epoch(self, self.start_epoch)

    def __iter__(self):
        return self._skip_then_yield(super().__iter__())

    def _skip_then_yield(self, iterator):
        # A generator: this runs at the first `next`, not at `iter`. Lightning makes the iterator early (to count
        # batches, and under FSDP before it restores the checkpoint) and calls `set_epoch` only after that.
        skip, self.skip_batches = self.skip_batches, 0  # once: the next epoch starts at its first batch
        yield from itertools.islice(iterator, skip, None)

    # The position is saved by LIMADataModule.state_dict, which Lightning restores before this loader exists.
    # Lightning's own loader-state hook restores too late when configure_optimizers has already built the
    # loader (estimated_stepping_batches; Lightning-AI/pytorch-lightning#20550), so these only tell it that
    # this loader resumes mid-epoch, which keeps its "dataloader is not resumable" warning away.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def train_position(trainer) -> dict[str, int]:
    """Where a checkpoint taken now resumes: the epoch, the batches of it already trained, and the epoch length."""
    done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    per_epoch = len(trainer.train_dataloader)
    if done >= trainer.num_training_batches:  # saved at the end of an epoch: resume at the next one
        return {"epoch": trainer.current_epoch + 1, "batches": 0, "batches_per_epoch": per_epoch}
    return {"epoch": trainer.current_epoch, "batches": done, "batches_per_epoch": per_epoch}


def check_position(position: dict[str, int], batches_per_epoch: int) -> None:
    """Refuse to skip batches of a loader that is not the one the checkpoint was taken with."""
    if position["batches_per_epoch"] != batches_per_epoch:
        raise UserError(
            f"--ckpt_path: the checkpoint was taken with {position['batches_per_epoch']} training batches per epoch, "
            f"this run has {batches_per_epoch}; resume with the run's config.yaml (same data.dataset, data.batch_size, "
            "data.max_seq_length, data.val_fraction and trainer.devices)"
        )
