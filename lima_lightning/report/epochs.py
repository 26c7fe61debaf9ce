"""`report --epochs FIT_RUN_DIR`: one fit run's per-epoch checkpoints side by side, to pick one by reading them.

LIMA picked its checkpoint by hand between epochs 5 and 10 on 50 dev prompts, because perplexity anti-correlates
with answer quality (paper, appendix B). Each column `epoch=E` is the run as it stood at the end of epoch E:
  - its responses: the fit run's samples.jsonl rows of the last validation in epoch E (`--samples.num_prompts 50`
    answers the first 50 held-out conversations, greedily, at every validation: a fixed dev set), or, with
    `--epoch-responses predictions`, the predictions.jsonl of a predict run of `adapters/epoch=E`;
  - its loss: train/loss and val/loss as last logged by the end of epoch E (epochs from the events' `epoch` scalar);
  - its answer NLL with an interval, when a validate run of `adapters/epoch=E` is found.
Predict and validate runs of an epoch adapter are found by their config.yaml's model.adapter_path, among the fit
run's sibling run dirs (the same `lightning_logs/`, where `validate --config <the fit config>` writes) and under
each `--runs-under ROOT`; the newest one per epoch wins. Epochs count from 0, as `adapters/epoch=E` does:
LIMA's epochs 5 to 10 are `--only-epochs 4-9`. Samples are greedy and stop at `--samples.max_new_tokens` (128 by
default; LIMA's answers run longer, so 500 reads better, at the cost of a slower validation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lima_lightning import runs as layout
from lima_lightning.errors import UserError
from lima_lightning.report import reading
from lima_lightning.report.reading import EPOCH_TAG, LOSS_TAGS, Run

RESPONSE_SOURCES = ("samples", "predictions")


def epoch_end_steps(epoch_points: list[tuple[int, float]]) -> dict[int, int]:
    """epoch -> the last step logged in it, from the `epoch` scalar Lightning logs at every logged step."""
    ends: dict[int, int] = {}
    for step, value in epoch_points:
        ends[round(value)] = max(step, ends.get(round(value), step))
    return ends


def curves_until(curves: dict[str, list[tuple[int, float]]], step: int) -> dict[str, list[tuple[int, float]]]:
    """Each curve's points up to `step`: what had been logged by then."""
    cut = {tag: [(s, v) for s, v in points if s <= step] for tag, points in curves.items()}
    return {tag: points for tag, points in cut.items() if points}


def parse_epochs(text: str) -> set[int]:
    """`4,6,8` or `4-9` (inclusive) or a mix (`0,4-9`)."""
    epochs: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise UserError(f"--only-epochs {text}: {part!r} is not an epoch or a range; expected e.g. 4,9 or 4-9 (epochs count from 0)")
        epochs.update(range(int(first), int(last if dash else first) + 1))
    return epochs


def search_roots(fit_dir: Path, runs_under: list[Path]) -> list[Path]:
    """The fit run's own default_root_dir (when it is a `lightning_logs/version_N`), then each --runs-under ROOT."""
    for root in runs_under:
        if not layout.run_dirs(root):
            raise UserError(f"--runs-under {root}: no {layout.logs_dir(root)}/version_N; give a trainer.default_root_dir")
    own = fit_dir.parent.parent
    return ([own] if layout.run_version(fit_dir, own) is not None else []) + list(runs_under)


def adapter_runs(fit_dir: Path, roots: list[Path], file_name: str) -> dict[int, Path]:
    """epoch -> the newest run dir under `roots` that holds `file_name` and used `<fit_dir>/adapters/epoch=E`."""
    found: dict[int, Path] = {}
    fit = fit_dir.resolve()
    for run_dir in sorted({d.resolve() for root in roots for d in layout.run_dirs(root)}):
        model = reading.run_model(run_dir) if (run_dir / file_name).is_file() else None
        adapter = model[1] if model else None
        epoch = layout.epoch_of_adapter(Path(adapter)) if adapter else None
        if epoch is None or layout.run_of_adapter(adapter) != fit:
            continue
        if epoch not in found or (run_dir / file_name).stat().st_mtime > (found[epoch] / file_name).stat().st_mtime:
            found[epoch] = run_dir
    return found


@dataclass
class FitRun:
    """What a fit run dir says about its epochs, and the predict/validate runs found for its epoch adapters."""

    dir: Path
    samples: dict[int, tuple[int, dict[int, dict]]] = field(default_factory=dict)  # epoch -> (step, {id: row})
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    ends: dict[int, int] = field(default_factory=dict)  # epoch -> its last logged step
    validated: set[int] = field(default_factory=set)  # epochs with a logged val/loss
    validate_runs: dict[int, Path] = field(default_factory=dict)
    predict_runs: dict[int, Path] = field(default_factory=dict)

    def epochs(self) -> set[int]:
        adapters = {layout.epoch_of_adapter(p) for p in layout.epoch_adapters(self.dir)}
        return set(self.samples) | adapters | self.validated | set(self.validate_runs) | set(self.predict_runs)


