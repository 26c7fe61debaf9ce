"""Reading a run's files: predictions.jsonl, samples.jsonl, validation.jsonl, TensorBoard scalars and config.yaml.

Every file name and path step comes from `lima_lightning.runs`, the one place that knows the run-directory
layout. A malformed row is a one-line `UserError` naming file:line, what is wrong and what a row must hold.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lima_lightning import runs as layout
from lima_lightning.errors import UserError

LOSS_TAGS = ("train/loss", "val/loss")
EPOCH_TAG = "epoch"  # Lightning logs the current epoch beside every logged metric, at the same step
ROW_KEYS = ("prompt", "response", "finish_reason", "new_tokens")


@dataclass
class Run:
    """One column of the report: what one model did, gathered from one or more files."""

    name: str
    predictions: dict[int, dict] = field(default_factory=dict)  # id -> {prompt, response, finish_reason, new_tokens, reference}
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # tag -> [(step, value)]
    sources: list[str] = field(default_factory=list)
    validation: dict[int, dict] = field(default_factory=dict)  # id -> {where, nll, tokens} of validation.jsonl
    model: tuple[str | None, str | None] | None = None  # (model.base_model, model.adapter_path) of its predict/validate runs
    curve_dirs: set[Path] = field(default_factory=set)  # fit run dirs whose curves are in `curves`


# ----------------------------------------------------------------------------- rows
Check = tuple[str, Callable[[object], bool]]  # (what the value must be, the test)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


INT: Check = ("an integer", _is_int)
COUNT: Check = ("an integer >= 0", lambda v: _is_int(v) and v >= 0)
TEXT: Check = ("a string", lambda v: isinstance(v, str))
NATS: Check = ("a finite number >= 0", lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0)
REFERENCE: Check = ("a string or null", lambda v: v is None or isinstance(v, str))

GENERATION_FIELDS = {"prompt": TEXT, "response": TEXT, "finish_reason": TEXT, "new_tokens": COUNT}
PREDICTION_FIELDS = {"id": INT, **GENERATION_FIELDS}
SAMPLE_FIELDS = {"epoch": COUNT, "step": COUNT, **GENERATION_FIELDS}
VALIDATION_FIELDS = {"id": INT, "where": TEXT, "nll": NATS, "tokens": COUNT}
EXPECTED = {
    "predictions": f"expected JSON with {', '.join(PREDICTION_FIELDS)} (optional reference), as `lima-lightning predict` writes",
    "samples": f"expected JSON with {', '.join(SAMPLE_FIELDS)} (optional reference), as fit's sample callback writes",
    "validation": "expected JSON with id (int), where (file:line), nll (nats), tokens (int), as `lima-lightning validate` writes",
}


def row_problem(row: object, fields: dict[str, Check]) -> str | None:
    """What is wrong with a parsed JSON line, None if it has every field with a valid value (and a valid reference)."""
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    for key, (must_be, ok) in {**fields, "reference": REFERENCE}.items():
        if key not in row:
            if key != "reference":
                return f"no {key!r}"
        elif not ok(row[key]):
            return f"{key} is {json.dumps(row[key])[:60]}, not {must_be}"
    return None


def read_rows(path: Path, what: str, fields: dict[str, Check]) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each non-blank line of a .jsonl file whose rows must hold `fields`."""
    expected = (
        f"expected JSON with {', '.join(fields)} (optional reference)"
        if what != "validation"
        else ("expected JSON with id (int), where (file:line), nll (nats), tokens (int), as `lima-lightning validate` writes")
    )
    for line_no, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{line_no}: not a {what} row (invalid JSON: {e}); {expected}") from None
        if (problem := row_problem(row, fields)) is not None:
            raise UserError(f"{path}:{line_no}: not a {what} row ({problem}); {expected}")
        yield line_no, row


def generation_row(row: dict) -> dict:
    return {k: row[k] for k in ROW_KEYS} | {"reference": row.get("reference")}


def read_by_id(path: Path, what: str, fields: dict[str, Check], keep: Callable[[dict], dict]) -> dict[int, dict]:
    """id -> keep(row); an id seen twice is an error (one row per prompt or conversation)."""
    rows, lines = {}, {}
    for line_no, row in read_rows(path, what, fields):
        if row["id"] in rows:
            raise UserError(f"{path}:{line_no}: id {row['id']} again (first at line {lines[row['id']]}); expected one row per id")
        rows[row["id"]], lines[row["id"]] = keep(row), line_no
    return rows


def read_predictions(path: Path) -> dict[int, dict]:
    """predictions.jsonl: id -> {prompt, response, finish_reason, new_tokens, reference}."""
    return read_by_id(path, "predictions", PREDICTION_FIELDS, generation_row)


def read_validation(path: Path) -> dict[int, dict]:
    """validation.jsonl (`lima-lightning validate`): id -> {where, nll, tokens}, nll summed over the trained tokens."""
    return read_by_id(path, "validation", VALIDATION_FIELDS, lambda row: {k: row[k] for k in ("where", "nll", "tokens")})


def read_samples(path: Path) -> dict[int, tuple[int, dict[int, dict]]]:
    """samples.jsonl: epoch -> (step, {position: row}) of the last validation in that epoch.

    The sample callback appends one group of rows per validation, the same prompts in the same order, so a row's
    position in its group is its prompt id, and a group starts where (epoch, step) changes or the first prompt comes
    again. A group logged again at the same (epoch, step), as a run resumed from an earlier checkpoint does,
    replaces the first.
    """
    groups: dict[tuple[int, int], list[dict]] = {}
    key, group = None, []
    for _, row in read_rows(path, "samples", SAMPLE_FIELDS):
        if (row["epoch"], row["step"]) != key or row["prompt"] == group[0]["prompt"]:
            if key is not None:
                groups[key] = group
            key, group = (row["epoch"], row["step"]), []
        group.append(generation_row(row))
    if key is not None:
        groups[key] = group
    return {epoch: (step, dict(enumerate(rows))) for (epoch, step), rows in sorted(groups.items())}


# ----------------------------------------------------------------------------- events and config
def read_scalars(run_dir: Path, tags: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] for those of `tags` the TensorBoard event files directly in `run_dir` hold."""
    if not any(run_dir.glob(layout.EVENTS_GLOB)):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()  # 0: keep every point
    present = set(events.Tags()["scalars"])
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags if tag in present}


def read_loss_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """train/loss and val/loss as [(step, value)] from the TensorBoard event files directly in `run_dir`."""
    return read_scalars(run_dir, LOSS_TAGS)


def run_model(run_dir: Path) -> tuple[str | None, str | None] | None:
    """(model.base_model, model.adapter_path resolved) from a run's config.yaml; None without one."""
    import yaml

    config_file = layout.config_file(run_dir)
    if not config_file.is_file():
        return None
    try:
        model = (yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}).get("model") or {}
    except (yaml.YAMLError, AttributeError) as e:
        raise UserError(f"{config_file}: not a run configuration ({type(e).__name__}); expected the config.yaml of a run") from None
    adapter = model.get("adapter_path")
    return model.get("base_model"), str(Path(adapter).expanduser().resolve()) if adapter else None


def adapter_run_dir(run_dir: Path) -> Path | None:
    """The fit run dir behind a predict or validate run: `model.adapter_path` is `<fit run dir>/adapters/<name>`."""
    model = run_model(run_dir)
    return layout.run_of_adapter(model[1]) if model and model[1] else None
