"""Reading runs: `--run NAME=PATH` specs, predictions files, loss curves from TensorBoard events, and the fit run
behind a predict run (through `lima_lightning.runs`, the one place that knows the run-directory layout)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from lima_lightning import runs as layout
from lima_lightning.errors import UserError

LOSS_TAGS = ("train/loss", "val/loss")
ROW_KEYS = ("prompt", "response", "finish_reason", "new_tokens")
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.+-]+")


@dataclass
class Run:
    name: str
    predictions: dict[int, dict] = field(default_factory=dict)  # id -> predictions.jsonl row
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # tag -> [(step, value)]
    sources: list[str] = field(default_factory=list)


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
    if not any(run_dir.glob(layout.EVENTS_GLOB)):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()  # 0: keep every point
    tags = set(events.Tags()["scalars"])
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in LOSS_TAGS if tag in tags}


def adapter_run_dir(predict_dir: Path) -> Path | None:
    """The fit run dir behind a predict run: `model.adapter_path` in its config.yaml is `<fit run dir>/adapters/<name>`."""
    import yaml

    config_file = layout.config_file(predict_dir)
    if not config_file.is_file():
        return None
    adapter = ((yaml.safe_load(config_file.read_text()) or {}).get("model") or {}).get("adapter_path")
    return layout.run_of_adapter(adapter) if adapter else None


def add_source(run: Run, spec: str, path: Path) -> None:
    """Add what `path` holds to `run`: predictions and/or loss curves (followed from a predict run to its fit run)."""
    if path.is_file():
        predictions, curves = path, {}
    elif path.is_dir():
        predictions = path / layout.PREDICTIONS_FILE if (path / layout.PREDICTIONS_FILE).is_file() else None
        curves = read_loss_curves(path)
        if curves:
            run.sources.append(f"loss curves: {path}")
        elif predictions is not None and (fit_dir := adapter_run_dir(path)) is not None and (curves := read_loss_curves(fit_dir)):
            run.sources.append(f"loss curves: {fit_dir} (the fit run of model.adapter_path in {layout.config_file(path)})")
    else:
        raise UserError(f"--run {spec}: no such file or directory")
    if predictions is None and not curves:
        raise UserError(f"--run {spec}: holds neither {layout.PREDICTIONS_FILE} nor TensorBoard events with {' or '.join(LOSS_TAGS)}")
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
