"""benchmarks/bench_train.py: the --smoke run (CPU, tiny model) goes through every configuration and writes
its report; the FLOP formula and the goal judgement are checked by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_train  # noqa: E402


def run_bench(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_train.py"), "--smoke", "--out", str(tmp_path / "bench.json"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


# The compile and flex code paths are the same for both methods: once (LoRA) covers them at half the time.
SMOKE_CONFIGS = [c.name for c in bench_train.CONFIGS if c.name not in ("qlora-packed-flex", "qlora-fast-compile")]


@pytest.mark.slow
def test_smoke_run_measures_every_configuration(tmp_path):
    done = run_bench(tmp_path, "--configs", ",".join(SMOKE_CONFIGS))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["config"]: r for r in report["results"]}
    assert list(rows) == SMOKE_CONFIGS
    for name, row in rows.items():
        assert "error" not in row and "skipped" not in row, row
        assert row["tokens_per_s"] > 0 and 0 <= row["padding"] < 1 and row["timed_tokens"] >= 500, name
    for config in bench_train.CONFIGS:
        if config.path == "ours" and config.name in rows:
            assert rows[config.name]["speedup"] > 0 and rows[config.name]["reference"] == config.reference
    assert rows["qlora-plain"]["padding"] > rows["qlora-fast"]["padding"]  # length grouping pads less
    assert rows["qlora-fast"]["checkpointing"] is False  # auto: off on CPU
    lowmem = rows["qlora-lowmem"]  # as configs/llama2-7b-qlora-lowmem.yaml ships it
    assert (lowmem["lora_dtype"], lowmem["optimizer"], lowmem["batching"], lowmem["compile"]) == ("bfloat16", "adamw_8bit", "packed", True)
    # Parity: fp32 LoRA on CPU matches tightly; the NF4 base computes in bf16.
    for method, tolerance in (("lora", 1e-4), ("qlora", 2e-2)):
        measured = [p for p in report["parity"][method] if "loss_diff" in p]
        assert len(measured) >= 2 and all(abs(p["loss_diff"]) < tolerance and p["grad_rel_diff"] < tolerance for p in measured), measured
    table = (tmp_path / "bench.md").read_text()
    assert "| config | path | batching |" in table and "loss parity, qlora" in table


def test_profile_steps_report_where_the_time_goes(tmp_path, tiny_dir):
    configs = ["--smoke", "--configs", "qlora-plain-2048x1,lora-fast"]
    timed_only = bench_train.main(configs)
    report = bench_train.main([*configs, "--profile-steps", "2", "--out", str(tmp_path / "b.json")])
    for row, plain_row in zip(report["results"], timed_only["results"], strict=True):
        # The profiled steps come after the timed window and leave it as it was.
        assert (row["timed_batches"], row["timed_tokens"]) == (plain_row["timed_batches"], plain_row["timed_tokens"])
        profile = row["profile"]
        assert profile["steps"] == 2 and profile["wall_ms_per_step"] > 0 and profile["cpu_op_ms_per_step"] > 0
        assert profile["kernels_per_step"] == 0 and profile["gpu_busy"] is None  # CPU: no kernels to time
        assert profile["top_cpu_ops_ms"] and all(ms >= 0 for _, ms, _ in profile["top_cpu_ops_ms"])
    assert "where a step's time goes" in (tmp_path / "b.md").read_text()
    assert all("profile" not in row for row in timed_only["results"])
    # More profiled steps than the epoch has left: no profile, the profiler stopped, the next configuration measured.
    short = bench_train.main([*configs, "--profile-steps", "100000"])
    assert [("profile" in r, r["timed_tokens"] > 0) for r in short["results"]] == [(False, True), (False, True)]


def test_time_budget_skips_what_would_overrun(tmp_path, tiny_dir):
    # In-process: nothing heavy runs, as no model is loaded when nothing fits.
    report = bench_train.main(["--smoke", "--time-budget", "0", "--configs", "qlora-plain,lora-fast", "--out", str(tmp_path / "b.json")])
    assert [r["config"] for r in report["results"]] == ["qlora-plain", "lora-fast"] and all("skipped" in r for r in report["results"])
    assert "skipped: time budget" in (tmp_path / "b.md").read_text()


def test_unknown_configuration_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_train.main(["--smoke", "--configs", "qlora-turbo"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "qlora-turbo" in err and "qlora-fast" in err


def test_model_flops_of_llama2_7b_by_hand():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)
    lora = 32 * 64 * (4 * (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096))  # r=64 on the seven projections
    per_token, per_squared_length = bench_train.model_flops(config, lora)
    matmuls = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 4096 * 32000  # 6.61e9: projections and LM head
    assert lora == 159_907_840 and matmuls == 6_607_077_376
    assert per_token == 4 * matmuls + 6 * lora  # ~27.4 GFLOP per token
    assert per_squared_length == 6 * 4096 * 32


def test_goals_are_judged_against_the_reference_of_the_same_run():
    rows = [
        {"config": "ref", "tokens_per_s": 1000.0, "peak_gib": 8.0, "goal": ""},
        {"config": "fast", "tokens_per_s": 6500.0, "peak_gib": 60.0, "reference": "ref", "goal": "speed>=6"},
        {"config": "lowmem", "tokens_per_s": 990.0, "peak_gib": 5.5, "reference": "ref", "goal": "speed>=1,peak<=6"},
        {"config": "cpu", "tokens_per_s": 2000.0, "peak_gib": None, "reference": "ref", "goal": "speed>=1,peak<=6"},
    ]
    bench_train.judge(rows)
    assert rows[1]["speedup"] == 6.5 and rows[1]["goal_met"] is True
    assert rows[2]["goal_met"] is False and rows[2]["memory_ratio"] == 5.5 / 8.0  # 0.99x speed misses speed>=1
    assert "goal_met" not in rows[3]  # no memory measured: not judged


def test_deadline_stops_a_configuration_that_overruns():
    import time

    with pytest.raises(TimeoutError, match="past --time-budget"), bench_train.deadline(0.2):
        time.sleep(5)
    with bench_train.deadline(0):  # no limit
        time.sleep(0.01)


@pytest.mark.parametrize(
    "row, config_file",
    [
        ("qlora-fast-compile", "llama2-7b-qlora.yaml"),
        ("qlora-lowmem", "llama2-7b-qlora-lowmem.yaml"),
        ("lora-fast-compile", "llama2-7b-lora.yaml"),
    ],
)
def test_the_benchmark_measures_the_shipped_configs(row, config_file):
    """The headline rows of RESULTS.md and the README are these configurations; they must not drift apart."""
    import yaml

    shipped = yaml.safe_load((REPO / "configs" / config_file).read_text())
    model, data = shipped["model"], shipped["data"]
    measured = next(c for c in bench_train.CONFIGS if c.name == row)
    assert measured.method == ("qlora" if model["quantization"] == "nf4" else "lora")
    assert (measured.batching, measured.max_tokens) == (data["batching"], data["max_tokens_per_batch"])
    assert measured.checkpointing == model["gradient_checkpointing"] and measured.compile == model["compile"]
    assert (measured.attn, measured.optimizer) == (model["attn_implementation"], model["optimizer"])
    assert (measured.lora_dtype, measured.loss_chunk_size) == (model.get("lora_dtype", "float32"), model["loss_chunk_size"])
