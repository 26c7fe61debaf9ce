"""Batched generation with the KV cache; each sequence stops at its own EOS."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 500
    do_sample: bool = True
    temperature: float = 0.8
    top_p: float = 0.9


@torch.no_grad()
def generate(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, settings: GenerationSettings) -> list[dict]:
    """Generate for a left-padded (B, T) batch; return response text, finish reason and new-token count per row."""
    sampling = {"temperature": settings.temperature, "top_p": settings.top_p} if settings.do_sample else {}
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        **sampling,
    )
    new_tokens = output[:, input_ids.shape[1] :].tolist()
    return [describe_completion(row, tokenizer) for row in new_tokens]


def describe_completion(new_ids: list[int], tokenizer) -> dict:
    """`eos` if the sequence produced EOS (counted in `new_tokens`), else `length`; text excludes EOS and padding."""
    eos = tokenizer.eos_token_id
    if eos in new_ids:
        end = new_ids.index(eos)
        return {"response": tokenizer.decode(new_ids[:end], skip_special_tokens=True), "finish_reason": "eos", "new_tokens": end + 1}
    return {"response": tokenizer.decode(new_ids, skip_special_tokens=True), "finish_reason": "length", "new_tokens": len(new_ids)}
