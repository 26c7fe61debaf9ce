"""Residual dropout as the LIMA paper trains with it (Zhou et al. 2023, section 3, after Ouyang et al. 2022).

Dropout on each decoder layer's residual branches, the attention and MLP outputs before they are added back to
the residual stream, at a rate rising linearly from 0 at the bottom layer to `top_rate` at the top one (the
paper: 0.2 for its 7B and 13B models, 0.3 for 65B). Only while training: in eval mode (validation, generation)
the branches pass through unchanged, and a rate of 0 leaves the model exactly as it was.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_rates(num_layers: int, top_rate: float) -> list[float]:
    """0 at the bottom layer, `top_rate` at the top one, linear in between."""
    if num_layers == 1:
        return [top_rate]
    return [top_rate * i / (num_layers - 1) for i in range(num_layers)]


def _dropout_hook(rate: float):
    def hook(module: torch.nn.Module, inputs, output):
        if not module.training or rate == 0.0:
            return output
        if isinstance(output, tuple):  # attention returns (output, weights)
            return (F.dropout(output[0], rate, training=True), *output[1:])
        return F.dropout(output, rate, training=True)

    return hook


def add_residual_dropout(model, top_rate: float) -> list[float]:
    """Hook dropout onto every decoder layer's attention and MLP output; returns the rate of each layer.

    `model`: a transformers causal LM (or a PEFT model around one) whose decoder layers have `self_attn` and
    `mlp` submodules (Llama, Mistral). Idempotent: a second call replaces the first one's hooks.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = base.get_decoder().layers
    rates = layer_rates(len(layers), top_rate)
    for layer, rate in zip(layers, rates, strict=True):
        for branch in (layer.self_attn, layer.mlp):
            for handle in getattr(branch, "_lima_residual_dropout", []):
                handle.remove()
            branch._lima_residual_dropout = [branch.register_forward_hook(_dropout_hook(rate))] if rate > 0 else []
    return rates
