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
from pathlib import Path

from lima_lightning.errors import UserError
from lima_lightning.report.plotting import plot_loss_curves
from lima_lightning.report.reading import Run, load_runs
from lima_lightning.report.rendering import render_html, render_markdown

REPORT_FILES = {"report.md", "report.html", "loss_curves.png"}


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
