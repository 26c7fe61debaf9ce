"""`lima-lightning stats`: what tokenization does to a dataset at each `max_seq_length`, before any training.

    lima-lightning stats --dataset ../shared/lima/train.jsonl --tokenizer ../shared/llama2-tokenizer --max_seq_length 2048 1024

Only the tokenizer is loaded, never model weights, so this runs in seconds on a laptop. The counts are
the ones `fit` logs at its start (`TokenizationStats`), computed by the same `tokenize_for_training`.
"""

from __future__ import annotations

import argparse
import typing

from lima_lightning.data.conversations import Conversation
from lima_lightning.data.sources import LIMA_HUB_ID, load_conversations
from lima_lightning.data.templates import TemplateName
from lima_lightning.data.tokenization import TokenizationStats, tokenize_for_training
from lima_lightning.errors import UserError

# (column title, how to read it from TokenizationStats); one table row per max_seq_length.
COLUMNS: tuple[tuple[str, typing.Callable[[TokenizationStats], str]], ...] = (
    ("conversations", lambda s: f"{s.conversations}"),
    ("examples", lambda s: f"{s.examples}"),
    ("truncated", lambda s: f"{s.truncated}"),
    ("dropped", lambda s: f"{s.dropped_no_target}"),
    ("trailing user turns", lambda s: f"{s.trailing_user_turns}"),
    ("tokens", lambda s: f"{s.tokens}"),
    ("trained tokens", lambda s: f"{s.trained_tokens}"),
    ("trained share", lambda s: f"{s.trained_tokens / max(s.tokens, 1):.1%}"),
)


def compute_stats(conversations: list[Conversation], tokenizer, template: str, max_seq_lengths: list[int]) -> dict[int, TokenizationStats]:
    """`TokenizationStats` of `conversations` at each length, exactly as `fit` would tokenize them."""
    return {n: tokenize_for_training(conversations, tokenizer, template, n)[1] for n in max_seq_lengths}


def format_table(stats: dict[int, TokenizationStats]) -> str:
    """A right-aligned text table: one row per max_seq_length, one column per count."""
    header = ["max_seq_length", *(title for title, _ in COLUMNS)]
    rows = [[str(n), *(cell(s) for _, cell in COLUMNS)] for n, s in stats.items()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(value.rjust(width) for value, width in zip(row, widths, strict=True)) for row in [header, *rows])


LEGEND = (
    "truncated: cut at max_seq_length (input_ids and labels cut together, no EOS added at the cut); "
    "dropped: no assistant token left after the cut; trailing user turns: a last user turn with no answer, "
    "left out of training; tokens / trained tokens: after truncation, trained = assistant tokens and their EOS."
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lima-lightning stats",
        description="Count what tokenization does to a dataset at each max_seq_length (loads the tokenizer only).",
    )
    parser.add_argument(
        "--dataset",
        default=LIMA_HUB_ID,
        help=f"As data.dataset: {LIMA_HUB_ID} (hub, gated: set HF_TOKEN), a local file (LIMA, chat, Alpaca or ShareGPT rows), "
        "or `synthetic`.",
    )
    parser.add_argument(
        "--tokenizer",
        default="meta-llama/Llama-2-7b-hf",
        help="As model.base_model: a hub id, a local directory holding a tokenizer, or `tiny`.",
    )
    parser.add_argument("--template", default="llama2-chat", choices=typing.get_args(TemplateName), help="Chat template.")
    parser.add_argument(
        "--max_seq_length", type=int, nargs="+", default=[2048, 1024], help="One or more lengths to count at (default: 2048 1024)."
    )
    parser.add_argument("--synthetic_size", type=int, default=512, help="Conversations in the `synthetic` set.")
    args = parser.parse_args(argv)
    bad = [n for n in args.max_seq_length if n < 16]
    if bad:
        raise UserError(f"--max_seq_length {' '.join(map(str, bad))}: every length must be at least 16, e.g. 2048 1024")
    return args


def main(argv: list[str]) -> None:
    from lima_lightning.models.loading import load_tokenizer

    args = parse_args(argv)
    conversations = load_conversations(args.dataset, "train", "--dataset", args.synthetic_size)
    try:
        tokenizer = load_tokenizer(args.tokenizer)
    except UserError as e:
        # load_tokenizer names the fit-time option; here the value came from --tokenizer.
        raise type(e)(str(e).replace("model.base_model=", "--tokenizer=", 1)) from None  # type: an Unavailable hub stays exit 1
    stats = compute_stats(conversations, tokenizer, args.template, args.max_seq_length)
    print(f"dataset {args.dataset}, tokenizer {args.tokenizer}, template {args.template}")
    print(format_table(stats))
    print(LEGEND)
