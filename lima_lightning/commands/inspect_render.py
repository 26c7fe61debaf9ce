"""`lima-lightning inspect`'s output: `RowView`s (`commands/inspect_view.py`) as terminal text and as an HTML page.

Both outputs share the same lines (header, counts, marks, summary). On a colour terminal the trained
tokens are green and special tokens bold (rich); where rich prints no colour, [trained]...[/trained]
marks stand in for the colour. The HTML page is self-contained and escapes every piece of data text.
"""

from __future__ import annotations

import html

from lima_lightning.commands.inspect_view import Piece, RowView

TRAINED_OPEN, TRAINED_CLOSE = "[trained]", "[/trained]"  # plain-text marks, where there is no colour
STYLES = {"trained": "green", "special": "bold", "cut": "bold red", "warning": "yellow", "header": "bold cyan"}


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
