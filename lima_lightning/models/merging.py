"""Merging a LoRA adapter into its base: one library for `export` and for predict's `generation.merge`.

An adapter trained with QLoRA learned to correct the *NF4* weights, not the original bf16 ones, so it is
merged onto those: the base is loaded in NF4 exactly as in training, each 4-bit weight is dequantized
(bitsandbytes' `dequantize_4bit`, through transformers' `model.dequantize`), then the LoRA update is added.
Merging onto the original bf16 base instead would shift every projection by the quantization error.
"""

from __future__ import annotations

import gc
import math

import torch


def dequantize_nf4(model, dtype: torch.dtype):
    """Replace each bitsandbytes Linear4bit by an nn.Linear holding its dequantized weight, cast to `dtype`.

    These are the weights every NF4 forward pass multiplied by in training (bnb dequantizes to the compute
    dtype, bf16, then multiplies), so an adapter merged onto them reproduces the QLoRA model.
    """
    import bitsandbytes as bnb

    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            # bnb repacks CPU weights at the first eval forward; dequantize_4bit does not read that layout.
            raise RuntimeError(f"{name}: NF4 weights were repacked for the CPU by a forward pass; dequantize a freshly loaded model")
    return model.dequantize(dtype=dtype)


MERGE_AUTO_SHARE = 0.75  # generation.merge=auto: the most of the GPU the NF4 base plus its merged copy may take


def merged_weight_bytes(model, dtype_bytes: int = 2) -> int:
    """Bytes of `model`'s weights once every NF4 layer is dequantized to a `dtype_bytes`-wide dtype."""
    total = 0
    for parameter in model.parameters():
        # bitsandbytes keeps the unpacked shape in the quant state; the packed tensor holds two weights per byte.
        shape = getattr(getattr(parameter, "quant_state", None), "shape", None)
        total += (math.prod(shape) if shape is not None else parameter.numel()) * dtype_bytes
    return total


def merged_copy_fits(base, device: torch.device) -> tuple[bool, str]:
    """Whether a bf16 merged copy of `base` fits beside it with room left for generation (predict's `auto`)."""
    if device.type != "cuda":
        return True, "on the CPU host memory is not planned for"
    from lima_lightning.memory import budget_bytes

    total = budget_bytes(device)  # --gpu_memory_gib, else the whole device
    # The copy is made while the loaded base is still allocated.
    need = torch.cuda.memory_allocated(device) + merged_weight_bytes(base, 2)
    verdict = need <= MERGE_AUTO_SHARE * total
    return verdict, f"base + bf16 copy {need / 2**30:.1f} GiB {'<=' if verdict else '>'} {MERGE_AUTO_SHARE:.0%} of {total / 2**30:.1f} GiB"


def decide_merge(setting: bool | str, base, device: torch.device) -> bool:
    """predict's `generation.merge`: true, false, or `auto` (logged: whether the merged copy fits, see above)."""
    from lightning.pytorch.utilities import rank_zero_info

    if setting != "auto":
        return bool(setting)
    merge, reason = merged_copy_fits(base, device)
    rank_zero_info(f"model.generation.merge=auto: {'merging' if merge else 'not merging'} ({reason})")
    return merge


def merge_into_base(base, adapter_path: str | None, base_name: str, dtype: torch.dtype):
    """A plain transformers model: `base` (NF4 weights dequantized first) with the adapter at `adapter_path` added in.

    Without `adapter_path` only the dequantization happens. Used by `export` and by predict's `generation.merge`.
    """
    from lima_lightning.models.loading import load_adapter

    if getattr(base, "is_loaded_in_4bit", False):
        base = dequantize_nf4(base, dtype)
        # The replaced 4-bit weights sit in reference cycles: without a collection they stay allocated (3.1 GiB
        # for 7B, measured on the H200) and shrink what generation can use for KV caches.
        gc.collect()
    # Cast the weights, not the buffers: RoPE's inv_freq is fp32 on purpose, and bf16 would shift every position.
    buffers = {name: b for name, b in base.named_buffers() if b.dtype == torch.float32}
    model = base.to(dtype)
    for name, buffer in buffers.items():
        module_name, _, attr = name.rpartition(".")
        model.get_submodule(module_name)._buffers[attr] = buffer  # keeps whether it is saved
    if adapter_path:
        # safe_merge checks the merged weights for NaN/inf before replacing the originals.
        model = load_adapter(model, adapter_path, base_name, trainable=False).merge_and_unload(safe_merge=True)
    model.config.use_cache = True  # training turned the KV cache off; a standalone model generates
    return model.eval()
