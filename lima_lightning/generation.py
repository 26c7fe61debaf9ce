"""Batched generation with the KV cache; each sequence stops at its own EOS.

A predict batch may hold more prompts than the GPU can keep KV caches for: it is generated in chunks of
consecutive rows whose caches fit (`plan_chunks`), computed from the memory budget and what is allocated
before generation, so the same setup always splits the same way (and the same seed gives the same samples).
Each chunk drops the left padding none of its rows needs: predict's batches come longest first, so the later
chunks' short prompts keep short caches and more of them fit at once (compiled decoding excepted: it keeps
one shape for every chunk, so that it compiles once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

from lima_lightning.decoding import cache_slots, decode, decodes_in_own_loop
from lima_lightning.memory import budget_bytes

GENERATION_MEMORY_FRACTION = 0.9  # of the memory budget; the rest is the allocator's and the CUDA context's slack


@dataclass(frozen=True)
class GenerationSettings:
    """How `predict`, `chat`, the samples callback and an export's `generation_config.json` generate.

    Args:
        max_new_tokens: Generation limit per prompt; a sequence that hits it ends with finish_reason `length`.
        do_sample: Sample (true) or decode greedily (false).
        temperature: Sampling temperature.
        top_k: Sample among the k most likely tokens only (0: all); 50 is transformers' default.
        top_p: Nucleus sampling threshold.
        seed: Seed for sampling, so the same run gives the same generations.
        cache: KV cache. `static`: allocated once per chunk of prompts (prompt + max_new_tokens per row), no
            copying while decoding, decoded by our own loop (`decoding`: transformers' tokens without its host work
            per step; sdpa and eager attention, others go through `generate`); `dynamic`: grows (and is copied)
            every step, through transformers' `generate`. Either way a predict batch is generated in as few chunks
            as fit the GPU's memory.
        merge: predict: merge the adapter into the base (bf16 on GPU, fp32 on CPU; an NF4 base is dequantized
            first, as `lima-lightning export` does) and generate with that: much faster from an NF4 base, whose
            4-bit matmuls are slow to generate with; needs the bf16 base's memory (~13 GB for 7B). Logits match the
            unmerged model to bf16 rounding, so samples can differ. `auto`: merge when the merged copy, made while
            the base is still loaded, takes at most 3/4 of the GPU (a 7B model: 24 GB GPUs and up).
        compile: torch.compile the decoding step with CUDA graphs (static cache; CUDA only, a bf16 base or merge:
            an NF4 base decodes uncompiled). The first batch compiles (about a minute for 7B).
        cuda_graphs: Replay each decoding step as one captured CUDA graph, uncompiled (static cache, CUDA): the
            same tokens with one launch per step instead of ~2,000, captured in milliseconds at each chunk's
            second step (`decode_graphs`). Off: every step launches its kernels one by one.
    """

    max_new_tokens: int = 500
    do_sample: bool = True
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.9
    seed: int = 0
    cache: Literal["dynamic", "static"] = "static"
    merge: bool | Literal["auto"] = False
    compile: bool = False
    cuda_graphs: bool = True

    def problems(self) -> list[str]:
        """Out-of-range values, each naming its option."""
        found = []
        if self.max_new_tokens < 1:
            found.append(f"model.generation.max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.do_sample and self.temperature <= 0:
            found.append(f"model.generation.temperature={self.temperature}: must be > 0 when sampling (do_sample: false for greedy)")
        if self.top_k < 0:
            found.append(f"model.generation.top_k={self.top_k}: must be >= 0 (0 samples among all tokens)")
        if self.do_sample and not 0 < self.top_p <= 1:
            found.append(f"model.generation.top_p={self.top_p}: must be in (0, 1]")
        return found


# Before 0.2 these were flat `model.*` options; an old config or command line gets one line naming the new key.
RENAMED_OPTIONS = {
    "max_new_tokens": "max_new_tokens",
    "do_sample": "do_sample",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "generation_cache": "cache",
    "merge_for_generation": "merge",
    "compile_generation": "compile",
}


def kv_cache_bytes_per_token(config, dtype_bytes: int) -> int:
    """Bytes of keys and values one token keeps in the cache, over all layers."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def generation_bytes_per_row(config, prompt_len: int, max_new_tokens: int, dtype_bytes: int) -> int:
    """Upper bound of one row's memory: its KV cache at full length (our loop's rounded length, or generate's prompt +
    max_new_tokens), its prefill activations, its logits."""
    cache = kv_cache_bytes_per_token(config, dtype_bytes) * max(prompt_len + max_new_tokens, cache_slots(prompt_len, max_new_tokens))
    intermediate = getattr(config, "intermediate_size", 4 * config.hidden_size)
    prefill = prompt_len * dtype_bytes * (4 * config.hidden_size + 3 * intermediate)
    logits = 4 * 4 * config.vocab_size  # fp32 logits and the sampler's sorted copies, one position per row
    return cache + prefill + logits


