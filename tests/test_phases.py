"""Time from command to result: the phase clock's accounting, and the split fit and predict print and save."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lima_lightning import phases
from lima_lightning.phases import PhaseClock, describe
from tests.conftest import demo_args, run_cli


def test_nested_phases_and_compiles_are_counted_once(monkeypatch):
    clock_now = {"wall": 0.0, "compile": 0.0}
    monkeypatch.setattr(phases.time, "perf_counter", lambda: clock_now["wall"])
    monkeypatch.setattr(phases, "compile_seconds", lambda: clock_now["compile"])

    def spend(seconds: float, compiling: float = 0.0) -> None:  # wall time passes; part of it compiling
        clock_now["wall"] += seconds
        clock_now["compile"] += compiling

    clock = PhaseClock()
    with clock.timed("train"):
        spend(5.0, compiling=2.0)  # a step that compiled for 2 s
        with clock.timed("checkpoints"):
            spend(3.0, compiling=1.0)
        spend(1.0)
    assert clock.seconds["checkpoints"] == pytest.approx(2.0)
    assert clock.seconds["train"] == pytest.approx(4.0)  # 9 s, less the checkpoint's 3 and its own 2 of compiling
    assert clock.seconds["compile"] == pytest.approx(3.0)
    assert sum(clock.seconds.values()) == pytest.approx(9.0)  # every second counted once


def test_the_end_line_shows_the_peak_gpu_memory_where_a_gpu_was_used(monkeypatch):
    split = {"total": 80.2, "startup": 12.8, "generate": 60.3}
    assert phases.peak_gpu_memory_gib() is None or torch.cuda.is_available()  # this CPU machine: no GPU, no peak
    assert describe(split, "predict", None) == "predict took 80 s from the command: startup 13 s, generate 60 s"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: int(21.37 * 2**30))
    peak = phases.peak_gpu_memory_gib()
    assert peak == 21.37
    assert describe(split, "predict", peak).endswith("generate 60 s; peak GPU memory 21.4 GiB")


@pytest.mark.slow
def test_fit_and_predict_end_with_their_time_split(tmp_path, caplog, monkeypatch):
    fit = run_cli("fit", *demo_args(tmp_path, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4"))  # then validation
    run_dir = Path(fit.trainer.log_dir)
    split = json.loads((run_dir / "phases.json").read_text())
    assert split["command"] == "fit" and split["peak_gpu_memory_gib"] is None  # CPU: no GPU peak to report
    seconds = split["seconds"]
    assert {"startup", "data", "load", "train", "validation", "samples", "final save"} <= seconds.keys()
    assert seconds["total"] == pytest.approx(sum(v for k, v in seconds.items() if k != "total"), abs=0.05)
    assert any(r.getMessage().startswith("fit took ") and "train " in r.getMessage() for r in caplog.records)
    from lightning.pytorch.strategies import Strategy

    moved, tearing_down = [], []  # the modules Lightning's teardown moves to host memory (a 7B model: 12-14 s on the GPU)
    original_apply, original_teardown = torch.nn.Module._apply, Strategy.teardown

    def record(self, fn, *args, **kwargs):
        if tearing_down:
            moved.append(self)
        return original_apply(self, fn, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "_apply", record)
    monkeypatch.setattr(Strategy, "teardown", lambda self: (tearing_down.append(1), original_teardown(self), tearing_down.clear()))
    predict = run_cli("predict", *demo_args(tmp_path, "--model.adapter_path", str(run_dir / "adapters/final")))
    predicted = json.loads((Path(predict.trainer.log_dir) / "phases.json").read_text())
    assert predicted["command"] == "predict" and {"load", "generate"} <= predicted["seconds"].keys()
    # Predict's model is kept out of that move, and is the module's again afterwards.
    assert predict.model in moved and predict.model.model is not None and not any(m is predict.model.model for m in moved)


@pytest.mark.slow
def test_predict_shows_prompts_and_tokens_as_they_are_generated(tmp_path, capsys):
    from lima_lightning.progress import GenerationProgress

    fit = run_cli("fit", *demo_args(tmp_path, "--trainer.max_steps", "2", "--trainer.max_epochs", "1", "--samples.num_prompts", "0"))
    adapter = str(Path(fit.trainer.log_dir) / "adapters/final")
    counts = []
    original = GenerationProgress.tokens
    GenerationProgress.tokens = lambda self, n: (counts.append(n), original(self, n))[1]
    try:
        shown = ("--trainer.enable_progress_bar", "true", "--data.predict_batch_size", "8", "--model.generation.max_new_tokens", "6")
        predict = run_cli("predict", *demo_args(tmp_path, "--model.adapter_path", adapter, *shown))
    finally:
        GenerationProgress.tokens = original
    rows = [json.loads(line) for line in (Path(predict.trainer.log_dir) / "predictions.jsonl").read_text().splitlines()]
    assert sum(counts) == sum(r["new_tokens"] for r in rows)  # every generated token counted once, EOS included
    out = capsys.readouterr().out  # not a terminal here: plain lines, the last one at the end
    assert f"generate: {len(rows)}/{len(rows)} prompts, {sum(counts):,} tokens" in out and "\r" not in out
