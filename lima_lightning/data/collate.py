"""Pad lists of ids into batches: right padding for training, left padding for generation."""

from __future__ import annotations

import torch

from lima_lightning.data.tokenization import IGNORE_INDEX


def pad_for_training(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """(B, T) input_ids / labels / attention_mask, padded on the right to the longest example."""
    longest = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


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
