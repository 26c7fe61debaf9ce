"""The tokenizer half of a GGUF file (`gguf_export.write_gguf`): llama.cpp's `llama` tokenizer model.

    add_tokenizer_metadata(writer, tokenizer, model.config.vocab_size, chat_template=None)

Tokens, scores and token types come from the SentencePiece `tokenizer.model` the tokenizer was loaded from,
exactly as llama.cpp's `convert_hf_to_gguf.py` reads it, or, where that file is gone (transformers >= 5
saves only tokenizer.json), from a Llama-style tokenizer.json with scores derived from its merge ranks.
Then the BOS/EOS/UNK/pad ids, whether to add BOS/EOS, and a chat template (`LLAMA2_CHAT_TEMPLATE` unless
the tokenizer has one) so that chat front ends format prompts the way the model was trained.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lima_lightning.errors import UserError

# Meta's Llama-2 chat format, written exactly as lima_lightning/data/templates.py and tokenization.py build
# training examples: BOS before every user turn, the system prompt inside the first, EOS after each answer.
# Without a template in the file, llama.cpp's chat mode falls back to ChatML, which this model never saw.
LLAMA2_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] | trim -%}{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- bos_token + '[INST] ' -}}"
    "{%- if loop.first and system -%}{{- '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' -}}{%- endif -%}"
    "{{- message['content'] | trim + ' [/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ' + message['content'] | trim + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _sentencepiece_file(tokenizer) -> Path | None:
    """The SentencePiece `tokenizer.model` the tokenizer was loaded from, if it still exists.

    transformers >= 5 saves only tokenizer.json, so a tokenizer loaded from a fit run's adapters/ has none.
    """
    source_dir = getattr(tokenizer, "name_or_path", None)
    for candidate in (getattr(tokenizer, "vocab_file", None), Path(source_dir) / "tokenizer.model" if source_dir else None):
        if candidate and Path(candidate).is_file() and Path(candidate).name.endswith(".model"):
            return Path(candidate)
    return None


def _vocab_from_sentencepiece(model_file: Path) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types exactly as SentencePiece stores them (llama.cpp's converter reads the same)."""
    import gguf
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(model_file))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        types.append(int(kind))
    return tokens, scores, types


def _vocab_from_tokenizer_json(tokenizer) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types of a Llama-style tokenizer.json: BPE over `▁`-prefixed text with byte fallback.

    This is what Hugging Face makes of a SentencePiece BPE model (and what transformers >= 5 saves in its
    place). llama.cpp's `llama` tokenizer merges the adjacent pair with the highest *score*, BPE the pair with
    the lowest merge *rank*; a token's score is therefore minus the rank of the first merge that makes it,
    which orders merges the same way. Tokens no merge makes (characters, bytes, specials) get 0, as
    SentencePiece gives its bytes and control tokens: for those the score plays no part in tokenizing.
    """
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")], ensure_ascii=False)
    if model.get("type") != "BPE" or not model.get("byte_fallback") or "▁" not in text:
        raise UserError(
            "GGUF export: the tokenizer must be Llama-2's SentencePiece tokenizer (tokenizer.model) or a tokenizer.json "
            f"of the same kind (BPE, byte_fallback, '▁' word boundaries); this one is {model.get('type', type(tokenizer).__name__)}"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    for added in spec.get("added_tokens") or []:
        vocab.setdefault(added["content"], added["id"])
    size = max(vocab.values()) + 1
    if sorted(vocab.values()) != list(range(size)):
        raise UserError("GGUF export: the tokenizer's ids are not contiguous from 0; llama.cpp needs one token per id")
    tokens = [""] * size
    for token, i in vocab.items():
        tokens[i] = token
    scores = [0.0] * size
    for rank, merge in reversed(list(enumerate(model.get("merges") or []))):  # reversed: the lowest rank wins
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        if (i := vocab.get(left + right)) is not None:
            scores[i] = -float(rank + 1)
    special = {a["id"] for a in spec.get("added_tokens") or [] if a.get("special")}
    in_model = set(model["vocab"].values())
    unk = getattr(tokenizer, "unk_token_id", None)
    types = []
    for i, token in enumerate(tokens):
        if i == unk:
            kind = gguf.TokenType.UNKNOWN
        elif i in special:
            kind = gguf.TokenType.CONTROL
        elif _BYTE_TOKEN.fullmatch(token):
            kind = gguf.TokenType.BYTE
        elif i not in in_model:
            kind = gguf.TokenType.USER_DEFINED
        else:
            kind = gguf.TokenType.NORMAL
        types.append(int(kind))
    return tokens, scores, types


def add_tokenizer_metadata(writer, tokenizer, vocab_size: int, chat_template: str | None) -> None:
    """The `llama` tokenizer model: tokens, scores, types, the special ids and whether to add BOS/EOS."""
    import gguf

    model_file = _sentencepiece_file(tokenizer)
    if model_file is not None:
        tokens, scores, types = _vocab_from_sentencepiece(model_file)
        # Tokens added on top of the SentencePiece model (none for Llama-2), as llama.cpp's converter adds them.
        for i in range(len(tokens), len(tokenizer)):
            tokens.append(tokenizer.convert_ids_to_tokens(i))
            scores.append(-1000.0)
            types.append(int(gguf.TokenType.CONTROL if i in tokenizer.all_special_ids else gguf.TokenType.USER_DEFINED))
    else:
        tokens, scores, types = _vocab_from_tokenizer_json(tokenizer)
    if len(tokens) > vocab_size:
        raise UserError(f"GGUF export: the tokenizer has {len(tokens)} tokens but the model's embedding only {vocab_size} rows")
    # An embedding padded beyond the vocabulary gets placeholder tokens, as in llama.cpp's converter.
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        scores.append(-10000.0)
        types.append(int(gguf.TokenType.UNUSED))

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(int(token_id))
    # From what the tokenizer does, not its `add_bos_token` attribute: transformers >= 5 reports False for a
    # reloaded Llama tokenizer whose post-processor still adds BOS.
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(len(probe) > 1 and probe[-1] == tokenizer.eos_token_id)
    template = chat_template or getattr(tokenizer, "chat_template", None) or LLAMA2_CHAT_TEMPLATE
    writer.add_chat_template(template)
