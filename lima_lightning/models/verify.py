"""How far apart two models' logits are on the same prompts: the check behind every export.

`export` merges an adapter into its base and `export --format gguf` then rewrites the merged weights
in llama.cpp's format; each step should change the logits only by rounding. This measures by how much:

    max_logit_difference(merged, adapter_model, prompts)                 # largest |a - b| over all logits
    max_logit_difference(merged, adapter_model, prompts, relative=True)  # the same / largest |b|

The relative figure is the one to put a bound on when the model size changes: a 7B model's logits
span about +-20, a tiny test model's +-2, and rounding errors grow with the logits they round.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def as_prompts(input_ids: torch.Tensor | Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """`input_ids` as a list of 1-D id tensors.

    A 2-D tensor is a batch of equal-length prompts; a 1-D tensor is one prompt; a list of id lists may hold
    prompts of different lengths. Each is run on its own, so no padding or attention mask is involved.
    """
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            return [input_ids.long()]
        if input_ids.dim() == 2:
            return [row.long() for row in input_ids]
        raise ValueError(f"input_ids: expected 1 or 2 dimensions, got shape {tuple(input_ids.shape)}")
    prompts = [torch.as_tensor(ids, dtype=torch.long) for ids in input_ids]
    if not prompts or any(p.dim() != 1 or p.numel() == 0 for p in prompts):
        raise ValueError("input_ids: expected one or more non-empty id sequences")
    return prompts


@torch.no_grad()
def prompt_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """(seq, vocab) float32 logits of `model` on one prompt, on the CPU, computed on the model's own device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # dropout off: LoRA dropout would otherwise make two identical models differ
    _keep_nf4_layers_in_train_mode(model)
    try:
        logits = model(input_ids=ids[None].to(device), use_cache=False).logits[0]
    finally:
        model.train(was_training)
    return logits.float().cpu()


def max_logit_difference(model_a, model_b, input_ids: torch.Tensor | Sequence[Sequence[int]], *, relative: bool = False) -> float:
    """Largest |logit_a - logit_b| over every position of every prompt; with `relative`, divided by the largest |logit_b|.

    `model_b` is the reference (the adapter model, or the merged model a GGUF was written from). Logits are
    compared in float32 whatever the models compute in. Non-finite logits in either model give `inf`, so a
    NaN can never pass a `difference <= bound` check (NaN compares false to everything).

    Measured on the tiny Llama of tests/test_verify.py (LoRA r=8, lora_B ~ N(0, 0.05) on all seven projections,
    logits up to +-10.7, two prompts of 37 and 5 tokens), merged vs adapter model: fp32 5.0e-6 abs (4.7e-7
    relative); bf16 7.0e-2 abs (7.4e-3 relative), as the merged weight W + BA is rounded to bf16 once more
    than the adapter model's separate W and BA. The base without its adapter: 1.0 relative.
    """
    worst, scale = 0.0, 0.0
    for ids in as_prompts(input_ids):
        a, b = prompt_logits(model_a, ids), prompt_logits(model_b, ids)
        if a.shape != b.shape:
            raise ValueError(f"the models' logits differ in shape: {tuple(a.shape)} vs {tuple(b.shape)} (different vocabularies?)")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            return float("inf")
        worst = max(worst, (a - b).abs().max().item())
        scale = max(scale, b.abs().max().item())
    if not relative:
        return worst
    return worst / scale if scale > 0 else (0.0 if worst == 0 else float("inf"))


def _keep_nf4_layers_in_train_mode(model) -> None:
    """bitsandbytes repacks a CPU NF4 weight at its first eval-mode forward into a layout that dequantizing can no
    longer read (export merges right after its check); in train mode the layer computes the same product."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.train()


# merged vs adapter model, relative (see max_logit_difference): measured 4.7e-7 (fp32) and 7.4e-3 (bf16) on the tiny
# Llama of tests/test_verify.py; the bounds leave room for larger models. Not yet measured on a 7B model.
MERGE_BOUNDS = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
CHECK_PROMPTS = (
    ("What is the capital of France?",),
    ("Write a haiku about the sea.",),
    ("Name a prime number.", "Seven is a prime number.", "And one more?"),
)


def check_prompts(tokenizer, template: str) -> list[list[int]]:
    """A few prompts as `predict` encodes them with `template`: what export compares its models on."""
    from lima_lightning.data.conversations import Conversation
    from lima_lightning.data.tokenization import encode_prompt

    return [encode_prompt(Conversation(turns, where="export check"), tokenizer, template) for turns in CHECK_PROMPTS]


def logits_on(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    return [prompt_logits(model, torch.tensor(ids)) for ids in prompts]


def relative_difference(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """max |got - expected| / max |expected| over all prompts; inf if any logit is not finite."""
    if not all(torch.isfinite(t).all() for t in (*got, *expected)):
        return float("inf")
    worst = max((g - e).abs().max().item() for g, e in zip(got, expected, strict=True))
    scale = max(e.abs().max().item() for e in expected)
    return worst / scale if scale > 0 else (0.0 if worst == 0 else float("inf"))
