"""The report as text: report.md (GitHub markdown, PNGs beside it) and report.html (one self-contained page:
every text escaped, the PNGs inlined). Both render the same tables (`tables`) and the same per-prompt responses."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass

from lima_lightning.report.figures import Bootstrap, has_reference, run_figures
from lima_lightning.report.reading import Run
from lima_lightning.report.statistics import NGRAM, contains_answer, exact_match, repeated_ngram_rate
from lima_lightning.report.tables import Table, figure_tables, fmt, summary_table

TITLE = "Comparison report"
LOSS_PNG = "loss_curves.png"
LENGTHS_PNG = "length_histogram.png"
LENGTH_DEFINITIONS = (
    "Lengths in words (whitespace-separated) for responses and references alike: the references have no token count. "
    "Every panel shares the same bins; the reference answers are outlined in black where rows carry them."
)


@dataclass(frozen=True)
class Page:
    """What a report shows besides its runs, computed once by the command and rendered twice."""

    title: str = TITLE
    intro: str | None = None
    tables: list[Table] | None = None  # the figure tables; None: computed from the runs with the default bootstrap
    lengths_png: bytes | None = None


def figure_tables_of(runs: list[Run], page: Page) -> list[Table]:
    if page.tables is not None:
        return page.tables
    boot = Bootstrap()
    return figure_tables(runs, {run.name: run_figures(run, boot) for run in runs}, boot)


def prompt_ids(runs: list[Run]) -> list[int]:
    return sorted({i for run in runs for i in run.predictions})


def first_row(runs: list[Run], i: int) -> dict:
    return next(run.predictions[i] for run in runs if i in run.predictions)


def reference_verdict(row: dict) -> str | None:
    """How a response compares with its row's reference (the table's definitions), None without a reference."""
    if not has_reference(row):
        return None
    if exact_match(row["response"], row["reference"]):
        return "exact match"
    return "contains the answer" if contains_answer(row["response"], row["reference"]) else "no match"


def response_stats(row: dict) -> str:
    verdict = reference_verdict(row)
    return (
        f"{row['new_tokens']} tokens, {row['finish_reason']}, {fmt(repeated_ngram_rate([row['response']]), '.0%')} repeated {NGRAM}-grams"
        + (f", {verdict}" if verdict else "")
    )


def fenced(text: str) -> str:
    """A markdown code block that no backtick run inside `text` can close early."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


# ----------------------------------------------------------------------------- markdown
def markdown_table(table: Table) -> list[str]:
    lines = [f"## {table.title}", "", "| " + " | ".join(table.header) + " |", "|" + "---|" * len(table.header)]
    return lines + ["| " + " | ".join(row) + " |" for row in table.rows] + ["", table.definitions, ""]


def render_markdown(runs: list[Run], png_name: str | None, page: Page | None = None) -> str:
    """`png_name`: the loss-curve PNG beside report.md (None: no curves); the length histogram, if any, is LENGTHS_PNG."""
    page = page or Page()
    lines = [f"# {page.title}", ""] + ([page.intro, ""] if page.intro else []) + ["Runs:", ""]
    lines += [f"- **{run.name}**: " + "; ".join(f"`{s}`" for s in run.sources) for run in runs]
    lines.append("")
    for table in [summary_table(runs), *figure_tables_of(runs, page)]:
        lines += markdown_table(table)
    if page.lengths_png:
        lines += ["## Response lengths", "", f"![response lengths against the references]({LENGTHS_PNG})", "", LENGTH_DEFINITIONS, ""]
    lines += ["## Loss curves", ""]
    lines += [f"![train/loss and val/loss]({png_name})" if png_name else "No run has train/loss or val/loss events.", ""]
    generating = [run for run in runs if run.predictions]
    if generating:
        lines += ["## Responses", ""]
    for i in prompt_ids(generating):
        lines += prompt_markdown(generating, i)
    return "\n".join(lines)


def prompt_markdown(generating: list[Run], i: int) -> list[str]:
    """One prompt: its text, a table of each run's length and finish, the reference, then every response."""
    first = first_row(generating, i)
    lines = [f"### Prompt {i}", "", fenced(first["prompt"]), ""]
    lines += [f"| run | new tokens | finish | repeated {NGRAM}-grams |", "|---|---|---|---|"]
    for run in generating:
        if i in run.predictions:
            row = run.predictions[i]
            lines.append(
                f"| {run.name} | {row['new_tokens']} | {row['finish_reason']} | {fmt(repeated_ngram_rate([row['response']]), '.0%')} |"
            )
    lines.append("")
    if first.get("reference") is not None:
        lines += ["**reference**", "", fenced(first["reference"]), ""]
    for run in generating:
        if i in run.predictions:
            lines += [f"**{run.name}** ({response_stats(run.predictions[i])})", "", fenced(run.predictions[i]["response"]), ""]
    return lines


