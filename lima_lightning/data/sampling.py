"""Which micro-batch a rank trains at each step: the epoch order, batching plan, step groups, DDP shards, resume.

One sampler, `MicroBatchSampler`, answers "which batch does rank r get at step s of epoch e" for every
`data.batching`. It yields whole batches (a batch is a list of rows, a row a list of example indices) to a
`DataLoader(batch_size=None)`, whose collate function (`collate.collate_rows`) makes the tensors.

    padded          `batch_size` conversations in a fresh random order each epoch, one per row
    length_grouped  conversations of similar length, as many as fit rows x longest <= `max_tokens`
                    (fairseq's batch_by_size); which conversations share a batch is fixed, the batch order
                    changes every epoch, shuffled in groups of one optimizer step's micro-batches
    packed          conversations concatenated into rows of at most `row_tokens` (first-fit decreasing),
                    `max_tokens // row_tokens` rows per batch; the rows are reshuffled every epoch

An epoch is a pure function of (plan, seed, epoch), so a resumed run rebuilds it and skips what it trained.
Several devices: rank r takes micro-batches r, r + N, r + 2N, ... of that one order, so an optimizer step
trains the same batches on N devices as on one device accumulating N. An epoch that does not split evenly
is padded with `Masked` copies of its first batches, which train nothing (every label ignored), so every
rank runs every step and no conversation is trained twice (torch's DistributedSampler would repeat some).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

import torch
from torch.utils.data import Dataset, DistributedSampler

from lima_lightning.data.collate import batch_width
from lima_lightning.data.tokenization import without_targets
from lima_lightning.errors import UserError

BatchingName = Literal["padded", "length_grouped", "packed"]

Row = list[int]  # indices of the examples concatenated in one row
Batch = list[Row]


def _rng(seed: int, epoch: int | str) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`: the same stream on every machine and Python version.
    return random.Random(f"lima-lightning:{seed}:{epoch}")


def epoch_permutation(size: int, seed: int, epoch: int) -> list[int]:
    """A random order of `range(size)` drawn from `seed + epoch` alone, as torch's DistributedSampler draws it."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def padded_batches(order: Sequence[int], batch_size: int) -> list[Batch]:
    """Consecutive `batch_size` examples of `order`, one example per row; the last batch may be short."""
    return [[[i] for i in order[k : k + batch_size]] for k in range(0, len(order), batch_size)]


def _longest_first(lengths: Sequence[int], seed: int) -> list[int]:
    order = list(range(len(lengths)))
    _rng(seed, "ties").shuffle(order)
    order.sort(key=lambda i: -lengths[i])  # stable: ties keep their seeded shuffle
    return order


def length_grouped_batches(lengths: Sequence[int], max_tokens: int, seed: int) -> list[Batch]:
    """Batches of one-conversation rows, longest first, each holding as many as fit rows x width <= max_tokens (the
    width as collated: the longest rounded up by `batch_width`)."""
    if max(lengths) > max_tokens:
        raise ValueError(f"an example of {max(lengths)} tokens exceeds max_tokens={max_tokens}")
    batches: list[Batch] = []
    for i in _longest_first(lengths, seed):
        # Sorted longest first, so a batch's first row sets its width.
        if batches and (len(batches[-1]) + 1) * batch_width(lengths[batches[-1][0][0]]) <= max_tokens:
            batches[-1].append([i])
        else:
            batches.append([[i]])
    return batches


def pack_rows(lengths: Sequence[int], row_tokens: int, seed: int) -> list[Row]:
    """First-fit decreasing: each example, longest first, goes into the first row with room for it."""
    if max(lengths) > row_tokens:
        raise ValueError(f"an example of {max(lengths)} tokens exceeds row_tokens={row_tokens}")
    rows: list[Row] = []
    room: list[int] = []  # free tokens per row
    for i in _longest_first(lengths, seed):
        target = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if target is None:
            rows.append([i])
            room.append(row_tokens - lengths[i])
        else:
            rows[target].append(i)
            room[target] -= lengths[i]
    return rows


def shuffle_in_step_groups(plan: list[Batch], step_group: int, rng: random.Random) -> list[Batch]:
    """Shuffle `plan` in groups of `step_group` neighbours: one optimizer step's micro-batches (devices x
    accumulate) are then batches of similar width and cost, so under DDP no rank waits long for a slower one.
    A partial last group stays last, so that every step after it still starts a group."""
    full = len(plan) - len(plan) % step_group
    groups = [plan[k : k + step_group] for k in range(0, full, step_group)]
    rng.shuffle(groups)
    return [batch for group in groups for batch in group] + plan[full:]


class Masked:
    """A padding batch: a copy of `batch` with every label ignored, so it costs a step and trains nothing."""

    __slots__ = ("batch",)

    def __init__(self, batch: Batch) -> None:
        self.batch = batch

    def __repr__(self) -> str:
        return f"Masked({self.batch!r})"


