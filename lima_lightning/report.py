"""`lima-lightning report`: compare runs side by side: summary statistics, loss curves, every response.

    lima-lightning report --run base=runs/predict/lightning_logs/version_0 \\
        --run qlora=runs/predict/lightning_logs/version_1 --run lora=runs/predict/lightning_logs/version_2 --out reports/lima

`--run NAME=PATH`, repeatable. PATH is a predictions .jsonl file or a run dir:
  - a predict run dir: its predictions.jsonl; the loss curves come from the fit run whose adapter it used
    (its config.yaml's model.adapter_path, `<fit run dir>/adapters/<name>`);
  - a fit run dir: its TensorBoard events (train/loss and val/loss).
Give one NAME twice to pair a predictions file with a fit run dir explicitly.

Writes into --out: report.md (with loss_curves.png beside it), report.html (self-contained: the plot is inlined).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from lima_lightning.errors import UserError

LOSS_TAGS = ("train/loss", "val/loss")
NGRAM = 4
ROW_KEYS = ("prompt", "response", "finish_reason", "new_tokens")
REPORT_FILES = {"report.md", "report.html", "loss_curves.png"}
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.+-]+")


@dataclass
class Run:
    name: str
    predictions: dict[int, dict] = field(default_factory=dict)  # id -> predictions.jsonl row
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # tag -> [(step, value)]
    sources: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Summary:
    prompts: int
    mean_new_tokens: float
    eos_share: float
    length_share: float
    repeated_ngram_rate: float


# ----------------------------------------------------------------------------- statistics (pure)
def ngram_repeats(text: str, n: int = NGRAM) -> tuple[int, int]:
    """(repeats, n-grams) over whitespace-separated words: a repeat is an n-gram that already occurred earlier in `text`.

    `a b c d a b c d` has 5 word 4-grams, 4 distinct: (1, 5). Under n words: (0, 0).
    """
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(grams) - len(set(grams)), len(grams)


def repeated_ngram_rate(texts: list[str], n: int = NGRAM) -> float:
    """Share of all word n-grams, pooled over `texts`, that repeat an earlier n-gram of the same text (0 if none)."""
    counts = [ngram_repeats(text, n) for text in texts]
    total = sum(grams for _, grams in counts)
    return sum(repeats for repeats, _ in counts) / total if total else 0.0


def summarize(rows: list[dict]) -> Summary:
    """Per-run statistics of predictions.jsonl rows (`new_tokens`, `finish_reason`, `response`)."""
    n = len(rows)
    return Summary(
        prompts=n,
        mean_new_tokens=sum(r["new_tokens"] for r in rows) / n if n else 0.0,
        eos_share=sum(r["finish_reason"] == "eos" for r in rows) / n if n else 0.0,
        length_share=sum(r["finish_reason"] == "length" for r in rows) / n if n else 0.0,
        repeated_ngram_rate=repeated_ngram_rate([r["response"] for r in rows]),
    )


def last_value(run: Run, tag: str) -> float | None:
    points = run.curves.get(tag)
    return points[-1][1] if points else None


# ----------------------------------------------------------------------------- reading runs
def parse_run_spec(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not NAME_PATTERN.fullmatch(name) or not path:
        raise UserError(f"--run {spec}: expected NAME=PATH, NAME made of letters, digits and _.+- (e.g. --run qlora=runs/.../version_3)")
    return name, Path(path).expanduser()


def read_predictions(path: Path) -> dict[int, dict]:
    """id -> row; a malformed line is reported as file:line."""
    rows = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows[row["id"]] = {k: row[k] for k in ROW_KEYS} | {"reference": row.get("reference")}
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(
                f"{path}:{line_no}: not a predictions row ({type(e).__name__}: {e}); expected JSON with id, {', '.join(ROW_KEYS)}"
            ) from None
    return rows


def read_loss_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """train/loss and val/loss as [(step, value)] from the TensorBoard event files directly in `run_dir`."""
    if not any(run_dir.glob("events.out.tfevents.*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()  # 0: keep every point
    tags = set(events.Tags()["scalars"])
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in LOSS_TAGS if tag in tags}


def adapter_run_dir(predict_dir: Path) -> Path | None:
    """The fit run dir behind a predict run: `model.adapter_path` in its config.yaml is `<fit run dir>/adapters/<name>`."""
    import yaml

    config_file = predict_dir / "config.yaml"
    if not config_file.is_file():
        return None
    adapter = ((yaml.safe_load(config_file.read_text()) or {}).get("model") or {}).get("adapter_path")
    return Path(adapter).expanduser().parent.parent if adapter else None


def add_source(run: Run, spec: str, path: Path) -> None:
    """Add what `path` holds to `run`: predictions and/or loss curves (followed from a predict run to its fit run)."""
    if path.is_file():
        predictions, curves = path, {}
    elif path.is_dir():
        predictions = path / "predictions.jsonl" if (path / "predictions.jsonl").is_file() else None
        curves = read_loss_curves(path)
        if curves:
            run.sources.append(f"loss curves: {path}")
        elif predictions is not None and (fit_dir := adapter_run_dir(path)) is not None and (curves := read_loss_curves(fit_dir)):
            run.sources.append(f"loss curves: {fit_dir} (the fit run of model.adapter_path in {path / 'config.yaml'})")
    else:
        raise UserError(f"--run {spec}: no such file or directory")
    if predictions is None and not curves:
        raise UserError(f"--run {spec}: holds neither predictions.jsonl nor TensorBoard events with {' or '.join(LOSS_TAGS)}")
    if predictions is not None:
        if run.predictions:
            raise UserError(f"--run {spec}: a second predictions file for {run.name}; give each a name of its own")
        run.predictions = read_predictions(predictions)
        run.sources.append(f"predictions: {predictions}")
    for tag, points in curves.items():
        if tag in run.curves:
            raise UserError(f"--run {spec}: a second {tag} curve for {run.name}; give each fit run a name of its own")
        run.curves[tag] = points


def load_runs(specs: list[str]) -> list[Run]:
    runs: dict[str, Run] = {}
    for spec in specs:
        name, path = parse_run_spec(spec)
        add_source(runs.setdefault(name, Run(name)), spec, path)
    check_same_prompts(list(runs.values()))
    return list(runs.values())


def check_same_prompts(runs: list[Run]) -> None:
    """Side by side only makes sense for the same prompts: a given id must carry the same prompt in every run."""
    seen: dict[int, tuple[str, str]] = {}
    for run in runs:
        for i, row in run.predictions.items():
            first = seen.setdefault(i, (run.name, row["prompt"]))
            if first[1] != row["prompt"]:
                raise UserError(
                    f"--run {run.name}: prompt id {i} differs from run {first[0]}'s; compare predictions made on the same predict_dataset"
                )


# ----------------------------------------------------------------------------- rendering
def plot_loss_curves(runs: list[Run]) -> bytes | None:
    """PNG bytes: train/loss and val/loss against the optimizer step, one line per run (same colour in both); None if no curves."""
    from matplotlib.figure import Figure  # no pyplot: the Agg canvas, no GUI backend, no global state
    from matplotlib.ticker import MaxNLocator

    with_curves = [run for run in runs if run.curves]
    if not with_curves:
        return None
    figure = Figure(figsize=(11, 4), layout="constrained")
    axes = figure.subplots(1, len(LOSS_TAGS), sharey=True)
    axes[0].set_ylabel("loss (nats per trained token)")
    for ax, tag in zip(axes, LOSS_TAGS, strict=True):
        for color, run in enumerate(runs):
            if tag in run.curves:
                steps, values = zip(*run.curves[tag], strict=True)
                ax.plot(steps, values, color=f"C{color}", marker="o" if tag == "val/loss" else None, markersize=3, label=run.name)
        ax.set(title=tag, xlabel="optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


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
        rows.append([run.name, *generation, fmt(last_value(run, "train/loss")), fmt(last_value(run, "val/loss"))])
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
        first = first_row(generating, i)
        lines += [f"### Prompt {i}", "", fenced(first["prompt"]), ""]
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
    return "\n".join(lines)


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
        first = first_row(generating, i)
        parts += [f'<section class="prompt"><h3>Prompt {i}</h3><pre class="prompt">{e(first["prompt"])}</pre>']
        cards = []
        if first.get("reference") is not None:
            cards.append(f'<div class="card"><h4>reference</h4><pre>{e(first["reference"])}</pre></div>')
        for run in generating:
            row = run.predictions.get(i)
            if row is None:
                cards.append(f'<div class="card"><h4>{e(run.name)}</h4><p>(no prediction for this prompt)</p></div>')
                continue
            repeated = fmt(repeated_ngram_rate([row["response"]]), ".0%")
            stats = (
                f'{row["new_tokens"]} tokens · <span class="finish">{e(row["finish_reason"])}</span> · {repeated} repeated {NGRAM}-grams'
            )
            title = f'<h4>{e(run.name)} <span class="stats">{stats}</span></h4>'
            cards.append(f'<div class="card {e(row["finish_reason"])}">{title}<pre>{e(row["response"])}</pre></div>')
        parts += [f'<div class="grid" style="--columns: {len(cards)}">', *cards, "</div></section>"]
    parts.append("</body></html>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- command
def write_report(runs: list[Run], out: Path) -> Path:
    """report.md + loss_curves.png + report.html, swapped into `out` together."""
    from lima_lightning.io import write_dir_atomically

    if out.exists() and (not out.is_dir() or {p.name for p in out.iterdir()} - REPORT_FILES):
        raise UserError(
            f"--out={out}: exists and holds other files than a report ({', '.join(sorted(REPORT_FILES))}); pick a new directory"
        )
    png = plot_loss_curves(runs)

    def write(tmp: Path) -> None:
        if png:
            (tmp / "loss_curves.png").write_bytes(png)
        (tmp / "report.md").write_text(render_markdown(runs, "loss_curves.png" if png else None), encoding="utf-8")
        (tmp / "report.html").write_text(render_html(runs, png), encoding="utf-8")

    return write_dir_atomically(out, write)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lima-lightning report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a named predictions .jsonl file, predict run dir or fit run dir; repeat for each run (columns keep this order)",
    )
    parser.add_argument("--out", required=True, type=Path, help="directory for report.md, report.html and loss_curves.png")
    return parser


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    out = write_report(load_runs(args.run), args.out.expanduser())
    print(f"report: wrote {out / 'report.md'} and {out / 'report.html'}")
