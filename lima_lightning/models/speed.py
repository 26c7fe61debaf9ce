"""Training-speed settings applied to the loaded LoRA model at the start of `fit`.

`configure_for_training` is called from `LIMALoRAModule.configure_model` and is idempotent, so one loaded
model can be trained under several settings (the benchmark does that). It sets, in this order:

1. the attention kernel (`sdpa`, or `flex_attention` on CUDA: it skips the blocks that packed rows mask out),
2. the adapter dtype (bf16 adapters halve adapter, gradient and AdamW-state memory; fp32 is the default),
3. gradient checkpointing: on, off, or `auto`, decided by measuring this model's activation memory on this
   GPU (see `probe_activation_memory`) against the largest micro-batch the data module will produce,
4. torch.compile of each decoder layer (regional compilation: every layer after the first, whose input
   needs no gradient, shares one compiled graph).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lima_lightning.data.collate import collate_rows
from lima_lightning.data.tokenization import IGNORE_INDEX
from lima_lightning.optim import optimizer_state_bytes

GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak GPU memory of a training step without checkpointing, extrapolated from two measured steps."""

    fixed_bytes: float  # weights, adapter gradients, per-layer temporaries: independent of the batch
    bytes_per_token: float  # saved activations (and the loss) per token of a micro-batch
    optimizer_bytes: float  # optimizer state, created after the probe
    max_tokens: int  # largest rows x width of any training micro-batch
    budget_bytes: float  # what this process may use on the device

    # Headroom for allocator fragmentation and the optimizer step's temporaries.
    MARGIN = 1.15
    SLACK_BYTES = 1 * GIB

    @property
    def predicted_peak_bytes(self) -> float:
        return self.fixed_bytes + self.optimizer_bytes + self.bytes_per_token * self.max_tokens

    @property
    def fits(self) -> bool:
        return self.predicted_peak_bytes * self.MARGIN + self.SLACK_BYTES <= self.budget_bytes

    def describe(self) -> str:
        return (
            f"without checkpointing a {self.max_tokens}-token micro-batch needs ~{self.predicted_peak_bytes / GIB:.1f} GiB "
            f"({self.fixed_bytes / GIB:.1f} fixed + {self.optimizer_bytes / GIB:.1f} optimizer + "
            f"{self.bytes_per_token / 2**20:.2f} MiB/token), {self.budget_bytes / GIB:.1f} GiB available"
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "predicted_peak_gib": self.predicted_peak_bytes / GIB, "fits": self.fits}


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


def set_attention(model, name: str, device: torch.device) -> str:
    """Switch the attention kernel of a loaded model; flex attention has no CPU backward, so CPU keeps sdpa."""
    if name == "flex_attention" and device.type != "cuda":
        rank_zero_warn("model.attn_implementation=flex_attention needs a CUDA GPU for training; using sdpa on CPU")
        name = "sdpa"
    if model.config._attn_implementation != name:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(name)
        else:  # older transformers read the config at every forward
            model.config._attn_implementation = name
    return name


def cast_adapters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Trainable (LoRA) weights to `dtype`; must run before the optimizer is created."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)


def set_gradient_checkpointing(model, enabled: bool) -> None:
    """Non-reentrant checkpointing of every decoder layer: it needs no input gradients, so embeddings stay frozen."""
    # The gradient_* names exist in every transformers we support; newer ones alias them (with a FutureWarning)
    # to activation_checkpointing_*.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if enabled:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()


def compile_decoder_layers(model, backend: str = "inductor") -> None:
    """torch.compile each decoder layer in place; identical layers reuse one graph (two: the first layer's input
    needs no gradient), so a 32-layer model compiles twice, not 32 times.

    dynamic=True: token-budget batches change both rows and width every step; one graph with symbolic
    shapes instead of a static first compile and recompiles as each dimension is seen to vary.
    """
    for layer in model.get_decoder().layers:
        if not getattr(layer, "_lima_compiled", False):
            layer.compile(backend=backend, dynamic=True)
            layer._lima_compiled = True


def estimate_memory(module, device: torch.device, max_tokens: int) -> MemoryEstimate:
    """Measure this model's no-checkpointing memory on `device` with two synthetic rows (all tokens trained)."""
    model = module.model
    set_gradient_checkpointing(model.get_base_model(), False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    vocab = model.get_base_model().config.vocab_size
    was_training = model.training
    model.train()

    def step(n: int) -> None:
        ids = torch.randint(3, vocab, (n,)).tolist()
        # One n-token row with every token but the first trained: the worst case of a real micro-batch.
        batch = collate_rows([[{"input_ids": ids, "labels": [IGNORE_INDEX, *ids[1:]]}]], pad_id=0)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with module.trainer.precision_plugin.train_step_context():
            nll, _ = module.masked_nll(batch)
        nll.backward()
        for p in trainable:
            p.grad = None

    # The probe draws dropout masks; fork the RNG so training sees the same random stream with or without it.
    with torch.random.fork_rng(devices=[device]):
        fixed, per_token = probe_activation_memory(step, device)
    model.train(was_training)
    free, _ = torch.cuda.mem_get_info(device)
    return MemoryEstimate(
        fixed_bytes=fixed,
        bytes_per_token=per_token,
        optimizer_bytes=optimizer_state_bytes(trainable, module.hparams.optimizer),
        max_tokens=max_tokens,
        budget_bytes=free + torch.cuda.memory_reserved(device),
    )


def decide_checkpointing(module, device: torch.device, max_tokens: int | None) -> tuple[bool, MemoryEstimate | None, str]:
    """`auto`: checkpoint only if the largest micro-batch would not fit without it."""
    if device.type != "cuda":
        return False, None, "auto -> off: on CPU there is no device memory budget to protect"
    if max_tokens is None:
        return True, None, "auto -> on: the data module does not say how large its micro-batches get"
    estimate = estimate_memory(module, device, max_tokens)
    return not estimate.fits, estimate, f"auto -> {'off' if estimate.fits else 'on'}: {estimate.describe()}"


def configure_for_training(module, device: torch.device, max_tokens: int | None, compile_backend: str = "inductor") -> dict:
    """Apply the module's speed settings to `module.model` (see the module docstring); returns what was chosen."""
    hp = module.hparams
    base = module.model.get_base_model()
    report: dict = {"attn_implementation": set_attention(base, hp.attn_implementation, device)}
    cast_adapters(module.model, getattr(torch, hp.lora_dtype))
    checkpointing, estimate, reason = hp.gradient_checkpointing, None, ""
    if checkpointing == "auto":
        checkpointing, estimate, reason = decide_checkpointing(module, device, max_tokens)
        rank_zero_info(f"model.gradient_checkpointing={reason}")
    set_gradient_checkpointing(base, bool(checkpointing))
    report.update(gradient_checkpointing=bool(checkpointing), memory_estimate=estimate.as_dict() if estimate else None)
    if hp.compile:
        compile_decoder_layers(base, compile_backend)
    report["compile"] = bool(hp.compile)
    return report