def rows_per_chunk(config, rows: int, prompt_len: int, max_new_tokens: int, dtype_bytes: int, budget_bytes: int | None) -> int:
    """How many rows of `prompt_len` tokens to generate together: all unless their caches would not fit `budget_bytes`."""
    if budget_bytes is None:
        return rows
    fit = budget_bytes // generation_bytes_per_row(config, prompt_len, max_new_tokens, dtype_bytes)
    if fit < 1:
        raise torch.cuda.OutOfMemoryError(
            f"generation: one prompt of {prompt_len} tokens plus max_new_tokens={max_new_tokens} needs more memory than is "
            f"free ({budget_bytes / 2**30:.1f} GiB); lower model.generation.max_new_tokens or data.max_seq_length"
        )
    return int(min(rows, fit))


def plan_chunks(config, prompt_lengths: list[int], max_new_tokens: int, dtype_bytes: int, budget_bytes: int | None) -> list[range]:
    """Consecutive runs of rows to generate together, each as long as its caches fit `budget_bytes`.

    A chunk's rows are padded to its longest prompt, so a row joins the chunk while (rows + 1) x the per-row
    memory at the chunk's longest prompt still fits. With a budget of None (CPU) every row goes in one chunk.
    """
    if not prompt_lengths:
        return []
    if budget_bytes is None:
        return [range(len(prompt_lengths))]
    chunks, start, longest = [], 0, 0
    for row, length in enumerate(prompt_lengths):
        rows_per_chunk(config, 1, length, max_new_tokens, dtype_bytes, budget_bytes)  # raises if one such row cannot fit
        longest = max(longest, length)
        if row > start and (row - start + 1) * generation_bytes_per_row(config, longest, max_new_tokens, dtype_bytes) > budget_bytes:
            chunks.append(range(start, row))  # this row starts the next chunk
            start, longest = row, length
    chunks.append(range(start, len(prompt_lengths)))
    return chunks


def generation_memory_budget(device: torch.device) -> int | None:
    """Bytes generation may use on `device`: a fixed share of the memory budget minus what is allocated now.

    The budget (`--gpu_memory_gib`, else the device's total) rather than free memory, so the chunking (and with
    it the samples) does not depend on what other processes hold. None on CPU: host memory is not planned for.
    """
    if device.type != "cuda":
        return None
    return max(0, int(budget_bytes(device) * GENERATION_MEMORY_FRACTION) - torch.cuda.memory_allocated(device))


class TokenCounter:
    """A transformers streamer that counts the new tokens of a batch as they are generated, for progress output.

    `generate` hands it the prompts once, then each step's next token of every row (finished rows repeat the pad
    id); `on_tokens(n)` gets the number of rows that produced a real token in the step.
    """

    def __init__(self, pad_id: int, on_tokens) -> None:
        self.pad_id, self.on_tokens, self.prompt_seen = pad_id, on_tokens, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call is the prompt itself
            self.prompt_seen = True
            return
        self.on_tokens(int((value != self.pad_id).sum()))

    def end(self) -> None:
        pass