def read_fit_run(fit_dir: Path, responses: str, runs_under: list[Path]) -> FitRun:
    if not fit_dir.is_dir():
        raise UserError(f"--epochs {fit_dir}: no such directory; expected a fit run dir (<default_root_dir>/lightning_logs/version_N)")
    for name in (layout.VALIDATION_FILE, layout.PREDICTIONS_FILE):
        if (fit_dir / name).is_file():  # a validate run logs samples too: it would pass for a one-epoch fit
            model = reading.run_model(fit_dir)
            behind = f" (its adapter is {model[1]})" if model and model[1] else ""
            raise UserError(f"--epochs {fit_dir}: holds {name}, so it is not a fit run{behind}; give the fit run dir")
    samples_file = fit_dir / layout.SAMPLES_FILE
    scalars = reading.read_scalars(fit_dir, (*LOSS_TAGS, EPOCH_TAG))
    epoch_at = {step: round(value) for step, value in scalars.get(EPOCH_TAG, [])}  # logged at the same step as the losses
    roots = search_roots(fit_dir, runs_under)
    return FitRun(
        dir=fit_dir,
        samples=reading.read_samples(samples_file) if samples_file.is_file() else {},
        curves={tag: points for tag, points in scalars.items() if tag in LOSS_TAGS},
        ends=epoch_end_steps(scalars.get(EPOCH_TAG, [])),
        validated={epoch_at[step] for step, _ in scalars.get("val/loss", []) if step in epoch_at},
        validate_runs=adapter_runs(fit_dir, roots, layout.VALIDATION_FILE),
        predict_runs=adapter_runs(fit_dir, roots, layout.PREDICTIONS_FILE) if responses == "predictions" else {},
    )


@dataclass(frozen=True)
class Epochs:
    columns: list[Run]  # one per epoch, named epoch=E, in epoch order
    fit: Run  # the fit run's whole curves, for the loss plot (the columns hold them cut at each epoch's end)
    ends: dict[int, int]  # epoch -> its last step, for the columns shown


def load_epoch_runs(fit_dir: Path, responses: str = "samples", runs_under: list[Path] = (), only: set[int] | None = None) -> Epochs:
    fit = read_fit_run(fit_dir, responses, list(runs_under))
    epochs = fit.epochs()
    if not epochs:
        raise UserError(
            f"--epochs {fit_dir}: no epoch found (no {layout.SAMPLES_FILE}, adapters/epoch=E or logged val/loss); "
            "expected the run dir of a fit"
        )
    if only is not None:
        if missing := sorted(only - epochs):
            raise UserError(f"--only-epochs: epoch {missing[0]} is not in {fit_dir} (it has {', '.join(map(str, sorted(epochs)))})")
        epochs &= only
    columns = [epoch_run(fit, epoch, responses) for epoch in sorted(epochs)]
    ends = {epoch: fit.ends[epoch] for epoch in sorted(epochs) if epoch in fit.ends}
    return Epochs(columns, Run(fit_dir.name, curves=fit.curves, sources=[f"loss curves: {fit_dir}"]), ends)


def epoch_run(fit: FitRun, epoch: int, responses: str) -> Run:
    """The column of one epoch: its responses, its losses as of the epoch's end, its answer NLL if validated."""
    run = Run(layout.epoch_adapter_name(epoch))
    if responses == "samples" and epoch in fit.samples:
        step, run.predictions = fit.samples[epoch]
        run.sources.append(f"responses: {fit.dir / layout.SAMPLES_FILE} (epoch {epoch}, step {step})")
    if (predict_dir := fit.predict_runs.get(epoch)) is not None:
        run.predictions = reading.read_predictions(predict_dir / layout.PREDICTIONS_FILE)
        run.sources.append(f"responses: {predict_dir / layout.PREDICTIONS_FILE}")
    if (end := fit.ends.get(epoch)) is not None:
        run.curves = curves_until(fit.curves, end)
        run.sources.append(f"losses as logged by step {end}, the end of epoch {epoch}")
    if (validate_dir := fit.validate_runs.get(epoch)) is not None:
        run.validation = reading.read_validation(validate_dir / layout.VALIDATION_FILE)
        run.sources.append(f"answer NLL: {validate_dir / layout.VALIDATION_FILE}")
    if not run.sources:
        run.sources.append(f"{layout.adapter_dir(fit.dir, run.name)} (no samples, losses or validate run for it)")
    return run
