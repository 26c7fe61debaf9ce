"""A seeded tiny Llama and a Llama-like tokenizer, built in code: the demo and tests download nothing.

The tokenizer behaves like Llama-2's SentencePiece tokenizer where it matters here: `<unk>`=0,
`<s>`=1, `</s>`=2, a `▁` word-boundary prefix on each encoded piece of text, byte fallback for
anything outside its character vocabulary, BOS added by default, no pad token.
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from pathlib import Path

TINY_VERSION = "v3"  # bump when the recipe below changes, so cached copies are rebuilt
TINY_SEED = 1234
LM_HEAD_SCALE = 15.0


def tiny_model_dir() -> Path:
    """Build the tiny model once into the cache and return its directory (safe under concurrency)."""
    cache = Path(os.environ.get("LIMA_LIGHTNING_CACHE", Path.home() / ".cache" / "lima-lightning"))
    target = cache / f"tiny-llama-{TINY_VERSION}"
    if (target / "config.json").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=cache))
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(staging)
    model = build_tiny_model(len(tokenizer))
    # Once torch.distributed is initialized (DDP builds this on every rank), transformers >= 5 writes weights and
    # config on rank 0 only; each process here writes its own complete copy and renames it into place.
    model.should_save_on_this_rank = lambda is_main_process: True
    model.save_pretrained(staging)
    try:
        staging.rename(target)  # atomic: other processes see either nothing or a complete directory
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    chars = ["▁"] + [c for c in string.printable if c not in " \t\n\r\x0b\x0c"]
    vocab = {token: i for i, token in enumerate(specials + byte_tokens + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=4096)


def build_tiny_model(vocab_size: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=192,  # multiples of 32: bitsandbytes packs NF4 weights for the CPU in blocks of 32 rows
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in larger Llamas
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    # A random init with std 0.02 caps every logit near +-1.3 (|w_row| * |h| = 0.16 * 8), so no adapter
    # could make any token likely. A trained Llama's output rows are far longer; scaling them up gives
    # the frozen head the logit range a real base has, and the adapters something to steer.
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    return model
