"""`--run NAME=PATH` specs to `Run`s: what each path holds, joined by NAME, checked to be comparable.

PATH is a file (`validation.jsonl` by its name, any other .jsonl a predictions file) or a run dir:
  - a predict run: its predictions.jsonl; the loss curves of the fit run behind its model.adapter_path;
  - a validate run (it holds validation.jsonl): that file; the loss curves likewise (its own val/loss is one
    point, the same figure as its validation.jsonl);
  - a fit run: its TensorBoard train/loss and val/loss.
One NAME given several times gathers them into one column (one model: the configs must agree).
"""

from __future__ import annotations

import re
from pathlib import Path

from lima_lightning import runs as layout
from lima_lightning.errors import UserError
from lima_lightning.report.reading import LOSS_TAGS, Run, adapter_run_dir, read_loss_curves, read_predictions, read_validation, run_model

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.+-]+")


def parse_run_spec(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not NAME_PATTERN.fullmatch(name) or not path:
        raise UserError(f"--run {spec}: expected NAME=PATH, NAME made of letters, digits and _.+- (e.g. --run qlora=runs/.../version_3)")
    return name, Path(path).expanduser()


def add_source(run: Run, spec: str, path: Path) -> None:
    """Add what `path` holds to `run`: predictions, validation and/or loss curves (followed to the fit run)."""
    if path.is_file():
        if path.name == layout.VALIDATION_FILE:
            set_validation(run, spec, path)
        else:
            set_predictions(run, spec, path)
    elif path.is_dir():
        add_run_dir(run, spec, path)
    else:
        raise UserError(f"--run {spec}: no such file or directory")


def existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def add_run_dir(run: Run, spec: str, path: Path) -> None:
    predictions, validation = (existing(path / name) for name in (layout.PREDICTIONS_FILE, layout.VALIDATION_FILE))
    # A validate run's own val/loss is one point, the figure its validation.jsonl gives with an interval.
    fit_dir, curves = (None, {}) if validation else (path, read_loss_curves(path))
    note = f"loss curves: {path}"
    if not curves and (predictions or validation) and (fit_dir := adapter_run_dir(path)) is not None:
        curves = read_loss_curves(fit_dir)
        note = f"loss curves: {fit_dir} (the fit run of model.adapter_path in {layout.config_file(path)})"
    if predictions is None and validation is None and not curves:
        raise UserError(
            f"--run {spec}: holds neither {layout.PREDICTIONS_FILE} nor TensorBoard events with {' or '.join(LOSS_TAGS)}, "
            f"nor {layout.VALIDATION_FILE}; expected a predict, validate or fit run dir"
        )
    if predictions or validation:
        check_same_model(run, spec, path)
    if predictions:
        set_predictions(run, spec, predictions)
    if validation:
        set_validation(run, spec, validation)
    if curves:
        add_curves(run, spec, fit_dir, curves, note)


def check_same_model(run: Run, spec: str, run_dir: Path) -> None:
    """One NAME is one model: the predict and validate runs gathered under it used the same base and adapter."""
    model = run_model(run_dir)
    if model is None:
        return
    if run.model is not None and model != run.model:
        raise UserError(
            f"--run {spec}: {layout.config_file(run_dir)} has base_model={model[0]}, adapter_path={model[1]}, but {run.name} "
            f"already has base_model={run.model[0]}, adapter_path={run.model[1]}; give each model a name of its own"
        )
    run.model = model


def set_predictions(run: Run, spec: str, path: Path) -> None:
    if run.predictions:
        raise UserError(f"--run {spec}: a second predictions file for {run.name}; give each a name of its own")
    run.predictions = read_predictions(path)
    run.sources.append(f"predictions: {path}")


def set_validation(run: Run, spec: str, path: Path) -> None:
    if run.validation:
        raise UserError(f"--run {spec}: a second {layout.VALIDATION_FILE} for {run.name}; give each a name of its own")
    run.validation = read_validation(path)
    run.sources.append(f"answer NLL: {path}")


def add_curves(run: Run, spec: str, fit_dir: Path, curves: dict, note: str) -> None:
    """The curves of one fit run, once: a predict and a validate run of the same adapter both lead to it."""
    if fit_dir.resolve() in run.curve_dirs:
        return
    for tag, points in curves.items():
        if tag in run.curves:
            raise UserError(f"--run {spec}: a second {tag} curve for {run.name}; give each fit run a name of its own")
        run.curves[tag] = points
    run.curve_dirs.add(fit_dir.resolve())
    run.sources.append(note)


def load_runs(specs: list[str]) -> list[Run]:
    runs: dict[str, Run] = {}
    for spec in specs:
        name, path = parse_run_spec(spec)
        add_source(runs.setdefault(name, Run(name)), spec, path)
    check_comparable(list(runs.values()))
    return list(runs.values())


def check_comparable(runs: list[Run]) -> None:
    check_same_prompts(runs)
    check_same_conversations(runs)


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


def check_same_conversations(runs: list[Run]) -> None:
    """Answer NLLs compare only on the same held-out conversations: every run's validation ids and `where`s agree."""
    scored = [run for run in runs if run.validation]
    if not scored:
        return
    first = scored[0]
    expected = {i: row["where"] for i, row in first.validation.items()}
    for run in scored[1:]:
        found = {i: row["where"] for i, row in run.validation.items()}
        if found != expected:
            differ = sorted(set(found) ^ set(expected)) or [i for i in sorted(found) if found[i] != expected[i]]
            raise UserError(
                f"--run {run.name}: its {layout.VALIDATION_FILE} scores other held-out conversations than {first.name}'s "
                f"({len(found)} vs {len(expected)} rows; first difference at id {differ[0]}); validate every run with the same "
                "data.dataset, data.val_fraction and data.seed"
            )
