"""`lima-lightning inspect`: a few training rows exactly as `fit` trains them, trained tokens marked.

    lima-lightning inspect --config configs/demo.yaml --rows 0,1
    lima-lightning inspect --config configs/llama2-7b-qlora.yaml --data.dataset ../shared/lima/train.jsonl \\
        --model.base_model ../shared/llama2-tokenizer --rows 1021 --html inspect.html

Takes fit's options (`--config`, `--data.*`, `--model.base_model`; the others are accepted and ignored)
and tokenizes with fit's own functions, `data.template` and `data.max_seq_length`. Only the tokenizer is
loaded, never model weights. `--rows` are 0-based indices into the rows of `data.dataset` in file order,
before the train/validation split (each row says which side of the split it lands on).

Output, per row:
  - a header: the index, the row's file:line, and its split (a validation row is scored, not trained);
  - the text its ids decode to, with the trained tokens (each answer and its EOS) in green in a colour
    terminal and between [trained] and [/trained] otherwise (a pipe, a file, NO_COLOR). Special tokens
    (<s>, </s>) appear as text, in bold. A truncated row ends with a [cut ...] mark where
    data.max_seq_length falls; the tokens after it are not shown (fit never sees them). A last user
    turn without an answer is not shown either: a [left out ...] mark stands for it;
  - counts: tokens, trained tokens, truncated or not, a trailing user turn left out (fit drops it too);
  - one `warning:` line per problem found:
      no trained token (fit drops the row: the cut falls before its first answer, or it has none);
      an answer not followed by a trained EOS (the model would not learn to stop), except the answer
        the cut falls in (no EOS is added at a cut);
      decoding the ids does not give back the rendered text (the model would train on other text);
      a special token written as text in the data (`</s>`) that the tokenizer reads as the token itself.
A summary line ends the output. --html FILE writes the same rows as one self-contained page, trained
spans in <span class="trained">, special tokens in <span class="special">.

The rendered text is the row before tokenization: per turn <s>, the template's prompt ([INST] user
[/INST]), the stripped answer, </s> (data.template=llama2-chat; `tokenization.rendered_segments` says it
for each template); a trailing user turn is left out, as in fit. A single space joins
<s> to the prompt and the prompt to the answer: the word boundary a Llama tokenizer puts at the start
of each separately tokenized text, which decoding writes back. It is compared exactly with
tokenizer.decode(ids) (special tokens kept, spaces not cleaned up); for a truncated row the decoded
text must be the rendered text's beginning. A character the cut splits into its UTF-8 bytes (byte
fallback: one token per byte) is shown by its byte tokens' names, <0xE2><0x98>, and left out of the
comparison: decoding those bytes gives U+FFFD, not text.
"""

from __future__ import annotations

import argparse
import html
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

from lima_lightning.data.conversations import Conversation
from lima_lightning.data.tokenization import IGNORE_INDEX, encode_conversation, rendered_segments, tokenize_for_training
from lima_lightning.errors import UserError

DEFAULT_ROWS = 3
BYTE_TOKEN = re.compile(r"<0x([0-9A-F]{2})>")  # byte-fallback token names, as Llama-2's SentencePiece writes them
TRAINED_OPEN, TRAINED_CLOSE = "[trained]", "[/trained]"  # plain-text marks, where there is no colour
STYLES = {"trained": "green", "special": "bold", "cut": "bold red", "warning": "yellow", "header": "bold cyan"}


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


# ----------------------------------------------------------------------------- options
def parse_rows(value: str) -> list[int]:
    """`0,5,1021` -> [0, 5, 1021] (order kept, repeats dropped); anything else is a one-line UserError."""
    rows: list[int] = []
    for part in value.split(","):
        part = part.strip()
        if not (part.isascii() and part.isdigit()):
            raise UserError(f"--rows {value}: {part!r} is not a row index; give 0-based row numbers separated by commas, e.g. 0,5,1021")
        if int(part) not in rows:
            rows.append(int(part))
    return rows


def check_rows(rows: list[int], n_rows: int, dataset: str) -> None:
    bad = [r for r in rows if r >= n_rows]
    if bad:
        raise UserError(
            f"--rows {','.join(map(str, bad))}: out of range; data.dataset={dataset} has rows 0-{n_rows - 1} "
            "(0-based, in file order, before the train/validation split)"
        )


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """inspect's own options, and the rest: fit's options, for `parse_fit_config`."""
    parser = argparse.ArgumentParser(
        prog="lima-lightning inspect",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # `--h` or `--r` must not swallow one of fit's options
        epilog="Every other option is fit's (`lima-lightning fit --help` lists them): --config, --data.*, --model.base_model, ...",
    )
    parser.add_argument(
        "--rows",
        type=parse_rows,
        default=None,
        help=f"0-based indices of data.dataset's rows in file order, before the train/validation split, e.g. 0,5,1021 "
        f"(default: the first {DEFAULT_ROWS}).",
    )
    parser.add_argument("--html", metavar="FILE", default=None, help="Also write the rows as a self-contained HTML page.")
    return parser.parse_known_args(argv)


