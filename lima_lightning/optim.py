"""The optimizer and learning-rate schedule of the LoRA weights."""

from __future__ import annotations

import math
from typing import Literal

import torch

OptimizerName = Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"]
SchedulerName = Literal["cosine", "linear", "constant"]


def build_optimizer(
    params: list[torch.nn.Parameter], name: OptimizerName, learning_rate: float, weight_decay: float
) -> torch.optim.Optimizer:
    """torch's AdamW, or a bitsandbytes 8-bit / paged AdamW (less optimizer memory)."""
    if name == "adamw":
        # foreach (the CUDA default), not fused: Lightning refuses gradient clipping with a fused AdamW under AMP.
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    import bitsandbytes as bnb

    optimizer_class = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }[name]
    return optimizer_class(params, lr=learning_rate, weight_decay=weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, name: SchedulerName, total_steps: int, warmup_ratio: float):
    """Linear warmup over `warmup_ratio` of the steps, then `name` decay (transformers' schedules), stepped per step."""
    from transformers import get_scheduler

    total_steps = max(1, total_steps)
    schedule = {"constant": "constant_with_warmup"}.get(name, name)
    return get_scheduler(schedule, optimizer, num_warmup_steps=math.ceil(warmup_ratio * total_steps), num_training_steps=total_steps)


def optimizer_state_bytes(params: list[torch.nn.Parameter], name: OptimizerName) -> int:
    """AdamW keeps two moments per weight: in the weight's dtype (torch), 8-bit (`*_8bit`), or fp32 (paged 32-bit)."""
    numel = sum(p.numel() for p in params)
    if name.endswith("_8bit"):
        return 2 * numel
    if name == "paged_adamw_32bit":
        return 8 * numel
    return 2 * sum(p.numel() * p.element_size() for p in params)
