"""`lima-lightning report`: statistics by hand, escaping, and a report built from real fit and predict runs."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from lima_lightning.errors import UserError
from lima_lightning.report.reading import Run
from lima_lightning.report.rendering import fenced, render_html, render_markdown
from lima_lightning.report.statistics import ngram_repeats, repeated_ngram_rate, summarize
from tests.conftest import demo_args, run_cli


def row(response: str, new_tokens: int, finish_reason: str, prompt: str = "p") -> dict:
    return {"prompt": prompt, "response": response, "new_tokens": new_tokens, "finish_reason": finish_reason, "reference": None}


# ----------------------------------------------------------------------------- statistics
def test_ngram_repeats_by_hand():
    assert ngram_repeats("the cat sat on the mat") == (0, 3)  # 3 distinct 4-grams
    # a b c d | b c d a | c d a b | d a b c | a b c d <- the 5th repeats the 1st
    assert ngram_repeats("a b c d a b c d") == (1, 5)
    assert ngram_repeats("x x x x x x") == (2, 3)  # three copies of (x x x x)
    assert ngram_repeats("one two three") == (0, 0)
    assert ngram_repeats("") == (0, 0)
    assert ngram_repeats("a\nb  c\td a b c d") == (1, 5)  # any whitespace separates words
    assert ngram_repeats("a b a b", n=2) == (1, 3)


def test_repeated_ngram_rate_pools_over_responses():
    # (1 + 0 + 0) repeats over (5 + 3 + 0) 4-grams; a mean of per-response rates would give (0.2 + 0) / 2 = 0.1.
    assert repeated_ngram_rate(["a b c d a b c d", "the cat sat on the mat", "hi"]) == pytest.approx(1 / 8)
    assert repeated_ngram_rate([]) == 0.0
    assert repeated_ngram_rate(["too short"]) == 0.0


def test_summarize_by_hand():
    s = summarize([row("a b c d a b c d", 10, "eos"), row("x", 20, "eos"), row("the cat sat on the mat", 48, "length")])
    assert s.prompts == 3
    assert s.mean_new_tokens == pytest.approx(26.0)
    assert s.eos_share == pytest.approx(2 / 3) and s.length_share == pytest.approx(1 / 3)
    assert s.repeated_ngram_rate == pytest.approx(1 / 8)


# ----------------------------------------------------------------------------- rendering
def test_html_escapes_every_text_and_markdown_fences_hold():
    evil = '<script>alert("x")</script> & `` ``` ```` code'
    runs = [Run("a", {0: row(evil, 5, "eos", prompt="<b>prompt</b>")}, sources=["<src>"])]
    page = render_html(runs, png=None)
    assert "<script>alert" not in page and "<b>prompt" not in page and "<src>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp;" in page and "&lt;b&gt;prompt&lt;/b&gt;" in page
    block = fenced(evil)
    assert block.startswith("`````text\n") and block.endswith("\n`````")  # longer than the longest run inside (4)
    assert block in render_markdown(runs, png_name=None)


def test_bad_inputs_are_user_errors(tmp_path):
    from lima_lightning.report.loading import load_runs

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 0, "prompt": "p", "response": "r", "finish_reason": "eos", "new_tokens": 1}\n{"id": 1, "prompt": "p"}\n')
    with pytest.raises(UserError, match=rf"{re.escape(str(bad))}:2: not a predictions row"):
        load_runs([f"a={bad}"])
    with pytest.raises(UserError, match="expected NAME=PATH"):
        load_runs([str(bad)])
    with pytest.raises(UserError, match="no such file"):
        load_runs([f"a={tmp_path / 'missing'}"])
    with pytest.raises(UserError, match="neither predictions.jsonl nor TensorBoard events"):
        load_runs([f"a={tmp_path}"])
    other = tmp_path / "other.jsonl"
    other.write_text('{"id": 0, "prompt": "another prompt", "response": "r", "finish_reason": "eos", "new_tokens": 1}\n')
    good = tmp_path / "good.jsonl"
    good.write_text(bad.read_text().splitlines()[0] + "\n")
    with pytest.raises(UserError, match="prompt id 0 differs from run a"):
        load_runs([f"a={good}", f"b={other}"])


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two short fits (different learning rates), a predict with each adapter, and a predict with the base alone."""
    root = tmp_path_factory.mktemp("report-runs")
    dirs = {}
    for name, lr in (("fast", "0.003"), ("slow", "0.0005")):
        fit = run_cli(
            "fit",
            *demo_args(root, "--trainer.max_steps", "4", "--trainer.max_epochs", "1", "--trainer.val_check_interval", "2")
            + ["--model.learning_rate", lr, "--samples.num_prompts", "0", "--adapters.every_epoch", "false"],
        )
        dirs[f"{name}-fit"] = Path(fit.trainer.log_dir)
        adapter = str(dirs[f"{name}-fit"] / "adapters/final")
        predict = run_cli("predict", *demo_args(root, "--model.adapter_path", adapter, "--model.generation.max_new_tokens", "24"))
        dirs[f"{name}-predict"] = Path(predict.trainer.log_dir)
    dirs["base-predict"] = Path(run_cli("predict", *demo_args(root, "--model.generation.max_new_tokens", "24")).trainer.log_dir)
    return dirs