# ----------------------------------------------------------------------------- one row (pure, given a tokenizer)
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
    """The row's text before tokenization, as the module docstring defines it (`tokenization.rendered_segments`)."""
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


# ----------------------------------------------------------------------------- text lines shared by all outputs
def header_line(view: RowView) -> str:
    split = "validation split (scored, not trained)" if view.split == "validation" else "train split"
    return f"row {view.index}  {view.where}  {split}"


def counts_line(view: RowView) -> str:
    share = view.trained_tokens / max(view.tokens, 1)
    if view.truncated:
        where = "inside an answer" if view.cut_in_answer else "inside a prompt"
        truncated = f"yes: cut at {view.max_seq_length} of {view.total_tokens} tokens, {where}"
    else:
        truncated = "no"
    extra = "; trailing user turn left out (no answer to train on)" if view.trailing_user_turn else ""
    return f"tokens {view.tokens}, trained {view.trained_tokens} ({share:.1%}), truncated {truncated}{extra}"


def cut_mark(view: RowView) -> str:
    return f"[cut: data.max_seq_length={view.max_seq_length}; {view.total_tokens - view.tokens} more tokens not trained]"


LEFT_OUT_MARK = "[left out: the last user turn, which has no answer]"


def end_marks(view: RowView) -> list[tuple[str, str]]:
    """(text, kind) of the marks after the last token: where the cut fell, a trailing user turn fit drops."""
    return [(cut_mark(view), "cut")] * view.truncated + [(LEFT_OUT_MARK, "cut")] * view.trailing_user_turn


def summary_line(views: list[RowView]) -> str:
    tokens = sum(v.tokens for v in views)
    trained = sum(v.trained_tokens for v in views)
    warnings = sum(len(v.warnings) for v in views)
    return (
        f"{plural(len(views), 'row')} shown: {tokens} tokens, {trained} trained ({trained / max(tokens, 1):.1%}), "
        f"{sum(v.truncated for v in views)} truncated, {plural(warnings, 'warning')}"
    )


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def trained_runs(pieces: list[Piece]) -> list[tuple[bool, list[Piece]]]:
    """Consecutive pieces grouped by trained-ness: one mark or span per answer, its EOS included."""
    runs: list[tuple[bool, list[Piece]]] = []
    for piece in pieces:
        if runs and runs[-1][0] == piece.trained:
            runs[-1][1].append(piece)
        else:
            runs.append((piece.trained, [piece]))
    return runs


# ----------------------------------------------------------------------------- renderers
def plain_conversation(view: RowView) -> str:
    """The conversation with [trained]...[/trained] marks: for pipes, files and tests."""
    out = []
    for trained, run in trained_runs(view.pieces):
        text = "".join(p.text for p in run)
        out.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text)
    out += [mark for mark, _ in end_marks(view)]
    return "".join(out)


def rich_conversation(view: RowView):
    """The conversation as a rich Text: trained pieces green, special tokens bold."""
    from rich.text import Text

    text = Text()
    for piece in view.pieces:
        styles = [STYLES[k] for k, on in (("trained", piece.trained), ("special", piece.special)) if on]
        text.append(piece.text, style=" ".join(styles) or None)
    for mark, kind in end_marks(view):
        text.append(mark, style=STYLES[kind])
    return text


def print_views(views: list[RowView], intro: str, console=None) -> None:
    """Colour on a colour terminal; marks instead where rich prints no colour (not a TTY, NO_COLOR, TERM=dumb)."""
    from rich.console import Console

    console = console or Console(highlight=False, markup=False, emoji=False, soft_wrap=True)
    plain = console.color_system is None or console.no_color
    legend = (
        f"{TRAINED_OPEN}...{TRAINED_CLOSE}: trained tokens (loss taken); <s> </s>: special tokens"
        if plain
        else "green: trained tokens (loss taken); bold: special tokens <s> </s>"
    )
    console.print(intro)
    console.print(legend)
    for view in views:
        console.print()
        console.print(header_line(view), style=None if plain else STYLES["header"])
        console.print(plain_conversation(view) if plain else rich_conversation(view))
        console.print(counts_line(view))
        for warning in view.warnings:
            console.print(f"warning: row {view.index}: {warning}", style=None if plain else STYLES["warning"])
    console.print()
    console.print(summary_line(views))


HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; color: #222; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; background: #f6f6f6; padding: 1em; border-radius: 4px;
      font: 13px/1.5 ui-monospace, SFMono-Regular, Menlo, monospace; }
.trained { background: #d3f2cf; color: #0a4a0a; }
.special { font-weight: bold; color: #7a28b8; }
.cut { color: #b00020; font-weight: bold; }
.warning { color: #8a5300; }
.counts, .legend, .summary { font-size: 0.95em; }
"""


def html_conversation(view: RowView) -> str:
    out = []
    for trained, run in trained_runs(view.pieces):
        inner = "".join(f'<span class="special">{html.escape(p.text)}</span>' if p.special else html.escape(p.text) for p in run)
        out.append(f'<span class="trained">{inner}</span>' if trained else inner)
    out += [f'<span class="{kind}">{html.escape(mark)}</span>' for mark, kind in end_marks(view)]
    return "".join(out)


def render_html(views: list[RowView], intro: str) -> str:
    """One self-contained page (no scripts, no external files); every piece of data text is escaped."""
    sections = []
    for view in views:
        warnings = "".join(f'<li class="warning">{html.escape(w)}</li>' for w in view.warnings)
        sections.append(
            f'<section class="row" id="row-{view.index}">\n<h2>{html.escape(header_line(view))}</h2>\n'
            f"<pre>{html_conversation(view)}</pre>\n"
            f'<p class="counts">{html.escape(counts_line(view))}</p>\n' + (f"<ul>{warnings}</ul>\n" if warnings else "") + "</section>"
        )
    body = "\n".join(sections)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>lima-lightning inspect</title>\n'
        f"<style>{HTML_STYLE}</style>\n</head>\n<body>\n<h1>lima-lightning inspect</h1>\n"
        f'<p class="legend">{html.escape(intro)}<br><span class="trained">trained tokens</span> (loss taken); '
        '<span class="special">special tokens</span>; <span class="cut">[cut]</span>: where data.max_seq_length truncates</p>\n'
        f'{body}\n<p class="summary">{html.escape(summary_line(views))}</p>\n</body>\n</html>\n'
    )


# ----------------------------------------------------------------------------- command
def fit_data_config(fit_args: list[str]):
    """fit's `data` options, resolved and checked as fit does (configs, overrides, the tokenizer linked to model.base_model)."""
    from lima_lightning.cli import parse_fit_config  # quiet: no seed line, no warning that `args` differ from sys.argv
    from lima_lightning.data.datamodule import LIMADataModule

    data = parse_fit_config(fit_args).data
    LIMADataModule(**data)  # its checks (e.g. data.max_seq_length >= 16), as fit would refuse the same values; loads nothing
    return data


def main(argv: list[str]) -> None:
    from lima_lightning.data.datamodule import split_conversations
    from lima_lightning.data.sources import load_conversations
    from lima_lightning.io import write_text_atomically
    from lima_lightning.models.loading import load_tokenizer

    args, fit_args = parse_args(argv)
    if args.html and Path(args.html).is_dir():
        raise UserError(f"--html {args.html}: is a directory; give a file name, e.g. {Path(args.html) / 'inspect.html'}")
    data = fit_data_config(fit_args)
    conversations = load_conversations(data.dataset, "train", "data.dataset", data.synthetic_size)
    rows = args.rows if args.rows is not None else list(range(min(DEFAULT_ROWS, len(conversations))))
    check_rows(rows, len(conversations), data.dataset)
    tokenizer = load_tokenizer(data.tokenizer)  # as the data module loads it: the tokenizer, no weights
    # The split works on any list: splitting the row indices tells which side each row lands on.
    _, validation = split_conversations(list(range(len(conversations))), data.val_fraction, data.seed)
    validation = set(validation)
    views = [
        inspect_row(r, conversations[r], tokenizer, data.template, data.max_seq_length, "validation" if r in validation else "train")
        for r in rows
    ]
    intro = (
        f"data.dataset={data.dataset} ({len(conversations)} rows), tokenizer {data.tokenizer}, "
        f"data.template={data.template}, data.max_seq_length={data.max_seq_length}"
    )
    print_views(views, intro)
    if args.html:
        try:
            path = write_text_atomically(args.html, render_html(views, intro))
        except OSError as e:
            raise UserError(f"--html {args.html}: cannot write it ({e.strerror or type(e).__name__}); give a writable file path") from None
        print(f"wrote {path}")
