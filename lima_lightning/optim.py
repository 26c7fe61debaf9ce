"""The optimizer and learning-rate schedule of the LoRA weights."""

from __future__ import annotations

import math
from typing import Literal

import torch

OptimizerName = Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"]
SchedulerName = Literal["cosine", "linear", "constant"]


def build_optimizer(params: list[torch.nn.Parameter], name: OptimizerName, learning_rate: float, weight_decay: float, betas=(0.9, 0.999)):
    """torch's AdamW, or a bitsandbytes 8-bit / paged AdamW (less optimizer memory)."""
    betas = tuple(betas)
    if name == "adamw":
        # foreach (the CUDA default), not fused: Lightning refuses gradient clipping with a fused AdamW under AMP.
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, betas=betas)
    import bitsandbytes as bnb

    optimizer_class = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }[name]
    return optimizer_class(params, lr=learning_rate, weight_decay=weight_decay, betas=betas)


def lr_factor(step: int, total_steps: int, warmup_steps: int, name: SchedulerName, min_lr_ratio: float = 0.0) -> float:
    """The learning rate at `step` as a share of the peak: linear warmup, then `name` decay down to `min_lr_ratio`."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 1.0 - progress if name == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_scheduler(optimizer, name: SchedulerName, total_steps: int, warmup_ratio: float, min_lr_ratio: float = 0.0):
    """`lr_factor` per optimizer step (transformers' warmup schedules, with an optional floor)."""
    from torch.optim.lr_scheduler import LambdaLR

    total_steps = max(1, total_steps)
    warmup_steps = math.ceil(warmup_ratio * total_steps)
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, name, min_lr_ratio))


def optimizer_state_bytes(params: list[torch.nn.Parameter], name: OptimizerName) -> int:
    """AdamW keeps two moments per weight: in the weight's dtype (torch), 8-bit (`*_8bit`), or fp32 (paged 32-bit)."""
    numel = sum(p.numel() for p in params)
    if name.endswith("_8bit"):
        return 2 * numel
    if name == "paged_adamw_32bit":
        return 8 * numel
    return 2 * sum(p.numel() * p.element_size() for p in params)