# ----------------------------------------------------------------------------- html
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1500px; padding: 0 1em; color: #222; }
table.summary { border-collapse: collapse; }
table.summary td, table.summary th { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
table.summary td:first-child, table.summary th:first-child { text-align: left; }
.definitions { color: #555; font-size: 0.9em; max-width: 70em; }
img { max-width: 100%; }
section.prompt { border-top: 2px solid #ddd; margin-top: 1.5em; }
.grid { display: grid; grid-template-columns: repeat(var(--columns), minmax(0, 1fr)); gap: 0.8em; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 0.5em 0.8em; background: #fafafa; }
.card h4 { margin: 0 0 0.4em 0; } .card .stats { font-weight: normal; color: #666; font-size: 0.85em; }
.card.eos h4 .finish { color: #1a7f37; } .card.length h4 .finish { color: #b35900; }
pre { white-space: pre-wrap; word-wrap: break-word; font-size: 0.85em; margin: 0; }
pre.prompt { background: #eef3fb; padding: 0.6em; border-radius: 6px; }
"""


def html_table(table: Table) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in table.header)
    rows = "\n".join("<tr>" + "".join(f"<td>{e(cell)}</td>" for cell in row) + "</tr>" for row in table.rows)
    definitions = e(table.definitions.replace("*", ""))
    return f'<h2>{e(table.title)}</h2><table class="summary"><tr>{head}</tr>\n{rows}\n</table><p class="definitions">{definitions}</p>'


def html_image(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def render_html(runs: list[Run], png: bytes | None, page: Page | None = None) -> str:
    """One self-contained page: every text escaped, the plots inlined as base64."""
    e = html.escape
    page = page or Page()
    parts = [
        "<!DOCTYPE html>",
        f'<html lang="en"><head><meta charset="utf-8"><title>{e(page.title)}</title>',
        f"<style>{CSS}</style></head><body>",
        f"<h1>{e(page.title)}</h1>",
        *([f'<p class="definitions">{e(page.intro.replace("*", ""))}</p>'] if page.intro else []),
        "<ul>",
        *(f"<li><b>{e(run.name)}</b>: {e('; '.join(run.sources))}</li>" for run in runs),
        "</ul>",
        *(html_table(table) for table in [summary_table(runs), *figure_tables_of(runs, page)]),
    ]
    if page.lengths_png:
        parts += [
            "<h2>Response lengths</h2>",
            html_image(page.lengths_png, "response lengths"),
            f'<p class="definitions">{e(LENGTH_DEFINITIONS)}</p>',
        ]
    parts += [
        "<h2>Loss curves</h2>",
        html_image(png, "train/loss and val/loss") if png else "<p>No run has train/loss or val/loss events.</p>",
    ]
    generating = [run for run in runs if run.predictions]
    if generating:
        parts.append("<h2>Responses</h2>")
    for i in prompt_ids(generating):
        parts += prompt_html(generating, i)
    parts.append("</body></html>")
    return "\n".join(parts)


def prompt_html(generating: list[Run], i: int) -> list[str]:
    """One prompt: its text, then a grid of cards (the reference first, then each run's response)."""
    e = html.escape
    first = first_row(generating, i)
    parts = [f'<section class="prompt"><h3>Prompt {i}</h3><pre class="prompt">{e(first["prompt"])}</pre>']
    cards = []
    if first.get("reference") is not None:
        cards.append(f'<div class="card"><h4>reference</h4><pre>{e(first["reference"])}</pre></div>')
    for run in generating:
        row = run.predictions.get(i)
        if row is None:
            cards.append(f'<div class="card"><h4>{e(run.name)}</h4><p>(no prediction for this prompt)</p></div>')
            continue
        repeated = fmt(repeated_ngram_rate([row["response"]]), ".0%")
        verdict = f" · {e(v)}" if (v := reference_verdict(row)) else ""
        finish = f'<span class="finish">{e(row["finish_reason"])}</span>'
        stats = f"{row['new_tokens']} tokens · {finish} · {repeated} repeated {NGRAM}-grams{verdict}"
        title = f'<h4>{e(run.name)} <span class="stats">{stats}</span></h4>'
        cards.append(f'<div class="card {e(row["finish_reason"])}">{title}<pre>{e(row["response"])}</pre></div>')
    parts += [f'<div class="grid" style="--columns: {len(cards)}">', *cards, "</div></section>"]
    return parts
