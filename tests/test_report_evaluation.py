"""`report` with validate runs: answer NLL per run, next to predictions under one NAME, checked to be comparable.

Run dirs are fabricated (config.yaml, .jsonl files, TensorBoard scalars written with SummaryWriter): no training.
The helpers here also serve tests/test_report_epochs.py.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from lima_lightning import runs as layout
from lima_lightning.errors import UserError
from lima_lightning.report import main
from lima_lightning.report.loading import load_runs
from lima_lightning.report.reading import read_predictions, read_validation


# ----------------------------------------------------------------------------- fabricated run dirs
def run_dir(root: Path, version: int) -> Path:
    path = layout.logs_dir(root) / f"version_{version}"
    path.mkdir(parents=True)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_config(run: Path, adapter: Path | None = None, base_model: str = "tiny") -> None:
    import yaml

    model = {"base_model": base_model, "adapter_path": str(adapter) if adapter else None}
    layout.config_file(run).write_text(yaml.safe_dump({"model": model}), encoding="utf-8")


def write_scalars(run: Path, scalars: dict[str, list[tuple[int, float]]]) -> None:
    """TensorBoard scalar events, as SummaryWriter.add_scalar writes them (tensorboard's writer: no torch import)."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(run))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_event(Event(step=step, wall_time=1.0, summary=Summary(value=[Summary.Value(tag=tag, simple_value=value)])))
    writer.close()


def validation_rows(pairs: list[tuple[float, int]], data: str = "lima/train.jsonl") -> list[dict]:
    """(nll, tokens) per conversation; `where` names the line of the data file the conversation came from."""
    return [{"id": i, "where": f"{data}:{3 * i + 1}", "nll": nll, "tokens": tokens} for i, (nll, tokens) in enumerate(pairs)]


PROMPTS = [("Write 'cloud' in capital letters.", "CLOUD"), ("What is 2+3?", "5"), ("Capital of Italy?", "Rome")]


def prediction_rows(responses: list[str], finish: list[str] | None = None) -> list[dict]:
    return [
        {"id": i, "prompt": p, "response": r, "finish_reason": (finish or ["eos"] * 3)[i], "new_tokens": 2 + i, "reference": ref}
        for i, ((p, ref), r) in enumerate(zip(PROMPTS, responses, strict=True))
    ]


@pytest.fixture
def runs(tmp_path) -> dict[str, Path]:
    """A fit run, a predict and a validate run of its adapter, and a predict and a validate run of the base alone."""
    root = tmp_path / "runs"
    fit = run_dir(root, 0)
    adapter = layout.adapter_dir(fit, layout.FINAL_ADAPTER)
    adapter.mkdir(parents=True)
    write_scalars(fit, {"train/loss": [(1, 2.0), (3, 1.5)], "val/loss": [(3, 1.7)], "epoch": [(1, 0), (3, 0)]})
    dirs = {"fit": fit}
    for version, (name, adapter_path) in enumerate(
        [("qlora-predict", adapter), ("qlora-validate", adapter), ("base-predict", None), ("base-validate", None)], 1
    ):
        dirs[name] = run_dir(root, version)
        write_config(dirs[name], adapter_path)
    write_jsonl(dirs["qlora-predict"] / layout.PREDICTIONS_FILE, prediction_rows(["CLOUD", "5", "Rome"]))
    write_jsonl(
        dirs["base-predict"] / layout.PREDICTIONS_FILE, prediction_rows(["cloud", "The answer is 5", "Paris"], ["eos", "length", "eos"])
    )
    write_jsonl(dirs["qlora-validate"] / layout.VALIDATION_FILE, validation_rows([(3.0, 2), (1.0, 2)]))
    write_jsonl(dirs["base-validate"] / layout.VALIDATION_FILE, validation_rows([(6.0, 2), (2.0, 2)]))
    write_scalars(dirs["qlora-validate"], {"val/loss": [(0, 9.9)], "epoch": [(0, 0)]})  # its own one point: not a curve
    return dirs


def table_line(md: str, title: str, name: str) -> str:
    """The row of run `name` in the markdown table under `## title`."""
    section = md.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return next(line for line in section.splitlines() if line.startswith(f"| {name} |"))


# ----------------------------------------------------------------------------- end to end
def test_report_compares_answer_nll_and_reference_figures(runs, tmp_path, capsys):
    argv = [f"--run=base={runs['base-predict']}", f"--run=base={runs['base-validate']}"]
    argv += [f"--run=qlora={runs['qlora-predict']}", f"--run=qlora={runs['qlora-validate']}"]
    main([*argv, "--out", str(tmp_path / "out")])
    assert "report: wrote" in capsys.readouterr().out
    md, page = (tmp_path / "out/report.md").read_text(), (tmp_path / "out/report.html").read_text()

    # base: (6 + 2) nats / (2 + 2) tokens = 2.0; a resample of 2 rows is {0,0} -> 3.0, {1,1} -> 1.0 or {0,1} -> 2.0 (1/4, 1/4,
    # 1/2), so the 95% interval is [1, 3]; perplexity is exp of each: 7.39 [2.72, 20.09]. qlora: 4/4 = 1.0 [0.5, 1.5].
    nll = "Answer NLL on the held-out conversations"
    assert table_line(md, nll, "base") == "| base | 2 | 4 | 2.000 [1.000, 3.000] | 7.39 [2.72, 20.09] |"
    assert table_line(md, nll, "qlora") == "| qlora | 2 | 4 | 1.000 [0.500, 1.500] | 2.72 [1.65, 4.48] |"
    assert "<td>base</td><td>2</td><td>4</td><td>2.000 [1.000, 3.000]</td><td>7.39 [2.72, 20.09]</td>" in page
    assert f"{math.exp(2):.2f}" == "7.39"

    # base: `cloud` is CLOUD normalised (exact), `The answer is 5` contains 5, Paris is not Rome.
    reference = "Against the reference answers"
    assert table_line(md, reference, "base").startswith("| base | 3 | 33.3% [0.0%, 100.0%] | 66.7% [")
    assert table_line(md, reference, "qlora") == "| qlora | 3 | 100.0% [100.0%, 100.0%] | 100.0% [100.0%, 100.0%] | 1.00 [1.00, 1.00] |"
    assert "**base** (3 tokens, length, 0% repeated 4-grams, contains the answer)" in md
    assert table_line(md, "Responses, with 95% intervals", "base").startswith("| base | 3 | 3.0 [2.0, 4.0] | 66.7% [")

    # The curves come from the fit run behind both qlora runs, once; the validate run's own val/loss point is no curve.
    assert table_line(md, "Summary", "qlora").endswith("| 1.500 | 1.700 |")
    assert md.count(f"loss curves: {runs['fit']}") == 1
    histogram = (tmp_path / "out" / "length_histogram.png").read_bytes()
    assert histogram.startswith(b"\x89PNG") and "![response lengths against the references](length_histogram.png)" in md

    # Seeded: the same inputs give the same report, byte for byte.
    main([*argv, "--out", str(tmp_path / "again")])
    assert (tmp_path / "again/report.md").read_text() == md and (tmp_path / "again/report.html").read_text() == page


def test_a_validate_run_alone_and_a_validation_file(runs, tmp_path):
    main(
        [
            "--run",
            f"base={runs['base-validate']}",
            "--run",
            f"q={runs['qlora-validate'] / layout.VALIDATION_FILE}",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    md = (tmp_path / "o/report.md").read_text()
    assert table_line(md, "Answer NLL on the held-out conversations", "q").startswith("| q | 2 | 4 | 1.000 [")
    assert table_line(md, "Summary", "base") == "| base | — | — | — | — | — | — | — |"  # no predictions, no adapter
    assert "## Responses" not in md and "length_histogram" not in md and not (tmp_path / "o/length_histogram.png").exists()


def test_runs_must_be_scored_on_the_same_conversations(runs, tmp_path):
    other = tmp_path / "other" / layout.VALIDATION_FILE
    other.parent.mkdir()
    write_jsonl(other, validation_rows([(6.0, 2), (2.0, 2)], data="another.jsonl"))
    with pytest.raises(
        UserError, match=r"--run b: its validation.jsonl scores other held-out conversations than a's .*id 0.*data.val_fraction"
    ):
        load_runs([f"a={runs['qlora-validate']}", f"b={other}"])
    write_jsonl(other, validation_rows([(6.0, 2)]))
    with pytest.raises(UserError, match=r"\(1 vs 2 rows; first difference at id 1\)"):
        load_runs([f"a={runs['qlora-validate']}", f"b={other}"])


def test_one_name_is_one_model(runs, tmp_path):
    with pytest.raises(
        UserError, match=r"--run q=.*adapter_path=None, but q already has base_model=tiny, adapter_path=.*final; give each model"
    ):
        load_runs([f"q={runs['qlora-predict']}", f"q={runs['base-validate']}"])
    with pytest.raises(UserError, match="a second validation.jsonl for q"):
        load_runs([f"q={runs['qlora-validate']}", f"q={runs['qlora-validate'] / layout.VALIDATION_FILE}"])


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"id": 1, "where": "t:4", "nll": NaN, "tokens": 3}', "nll is NaN, not a finite number >= 0"),
        ('{"id": 1, "where": "t:4", "nll": -0.5, "tokens": 3}', "nll is -0.5, not a finite number >= 0"),
        ('{"id": 1, "where": "t:4", "nll": 1.5}', "no 'tokens'"),
        ('{"id": 1, "where": "t:4", "nll": 1.5, "tokens": 2.5}', "tokens is 2.5, not an integer >= 0"),
        ('{"id": 0, "where": "t:4", "nll": 1.5, "tokens": 3}', "id 0 again (first at line 1)"),
        ("[1, 2]", "a JSON list, not an object"),
        ("{", "invalid JSON"),
    ],
)
def test_bad_validation_rows_name_file_line_and_value(tmp_path, line, problem):
    path = tmp_path / layout.VALIDATION_FILE
    path.write_text('{"id": 0, "where": "t:1", "nll": 1.0, "tokens": 2}\n' + line + "\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}:2: .*{re.escape(problem)}"):
        read_validation(path)


