"""The one loss: causal-LM negative log-likelihood over trained (assistant) tokens only, and its token weighting.

Two entry points share `_nll`: `masked_nll_sum` takes logits a model already computed, and `head_nll_sum`
takes the last hidden states and the output head, and applies the head only at trained positions, so the
(B, T, V) logits tensor never exists (for Llama-2 at 8k tokens: 0.5 GB in bf16, 1 GB more upcast to fp32,
per micro-batch).

Both return sums, not means: backward runs on the sum of every micro-batch of an optimizer step, and
`scale_grads` then divides the accumulated gradient by the number of trained tokens of the whole step (all
micro-batches, all devices), so every token weighs the same: a token-weighted mean, not a mean of means.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lima_lightning.data.tokenization import IGNORE_INDEX


def _nll(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor | None, num_rows: int) -> torch.Tensor:
    """(N, V) logits of trained positions, (N,) targets -> summed NLL in fp32; per row when `rows` (N,) is given."""
    if rows is None:
        return F.cross_entropy(logits.float(), targets, reduction="sum")
    per_token = F.cross_entropy(logits.float(), targets, reduction="none")
    return per_token.new_zeros(num_rows).index_add_(0, rows, per_token)


def _trained(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets (B, T-1) (position t predicts token t+1) and where they are trained."""
    targets = labels[:, 1:]
    return targets, targets != IGNORE_INDEX


def masked_nll_sum(logits: torch.Tensor, labels: torch.Tensor, per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of NLL over trained tokens, and their count (per row of the batch with `per_row`: shapes (B,)).

    logits: (B, T, V), position t predicts token t+1; labels: (B, T), IGNORE_INDEX where untrained.
    """
    targets, trained = _trained(labels)
    rows = trained.nonzero()[:, 0] if per_row else None
    # Select trained positions before upcasting: (N, V) in fp32 instead of (B, T, V).
    nll = _nll(logits[:, :-1][trained], targets[trained], rows, len(labels))
    return nll, trained.sum(dim=1) if per_row else trained.sum()


def head_nll_sum(
    hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, chunk_size: int = 0, per_row: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """`masked_nll_sum(head(hidden), labels, per_row)` without computing logits where no loss is taken.

    hidden: (B, T, H) last hidden states (after the final norm); head: H -> V (the LM head); labels: (B, T).
    chunk_size > 0: the head and cross-entropy run on that many trained tokens at a time, each chunk
    recomputed in backward, so at most one chunk's (chunk, V) logits exist at once; it costs one more
    head matmul (~1% of a 7B step). 0: all trained tokens at once.
    """
    targets, trained = _trained(labels)
    picked = hidden[:, :-1][trained]  # (N, H)
    targets = targets[trained]  # (N,)
    rows = trained.nonzero()[:, 0] if per_row else None
    count = trained.sum(dim=1) if per_row else trained.sum()
    if chunk_size <= 0 or len(targets) <= chunk_size:
        return _nll(head(picked), targets, rows, len(labels)), count
    total = hidden.new_zeros(len(labels) if per_row else (), dtype=torch.float32)
    row_chunks = rows.split(chunk_size) if per_row else [None] * len(picked.split(chunk_size))
    for h, t, r in zip(picked.split(chunk_size), targets.split(chunk_size), row_chunks, strict=True):
        # Non-reentrant checkpoint keeps only `h` (a view of `picked`) and replays the autocast state.
        total = total + checkpoint(_head_nll, head, h, t, r, len(labels), use_reentrant=False)
    return total, count


def _head_nll(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, rows, num_rows: int) -> torch.Tensor:
    return _nll(head(hidden), targets, rows, num_rows)


def scale_grads(params: list[torch.nn.Parameter], scale: torch.Tensor | float) -> None:
    """Multiply every gradient by `scale` in a few multi-tensor kernels (not one per adapter weight: 448 for 7B).

    The token-weighted step: backward ran on summed NLLs, so `scale = 1 / trained tokens of the step`, times
    whatever Lightning and DDP already divided by (torchtune's `training.scale_grads(model, 1 / num_tokens)`).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, scale)
