"""Several devices through Lightning's own strategies: `--trainer.devices=N --trainer.strategy=ddp` (or `fsdp`).

What a frozen base + LoRA needs beyond what Lightning does by itself:

- **Data**: `data/sampling.py` gives each rank its micro-batches (the same per optimizer step as on one device).
- **Loss**: `loss.scale_grads` divides by the trained-token count all-reduced over the devices, so the loss is
  a token-weighted mean over all of them (a device with more trained tokens weighs more).
- **FSDP**: `prepare_fsdp` fills in, when the user has not set them, what `FSDPStrategy` needs for a frozen
  (NF4 or bf16) base with trainable LoRA weights: an auto-wrap policy (one unit per decoder layer, one per
  LoRA weight, so no flat parameter mixes frozen bf16 with trainable fp32), no FSDP dtype casts (autocast
  computes in bf16, as under DDP), and FSDP's activation checkpointing in place of transformers' own. The NF4
  weights are stored as bf16 (`bnb_4bit_quant_storage`) so FSDP can shard them; see `fsdp_quant_storage`.
  Only the root FSDP module can clip by the total norm (`clip_gradients`).
- **Writing once**: helpers never call collectives from one rank only (`Trainer.log_dir` broadcasts, so the
  callbacks resolve the run dir without it); under FSDP, gathering the adapter is a collective on all ranks;
  `gather_rows` brings every rank's predictions to rank 0 (Lightning shards the prompts without repeats).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Wrapper prefixes FSDP and activation checkpointing put into parameter names; state dicts leave them out.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


# ----------------------------------------------------------------------------- strategies
def is_fsdp(strategy) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy)


def fsdp_quant_storage(strategy) -> torch.dtype | None:
    """The dtype NF4 weights are packed into: bf16 under FSDP, so they shard like the bf16 weights around them.

    FSDP flattens each unit's parameters into one tensor of one (floating) dtype; bitsandbytes' default uint8
    packing would not flatten with a decoder layer's bf16 norms. The bytes are the same either way.
    """
    return torch.bfloat16 if is_fsdp(strategy) else None


def decoder_layer_classes(model: torch.nn.Module) -> tuple[type, ...]:
    """The model's transformer block classes (transformers lists them in `_no_split_modules`), e.g. LlamaDecoderLayer."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    classes = tuple({type(m) for m in model.modules() if type(m).__name__ in names})
    if not classes:
        raise ValueError(f"{type(model).__name__} names no transformer block class in _no_split_modules; FSDP cannot wrap it by layer")
    return classes