def test_bad_prediction_values_are_user_errors(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", prediction_rows(["a", "b", "c"]))
    rows = path.read_text().splitlines()
    path.write_text(rows[0] + "\n" + rows[1].replace('"response": "b"', '"response": null') + "\n")
    with pytest.raises(UserError, match=rf"{re.escape(str(path))}:2: not a predictions row \(response is null, not a string\)"):
        read_predictions(path)
    path.write_text(rows[0] + "\n" + rows[1].replace('"reference": "5"', '"reference": 5') + "\n")
    with pytest.raises(UserError, match=r":2: not a predictions row \(reference is 5, not a string or null\)"):
        read_predictions(path)


def test_report_options_are_checked(runs, tmp_path):
    out = str(tmp_path / "o")
    with pytest.raises(UserError, match="give --run NAME=PATH for each run, or --epochs FIT_RUN_DIR"):
        main(["--out", out])
    with pytest.raises(UserError, match="--only-epochs: only means something with --epochs"):
        main(["--run", f"a={runs['qlora-validate']}", "--only-epochs", "4-9", "--out", out])
    with pytest.raises(UserError, match="--resamples 0: expected a number of bootstrap resamples >= 1"):
        main(["--run", f"a={runs['qlora-validate']}", "--resamples", "0", "--out", out])
