"""`lima-lightning report`: compare runs side by side: answer NLL, response figures with 95% intervals, loss curves,
every response; or, with --epochs, one fit run's epochs side by side to pick a checkpoint.

Compare models (base, QLoRA, LoRA) on the same prompts and the same held-out conversations:

    lima-lightning report --run base=runs/predict/lightning_logs/version_0 --run base=runs/validate/lightning_logs/version_0 \\
        --run qlora=runs/predict/lightning_logs/version_1 --run qlora=runs/validate/lightning_logs/version_1 \\
        --run lora=runs/predict/lightning_logs/version_2 --out reports/lima

`--run NAME=PATH`, repeatable; one NAME given several times gathers its files into one column (one model). PATH is:
  - a predict run dir: its predictions.jsonl; the loss curves come from the fit run whose adapter it used
    (its config.yaml's model.adapter_path, `<fit run dir>/adapters/<name>`);
  - a validate run dir (`lima-lightning validate --config X [--model.adapter_path A]`): its validation.jsonl, the
    answer NLL of each held-out conversation; loss curves as for a predict run;
  - a fit run dir: its TensorBoard events (train/loss and val/loss);
  - a file: validation.jsonl (by its name) or a predictions .jsonl.

Pick a checkpoint as LIMA did (by reading answers to 50 dev prompts at each epoch; perplexity anti-correlates with
quality): fit with `--samples.num_prompts 50 --samples.max_new_tokens 500` (adapters/epoch=E are saved every epoch), then

    lima-lightning report --epochs runs/llama2-7b-qlora/lightning_logs/version_0 --only-epochs 4-9 --out reports/epochs

One column per epoch: its samples.jsonl responses at the epoch's last validation, its train/loss and val/loss at
the epoch's end, and its answer NLL where a validate run of adapters/epoch=E exists (found by model.adapter_path in
the fit run's lightning_logs/ and under each --runs-under ROOT). Epochs count from 0, as adapters/epoch=E: LIMA's
epochs 5 to 10 are 4-9. `--epoch-responses predictions` takes each epoch's responses from a predict run of its
adapter instead. `--run` adds columns after the epochs (e.g. `--run base=<a validate run of the base model>`).

Writes into --out: report.md (with loss_curves.png and length_histogram.png beside it) and report.html
(self-contained: the plots are inlined). Intervals are seeded: the same inputs give the same report.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from lima_lightning.errors import UserError
from lima_lightning.report.epochs import RESPONSE_SOURCES, load_epoch_runs, parse_epochs
from lima_lightning.report.figures import Bootstrap, run_figures
from lima_lightning.report.loading import check_comparable, load_runs
from lima_lightning.report.plotting import plot_length_histograms, plot_loss_curves
from lima_lightning.report.reading import Run
from lima_lightning.report.rendering import LENGTHS_PNG, LOSS_PNG, TITLE, Page, render_html, render_markdown
from lima_lightning.report.statistics import RESAMPLES, SEED
from lima_lightning.report.tables import figure_tables

REPORT_FILES = {"report.md", "report.html", LOSS_PNG, LENGTHS_PNG}


@dataclass(frozen=True)
class Report:
    runs: list[Run]  # the columns, in order
    plot_runs: list[Run]  # the loss plot's lines (--epochs: the fit run once, not once per epoch)
    epoch_ends: dict[int, int] | None = None
    title: str = TITLE
    intro: str | None = None


def epochs_intro(fit_dir: Path, responses: str) -> str:
    source = "samples.jsonl at the epoch's last validation" if responses == "samples" else "a predict run of adapters/epoch=E"
    return (
        f"Checkpoint selection for `{fit_dir}`: column *epoch=E* is this fit run at the end of epoch E (counted from 0, as "
        f"adapters/epoch=E), its responses from {source}. LIMA chose its checkpoint by reading answers to 50 dev prompts, "
        "not by perplexity, which it found anti-correlated with quality (paper, appendix B)."
    )


def load_report(args: argparse.Namespace) -> Report:
    extra = load_runs(args.run) if args.run else []
    if args.epochs is None:
        return Report(extra, extra)
    only = parse_epochs(args.only_epochs) if args.only_epochs else None
    epochs = load_epoch_runs(args.epochs.expanduser(), args.epoch_responses, [p.expanduser() for p in args.runs_under], only)
    runs = epochs.columns + extra
    check_comparable(runs)
    title = f"Epochs of {args.epochs}"
    return Report(runs, [epochs.fit, *extra], epochs.ends, title, epochs_intro(args.epochs, args.epoch_responses))


def write_report(report: Report, out: Path, boot: Bootstrap = Bootstrap()) -> Path:
    """report.md + report.html + the PNGs, swapped into `out` together."""
    from lima_lightning.io import write_dir_atomically

    if out.exists() and (not out.is_dir() or {p.name for p in out.iterdir()} - REPORT_FILES):
        raise UserError(
            f"--out={out}: exists and holds other files than a report ({', '.join(sorted(REPORT_FILES))}); pick a new directory"
        )
    figures = {run.name: run_figures(run, boot) for run in report.runs}
    page = Page(report.title, report.intro, figure_tables(report.runs, figures, boot), plot_length_histograms(report.runs))
    curves = plot_loss_curves(report.plot_runs, report.epoch_ends)

    def write(tmp: Path) -> None:
        for name, png in ((LOSS_PNG, curves), (LENGTHS_PNG, page.lengths_png)):
            if png:
                (tmp / name).write_bytes(png)
        (tmp / "report.md").write_text(render_markdown(report.runs, LOSS_PNG if curves else None, page), encoding="utf-8")
        (tmp / "report.html").write_text(render_html(report.runs, curves, page), encoding="utf-8")

    return write_dir_atomically(out, write)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lima-lightning report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a named predictions .jsonl or validation.jsonl file, or predict, validate or fit run dir; repeat for each run "
        "(columns keep this order); required unless --epochs is given",
    )
    parser.add_argument("--epochs", type=Path, metavar="FIT_RUN_DIR", help="one column per epoch of this fit run (checkpoint selection)")
    parser.add_argument("--only-epochs", metavar="E,E|E-E", help="with --epochs: only these epochs, e.g. 4-9 (counted from 0)")
    parser.add_argument(
        "--epoch-responses",
        choices=RESPONSE_SOURCES,
        default="samples",
        help="with --epochs: each epoch's responses from the fit run's samples.jsonl (default) or from a predict run of its adapter",
    )
    parser.add_argument(
        "--runs-under",
        action="append",
        default=[],
        type=Path,
        metavar="ROOT",
        help="with --epochs: also look for validate/predict runs of the epoch adapters in ROOT/lightning_logs (a default_root_dir)",
    )
    parser.add_argument("--resamples", type=int, default=RESAMPLES, help=f"bootstrap resamples per interval (default {RESAMPLES})")
    parser.add_argument("--seed", type=int, default=SEED, help=f"bootstrap seed (default {SEED}): the same seed, the same intervals")
    parser.add_argument("--out", required=True, type=Path, help=f"directory for {', '.join(sorted(REPORT_FILES))}")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if not args.run and args.epochs is None:
        raise UserError("report: give --run NAME=PATH for each run, or --epochs FIT_RUN_DIR (`lima-lightning report --help` shows both)")
    if args.epochs is None:
        given = [f"--{o}" for o, v in (("only-epochs", args.only_epochs), ("runs-under", args.runs_under)) if v]
        given += ["--epoch-responses"] if args.epoch_responses != "samples" else []
        if given:
            raise UserError(f"{given[0]}: only means something with --epochs FIT_RUN_DIR; add it or drop {given[0]}")
    if args.resamples < 1:
        raise UserError(f"--resamples {args.resamples}: expected a number of bootstrap resamples >= 1 (e.g. the default {RESAMPLES})")


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    check_args(args)
    out = write_report(load_report(args), args.out.expanduser(), Bootstrap(args.resamples, args.seed))
    print(f"report: wrote {out / 'report.md'} and {out / 'report.html'}")