@torch.no_grad()
def generate(
    model,
    tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    settings: GenerationSettings,
    progress=None,
    streamer=None,
) -> list[dict]:
    """Generate for a left-padded (B, T) batch; return response text, finish reason and new-token count per row.

    progress: an object with `tokens(n)` and `prompts(n)` (see `progress.GenerationProgress`), told as it goes.
    streamer: a transformers streamer that receives the tokens as they are generated (chat: one row only).
    """
    sampling = {"temperature": settings.temperature, "top_k": settings.top_k, "top_p": settings.top_p} if settings.do_sample else {}
    cache = "static" if settings.compile else settings.cache
    dtype_bytes = model.dtype.itemsize  # the KV cache is kept in the model's dtype
    budget = generation_memory_budget(input_ids.device)
    # Each row's width: its columns from its first real token on (all of it for a left-padded batch). Compiled
    # decoding keeps the batch's full width in every chunk instead: one shape, compiled once.
    full = input_ids.shape[1]
    widths = [full] * len(input_ids) if settings.compile else (full - attention_mask.int().argmax(1)).tolist()
    chunks = plan_chunks(model.config, widths, settings.max_new_tokens, dtype_bytes, budget)
    if len(chunks) > 1:
        sizes = sorted({len(c) for c in chunks})
        rank_zero_info(
            f"generation: {len(input_ids)} prompts in {len(chunks)} chunks of {sizes[0]}-{sizes[-1]} rows: their KV caches "
            f"would not fit the {budget / 2**30:.1f} GiB left for generation together"
        )
    results, eos, pad = [], tokenizer.eos_token_id, tokenizer.pad_token_id
    for rows in chunks:
        first = full - max(widths[rows.start : rows.stop])  # padding columns no row of the chunk uses
        chunk_ids, chunk_mask = input_ids[rows.start : rows.stop, first:], attention_mask[rows.start : rows.stop, first:]
        if uses_own_loop(model, settings):
            on_tokens = progress.tokens if progress is not None else None
            graphs = uses_cuda_graphs(settings, input_ids.device)
            new_ids = decode(model, chunk_ids, chunk_mask, settings, eos, pad, graphs=graphs, on_tokens=on_tokens, streamer=streamer)
        else:
            size_static_cache_to_this_call(model)
            output = model.generate(
                input_ids=chunk_ids,
                attention_mask=chunk_mask,
                max_new_tokens=settings.max_new_tokens,
                do_sample=settings.do_sample,
                eos_token_id=eos,
                pad_token_id=pad,
                use_cache=True,
                cache_implementation=cache,
                disable_compile=not settings.compile,  # transformers compiles static-cache decoding on CUDA by itself
                streamer=streamer or (TokenCounter(pad, progress.tokens) if progress is not None else None),
                **sampling,
            )
            new_ids = output[:, chunk_ids.shape[1] :]
        completed = [describe_completion(row, tokenizer) for row in new_ids.tolist()]
        if progress is not None:
            progress.prompts(len(completed))
        results += completed
    return results


def uses_own_loop(model, settings: GenerationSettings) -> bool:
    """`decoding.decode` rather than transformers' `generate`: a static cache, uncompiled, an attention it masks."""
    return settings.cache == "static" and not settings.compile and decodes_in_own_loop(model)


def uses_cuda_graphs(settings: GenerationSettings, device: torch.device) -> bool:
    """Decoding steps replayed as CUDA graphs (in the own loop): on CUDA with a static cache, unless compiled."""
    return settings.cuda_graphs and not settings.compile and settings.cache == "static" and device.type == "cuda"


def size_static_cache_to_this_call(model) -> None:
    """Make transformers size the next static cache for the coming call alone.

    transformers remembers the longest static cache a model has generated with and makes every later one at least
    that long, so that compiled decoding keeps one shape. Uncompiled chunks of short prompts would then get the
    first, longest chunk's cache: planned for 9.0 GiB, a 24 GiB run ran out of memory in its second chunk.
    """
    for module in model.modules():  # the attribute sits on the transformers model inside any PEFT wrapper
        module.__dict__.pop("_previous_max_cache_length", None)


def describe_completion(new_ids: list[int], tokenizer) -> dict:
    """`eos` if the sequence produced EOS (counted in `new_tokens`), else `length`; text excludes EOS and padding."""
    eos = tokenizer.eos_token_id
    if eos in new_ids:
        end = new_ids.index(eos)
        return {"response": tokenizer.decode(new_ids[:end], skip_special_tokens=True), "finish_reason": "eos", "new_tokens": end + 1}
    return {"response": tokenizer.decode(new_ids, skip_special_tokens=True), "finish_reason": "length", "new_tokens": len(new_ids)}