def scalars(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return [e.value for e in EventAccumulator(str(run_dir)).Reload().Scalars(tag)]


@pytest.mark.slow
def test_report_from_real_runs(runs, tmp_path, capsys):
    from lima_lightning.cli import main

    out = tmp_path / "report"
    main(
        [
            "report",
            "--run",
            f"base={runs['base-predict']}",
            "--run",
            f"fast={runs['fast-predict']}",  # a predict dir: the curves are found through its model.adapter_path
            "--run",
            f"slow={runs['slow-predict'] / 'predictions.jsonl'}",  # a file and a fit dir paired by name
            "--run",
            f"slow={runs['slow-fit']}",
            "--out",
            str(out),
        ]
    )
    assert "report: wrote" in capsys.readouterr().out
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    png = (out / "loss_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert "![train/loss and val/loss](loss_curves.png)" in md
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in page  # the very same plot, inlined

    for name in ("base", "fast", "slow"):
        rows = [json.loads(line) for line in (runs[f"{name}-predict"] / "predictions.jsonl").read_text().splitlines()]
        mean_tokens = sum(r["new_tokens"] for r in rows) / len(rows)
        eos = sum(r["finish_reason"] == "eos" for r in rows) / len(rows)
        losses = (
            [f"{scalars(runs[f'{name}-fit'], 'train/loss')[-1]:.3f}", f"{scalars(runs[f'{name}-fit'], 'val/loss')[-1]:.3f}"]
            if name != "base"
            else ["—", "—"]
        )
        expected = f"| {name} | {len(rows)} | {mean_tokens:.1f} | {eos:.1%} | {1 - eos:.1%} | "
        summary_line = next(line for line in md.splitlines() if line.startswith(f"| {name} | {len(rows)} |"))
        assert summary_line.startswith(expected), (summary_line, expected)
        assert summary_line.endswith(f"| {losses[0]} | {losses[1]} |"), summary_line
        assert f"<td>{name}</td><td>{len(rows)}</td><td>{mean_tokens:.1f}</td><td>{eos:.1%}</td>" in page
        # Every response is shown, with its own length and finish reason.
        for r in rows:
            assert f"**{name}** ({r['new_tokens']} tokens, {r['finish_reason']}," in md
    assert md.count("### Prompt ") == 20 and page.count('<section class="prompt">') == 20
    assert f"loss curves: {runs['fast-fit']} (the fit run of model.adapter_path" in md

    # A second report may replace the first, but --out never replaces a directory holding anything else.
    main(["report", "--run", f"base={runs['base-predict']}", "--out", str(out)])
    assert not (out / "loss_curves.png").exists() and "No run has train/loss" in (out / "report.md").read_text()
    with pytest.raises(UserError, match="holds other files"):
        from lima_lightning.report import main as report_main

        report_main(["--run", f"base={runs['base-predict']}", "--out", str(runs["base-predict"])])


@pytest.mark.slow
def test_epochs_report_reads_real_lightning_logs(runs, tmp_path):
    """--epochs on a real fit run: Lightning's `epoch` scalar places the epoch's end, so its column has the run's last losses."""
    from lima_lightning.report import main as report_main

    report_main(["--epochs", str(runs["fast-fit"]), "--out", str(tmp_path / "epochs")])
    md = (tmp_path / "epochs" / "report.md").read_text()
    losses = f"| {scalars(runs['fast-fit'], 'train/loss')[-1]:.3f} | {scalars(runs['fast-fit'], 'val/loss')[-1]:.3f} |"
    line = next(line for line in md.splitlines() if line.startswith("| epoch=0 |"))
    assert line.endswith(losses), (line, losses)
