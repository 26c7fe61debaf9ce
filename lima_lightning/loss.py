"""The one loss: causal-LM negative log-likelihood over trained (assistant) tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lima_lightning.data.tokenization import IGNORE_INDEX


def masked_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of NLL over trained tokens, and their count.

    logits: (B, T, V), position t predicts token t+1; labels: (B, T), IGNORE_INDEX where untrained.
    A sum (not a mean) lets callers weight every trained token equally across micro-batches,
    devices and accumulation steps; divide by the total count once.
    """
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX  # (B, T-1)
    # Select trained positions before upcasting: (N, V) in fp32 instead of (B, T, V).
    picked = logits[:, :-1][trained].float()
    nll = F.cross_entropy(picked, targets[trained], reduction="sum")
    return nll, trained.sum()
