"""One row of `lima-lightning inspect` as fit tokenizes it: which tokens are trained, where the cut falls, what is wrong.

Pure, given a tokenizer: `inspect_row` tokenizes a row with fit's own `tokenize_for_training` and returns a
`RowView`, its decoded text in pieces marked trained/special, its counts and its warnings. What the view
shows and which problems it warns about is the command's docstring (`commands/inspect.py`, its --help);
`commands/inspect_render.py` turns views into text and HTML.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

from lima_lightning.data.conversations import Conversation
from lima_lightning.data.tokenization import IGNORE_INDEX, encode_conversation, rendered_segments, tokenize_for_training

BYTE_TOKEN = re.compile(r"<0x([0-9A-F]{2})>")  # byte-fallback token names, as Llama-2's SentencePiece writes them


@dataclass(frozen=True)
class Piece:
    """A run of consecutive tokens alike in being trained and in being special, as the text they decode to.

    `special`: special tokens (<s>, </s>), or the byte tokens of a character the cut split, shown by name.
    """

    text: str
    trained: bool
    special: bool


@dataclass
class RowView:
    """One row as fit trains it; `tokens` and `trained_tokens` count after the cut."""

    index: int
    where: str
    split: str  # "train" or "validation"
    pieces: list[Piece]
    tokens: int
    trained_tokens: int
    total_tokens: int  # before the cut
    max_seq_length: int
    cut_in_answer: bool  # the last kept token is trained: the cut falls inside an answer
    trailing_user_turn: bool
    warnings: list[str] = field(default_factory=list)

    @property
    def truncated(self) -> bool:
        return self.total_tokens > self.tokens


def trained_spans(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of trained positions: one per answer (its tokens and its EOS)."""
    spans, start = [], None
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


def token_pieces(ids: list[int], labels: list[int], tokenizer) -> list[Piece]:
    """Split the ids where trained-ness or special-ness changes; each piece is its share of `decode(ids)`.

    Decoding a piece on its own would lose the space its first token's word boundary stands for, so each
    piece is the text decode(ids[:end]) adds to decode(ids[:start]).
    """
    if not ids:  # a row of one user turn: fit drops that turn and has nothing left
        return []
    specials = set(tokenizer.all_special_ids)
    kinds = [(label != IGNORE_INDEX, token in specials) for token, label in zip(ids, labels, strict=True)]
    bounds = [0, *(k for k in range(1, len(ids)) if kinds[k] != kinds[k - 1]), len(ids)]
    texts = [decode(tokenizer, ids[:b]) for b in bounds]
    pieces = []
    for j, (start, end) in enumerate(itertools.pairwise(bounds)):
        before, after = texts[j], texts[j + 1]
        # A decoder whose output for a prefix is not the start of the whole: fall back to the piece alone.
        text = after[len(before) :] if after.startswith(before) else decode(tokenizer, ids[start:end])
        pieces.append(Piece(text, *kinds[start]))
    return pieces


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def rendered_text(conversation: Conversation, tokenizer, template: str) -> str:
    """The row's text before tokenization, as `commands/inspect.py`'s docstring defines it (`tokenization.rendered_segments`)."""
    return "".join(text for text, _ in rendered_segments(conversation, tokenizer, template))


def cut_character_tokens(ids: list[int], tokenizer) -> int:
    """How many tokens at the end of `ids` are the first bytes of a character the cut split (0 to 3).

    With byte fallback, a character outside the vocabulary is one token per UTF-8 byte (`<0xE2><0x98><0x83>`).
    A cut among them leaves bytes that decode to U+FFFD, and a tokenizer then writes U+FFFD for the whole run
    of byte tokens before them too, so they are counted here and shown by name instead.
    """
    tail = []  # trailing byte values, last first
    for token in reversed(tokenizer.convert_ids_to_tokens(ids[-4:])):
        match = BYTE_TOKEN.fullmatch(token)
        if not match:
            break
        tail.append(int(match.group(1), 16))
    for n, byte in enumerate(tail, start=1):
        if byte & 0xC0 != 0x80:  # not a continuation byte: the first byte of the character, which says its length
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            return n if n < need else 0
    return 0


