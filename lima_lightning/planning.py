"""A training run's GPU memory and speed, predicted from its configuration alone (no weights, no GPU): `plan`.

The model is built on the meta device from its `config.json`, so its weight and adapter sizes are exact. What a
step keeps per token is a formula in the model's shapes (the tensors autograd saves in a Llama decoder layer with
LoRA on its projections), scaled by one factor measured on an H200: the memory probe's 7.63 MiB per token for
Llama-2-7B (QLoRA, r=64, LoRA dropout 0.05, eager; `benchmarks/RESULTS.md`). The result is a
`MemoryEstimate`, the kind `gradient_checkpointing: auto` builds from its probe at the start of a real run; the
run takes each quantity as the larger of its probe's and this one's, so it checkpoints at least the layers the
plan says. Compiled layers keep 15% less per token (measured for QLoRA and LoRA alike), which lowers the
predicted peak but not the decision (the run probes uncompiled).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from lima_lightning.memory import GIB, MemoryEstimate

# Measured on an H200 (benchmarks/RESULTS.md, "Memory model"): probe bytes per token of Llama-2-7B over the
# formula below, and compiled over eager peak activations (58.1 vs 67.6 GiB QLoRA, 66.9 vs 76.2 GiB LoRA).
ACTIVATION_SCALE = 0.718
COMPILED_ACTIVATIONS = 0.85
# Measured steady-state tokens/s on one H200 (Llama-2-7B shape, LIMA, 8192-token length-grouped micro-batches):
# (quantization, compiled) -> (no layer checkpointed, every layer checkpointed); None: not measured. bf16 compiled
# with every layer checkpointed: the LoRA config under a 24 GiB budget, median of 5 steps after compiling (S11-2).
MEASURED_TOKENS_PER_SECOND = {
    "H200": {("nf4", True): (14818, None), ("nf4", False): (10775, 7834), ("none", True): (16350, 8885), ("none", False): (10599, None)},
}
LIMA_TOKENS_PER_EPOCH = 701_115  # real tokens of LIMA's training split at max_seq_length 2048 (benchmarks/RESULTS.md)
# What a fit costs besides its training steps, measured through the CLI on an H200 (benchmarks/RESULTS.md, "Command
# to result"): once per run, startup (imports), data, loading and quantizing, the memory probe, the final save and
# the rest: 30.0-35.5 s (S7-4, S8-2, S11-1); at each epoch's end, validation, samples, the adapter and the
# checkpoint: 6.1-7.1 s (S8-2, S11-1); compiling the decoder layers, once: 50-80 s (S4-1, S6-3, S11-2).
FIT_FIXED_SECONDS = 32
FIT_SECONDS_PER_EPOCH_END = 7
COMPILE_SECONDS = 65


def nf4_bytes(numel: int) -> float:
    """Packed 4-bit weights plus double-quantized absmax (one 8-bit scale per 64 weights, an fp32 one per 256 scales)."""
    return numel * (0.5 + 1 / 64 + 4 / (64 * 256))


def layer_bytes_per_token(hidden: int, intermediate: int, dropout: bool) -> float:
    """Bytes a Llama decoder layer with LoRA on all seven projections saves for backward, per token (bf16 autocast).

    Two RMSNorms (their fp32 input and bf16 output: 6H each), the attention input and q, k, v before and after
    RoPE plus SDPA's output (20H), the MLP's gate, SiLU, up and product (4 x 2I) and its input (2H); with LoRA
    dropout each projection's branch also keeps its dropout mask and output (3 bytes per input element).
    """
    saved = 34 * hidden + 8 * intermediate
    if dropout:
        saved += 3 * (5 * hidden) + 3 * (hidden + intermediate)  # q, k, v, gate, up read H; o reads H; down reads I
    return ACTIVATION_SCALE * saved


def head_bytes_per_token(vocab: int) -> float:
    """The LM head and loss per trained token: bf16 logits, their fp32 copy, and cross-entropy's softmax."""
    return 10 * vocab


@dataclass(frozen=True)
class TrainingPlan:
    estimate: MemoryEstimate
    compiled_peak_bytes: float | None  # with compiled layers: what the run will peak at
    settings: dict

    @property
    def peak_bytes(self) -> float:
        return self.compiled_peak_bytes if self.compiled_peak_bytes is not None else self.estimate.predicted_peak_bytes

    def as_dict(self) -> dict:
        e = self.estimate
        return {
            "peak_gib": round(self.peak_bytes / GIB, 2),
            "checkpointed_layers": e.checkpointed_layers,
            "layers": e.num_layers,
            "fits": e.fits,
            "budget_gib": round(e.budget_bytes / GIB, 2),
            "max_tokens_per_micro_batch": e.max_tokens,
            "uncompiled_peak_gib": round(e.predicted_peak_bytes / GIB, 2),
            **self.settings,
        }


