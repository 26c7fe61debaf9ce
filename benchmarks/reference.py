"""The reference: the training loop a user writes with plain transformers + PEFT + bitsandbytes.

Nothing here comes from lima-lightning: the batches are built by hand (right padding plus an attention mask,
or rows cut from the concatenated conversations), the loss is transformers' own `labels=` loss, and the
optimizer is torch's AdamW stepped after every batch, under bf16 autocast on the GPU.
"""

from __future__ import annotations

import random

import torch
from measure import TimedWindow

IGNORE_INDEX = -100  # transformers' ignore index for `labels=`


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


def padded_batches(examples: list[dict], order: list[int], batch_size: int, pad_id: int) -> list[tuple[dict, list[int]]]:
    """(batch, lengths of its conversations): `batch_size` shuffled conversations padded to the longest."""
    out = []
    for k in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[k : k + batch_size]]
        out.append((plain_padded_batch(chunk, pad_id), [len(e["input_ids"]) for e in chunk]))
    return out


def row_batches(examples: list[dict], order: list[int], row_tokens: int) -> list[tuple[dict, list[int]]]:
    """(batch, lengths of the conversation pieces in it): the shuffled conversations concatenated and cut into
    full rows of `row_tokens`, one row per batch (no mask: plain causal attention across the pieces)."""
    ids = [t for i in order for t in examples[i]["input_ids"]]
    labels = [t for i in order for t in examples[i]["labels"]]
    bounds, at = [], 0
    for i in order:
        at += len(examples[i]["input_ids"])
        bounds.append(at)
    out = []
    for start in range(0, len(ids) - row_tokens + 1, row_tokens):
        end = start + row_tokens
        cuts = sorted({start, end, *(b for b in bounds if start < b < end)})
        batch = {"input_ids": torch.tensor([ids[start:end]]), "labels": torch.tensor([labels[start:end]])}
        out.append((batch, [b - a for a, b in zip(cuts[:-1], cuts[1:], strict=True)]))
    return out


def plain_batches(examples: list[dict], batching: str, batch_size: int, pad_id: int, seed: int, row_tokens: int):
    """The plain loop's batches in a plain shuffled order: `padded` (batch_size per batch) or `rows`."""
    order = shuffled(len(examples), seed)
    if batching == "padded":
        return padded_batches(examples, order, batch_size, pad_id)
    return row_batches(examples, order, row_tokens)


def plain_loop(model, batches, window: TimedWindow, device: torch.device) -> dict:
    """What a user writes with transformers + PEFT + bitsandbytes, timed by `window`."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    for step, (batch, lengths) in enumerate(batches):
        window.begin_step(step)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            loss = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if window.end_step(step, sum(lengths), batch["input_ids"].numel(), lengths):
            break
    return window.result()


def prepare_model(model, checkpointing: bool, device: torch.device) -> None:
    """The shared model as a plain loop starts it: fp32 adapters, SDPA attention, transformers' gradient
    checkpointing on or off; this undoes what a row of ours changed before (the helpers only set those)."""
    from lima_lightning.models.speed import cast_adapters, set_attention, set_gradient_checkpointing

    cast_adapters(model, torch.float32)
    set_attention(model.get_base_model(), "sdpa", device)
    set_gradient_checkpointing(model.get_base_model(), checkpointing)
