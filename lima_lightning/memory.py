"""GPU memory: the process's budget (`--gpu_memory_gib`), and the measured plan of a training step's peak.

The budget is enforced with `torch.cuda.set_per_process_memory_fraction`, so a run that needs more fails as it
would on a smaller card: one H200 can stand in for a 24, 40 or 80 GB GPU honestly, and several runs can share
one GPU. Everything that plans memory (checkpointing, generation chunks, merging for generation) plans
against `budget_bytes`, never against what the device reports free.

`gradient_checkpointing: auto` measures this model on this GPU with four short probe steps (rows of 512 and
1024 tokens, without and with every layer checkpointed), fits how the step's peak grows per token in both
cases, and checkpoints the fewest decoder layers whose predicted peak for the largest micro-batch fits. Short
rows can miss the part of the peak that large micro-batches reach (on an H200 at a 24 GiB budget the probe
predicted 19.0 GiB for 26 checkpointed layers, the step reached 21.7), so each quantity is at least what the
shape model of `planning.py` predicts (21.0 there, within 10% of every measured peak).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch

GIB = 2**30
_requested_gib: dict[str, float] = {}  # --gpu_memory_gib, per process


def prefer_expandable_segments(environ=os.environ) -> None:
    """Let PyTorch's CUDA allocator grow segments in place unless the user configured it.

    Without it a budget fills with fragments: QLoRA on Llama-2-7B under 24 GiB died of out-of-memory at step 3
    with 19.5 GiB allocated and 23.5 GiB reserved; with it the same steps ran (peak 21.7 GiB). Read when CUDA
    first allocates, so set before any command touches the GPU.
    """
    if not {"PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"} & environ.keys():
        environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def request_budget(gib: float | None) -> None:
    """Remember `--gpu_memory_gib` for this process; `apply_budget` enforces it once the device is known."""
    _requested_gib.clear()
    if gib is not None:
        if gib <= 0:
            from lima_lightning.errors import UserError

            raise UserError(f"--gpu_memory_gib={gib}: must be a positive number of GiB, e.g. 24 for a 24 GB card")
        _requested_gib["gib"] = float(gib)


def apply_budget(device: torch.device) -> None:
    """Cap this process's share of `device` at the requested budget (a no-op without one, or on CPU)."""
    if device.type != "cuda" or "gib" not in _requested_gib:
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, _requested_gib["gib"] * GIB / total), device)


def budget_bytes(device: torch.device) -> int:
    """What this process may allocate on `device`: the requested budget, else the whole device."""
    total = torch.cuda.get_device_properties(device).total_memory
    return min(total, int(_requested_gib["gib"] * GIB)) if "gib" in _requested_gib else total


def available_bytes(device: torch.device) -> int:
    """The budget, or less when other processes hold part of the device."""
    free, _ = torch.cuda.mem_get_info(device)
    return min(budget_bytes(device), free + torch.cuda.memory_reserved(device))


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak GPU memory of a training step, extrapolated from measured probe steps, for 0 to all checkpointed layers."""

    fixed_bytes: float  # weights, adapter gradients, per-layer temporaries: independent of the batch
    bytes_per_token: float  # saved activations (and the loss) per token of a micro-batch, no layer checkpointed
    checkpointed_bytes_per_token: float  # the same with every decoder layer checkpointed
    num_layers: int
    optimizer_bytes: float  # optimizer state, created after the probe
    max_tokens: int  # largest rows x width of any training micro-batch
    budget_bytes: float  # what this process may use on the device
    checkpointed_choice: int | None = None  # set: that many layers are checkpointed (not `auto`'s choice)

    # Headroom for allocator fragmentation and the optimizer step's temporaries.
    MARGIN = 1.15
    SLACK_BYTES = 1 * GIB

    def peak_bytes(self, checkpointed: int) -> float:
        """Predicted peak with `checkpointed` of the decoder layers checkpointed (each saves the same per token)."""
        saved_per_layer = (self.bytes_per_token - self.checkpointed_bytes_per_token) / max(self.num_layers, 1)
        per_token = self.bytes_per_token - checkpointed * saved_per_layer
        return self.fixed_bytes + self.optimizer_bytes + per_token * self.max_tokens

    def fits_with(self, checkpointed: int) -> bool:
        return self.peak_bytes(checkpointed) * self.MARGIN + self.SLACK_BYTES <= self.budget_bytes

    @property
    def checkpointed_layers(self) -> int:
        """The fewest layers to checkpoint for the largest micro-batch to fit (all of them if nothing fits)."""
        if self.checkpointed_choice is not None:
            return self.checkpointed_choice
        return next((k for k in range(self.num_layers + 1) if self.fits_with(k)), self.num_layers)

    @property
    def predicted_peak_bytes(self) -> float:
        return self.peak_bytes(self.checkpointed_layers)

    @property
    def fits(self) -> bool:
        return self.fits_with(self.checkpointed_layers)

    def describe(self) -> str:
        k, layers = self.checkpointed_layers, self.num_layers
        verdict = "fits" if self.fits else "does NOT fit even with every layer checkpointed"
        return (
            f"checkpointing {k} of {layers} decoder layers: a {self.max_tokens}-token micro-batch needs "
            f"~{self.predicted_peak_bytes / GIB:.1f} GiB ({self.fixed_bytes / GIB:.1f} fixed + {self.optimizer_bytes / GIB:.1f} "
            f"optimizer + {self.bytes_per_token / 2**20:.2f} MiB/token, {self.checkpointed_bytes_per_token / 2**20:.2f} MiB/token "
            f"with all layers checkpointed) of the {self.budget_bytes / GIB:.1f} GiB budget: {verdict}"
        )

    def at_least(self, other: MemoryEstimate) -> MemoryEstimate:
        """This estimate with each measured quantity raised to `other`'s where that is larger."""
        return replace(
            self,
            fixed_bytes=max(self.fixed_bytes, other.fixed_bytes),
            bytes_per_token=max(self.bytes_per_token, other.bytes_per_token),
            checkpointed_bytes_per_token=max(self.checkpointed_bytes_per_token, other.checkpointed_bytes_per_token),
        )

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "checkpointed_layers": self.checkpointed_layers,
            "predicted_peak_gib": self.predicted_peak_bytes / GIB,
            "fits": self.fits,
        }