class ExampleRows(Dataset):
    """Maps a batch of index rows (what `MicroBatchSampler` yields) to the same rows of examples."""

    def __init__(self, examples: list[dict]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, batch: Batch | Masked) -> list[list[dict]]:
        if isinstance(batch, Masked):
            return [[without_targets(self.examples[i]) for i in row] for row in batch.batch]
        return [[self.examples[i] for i in row] for row in batch]


class MicroBatchSampler(DistributedSampler):
    """This rank's micro-batches of each epoch (see the module docstring); yields batches, skips what was trained.

    A DistributedSampler so that Lightning keeps it under DDP instead of wrapping it in its own, which would deal
    the order out item by item and regroup every step's examples.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batching: BatchingName = "padded",
        batch_size: int = 4,
        max_tokens: int = 8192,
        row_tokens: int = 2048,
        seed: int = 0,
        shuffle: bool = True,
        step_group: int = 1,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        """
        Args:
            lengths: Token count of each example.
            batching: `padded`, `length_grouped` or `packed` (see the module docstring).
            batch_size: Conversations per batch with `padded`.
            max_tokens: Token budget of a `length_grouped` or `packed` batch: rows x width never exceeds it.
            row_tokens: Longest row (`max_seq_length`); `packed` fills rows up to it.
            seed: Seed of the plan and of every epoch's order.
            shuffle: False: the same order every epoch (validation): `padded` in example order, `length_grouped` in
                the plan's longest-first order.
            step_group: Micro-batches per optimizer step over all devices (world size x accumulate_grad_batches).
            num_replicas: Number of processes (`trainer.world_size`).
            rank: This process's global rank.
        """
        # First: DistributedSampler.__init__ sets `seed`, `shuffle` and `epoch` of its own. Its num_samples and
        # total_size (from the dataset argument) are not used: `__len__` and `rank_batches` count batches.
        super().__init__(range(len(lengths)), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.lengths = list(lengths)
        self.batching = batching
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_each_epoch = shuffle
        self.step_group = max(1, step_group)
        self.skip = 0
        if batching == "padded":
            self.plan: list = []  # drawn per epoch
        elif batching == "length_grouped":
            self.plan = length_grouped_batches(self.lengths, max_tokens, seed)
        elif batching == "packed":
            self.plan = pack_rows(self.lengths, row_tokens, seed)
            self.rows_per_batch = max(1, max_tokens // row_tokens)
        else:
            raise ValueError(f"batching={batching!r}: expected padded, length_grouped or packed")

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches of one epoch on one device (all ranks together)."""
        if self.batching == "padded":
            return -(-len(self.lengths) // self.batch_size)
        if self.batching == "packed":
            return -(-len(self.plan) // self.rows_per_batch)
        return len(self.plan)

    def epoch_batches(self, epoch: int) -> list[Batch]:
        """One device's micro-batches of `epoch`, in order: a pure function of (plan, seed, epoch)."""
        if self.batching == "padded":
            order = epoch_permutation(len(self.lengths), self.seed, epoch) if self.shuffle_each_epoch else range(len(self.lengths))
            return padded_batches(list(order), self.batch_size)
        if self.batching == "length_grouped":
            if not self.shuffle_each_epoch:
                return list(self.plan)
            # The plan is longest first, so neighbours are batches of similar width and cost.
            return shuffle_in_step_groups(self.plan, self.step_group, _rng(self.seed, epoch))
        rows = list(self.plan)
        _rng(self.seed, epoch).shuffle(rows)
        return [rows[k : k + self.rows_per_batch] for k in range(0, len(rows), self.rows_per_batch)]

    def rank_batches(self, epoch: int) -> list[Batch | Masked]:
        """This rank's share of `epoch`: every num_replicas-th batch, padded with `Masked` copies to an even split."""
        batches: list = self.epoch_batches(epoch)
        padding = -len(batches) % self.num_replicas
        batches += [Masked(b) for b in (batches * padding)[:padding]]
        return batches[self.rank :: self.num_replicas]

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """The next iteration yields `epoch` from its batch `batches_done` on (exact resume); later ones whole."""
        self.set_epoch(epoch)
        self.skip = batches_done

    def __iter__(self):
        # A generator: this runs at the first `next`, not at `iter`. Lightning makes the iterator early (to count
        # batches, and under FSDP before it restores the checkpoint) and calls `set_epoch` only after that.
        skip, self.skip = self.skip, 0
        yield from self.rank_batches(self.epoch)[skip:]

    def __len__(self) -> int:
        return -(-self.batches_per_epoch // self.num_replicas)

    @property
    def max_batch_tokens(self) -> int:
        """Largest rows x width of any batch in any epoch (packed: the longest row times rows per batch), as collated."""
        if self.batching == "padded":
            return min(self.batch_size, len(self.lengths)) * batch_width(max(self.lengths))
        if self.batching == "length_grouped":
            return max(len(batch) * batch_width(self.lengths[batch[0][0]]) for batch in self.plan)
        longest_row = max(sum(self.lengths[i] for i in row) for row in self.plan)
        return min(self.rows_per_batch, len(self.plan)) * batch_width(longest_row)


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
