"""Per-optimizer-step bookkeeping: what a step trained, and the metrics logged for it."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lima_lightning.distributed import global_grad_norm
from lima_lightning.errors import NonFiniteLossError


@dataclass
class StepTotals:
    """One optimizer step over all micro-batches and devices."""

    nll: torch.Tensor  # summed NLL of the trained tokens
    trained_tokens: torch.Tensor  # float, >= 0
    seen_tokens: torch.Tensor  # real (non-padding) tokens processed
    seconds: float

    @property
    def loss(self) -> torch.Tensor:
        """Token-weighted mean NLL; 0 (never NaN) for a step without a trained token."""
        return self.nll / self.trained_tokens.clamp(min=1)


class StepTally:
    """Sums what this device's micro-batches of the current optimizer step trained; `totals` reduces over devices."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.nll = torch.zeros(())
        self.trained = torch.zeros((), dtype=torch.long)
        self.seen = 0  # a Python int: counting needs no device sync
        self.started = time.perf_counter()

    def add(self, nll: torch.Tensor, trained: torch.Tensor, seen_tokens: int) -> None:
        self.nll = self.nll.to(nll.device) + nll.detach()
        self.trained = self.trained.to(trained.device) + trained
        self.seen += int(seen_tokens)

    def totals(self, strategy) -> StepTotals:
        """All-reduced over the devices (a collective: every rank calls it)."""
        trained = strategy.reduce(self.trained.float(), reduce_op="sum")
        # Tokens all devices processed; rank 0's times the world size would be off by how unevenly lengths fall.
        seen = strategy.reduce(trained.new_tensor(float(self.seen)), reduce_op="sum")
        return StepTotals(strategy.reduce(self.nll, reduce_op="sum"), trained, seen, time.perf_counter() - self.started)


def check_finite(loss: torch.Tensor, step: int, epoch: int) -> None:
    """Stop before the optimizer applies a NaN or infinite loss (the weights are still the last good ones)."""
    if not torch.isfinite(loss):
        raise NonFiniteLossError(
            f"train loss is {loss.item()} at step {step} (epoch {epoch}); the update was not applied; "
            "lower model.learning_rate or check the data"
        )


def train_metrics(step: StepTotals, params: list[torch.nn.Parameter], strategy, learning_rate: float, device: torch.device) -> dict:
    """The `train/*` scalars of one optimizer step (after its gradients were scaled)."""
    seconds = max(step.seconds, 1e-9)
    metrics = {
        "train/loss": step.loss,
        "train/perplexity": torch.exp(step.loss),
        "train/grad_norm": global_grad_norm([p.grad for p in params if p.grad is not None], strategy),
        "train/lr": learning_rate,
        "train/trained_tokens_per_sec": step.trained_tokens / seconds,
        "train/tokens_per_sec": step.seen_tokens / seconds,
    }
    if device.type == "cuda":
        metrics["train/peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return metrics
