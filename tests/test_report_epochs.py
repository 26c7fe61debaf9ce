"""`report --epochs`: one fit run's epochs side by side (checkpoint selection as LIMA did it), on fabricated run dirs."""

from __future__ import annotations

import os

import pytest

from lima_lightning import runs as layout
from lima_lightning.errors import UserError
from lima_lightning.report import main
from lima_lightning.report.epochs import curves_until, epoch_end_steps, parse_epochs
from lima_lightning.report.reading import read_samples
from tests.test_report_evaluation import run_dir, table_line, validation_rows, write_config, write_jsonl, write_scalars

PROMPTS = [("Write 'cloud' in capital letters.", "CLOUD"), ("Reverse the word 'ocean'.", "naeco")]


def sample_group(epoch: int, step: int, responses: list[str]) -> list[dict]:
    """One validation's rows, as SampleGenerations appends them: the same prompts in the same order."""
    return [
        {"epoch": epoch, "step": step, "prompt": p, "response": r, "finish_reason": "eos", "new_tokens": 3, "reference": ref}
        for (p, ref), r in zip(PROMPTS, responses, strict=True)
    ]


@pytest.fixture
def fit(tmp_path):
    """Three epochs, two validations each (steps 2, 4 | 6, 8 | 10, 12); the one at step 8 logged twice (a resumed run)."""
    root = tmp_path / "runs"
    fit = run_dir(root, 0)
    for epoch in range(3):
        layout.adapter_dir(fit, layout.epoch_adapter_name(epoch)).mkdir(parents=True)
    # TensorBoard steps lag the samples' global_step by one, as Lightning logs them; `epoch` is logged beside each metric.
    write_scalars(
        fit,
        {
            "train/loss": [(1, 3.0), (3, 2.5), (5, 2.0), (7, 1.8), (9, 1.6), (11, 1.5)],
            "val/loss": [(1, 2.9), (3, 2.6), (5, 2.2), (7, 2.1), (9, 2.05), (11, 2.3)],
            "epoch": [(1, 0), (3, 0), (5, 1), (7, 1), (9, 2), (11, 2)],
        },
    )
    groups = [
        sample_group(0, 2, ["early", "early"]),
        sample_group(0, 4, ["cloud", "ocean"]),
        sample_group(1, 6, ["early", "early"]),
        sample_group(1, 8, ["killed", "killed"]),
        sample_group(1, 8, ["CLOUD", "nae co"]),  # logged again after resuming: this one counts
        sample_group(2, 10, ["early", "early"]),
        sample_group(2, 12, ["CLOUD!", "naeco"]),
    ]
    write_jsonl(fit / layout.SAMPLES_FILE, [row for group in groups for row in group])
    # Two validate runs of epoch=1 (the newer counts), one of another fit run's adapter (ignored).
    for version, pairs, mtime in ((1, [(3.0, 2), (1.0, 2)], 2_000_000_000), (2, [(9.0, 1), (9.0, 1)], 1_000_000_000)):
        validate = run_dir(root, version)
        write_config(validate, layout.adapter_dir(fit, "epoch=1"))
        os.utime(write_jsonl(validate / layout.VALIDATION_FILE, validation_rows(pairs)), (mtime, mtime))
    stranger = run_dir(root, 3)
    write_config(stranger, tmp_path / "elsewhere/lightning_logs/version_0/adapters/epoch=0")
    write_jsonl(stranger / layout.VALIDATION_FILE, validation_rows([(1.0, 1), (1.0, 1)]))
    # A predict run of epoch=2 under another default_root_dir, and a validate run of the base model.
    predict = run_dir(tmp_path / "predict", 0)
    write_config(predict, layout.adapter_dir(fit, "epoch=2"))
    rows = [{"id": 0, "prompt": "What is 2+3?", "response": "5", "finish_reason": "eos", "new_tokens": 2, "reference": "5"}]
    write_jsonl(predict / layout.PREDICTIONS_FILE, rows)
    base = run_dir(tmp_path / "base", 0)
    write_config(base, None)
    write_jsonl(base / layout.VALIDATION_FILE, validation_rows([(6.0, 2), (2.0, 2)]))
    return {"fit": fit, "predict-root": tmp_path / "predict", "base": base}


