"""Lists of ids into tensors: one collator for every training and validation batch, one for generation."""

from __future__ import annotations

import torch

from lima_lightning.data.tokenization import IGNORE_INDEX

# Batch widths are rounded up to a multiple of this. Compiled layers specialize on whether the sequence length is
# a multiple of 8 (Inductor's alignment guard on the GPU), so a run whose widths are sometimes aligned and
# sometimes not compiles each layer graph twice, ~20 s more (S13-1); it costs at most 7 padding tokens a row.
WIDTH_MULTIPLE = 8


def batch_width(longest: int) -> int:
    """The width of a batch whose longest row holds `longest` tokens."""
    return -(-longest // WIDTH_MULTIPLE) * WIDTH_MULTIPLE


def collate_rows(rows: list[list[dict]], pad_id: int, packed: bool = False) -> dict:
    """(R, T) `input_ids`, `labels`, `position_ids` for rows of examples, right-padded to `batch_width` of the longest.

    Every training micro-batch, whatever `data.batching`, comes from here: a padded row is a row holding one
    example, a packed row holds several. Positions restart at 0 for every example, and a row's padding tail
    continues the positions of the example before it, so a row of one example has plain 0..T-1 positions.
    The model gets `input_ids` and `position_ids` and no attention mask: transformers finds the restarts in
    `position_ids` and builds a causal mask that is block-diagonal per conversation, and under causal attention
    no real token can see the right padding after it. Labels are copied as tokenization wrote them (each
    example's first label, its BOS, is already ignored, so a packed row never predicts across examples).
    `num_tokens` (a Python int: counting needs no GPU sync) is the number of real tokens. `packed` says the rows
    come from `data.batching: packed`, where a row may hold one conversation or several (see
    `models.speed.packed_rows_mask`).

    >>> a = {"input_ids": [1, 5, 6], "labels": [-100, 6, 2]}
    >>> b = {"input_ids": [1, 7], "labels": [-100, 7]}
    >>> batch = collate_rows([[a, b], [b]], pad_id=0)
    >>> batch["input_ids"].tolist(), batch["position_ids"].tolist(), batch["num_tokens"]
    ([[1, 5, 6, 1, 7, 0, 0, 0], [1, 7, 0, 0, 0, 0, 0, 0]], [[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7]], 7)
    >>> batch["labels"].tolist()
    [[-100, 6, 2, -100, 7, -100, -100, -100], [-100, 7, -100, -100, -100, -100, -100, -100]]
    """
    widths = [sum(len(e["input_ids"]) for e in row) for row in rows]
    width = batch_width(max(widths))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.empty((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for example in row:
            n = len(example["input_ids"])
            input_ids[r, at : at + n] = torch.tensor(example["input_ids"])
            labels[r, at : at + n] = torch.tensor(example["labels"])
            position_ids[r, at : at + n] = torch.arange(n)
            at += n
        last = len(row[-1]["input_ids"])
        position_ids[r, at:] = torch.arange(last, last + width - at)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "num_tokens": sum(widths), "packed": packed}


def pad_for_generation(examples: list[dict], pad_id: int) -> dict:
    """Left padding, so every prompt ends at the last column and new tokens append in step."""
    longest = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, longest - n :] = torch.tensor(example["input_ids"])
        attention_mask[row, longest - n :] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "id": [e["id"] for e in examples],
        "prompt": [e["prompt"] for e in examples],
        "reference": [e.get("reference") for e in examples],
    }