def lora_fsdp_wrap_policy(layer_classes: tuple[type, ...]) -> Callable:
    """FSDP units: every decoder layer, and every leaf with a trainable weight (each LoRA A and B) on its own.

    A unit's parameters become one flat tensor, which must have one dtype (and, without use_orig_params, one
    requires_grad): the frozen base of a layer (bf16, or NF4 stored as bf16) and its fp32 LoRA weights cannot
    share one. This is the policy of llama-recipes and PEFT's `fsdp_auto_wrap_policy`.
    """
    from functools import partial

    from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy

    def trainable_leaf(module: torch.nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        return next(module.children(), None) is None and isinstance(weight, torch.Tensor) and weight.requires_grad

    return partial(
        _or_policy,
        policies=[
            partial(lambda_auto_wrap_policy, lambda_fn=trainable_leaf),
            partial(transformer_auto_wrap_policy, transformer_layer_cls=set(layer_classes)),
        ],
    )


def prepare_fsdp(strategy, model: torch.nn.Module) -> None:
    """Under FSDPStrategy: set what a frozen base + LoRA needs, unless the user configured it; else do nothing.

    Runs in `configure_model`, after the model exists and before Lightning wraps it. Idempotent.
    - `auto_wrap_policy`: `lora_fsdp_wrap_policy` (without one FSDP makes the whole model one flat tensor).
    - `mixed_precision`: none, i.e. FSDP casts nothing. Lightning's bf16 default would also cast buffers (RoPE's
      inv_freq) to bf16; autocast already runs the matmuls in bf16, and LoRA weights stay fp32, as under DDP.
    - activation checkpointing: transformers' own (inside each layer) is turned off and FSDP's checkpoint
      wrapper put around each decoder layer instead, the combination torch documents for FSDP.
    """
    if not is_fsdp(strategy):
        return
    from torch.distributed.fsdp import MixedPrecision

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_classes = decoder_layer_classes(base)
    if "auto_wrap_policy" not in strategy.kwargs:
        strategy.kwargs["auto_wrap_policy"] = lora_fsdp_wrap_policy(layer_classes)
    if strategy.mixed_precision is None:
        strategy.mixed_precision = MixedPrecision()
    checkpointed = [layer for layer in base.get_decoder().layers if getattr(layer, "gradient_checkpointing", False)]
    if checkpointed:
        from lima_lightning.models.speed import set_gradient_checkpointing

        set_gradient_checkpointing(base, False)
        # The same layers, wrapped by FSDP instead. Lightning applies these after wrapping
        # (FSDPStrategy._setup_model); a private attribute of 2.6.
        if not strategy._activation_checkpointing_kwargs:
            chosen = {id(layer) for layer in checkpointed}
            strategy._activation_checkpointing_kwargs = {"check_fn": lambda module: id(module) in chosen}


def clean_param_name(name: str) -> str:
    """A parameter name as state dicts spell it, without FSDP, activation-checkpointing or compile wrappers."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def clip_gradients(module, optimizer, gradient_clip_val, gradient_clip_algorithm) -> None:
    """Lightning's gradient clipping, except by the total norm under FSDP, which only the root FSDP module can do.

    Each rank holds a shard of the gradient there (Lightning's own norm clipping refuses FSDP); a collective,
    like every hook under FSDP.
    """
    if gradient_clip_val and is_fsdp(module.trainer.strategy) and gradient_clip_algorithm in (None, "norm"):
        module.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
        return
    module.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm)


def global_grad_norm(grads: list[torch.Tensor], strategy) -> torch.Tensor:
    """L2 norm of the gradient over all devices: under FSDP each rank holds a shard of it, under DDP all of it."""
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    if is_fsdp(strategy):
        norm = strategy.reduce(norm.float() ** 2, reduce_op="sum") ** 0.5
    return norm


def gather_adapter_state(trainer, pl_module) -> dict[str, torch.Tensor] | None:
    """Under FSDP: the full trainable weights on rank 0 (PeftModel names), others get {}; a collective: call it on
    every rank. Otherwise None: every rank holds the whole adapter and `save_pretrained` reads it directly."""
    if not is_fsdp(trainer.strategy):
        return None
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # The full state dict, gathered unit by unit and offloaded to CPU on rank 0 only (whatever
    # `state_dict_type` the strategy checkpoints with). It holds the frozen base too, as a `full` checkpoint
    # does; only the trainable weights are kept.
    root = trainer.strategy.model
    with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
        state = root.state_dict()
    return adapter_state_from_full(state, pl_module.trainable_parameter_names())


def adapter_state_from_full(state: dict[str, torch.Tensor], trainable: set[str]) -> dict[str, torch.Tensor]:
    """The trainable entries of a LightningModule state dict, named as the PeftModel (`self.model`) names them."""
    prefix = "model."  # the LightningModule's attribute holding the PeftModel
    return {k[len(prefix) :]: v for k, v in state.items() if k in trainable and k.startswith(prefix)}


def gather_rows(rows: list, trainer) -> list:
    """Every rank's rows, concatenated in rank order, on every rank; `rows` itself on a single process."""
    if trainer.world_size == 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return list(rows)
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, list(rows))
    return [row for part in parts for row in part]