def test_epoch_columns_hold_each_epochs_last_samples_losses_and_answer_nll(fit, tmp_path):
    main(["--epochs", str(fit["fit"]), "--out", str(tmp_path / "o")])
    md = (tmp_path / "o/report.md").read_text()
    page = (tmp_path / "o/report.html").read_text()
    assert md.startswith(f"# Epochs of {fit['fit']}\n") and "counted from 0, as adapters/epoch=E" in md
    # Losses as of each epoch's last logged step (3, 7, 11): the last train/loss and val/loss by then.
    assert table_line(md, "Summary", "epoch=0").endswith("| 2.500 | 2.600 |")
    assert table_line(md, "Summary", "epoch=1").endswith("| 1.800 | 2.100 |")
    assert table_line(md, "Summary", "epoch=2").endswith("| 1.500 | 2.300 |")
    # Responses from each epoch's last validation (the re-logged step 8 for epoch 1), matched against the references.
    ref = "Against the reference answers"
    assert table_line(md, ref, "epoch=0").startswith("| epoch=0 | 2 | 50.0% [")  # cloud = CLOUD, ocean != naeco
    assert table_line(md, ref, "epoch=1").startswith("| epoch=1 | 2 | 50.0% [")  # CLOUD; `nae co` is not naeco
    assert table_line(md, ref, "epoch=2").startswith("| epoch=2 | 2 | 50.0% [0.0%, 100.0%] | 100.0% [100.0%, 100.0%] |")
    assert "killed" not in md and "early" not in md
    assert md.count("### Prompt ") == 2 and "**epoch=2** (3 tokens, eos, 0% repeated 4-grams, contains the answer)" in md
    # Answer NLL of the newest validate run of adapters/epoch=1: (3 + 1) / (2 + 2); the other epochs were not validated.
    nll = "Answer NLL on the held-out conversations"
    assert table_line(md, nll, "epoch=1") == "| epoch=1 | 2 | 4 | 1.000 [0.500, 1.500] | 2.72 [1.65, 4.48] |"
    assert table_line(md, nll, "epoch=0") == "| epoch=0 | — | — | — | — |"
    assert [line.split(" |")[0] for line in md.splitlines() if line.startswith("| epoch=")][:3] == ["| epoch=0", "| epoch=1", "| epoch=2"]
    assert "data:image/png;base64," in page and (tmp_path / "o/loss_curves.png").read_bytes().startswith(b"\x89PNG")


def test_epoch_responses_from_predict_runs_with_a_base_column(fit, tmp_path):
    argv = ["--epochs", str(fit["fit"]), "--only-epochs", "1-2", "--epoch-responses", "predictions"]
    main([*argv, "--runs-under", str(fit["predict-root"]), "--run", f"base={fit['base']}", "--out", str(tmp_path / "o")])
    md = (tmp_path / "o/report.md").read_text()
    assert "epoch=0" not in md
    assert table_line(md, "Summary", "epoch=1").startswith("| epoch=1 | — |")  # no predict run of epoch=1
    assert table_line(md, "Summary", "epoch=2").startswith("| epoch=2 | 1 | 2.0 | 100.0% |")  # the predict run's one answer
    assert "What is 2+3?" in md and "Reverse the word" not in md
    nll = "Answer NLL on the held-out conversations"
    assert table_line(md, nll, "base") == "| base | 2 | 4 | 2.000 [1.000, 3.000] | 7.39 [2.72, 20.09] |"


def test_epoch_mistakes_are_user_errors(fit, tmp_path):
    out = str(tmp_path / "o")
    with pytest.raises(UserError, match=r"--only-epochs: epoch 7 is not in .* \(it has 0, 1, 2\)"):
        main(["--epochs", str(fit["fit"]), "--only-epochs", "7", "--out", out])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="--epochs .*empty: no epoch found"):
        main(["--epochs", str(tmp_path / "empty"), "--out", out])
    with pytest.raises(UserError, match="--runs-under .*: no .*lightning_logs/version_N; give a trainer.default_root_dir"):
        main(["--epochs", str(fit["fit"]), "--runs-under", str(tmp_path / "empty"), "--out", out])


def test_epoch_arithmetic_by_hand():
    assert epoch_end_steps([(1, 0.0), (3, 0.0), (3, 0.0), (5, 1.0), (7, 1.0)]) == {0: 3, 1: 7}
    curves = {"train/loss": [(1, 3.0), (3, 2.0), (5, 1.0)], "val/loss": [(5, 1.5)]}
    assert curves_until(curves, 3) == {"train/loss": [(1, 3.0), (3, 2.0)]}  # the step itself counts; empty curves go
    assert parse_epochs("4-6") == {4, 5, 6} and parse_epochs("0, 4-5,9") == {0, 4, 5, 9}
    for bad in ("4-", "x", "-3", "1.5"):
        with pytest.raises(UserError, match="expected e.g. 4,9 or 4-9"):
            parse_epochs(bad)


def test_read_samples_keeps_each_epochs_last_validation(tmp_path):
    rows = sample_group(0, 2, ["a", "b"]) + sample_group(0, 4, ["c", "d"]) + sample_group(1, 6, ["e", "f"])
    rows += sample_group(1, 6, ["g", "h"])  # the same validation logged again right after (resumed): it replaces the first
    samples = read_samples(write_jsonl(tmp_path / layout.SAMPLES_FILE, rows))
    assert sorted(samples) == [0, 1]
    step, by_id = samples[0]
    assert step == 4 and [by_id[i]["response"] for i in (0, 1)] == ["c", "d"] and by_id[0]["reference"] == "CLOUD"
    assert [row["response"] for row in samples[1][1].values()] == ["g", "h"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"epoch": "1", "step": 2, "prompt": "p", "response": "r", "finish_reason": "eos", "new_tokens": 1}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1: not a samples row \(epoch is \"1\", not an integer >= 0\)"):
        read_samples(bad)


def test_epochs_refuses_a_validate_run(fit, tmp_path):
    validate = fit["fit"].parent / "version_1"  # it has a samples.jsonl of its own, as real validate runs do
    write_jsonl(validate / layout.SAMPLES_FILE, sample_group(0, 0, ["a", "b"]))
    with pytest.raises(UserError, match=r"--epochs .*version_1: holds validation.jsonl, so it is not a fit run \(its adapter is .*=1\)"):
        main(["--epochs", str(validate), "--out", str(tmp_path / "o")])
