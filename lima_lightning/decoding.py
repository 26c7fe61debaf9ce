"""Decoding against a static KV cache in a loop of our own: transformers' tokens without its host work per step.

`generate` does its host work on every step of a 7B model (preparing inputs, building the 4D mask, the
sampler, the stop check) between the GPU's steps. Here a step is the model's forward (replayed from
`decode_graphs` on CUDA), a few sampling kernels and three in-place updates, queued without waiting on the GPU;
the host reads "all rows finished?" after the first step and then every `STOP_CHECK_EVERY` steps. Measured on an
H200 this did not shorten predict's step (the GPU, not the host, was the bound: benchmarks/RESULTS.md, S8); the
loop stays because it owns the cache (each chunk's length, rounded below) and is no slower.

It computes what `generate` computes: the same positions (a left-padded row counts from its first real token),
the same mask (each row's real prompt tokens and every token generated so far), logits in float32, the
temperature, top-k and top-p warpers of transformers, `torch.multinomial` on the same generator, and a row
padded after its EOS. So a seed gives the same tokens (tests/test_decoding.py against `generate`, CPU and GPU).
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from transformers import LogitsProcessorList, StaticCache, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from lima_lightning.decode_graphs import graphed_decoding

# The attention implementations whose 4D mask this loop builds (sdpa: True where a key is attended; eager: 0 there
# and the dtype's minimum elsewhere, added to the scores). Others (flex, flash) decode through `generate`.
MASK_VALUES = {"sdpa": (True, False), "eager": (0.0, None)}
STOP_CHECK_EVERY = 8  # steps between host reads of the finished rows: at most 7 steps of padding run past the end
# Cache lengths are rounded up to a multiple of this. cuDNN's attention builds (and compiles, ~1 s each) a kernel for
# every alignment of the key length it meets: predict's chunks at 24 GiB had 3 alignments among 10 lengths and paid
# ~4 s of compiles in two chunks (benchmarks/RESULTS.md). 16 slots cover the widest alignment, 16 bytes of the
# mask's row; the extra slots are never attended.
CACHE_SLOT_MULTIPLE = 16


def cache_slots(prompt_width: int, max_new_tokens: int) -> int:
    """Length of the static cache for a chunk of prompts `prompt_width` wide: every position fed to the model (the
    last new token is never fed back), rounded up to CACHE_SLOT_MULTIPLE."""
    needed = prompt_width + max_new_tokens - 1
    return -(-needed // CACHE_SLOT_MULTIPLE) * CACHE_SLOT_MULTIPLE


def decodes_in_own_loop(model) -> bool:
    """Whether `decode` can run `model`: its attention implementation is one whose mask it builds."""
    return getattr(model.config, "_attn_implementation", None) in MASK_VALUES


def token_chooser(settings):
    """`logits (B, V) float32 -> tokens (B,)`: argmax, or transformers' warpers then one multinomial draw."""
    if not settings.do_sample:
        return lambda logits: logits.argmax(-1)
    warpers = LogitsProcessorList()
    if settings.temperature != 1.0:  # the order transformers applies them in
        warpers.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k:
        warpers.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1.0:
        warpers.append(TopPLogitsWarper(settings.top_p))
    return lambda logits: torch.multinomial(torch.softmax(warpers(None, logits), dim=-1), num_samples=1).squeeze(1)


@torch.no_grad()
def decode(model, input_ids, attention_mask, settings, eos_token_id, pad_token_id, graphs=False, on_tokens=None, streamer=None):
    """New tokens for a left-padded (B, T) batch: (B, n <= max_new_tokens), each row padded after its EOS.

    graphs: replay the decoding steps as CUDA graphs (`decode_graphs`). on_tokens(n): told the number of real
    tokens generated, every few steps. streamer: a transformers streamer, given the prompt and then every step's
    tokens (chat; it reads each step on the host).
    """
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    rows, width = input_ids.shape
    steps = settings.max_new_tokens
    cache_length = cache_slots(width, steps)
    forward_parameters = inspect.signature(target.forward).parameters
    extra = {"cache" if "cache" in forward_parameters else "past_key_values": StaticCache(config=target.config, max_cache_len=cache_length)}
    if "logits_to_keep" in forward_parameters:
        extra["logits_to_keep"] = 1  # the last position's logits only, as generate asks for
    attend, blocked = MASK_VALUES[target.config._attn_implementation]
    mask_dtype = torch.bool if attend is True else target.get_input_embeddings().weight.dtype
    blocked = torch.finfo(mask_dtype).min if blocked is None else blocked
    mask = torch.full((rows, 1, 1, cache_length), blocked, dtype=mask_dtype, device=input_ids.device)
    mask[:, 0, 0, :width].masked_fill_(attention_mask.bool(), attend)
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill_(attention_mask == 0, 0)
    choose = token_chooser(settings)
    tokens = torch.full((rows, steps), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    finished = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
    generated = torch.zeros((), dtype=torch.long, device=input_ids.device)  # real tokens so far, read at each check
    told = 0
    if streamer is not None:
        streamer.put(input_ids.cpu())
    with graphed_decoding(model) if graphs else contextlib.nullcontext():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True, **extra).logits
        step_ids, step_positions = torch.empty_like(input_ids[:, :1]), positions[:, -1:].clone()
        for step in range(steps):
            chosen = choose(logits[:, -1].float()).masked_fill_(finished, pad_token_id)
            generated += (~finished).sum()
            tokens[:, step] = chosen
            if eos_token_id is not None:
                finished |= chosen == eos_token_id
            if streamer is not None:
                streamer.put(chosen.cpu())
            last = step == steps - 1
            if last or step == 0 or (step + 1) % STOP_CHECK_EVERY == 0:  # step 0: rows that answer EOS at once
                if on_tokens is not None:
                    total = int(generated)
                    on_tokens(total - told)
                    told = total
                if last or bool(finished.all()):
                    break
            # The next step: this token in, one position on, its cache slot attended.
            step_ids.copy_(chosen[:, None])
            step_positions += 1
            mask[:, 0, 0, width + step] = attend
            logits = model(input_ids=step_ids, attention_mask=mask, position_ids=step_positions, use_cache=True, **extra).logits
    if streamer is not None:
        streamer.end()
    return tokens[:, : step + 1]