def round_trip_problem(decoded: str, rendered: str, truncated: bool) -> str | None:
    """Why `decoded` is not `rendered` (nor, for a truncated row, its beginning); None when it is."""
    if truncated:
        rendered = rendered[: len(decoded)]
    if decoded == rendered:
        return None
    i = next((k for k, (a, b) in enumerate(zip(decoded, rendered, strict=False)) if a != b), min(len(decoded), len(rendered)))
    lo = max(0, i - 20)
    return (
        f"decoding the ids does not give back the rendered text: they differ at character {i}, "
        f"decoded {decoded[lo : i + 20]!r}, rendered {rendered[lo : i + 20]!r}"
    )


def special_tokens_in_text(conversation: Conversation, tokenizer, template: str) -> list[str]:
    """Special tokens written as text in the row (`</s>` closes HTML strikethrough) that the tokenizer reads as the token.

    The round trip cannot see these: the id decodes back to the same text. But fit then trains on an EOS (or
    BOS) the template never put there, and the model learns to stop in mid-answer.
    """
    answered = conversation.turns[:-1] if conversation.ends_on_user else conversation.turns
    text = "\n".join([conversation.system or "", *answered])  # the row's own text: templates write no special token as text
    return [
        token
        for token in tokenizer.all_special_tokens
        if token in text and tokenizer.convert_tokens_to_ids(token) in tokenizer(token, add_special_tokens=False)["input_ids"]
    ]


def eos_problems(ids: list[int], labels: list[int], tokenizer, truncated: bool) -> list[str]:
    """Each trained span must end with a trained EOS, except the answer the cut falls in (no EOS is invented there)."""
    problems = []
    for start, end in trained_spans(labels):
        if truncated and end == len(labels):
            continue
        if labels[end - 1] != tokenizer.eos_token_id:
            last = tokenizer.convert_ids_to_tokens(ids[end - 1])
            problems.append(
                f"the answer trained at tokens {start}-{end - 1} is not followed by EOS {tokenizer.eos_token} "
                f"(it ends with {last!r}, id {ids[end - 1]}) and is not truncated: the model would not learn to stop"
            )
    return problems


def inspect_row(index: int, conversation: Conversation, tokenizer, template: str, max_seq_length: int, split: str) -> RowView:
    """Tokenize one row with fit's own `tokenize_for_training`, then describe what it trains."""
    full = encode_conversation(conversation, tokenizer, template)
    examples, _ = tokenize_for_training([conversation], tokenizer, template, max_seq_length)
    # A row left with no trained token is dropped by fit, which then has no example to show: show its cut ids.
    example = examples[0] if examples else {k: v[:max_seq_length] for k, v in full.items()}
    ids, labels = example["input_ids"], example["labels"]
    trained = sum(label != IGNORE_INDEX for label in labels)
    truncated = len(full["input_ids"]) > len(ids)
    shown = len(ids) - (cut_character_tokens(ids, tokenizer) if truncated else 0)
    pieces = token_pieces(ids[:shown], labels[:shown], tokenizer)
    if shown < len(ids):
        pieces.append(Piece("".join(tokenizer.convert_ids_to_tokens(ids[shown:])), labels[-1] != IGNORE_INDEX, True))
    view = RowView(
        index=index,
        where=conversation.where,
        split=split,
        pieces=pieces,
        tokens=len(ids),
        trained_tokens=trained,
        total_tokens=len(full["input_ids"]),
        max_seq_length=max_seq_length,
        cut_in_answer=truncated and labels[-1] != IGNORE_INDEX,
        trailing_user_turn=conversation.ends_on_user,
    )
    if trained == 0:
        spans = trained_spans(full["labels"])
        if spans:
            view.warnings.append(
                f"no token is trained: data.max_seq_length={max_seq_length} cuts it before its first answer "
                f"(token {spans[0][0]}); fit drops this row (raise data.max_seq_length to keep it)"
            )
        else:
            view.warnings.append("no token is trained: the row has no answer (only a user turn); fit drops it")
    view.warnings += eos_problems(ids, labels, tokenizer, view.truncated)
    for token in special_tokens_in_text(conversation, tokenizer, template):
        view.warnings.append(
            f"the text holds {token!r}, which the tokenizer reads as the special token (id {tokenizer.convert_tokens_to_ids(token)}), "
            "not as text: fit feeds the model a special token the template never put there"
        )
    problem = round_trip_problem(decode(tokenizer, ids[:shown]), rendered_text(conversation, tokenizer, template), truncated)
    if problem:
        view.warnings.append(problem)
    return view
