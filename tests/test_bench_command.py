"""The whole-command benchmark, rehearsed on CPU with the tiny model: every row it writes is filled in."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import LIMA_TRAIN, REPO, needs_lima

CPU = "--trainer.accelerator cpu --trainer.precision 32-true --model.quantization none --model.compile false --data.max_seq_length 256"
CPU += " --data.max_tokens_per_batch 512 --trainer.max_epochs 1 --samples.num_prompts 1 --samples.max_new_tokens 4"
CPU += " --model.generation.max_new_tokens 4 --trainer.limit_val_batches 2 --trainer.log_every_n_steps 1 --model.lora_r 4"


@needs_lima
@pytest.mark.slow
def test_fit_then_predict_rows(tmp_path):
    out = tmp_path / "rows.json"
    command = [sys.executable, str(REPO / "benchmarks/bench_command.py"), "--model", "tiny", "--lima", str(LIMA_TRAIN.parent)]
    runs = "qlora@24,predict-qlora@24,predict-qlora@24/model.generation.max_new_tokens=2/model.generation.do_sample=false,plain-qlora@24"
    command += ["--runs", runs, "--out", str(out), "--root", str(tmp_path / "runs"), "--max-steps", "3", "--plain-extra=--smoke"]
    command += ["--skip-steps", "1", "--extra", CPU + " --data.predict_batch_size 16 --trainer.limit_predict_batches 1"]
    subprocess.run(command, cwd=REPO, check=True, timeout=600, capture_output=True)
    fit, predict, predict_short, plain = json.loads(out.read_text())["rows"]
    assert fit["exit"] == 0 and fit["steps"] == 3 and fit["steady_tokens_per_s"] > 0 and fit["adapter"]
    assert {"startup", "load", "train"} <= fit["phases_s"].keys() and fit["wall_s"] >= fit["phases_s"]["total"] * 0.9
    assert predict["exit"] == 0 and predict["prompts"] == 16 and predict["new_tokens"] > 0 and "generate" in predict["phases_s"]
    assert predict["peak_gib"] is None  # no GPU here; on one, the whole command's peak from phases.json
    # A run's own options reach its command only (after --extra's, so they win): 2 new tokens per prompt at most.
    assert predict_short["options"] == ["model.generation.max_new_tokens=2", "model.generation.do_sample=false"]
    assert predict_short["prompts"] == 16 and 16 <= predict_short["new_tokens"] <= 32 < predict["new_tokens"]
    # The plain loop under the same budget: its steady rate and peak, and 3 epochs estimated from them.
    assert plain["exit"] == 0 and plain["steady_tokens_per_s"] > 0 and "peak_gib" in plain  # None on the CPU
    expected = plain["load_s"] + 3 * 701_115 / plain["steady_tokens_per_s"]
    assert abs(plain["three_epochs_estimate_s"] - expected) <= 0.01 * expected + 1  # the rate is rounded in the row
