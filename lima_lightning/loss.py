"""The one loss: causal-LM negative log-likelihood over trained (assistant) tokens only.

Two entry points share `_nll_sum`: `masked_nll_sum` takes logits a model already computed, and
`head_nll_sum` takes the last hidden states and the output head, and applies the head only at trained
positions, so the (B, T, V) logits tensor never exists (for Llama-2 at 8k tokens: 0.5 GB in bf16, 1 GB more
upcast to fp32, per micro-batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lima_lightning.data.tokenization import IGNORE_INDEX


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, V) logits of trained positions, (N,) targets -> summed NLL, computed in fp32."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def masked_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of NLL over trained tokens, and their count.

    logits: (B, T, V), position t predicts token t+1; labels: (B, T), IGNORE_INDEX where untrained.
    A sum (not a mean) lets callers weight every trained token equally across micro-batches,
    devices and accumulation steps; divide by the total count once.
    """
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX  # (B, T-1)
    # Select trained positions before upcasting: (N, V) in fp32 instead of (B, T, V).
    return _nll_sum(logits[:, :-1][trained], targets[trained]), trained.sum()


def head_nll_sum(
    hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, chunk_size: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`masked_nll_sum(head(hidden), labels)` without computing logits where no loss is taken.

    hidden: (B, T, H) last hidden states (after the final norm); head: H -> V (the LM head); labels: (B, T).
    chunk_size > 0: the head and cross-entropy run on that many trained tokens at a time, each chunk
    recomputed in backward, so at most one chunk's (chunk, V) logits exist at once; it costs one more
    head matmul (~1% of a 7B step). 0: all trained tokens at once.
    """
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX  # (B, T-1)
    picked = hidden[:, :-1][trained]  # (N, H)
    targets = targets[trained]  # (N,)
    if chunk_size <= 0 or len(targets) <= chunk_size:
        return _nll_sum(head(picked), targets), trained.sum()
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, t in zip(picked.split(chunk_size), targets.split(chunk_size), strict=True):
        # Non-reentrant checkpoint keeps only `h` (a view of `picked`) and replays the autocast state.
        total = total + checkpoint(_head_nll, head, h, t, use_reentrant=False)
    return total, trained.sum()


def _head_nll(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return _nll_sum(head(hidden), targets)