def lora_parameters(model: torch.nn.Module, targets: list[str], rank: int) -> int:
    """r x (in + out) for every Linear whose name ends in a target module name, as PEFT injects them."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            total += rank * (module.in_features + module.out_features)
    return total


def optimizer_bytes(parameters: int, dtype_bytes: int, optimizer: str) -> int:
    """As `optim.optimizer_state_bytes`, from a parameter count."""
    if optimizer.endswith("_8bit"):
        return 2 * parameters
    if optimizer == "paged_adamw_32bit":
        return 8 * parameters
    return 2 * parameters * dtype_bytes


def max_micro_batch_tokens(data) -> int:
    """The largest rows x width `data.batching` can produce (what the run's auto decision plans for)."""
    if data.batching == "padded":
        return data.batch_size * data.max_seq_length
    if data.batching == "packed":
        return max(1, data.max_tokens_per_batch // data.max_seq_length) * data.max_seq_length
    return data.max_tokens_per_batch


def shape_estimate(model_config, model_options, max_tokens: int, budget_bytes: float) -> tuple[MemoryEstimate, int]:
    """The step memory of `model_options` (the `model.*` options) on a model of `model_config`'s shapes, and the
    number of LoRA parameters it trains.

    Also the floor under a run's own probe (`memory.decide_checkpointing`): the probe's short rows can miss the
    branch of the peak that large micro-batches reach.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.bfloat16)
    decoder_linear = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2)
    other = sum(p.numel() for p in model.parameters()) - decoder_linear
    nf4 = model_options.quantization == "nf4"
    weights = nf4_bytes(decoder_linear) + 2 * other if nf4 else 2 * (decoder_linear + other)
    lora = lora_parameters(model, list(model_options.target_modules), model_options.lora_r)
    lora_dtype_bytes = 2 if model_options.lora_dtype == "bfloat16" else 4
    hidden, vocab = model_config.hidden_size, model_config.vocab_size
    intermediate = getattr(model_config, "intermediate_size", 4 * hidden)
    layers = model_config.num_hidden_layers
    per_layer = layer_bytes_per_token(hidden, intermediate, model_options.lora_dropout > 0)
    head = head_bytes_per_token(vocab) if not model_options.loss_chunk_size else 0.0
    head_chunk = 10 * vocab * model_options.loss_chunk_size  # chunked loss: one chunk's logits at a time
    estimate = MemoryEstimate(
        fixed_bytes=weights + 2 * lora * lora_dtype_bytes + head_chunk,  # weights, adapters and their gradients
        bytes_per_token=layers * per_layer + head,
        # Every layer's input (in host memory when offloaded), and then whichever is larger: the loss's logits, or
        # one layer recomputed in backward.
        checkpointed_bytes_per_token=(0 if model_options.offload_checkpoints else layers * 2 * hidden) + max(per_layer, head),
        num_layers=layers,
        optimizer_bytes=optimizer_bytes(lora, lora_dtype_bytes, model_options.optimizer),
        max_tokens=max_tokens,
        budget_bytes=budget_bytes,
    )
    return estimate, lora


def plan_training(model_config, model_options, data, budget_bytes: float) -> TrainingPlan:
    """The memory plan of `fit` with these `model.*` and `data.*` options, for `model_config` (a transformers config)."""
    estimate, lora = shape_estimate(model_config, model_options, max_micro_batch_tokens(data), budget_bytes)
    layers = estimate.num_layers
    fixed_layers = {True: layers, False: 0}.get(model_options.gradient_checkpointing)  # None: auto decides
    if fixed_layers is not None:
        estimate = replace(estimate, checkpointed_choice=fixed_layers)
    compiled = None
    if model_options.compile:
        k = estimate.checkpointed_layers
        activations = estimate.peak_bytes(k) - estimate.fixed_bytes - estimate.optimizer_bytes
        compiled = estimate.fixed_bytes + estimate.optimizer_bytes + COMPILED_ACTIVATIONS * activations
    settings = {
        "quantization": model_options.quantization,
        "compile": bool(model_options.compile),
        "offload_checkpoints": bool(model_options.offload_checkpoints),
        "lora_parameters": lora,
    }
    return TrainingPlan(estimate, compiled, settings)


def largest_fitting_tokens(plan: TrainingPlan, row_tokens: int) -> int | None:
    """The largest micro-batch (a multiple of `row_tokens`) that fits with every layer checkpointed, or None."""
    e = plan.estimate
    per_token = e.checkpointed_bytes_per_token
    room = (e.budget_bytes - e.SLACK_BYTES) / e.MARGIN - e.fixed_bytes - e.optimizer_bytes
    rows = math.floor(room / per_token / row_tokens) if room > 0 else 0
    return rows * row_tokens if rows >= 1 else None


def fit_seconds(epoch_s: float, epochs: int, compiled: bool) -> int:
    """Seconds from the command to `adapters/final` for `epochs` epochs of `epoch_s` each, with the measured fixed costs."""
    return round(FIT_FIXED_SECONDS + (COMPILE_SECONDS if compiled else 0) + epochs * (epoch_s + FIT_SECONDS_PER_EPOCH_END))


def speed_estimates(plan: TrainingPlan, epochs: int | None = None) -> list[dict]:
    """Tokens/s and LIMA epoch time on each GPU measured, interpolated in time per token between 0 and all layers;
    with `epochs`, also the whole fit's time from the command (`fit_s`). Empty for a plan that does not fit."""
    e, rows = plan.estimate, []
    if not e.fits:
        return rows
    key = (plan.settings["quantization"], plan.settings["compile"])
    for gpu, table in MEASURED_TOKENS_PER_SECOND.items():
        none, every = table.get(key, (None, None))
        k = e.checkpointed_layers
        if none is None or (k and every is None):
            rows.append({"gpu": gpu, "tokens_per_s": None, "epoch_s": None, "fit_s": None})
            continue
        seconds_per_token = 1 / none if not k else 1 / none + (k / e.num_layers) * (1 / every - 1 / none)
        epoch_s = LIMA_TOKENS_PER_EPOCH * seconds_per_token
        fit_s = fit_seconds(epoch_s, epochs, plan.settings["compile"]) if epochs else None
        rows.append({"gpu": gpu, "tokens_per_s": round(1 / seconds_per_token), "epoch_s": round(epoch_s), "fit_s": fit_s})
    return rows