def probe_activation_memory(step: Callable[[int], None], device: torch.device, sizes: tuple[int, int] = (512, 1024)) -> tuple[float, float]:
    """Peak allocated memory of `step(n)` (one forward + backward of an n-token row) at two sizes, fit as a line.

    Returns (fixed bytes, bytes per token). Activation memory is linear in tokens here: SDPA's kernels keep no
    (T, T) matrix and the loss runs on trained tokens only.
    """
    peaks = []
    for n in sizes:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(n)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device))
    per_token = max(0.0, (peaks[1] - peaks[0]) / (sizes[1] - sizes[0]))
    return peaks[0] - per_token * sizes[0], per_token


def probe_step(module, device: torch.device) -> Callable[[int], None]:
    """One forward + backward of an n-token row with every target trained (a real micro-batch's worst case)."""
    from lima_lightning.data.collate import collate_rows
    from lima_lightning.data.tokenization import IGNORE_INDEX

    model = module.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    vocab = model.get_base_model().config.vocab_size

    def step(n: int) -> None:
        ids = torch.randint(3, vocab, (n,)).tolist()
        batch = collate_rows([[{"input_ids": ids, "labels": [IGNORE_INDEX, *ids[1:]]}]], pad_id=0)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with module.trainer.precision_plugin.train_step_context():
            nll, _ = module.masked_nll(batch)
        nll.backward()
        for p in trainable:
            p.grad = None

    return step


def estimate_memory(module, device: torch.device, max_tokens: int) -> MemoryEstimate:
    """Measure this model's step memory on `device` without and with checkpointing (four probe steps)."""
    from lima_lightning.models.speed import set_gradient_checkpointing
    from lima_lightning.optim import optimizer_state_bytes

    model = module.model
    base = model.get_base_model()
    was_training = model.training
    model.train()  # checkpointing recomputes only in train mode
    step = probe_step(module, device)
    # The probe draws dropout masks; fork the RNG so training sees the same random stream with or without it.
    with torch.random.fork_rng(devices=[device]):
        set_gradient_checkpointing(base, False)
        fixed, per_token = probe_activation_memory(step, device)
        set_gradient_checkpointing(base, True, offload=module.hparams.offload_checkpoints)
        _, checkpointed_per_token = probe_activation_memory(step, device)
        set_gradient_checkpointing(base, False)
    model.train(was_training)
    return MemoryEstimate(
        fixed_bytes=fixed,
        bytes_per_token=per_token,
        checkpointed_bytes_per_token=min(per_token, checkpointed_per_token),
        num_layers=len(base.get_decoder().layers),
        optimizer_bytes=optimizer_state_bytes([p for p in model.parameters() if p.requires_grad], module.hparams.optimizer),
        max_tokens=max_tokens,
        budget_bytes=available_bytes(device),
    )


def decide_checkpointing(module, device: torch.device, max_tokens: int | None) -> tuple[int, MemoryEstimate | None, str]:
    """`auto`: how many decoder layers to checkpoint so that the largest micro-batch fits the budget."""
    layers = len(module.model.get_base_model().get_decoder().layers)
    if device.type != "cuda":
        return 0, None, "auto -> off: on CPU there is no device memory budget to protect"
    if max_tokens is None:
        return layers, None, "auto -> all layers: the data module does not say how large its micro-batches get"
    from lima_lightning.phases import PHASES
    from lima_lightning.planning import shape_estimate

    with PHASES.timed("probe"):
        measured = estimate_memory(module, device, max_tokens)
    modelled, _ = shape_estimate(module.model.get_base_model().config, module.hparams, max_tokens, measured.budget_bytes)
    estimate = measured.at_least(modelled)
    return estimate.checkpointed_layers, estimate, f"auto -> {estimate.describe()}"
