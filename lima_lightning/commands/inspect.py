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
from pathlib import Path

# The command; one row's view (`inspect_view`) and its rendering (`inspect_render`) have their own modules.
from lima_lightning.commands.inspect_render import print_views, render_html
from lima_lightning.commands.inspect_view import inspect_row
from lima_lightning.errors import UserError

DEFAULT_ROWS = 3


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
