"""The report as text: report.md (GitHub markdown) and report.html (one self-contained page, every text escaped)."""

from __future__ import annotations

import base64
import html
import re

from lima_lightning.report.reading import Run
from lima_lightning.report.statistics import NGRAM, last_value, repeated_ngram_rate, summarize


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def summary_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    header = [
        "run",
        "prompts",
        "mean new tokens",
        "stopped at EOS",
        "hit the limit",
        f"repeated {NGRAM}-grams",
        "last train/loss",
        "last val/loss",
    ]
    rows = []
    for run in runs:
        s = summarize(list(run.predictions.values())) if run.predictions else None
        generation = (
            [
                str(s.prompts),
                fmt(s.mean_new_tokens, ".1f"),
                fmt(s.eos_share, ".1%"),
                fmt(s.length_share, ".1%"),
                fmt(s.repeated_ngram_rate, ".1%"),
            ]
            if s
            else ["—"] * 5
        )
        losses = [fmt(last_value(run.curves.get("train/loss"))), fmt(last_value(run.curves.get("val/loss")))]
        rows.append([run.name, *generation, *losses])
    return header, rows


DEFINITIONS = (
    f"*mean new tokens*: generated tokens per prompt, EOS included. *stopped at EOS* / *hit the limit*: share of prompts "
    f"whose generation ended with EOS / at max_new_tokens. *repeated {NGRAM}-grams*: share of all word {NGRAM}-grams "
    f"(whitespace-separated words), pooled over a run's responses, that repeat an earlier {NGRAM}-gram of the same response; "
    "high values mean loops. *last train/loss, val/loss*: the last logged values (masked NLL per trained token)."
)


def prompt_ids(runs: list[Run]) -> list[int]:
    return sorted({i for run in runs for i in run.predictions})


def first_row(runs: list[Run], i: int) -> dict:
    return next(run.predictions[i] for run in runs if i in run.predictions)


def response_stats(row: dict) -> str:
    return (
        f"{row['new_tokens']} tokens, {row['finish_reason']}, {fmt(repeated_ngram_rate([row['response']]), '.0%')} repeated {NGRAM}-grams"
    )


def fenced(text: str) -> str:
    """A markdown code block that no backtick run inside `text` can close early."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


# ----------------------------------------------------------------------------- markdown
def render_markdown(runs: list[Run], png_name: str | None) -> str:
    header, rows = summary_rows(runs)
    lines = ["# Comparison report", "", "Runs:", ""]
    lines += [f"- **{run.name}**: " + "; ".join(f"`{s}`" for s in run.sources) for run in runs]
    lines += ["", "## Summary", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", DEFINITIONS, "", "## Loss curves", ""]
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


def render_html(runs: list[Run], png: bytes | None) -> str:
    """One self-contained page: every text escaped, the plot inlined as base64."""
    e = html.escape
    header, rows = summary_rows(runs)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>Comparison report</title>',
        f"<style>{CSS}</style></head><body>",
        "<h1>Comparison report</h1><ul>",
        *(f"<li><b>{e(run.name)}</b>: {e('; '.join(run.sources))}</li>" for run in runs),
        '</ul><h2>Summary</h2><table class="summary"><tr>',
        *(f"<th>{e(h)}</th>" for h in header),
        "</tr>",
        *("<tr>" + "".join(f"<td>{e(cell)}</td>" for cell in row) + "</tr>" for row in rows),
        f'</table><p class="definitions">{e(DEFINITIONS.replace("*", ""))}</p>',
        "<h2>Loss curves</h2>",
        f'<img alt="train/loss and val/loss" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        if png
        else "<p>No run has train/loss or val/loss events.</p>",
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
        stats = f'{row["new_tokens"]} tokens · <span class="finish">{e(row["finish_reason"])}</span> · {repeated} repeated {NGRAM}-grams'
        title = f'<h4>{e(run.name)} <span class="stats">{stats}</span></h4>'
        cards.append(f'<div class="card {e(row["finish_reason"])}">{title}<pre>{e(row["response"])}</pre></div>')
    parts += [f'<div class="grid" style="--columns: {len(cards)}">', *cards, "</div></section>"]
    return parts
