"""Training-speed settings applied to the loaded LoRA model at the start of `fit`.

`configure_for_training` is called from `LIMALoRAModule.configure_model` and is idempotent, so one loaded
model can be trained under several settings (the benchmark does that). It sets, in this order:

1. the attention kernel (`sdpa`, or `flex_attention` on CUDA: it skips the blocks that packed rows mask out),
2. the adapter dtype (bf16 adapters halve adapter, gradient and AdamW-state memory; fp32 is the default),
3. gradient checkpointing: on, off, or `auto`: as many decoder layers as the largest micro-batch the data module
   will produce needs to fit the memory budget, measured on this GPU (see `lima_lightning.memory`); with
   `offload_checkpoints` the checkpointed layers' inputs wait in host memory,
4. torch.compile of each decoder layer (regional compilation: every layer after the first, whose input
   needs no gradient, shares one compiled graph).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


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


def set_gradient_checkpointing(model, layers: bool | int, offload: bool = False) -> None:
    """Non-reentrant checkpointing of the first `layers` decoder layers (True: all, False or 0: none).

    Non-reentrant needs no input gradients, so the embeddings stay frozen. Each checkpointed layer keeps only its
    input for backward and recomputes the rest; the others keep their activations and skip the recompute. With
    `offload`, that input waits in pinned host memory (`inputs_on_host`).
    """
    # The gradient_* names exist in every transformers we support; newer ones alias them (with a FutureWarning)
    # to activation_checkpointing_*.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if layers:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
    decoder_layers = model.get_decoder().layers
    count = len(decoder_layers) if layers is True else int(layers)
    for index, layer in enumerate(decoder_layers):
        layer.gradient_checkpointing = bool(layers) and index < count
        if layer.gradient_checkpointing and offload:  # enable() has just set a fresh function: wrapped once
            layer._gradient_checkpointing_func = inputs_on_host(layer._gradient_checkpointing_func)


def inputs_on_host(checkpoint: Callable) -> Callable:
    """`checkpoint` with the layer input it keeps for backward held in pinned host memory instead of on the GPU.

    A non-reentrant checkpoint saves its inputs (the hidden states, 2 bytes x hidden per token: 16 MiB per layer
    for a 2048-token row of Llama-2-7B) through autograd's saved-tensor hooks before it installs its own for the
    layer's inside, so `SavedOnHost` here moves exactly those inputs: a copy out in forward and back before the
    layer is recomputed in backward. The recompute, its gradients and every other layer are unchanged.
    """

    @functools.wraps(checkpoint)
    def checkpoint_with_input_on_host(function, *args, **kwargs):
        with SavedOnHost():
            return checkpoint(function, *args, **kwargs)

    checkpoint_with_input_on_host.offloads_input = True
    return checkpoint_with_input_on_host


class SavedOnHost(torch.autograd.graph.saved_tensors_hooks):
    """Tensors saved for backward wait in pinned host memory; both copies are queued on the current stream.

    This is `torch.autograd.graph.save_on_cpu(pin_memory=True)` as torch 2.13 has it (pytorch#175421). In torch 2.11
    its copy out waits for the GPU, one host-device synchronization per tensor (S12-2 measured 32 more per
    micro-batch), which stops the host from queueing the next layer's kernels ahead of the GPU. Queued copies are
    safe: the GPU tensor is not reused until the copy has run (the caching allocator orders its reuse after it on
    the same stream), the pinned buffer is not reused until the copy back has run (the caching host allocator
    records an event for it), and the copy back is queued after the copy out on the same stream.
    """

    def __init__(self) -> None:
        super().__init__(self.pack, self.unpack)

    @staticmethod
    def pack(tensor: torch.Tensor) -> tuple[torch.device, torch.Tensor]:
        if tensor.device.type != "cuda":
            return tensor.device, tensor
        packed = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=True)
        packed.copy_(tensor, non_blocking=True)
        return tensor.device, packed

    @staticmethod
    def unpack(packed: tuple[torch.device, torch.Tensor]) -> torch.Tensor:
        device, tensor = packed
        return tensor.to(device, non_blocking=True)


def offloaded_layer_count(model) -> int:
    """Decoder layers whose checkpointed input waits in host memory."""
    layers = model.get_decoder().layers
    return sum(getattr(layer, "gradient_checkpointing", False) and _offloads(layer) for layer in layers)


def _offloads(layer) -> bool:
    return getattr(getattr(layer, "_gradient_checkpointing_func", None), "offloads_input", False)


def checkpointed_layer_count(model) -> int:
    return sum(bool(getattr(layer, "gradient_checkpointing", False)) for layer in model.get_decoder().layers)


def compile_decoder_layers(model, backend: str = "inductor") -> None:
    """torch.compile each decoder layer in place; identical layers reuse one graph, so a 32-layer model compiles
    once, not 32 times (once more for checkpointed layers when only some are).

    The embeddings' output is made to require a gradient, so that the first layer's input is like every other
    layer's (without it the first layer is a graph of its own, compiled a second time); the extra backward work
    is one input gradient of the first layer. dynamic=True: token-budget batches change both rows and width
    every step; one graph with symbolic shapes instead of a static first compile and recompiles as each
    dimension is seen to vary.
    """
    model.enable_input_require_grads()
    for layer in model.get_decoder().layers:
        if not getattr(layer, "_lima_compiled", False):
            layer.compile(backend=backend, dynamic=True)
            layer._lima_compiled = True


def layers_compiled(model) -> bool:
    return any(getattr(layer, "_lima_compiled", False) for layer in model.get_decoder().layers)


def packed_rows_mask(model, batch: dict) -> torch.Tensor | None:
    """The attention mask transformers would build from a packed batch's `position_ids`, where it would build none.

    With sdpa, transformers passes no mask for a batch whose rows show no position restart (a packed row that
    holds one conversation: plain causal attention) and a block-diagonal one otherwise. Compiled layers see that
    as two different inputs and compile a second graph (~19 s on the H200, S13-1's `TORCH_LOGS=recompiles`); about
    20% of LIMA's packed rows hold one conversation. Built here with `allow_is_causal_skip=False`, every packed batch
    brings a mask, which the model uses as given: the same attention, one graph. Its cost: those rows attend through
    the masked kernel instead of the causal one. None (transformers decides) for unpacked batches, whose rows never
    need a mask, uncompiled layers, and the other attention kernels, which always get one.
    """
    if not (batch.get("packed") and model.config._attn_implementation == "sdpa" and layers_compiled(model)):
        return None
    from transformers.masking_utils import create_causal_mask

    # Only the shape, dtype and device of the embeddings are read.
    position_ids = batch["position_ids"]
    dtype = model.get_input_embeddings().weight.dtype
    shape_only = torch.empty((*position_ids.shape, 0), dtype=dtype, device=position_ids.device)
    return create_causal_mask(model.config, shape_only, None, None, position_ids, allow_is_causal_skip=False)


def configure_for_training(module, device: torch.device, max_tokens: int | None, compile_backend: str = "inductor") -> dict:
    """Apply the module's speed settings to `module.model` (see the module docstring); returns what was chosen."""
    from lima_lightning.memory import decide_checkpointing

    hp = module.hparams
    base = module.model.get_base_model()
    report: dict = {"attn_implementation": set_attention(base, hp.attn_implementation, device)}
    cast_adapters(module.model, getattr(torch, hp.lora_dtype))
    checkpointing, estimate = hp.gradient_checkpointing, None
    if checkpointing == "auto":
        checkpointing, estimate, reason = decide_checkpointing(module, device, max_tokens)
        rank_zero_info(f"model.gradient_checkpointing={reason}")
    offload = hp.offload_checkpoints and device.type == "cuda"
    if hp.offload_checkpoints and not offload:
        rank_zero_info("model.offload_checkpoints=true: off on CPU, where there is no GPU memory to free")
    set_gradient_checkpointing(base, checkpointing, offload)
    layers = checkpointed_layer_count(base)
    report.update(gradient_checkpointing=layers > 0, checkpointed_layers=layers, offloaded_layers=offloaded_layer_count(base))
    report["memory_estimate"] = estimate.as_dict() if estimate else None
    if hp.compile:
        compile_decoder_layers(base, compile_backend)
    report["compile"] = bool(hp.compile)
    return report
