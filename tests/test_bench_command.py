"""The whole-command benchmark, rehearsed on CPU with the tiny model: every row it writes is filled in."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, needs_lima

CPU = "--trainer.accelerator cpu --trainer.precision 32-true --model.quantization none --model.compile false --data.max_seq_length 256"
CPU += " --data.max_tokens_per_batch 512 --trainer.max_epochs 1 --samples.num_prompts 1 --samples.max_new_tokens 4"
CPU += " --model.generation.max_new_tokens 4 --trainer.limit_val_batches 2 --trainer.log_every_n_steps 1 --model.lora_r 4"


@needs_lima
@pytest.mark.slow
def test_fit_then_predict_rows(tmp_path):
    out = tmp_path / "rows.json"
    command = [sys.executable, str(REPO / "benchmarks/bench_command.py"), "--model", "tiny", "--lima", str(REPO.parent / "shared/lima")]
    command += ["--runs", "qlora@24,predict-qlora@24", "--out", str(out), "--root", str(tmp_path / "runs"), "--max-steps", "3"]
    command += ["--skip-steps", "1", "--extra", CPU + " --data.predict_batch_size 16 --trainer.limit_predict_batches 1"]
    subprocess.run(command, cwd=REPO, check=True, timeout=600, capture_output=True)
    fit, predict = json.loads(out.read_text())["rows"]
    assert fit["exit"] == 0 and fit["steps"] == 3 and fit["steady_tokens_per_s"] > 0 and fit["adapter"]
    assert {"startup", "load", "train"} <= fit["phases_s"].keys() and fit["wall_s"] >= fit["phases_s"]["total"] * 0.9
    assert predict["exit"] == 0 and predict["prompts"] == 16 and predict["new_tokens"] > 0 and "generate" in predict["phases_s"]
