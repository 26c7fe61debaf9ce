"""Token-budget training batches: length-grouped padded rows, or packed rows with no padding.

`data.batching` picks how tokenized conversations become micro-batches:

    padded          `batch_size` conversations in shuffled order, padded to the longest (the datamodule's own
                    loader; LIMA at batch 4 is ~45% padding)
    length_grouped  conversations of similar length, as many as fit rows x longest <= `max_tokens_per_batch`
                    (fairseq's batch_by_size): one conversation per row, little padding
    packed          conversations concatenated into rows of at most `max_seq_length` tokens (first-fit
                    decreasing); `max_tokens_per_batch // max_seq_length` rows per batch; almost no padding

Every batch is a list of rows, every row a list of example indices, and `collate_rows` turns it into
tensors the same way for both modes: `position_ids` restart at 0 for every conversation, and a row's padding
tail continues the positions of the conversation before it. The model then gets `input_ids` and
`position_ids` and no attention mask (`model_inputs`): transformers finds the restarts in `position_ids` and
builds a causal mask that is block-diagonal per conversation, so no token attends to another conversation;
rows without a restart are plain causal, and SDPA runs its causal flash kernel. Right padding needs no mask
either: under causal attention no real token can see the padding after it.

Batches (length_grouped) and rows (packed) are made once from the lengths, so every epoch has the same
number of batches (Lightning reads `len(dataloader)` once per fit). The order of an epoch is a pure function
of (seed, epoch): `set_epoch` chooses it, so a resumed run can rebuild an epoch and skip what it consumed.
Which conversations share a batch is fixed across epochs; the order of the batches changes every epoch.
Conversations in one micro-batch never interact (separate rows or blocked attention), so membership only
matters through which batches share an optimizer step. length_grouped batches are shuffled in groups of
`step_group` neighbours of the plan (the micro-batches of one optimizer step: devices x accumulate): one
step's micro-batches then have similar widths and cost, so under DDP no rank waits long for a slower one.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

import torch
from torch.utils.data import Dataset, Sampler

from lima_lightning.data.tokenization import IGNORE_INDEX

BatchingName = Literal["padded", "length_grouped", "packed"]

Row = list[int]  # indices of the examples concatenated in one row
Batch = list[Row]


def _rng(seed: int, epoch: int | str) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`: the same stream on every machine and Python version.
    return random.Random(f"lima-lightning:{seed}:{epoch}")


def length_grouped_batches(lengths: Sequence[int], max_tokens: int, seed: int) -> list[Batch]:
    """Batches of one-conversation rows, longest first, each holding as many as fit rows x longest <= max_tokens.

    Ties in length are broken by a seeded shuffle, so the plan depends only on (lengths, max_tokens, seed).
    """
    if max(lengths) > max_tokens:
        raise ValueError(f"an example of {max(lengths)} tokens exceeds max_tokens={max_tokens}")
    order = list(range(len(lengths)))
    _rng(seed, "ties").shuffle(order)
    order.sort(key=lambda i: -lengths[i])  # stable: shuffled order among equal lengths
    batches: list[Batch] = []
    for i in order:
        # Sorted longest first, so a batch's first row sets its width.
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0][0]] <= max_tokens:
            batches[-1].append([i])
        else:
            batches.append([[i]])
    return batches


def pack_rows(lengths: Sequence[int], row_tokens: int, seed: int) -> list[Row]:
    """First-fit decreasing: each example, longest first, goes into the first row with room for it."""
    if max(lengths) > row_tokens:
        raise ValueError(f"an example of {max(lengths)} tokens exceeds row_tokens={row_tokens}")
    order = list(range(len(lengths)))
    _rng(seed, "ties").shuffle(order)
    order.sort(key=lambda i: -lengths[i])
    rows: list[Row] = []
    room: list[int] = []  # free tokens per row
    for i in order:
        n = lengths[i]
        target = next((r for r, free in enumerate(room) if free >= n), None)
        if target is None:
            rows.append([i])
            room.append(row_tokens - n)
        else:
            rows[target].append(i)
            room[target] -= n
    return rows


class TokenBudgetSampler(Sampler[Batch]):
    """Yields batches (lists of rows of example indices) for `DataLoader(batch_size=None)`; see the module docstring."""

    def __init__(
        self,
        lengths: Sequence[int],
        batching: Literal["length_grouped", "packed"],
        max_tokens: int,
        row_tokens: int,
        seed: int,
        step_group: int = 1,
    ) -> None:
        """
        Args:
            lengths: Token count of each example.
            batching: `length_grouped` or `packed` (see the module docstring).
            max_tokens: Token budget of a micro-batch: rows x row width never exceeds it.
            row_tokens: Longest row (`max_seq_length`); `packed` fills rows up to it.
            seed: Seed of the plan and of every epoch's order.
            step_group: Micro-batches per optimizer step over all devices (world size x accumulate_grad_batches);
                length_grouped batches are shuffled in groups of this many neighbours of the plan.
        """
        self.lengths = list(lengths)
        self.batching = batching
        self.seed = seed
        self.step_group = max(1, step_group)
        self.epoch = 0
        if batching == "length_grouped":
            self.units: list = length_grouped_batches(self.lengths, max_tokens, seed)
            self.rows_per_batch = 1  # units are whole batches
        elif batching == "packed":
            self.units = pack_rows(self.lengths, row_tokens, seed)
            self.rows_per_batch = max(1, max_tokens // row_tokens)
        else:
            raise ValueError(f"batching={batching!r}: TokenBudgetSampler handles 'length_grouped' and 'packed'")

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this before each epoch (on `dataloader.sampler`); the order depends only on it."""
        self.epoch = epoch

    def batches(self, epoch: int) -> list[Batch]:
        """The whole epoch's batches, in order: a pure function of (plan, seed, epoch)."""
        if self.batching == "length_grouped":
            # The plan is longest first, so neighbours are batches of similar width and cost.
            # A partial last group stays last, so that every step after it still starts a group.
            full = len(self.units) - len(self.units) % self.step_group
            groups = [self.units[k : k + self.step_group] for k in range(0, full, self.step_group)]
            _rng(self.seed, epoch).shuffle(groups)
            return [batch for group in groups for batch in group] + self.units[full:]
        order = list(range(len(self.units)))
        _rng(self.seed, epoch).shuffle(order)
        rows = [self.units[i] for i in order]
        return [rows[k : k + self.rows_per_batch] for k in range(0, len(rows), self.rows_per_batch)]

    def __iter__(self):
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        return -(-len(self.units) // self.rows_per_batch)

    @property
    def max_batch_tokens(self) -> int:
        """Largest rows x width of any batch in any epoch (packed: rows x row_tokens, the worst grouping)."""
        if self.batching == "length_grouped":
            return max(len(batch) * self.lengths[batch[0][0]] for batch in self.units)
        longest_row = max(sum(self.lengths[i] for i in row) for row in self.units)
        return min(self.rows_per_batch, len(self.units)) * longest_row


class ExampleRows(Dataset):
    """Maps a batch of index rows (what `TokenBudgetSampler` yields) to the same rows of examples."""

    def __init__(self, examples: list[dict]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, batch: Batch) -> list[list[dict]]:
        return [[self.examples[i] for i in row] for row in batch]


def collate_rows(rows: list[list[dict]], pad_id: int) -> dict:
    """(R, T) input_ids / labels / position_ids for rows of examples, padded on the right to the longest row.

    Positions restart at 0 for every example; a row's padding continues the positions of the example before
    it, so a row holding one example has plain 0..T-1 positions. The first label of every example is
    IGNORE_INDEX: it would be the target of the previous example's last token, which unpacked training never
    has. `num_tokens` (a Python int: counting needs no GPU sync) is the number of real tokens.
    """
    widths = [sum(len(e["input_ids"]) for e in row) for row in rows]
    width = max(widths)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.empty((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for example in row:
            n = len(example["input_ids"])
            input_ids[r, at : at + n] = torch.tensor(example["input_ids"])
            labels[r, at : at + n] = torch.tensor(example["labels"])
            labels[r, at] = IGNORE_INDEX
            position_ids[r, at : at + n] = torch.arange(n)
            at += n
        last = len(row[-1]["input_ids"])
        position_ids[r, at:] = torch.arange(last, last + width - at)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "num_tokens": sum(widths)}


def model_inputs(batch: dict) -> dict[str, torch.Tensor]:
    """What the model gets for a training batch: ids, position_ids when present, and never an attention mask.

    Packed rows need the mask absent (transformers only looks for position restarts when it is), and every
    training batch is right-padded, where causal attention already keeps real tokens off the padding.
    """
    inputs = {"input_ids": batch["input_ids"]}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    return inputs


def count_tokens(batch: dict) -> int:
    """Real (non-padding) tokens in a batch from any of the training collators."""
    if "num_tokens" in batch:
        return int(batch["num_tokens"])
    return int(batch["attention_mask"].sum())


def padding_fraction(batches: list[Batch], lengths: Sequence[int]) -> float:
    """Share of the tensor cells (rows x width, summed over batches) that hold padding."""
    real = sum(lengths[i] for batch in batches for row in batch for i in row)
    cells = sum(len(batch) * max(sum(lengths[i] for i in row) for row in batch) for batch in batches)
    return 1.0 - real / cells
