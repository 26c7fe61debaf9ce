"""benchmarks/bench_train.py: its rows are the shipped configs plus overrides; the --smoke run (CPU, tiny model)
runs every kind of row, checks parity and writes its report; profiling, the time budget, the FLOP formula and
the goal judgement are checked on their own."""

from __future__ import annotations

import sys

import pytest
import torch
import yaml

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_train  # noqa: E402
from measure import deadline, model_flops  # noqa: E402
from train_report import judge  # noqa: E402
from train_rows import ROWS, parse_rows  # noqa: E402

# Every value of every knob the rows vary is in one of these (test_smoke_rows_cover_every_knob_value_of_the_rows
# holds the list to that); the other rows combine the same values, so running them adds time, not code paths.
# In ROWS order, the order a run takes them in.
SMOKE_ROWS = [
    "qlora-plain",  # plain, padded, checkpointing; QLoRA's model and parity
    "qlora-plain-2048x1",  # plain, full rows
    "qlora-lowmem-eager",  # ours, packed, bf16 adapters, 8-bit AdamW, loss chunks
    "qlora-padded-ours",  # ours, padded, checkpointing on
    "lora-plain",  # plain without checkpointing; LoRA's model and parity
    "lora-fast",  # ours, length_grouped, checkpointing auto
    "lora-packed-flex",  # flex_attention: the parity re-check before it, the CPU fallback
    "lora-fast-compile",  # compiled layers: the graph counter, dynamo reset
]


def knobs(setup) -> dict:
    """What a row sets that changes what the benchmark or the product runs."""
    row, model, data = setup.row, setup.model, setup.data
    if row.plain:
        return {"method": setup.method, "plain batching": row.plain, "plain checkpointing": row.checkpointing}
    keys = ("gradient_checkpointing", "offload_checkpoints", "attn_implementation", "compile", "lora_dtype", "optimizer")
    # The loss's code path is chunked or not; the chunk's size is a number in it.
    chunked = {"loss chunked": model["loss_chunk_size"] > 0}
    return {"method ours": setup.method, "batching": data["batching"], **{k: str(model[k]) for k in keys}, **chunked}


@pytest.fixture(scope="module")
def all_setups():
    """Every row, read as on the GPU (max_seq_length 2048): nothing is loaded."""
    return parse_rows(ROWS, ["--model.base_model", "/models/llama2-7b"], 2048)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, tiny_dir):
    """One in-process --smoke run of SMOKE_ROWS, shared by the tests that read its report."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    return bench_train.main(["--smoke", "--configs", ",".join(SMOKE_ROWS), "--out", str(out)]), out


def test_rows_are_the_shipped_configs_plus_their_overrides(all_setups):
    """A row's model.* and data.* are its configs/*.yaml, except what its own overrides (or the model path) set."""
    for setup in all_setups:
        shipped = yaml.safe_load((REPO / "configs" / setup.row.config).read_text())
        overridden = {arg[2:] for arg in setup.row.overrides if arg.startswith("--")} | {"model.base_model"}
        for section, values in (("model", setup.model), ("data", setup.data)):
            for key, value in shipped[section].items():
                if f"{section}.{key}" not in overridden and not isinstance(value, dict):
                    assert values[key] == value, (setup.row.name, section, key)
        assert setup.trainer["gradient_clip_val"] == shipped["trainer"]["gradient_clip_val"], setup.row.name
        for arg in setup.row.overrides[::2]:  # every override took effect
            section, key = arg[2:].split(".")
            assert str((setup.model if section == "model" else setup.data)[key]).lower() in setup.row.overrides, (setup.row.name, arg)
    by_name = {s.row.name: s for s in all_setups}
    for setup in all_setups:  # every row of ours is compared with a plain row of the same model
        if not setup.row.plain:
            assert by_name[setup.row.reference].row.plain and by_name[setup.row.reference].method == setup.method, setup.row.name
    assert [by_name[n].row.overrides for n in ("qlora-fast-compile", "qlora-lowmem", "lora-fast-compile")] == [()] * 3  # as shipped


def test_smoke_rows_cover_every_knob_value_of_the_rows(all_setups):
    every, smoke = {}, {}
    for setup in all_setups:
        for knob, value in knobs(setup).items():
            every.setdefault(knob, set()).add(value)
            if setup.row.name in SMOKE_ROWS:
                smoke.setdefault(knob, set()).add(value)
    assert smoke == every


@pytest.mark.slow
def test_smoke_run_measures_every_kind_of_row(smoke):
    report, out = smoke
    rows = {r["config"]: r for r in report["results"]}
    assert list(rows) == SMOKE_ROWS
    for name, row in rows.items():
        assert "error" not in row and "skipped" not in row, row
        # The window closed on its token target, not at the end of the data.
        assert row["tokens_per_s"] > 0 and 0 <= row["padding"] < 1 and row["timed_tokens"] >= report["timed_tokens"], name
    for row in ROWS:
        if not row.plain and row.name in rows:
            assert rows[row.name]["speedup"] > 0 and rows[row.name]["reference"] == row.reference
    assert rows["lora-plain"]["padding"] > rows["lora-fast"]["padding"]  # length grouping pads less
    assert rows["lora-fast"]["checkpointing"] is False and rows["lora-fast"]["checkpointing_setting"] == "auto"  # auto: off on CPU
    lowmem = rows["qlora-lowmem-eager"]  # configs/llama2-7b-qlora-lowmem.yaml, uncompiled
    assert (lowmem["lora_dtype"], lowmem["optimizer"], lowmem["batching"], lowmem["compile"]) == ("bfloat16", "adamw_8bit", "packed", False)
    assert rows["lora-fast-compile"]["compile"] is True
    # Parity: fp32 LoRA on CPU matches tightly; the NF4 base computes in bf16. LoRA's is checked again before flex.
    for method, tolerance, checks in (("lora", 1e-4, 4), ("qlora", 2e-2, 2)):
        measured = [p for p in report["parity"][method] if "loss_diff" in p]
        assert len(measured) == checks, measured
        assert all(abs(p["loss_diff"]) < tolerance and p["grad_rel_diff"] < tolerance for p in measured), measured
    table = out.with_suffix(".md").read_text()
    assert "| config | path | batching |" in table and "loss parity, qlora" in table
    assert "- lora-packed-flex: `llama2-7b-lora.yaml` --model.compile false --data.batching packed" in table


@pytest.mark.slow
def test_profile_steps_report_where_the_time_goes(smoke, tmp_path):
    configs = ["--smoke", "--configs", "lora-plain,lora-fast"]  # the plain loop and our Trainer
    timed_only = {r["config"]: r for r in smoke[0]["results"]}
    report = bench_train.main([*configs, "--profile-steps", "2", "--out", str(tmp_path / "b.json")])
    for row in report["results"]:
        # The profiled steps come after the timed window and leave it as it was.
        plain_row = timed_only[row["config"]]
        assert (row["timed_batches"], row["timed_tokens"]) == (plain_row["timed_batches"], plain_row["timed_tokens"])
        profile = row["profile"]
        # Whole optimizer steps: configs/llama2-7b-lora.yaml accumulates 2 micro-batches, the plain loop none.
        assert (
            profile["steps"] == (2 if row["path"] == "plain" else 4)
            and profile["wall_ms_per_step"] > 0
            and profile["cpu_op_ms_per_step"] > 0
        )
        assert profile["kernels_per_step"] == 0 and profile["gpu_busy"] is None  # CPU: no kernels to time
        assert profile["top_cpu_ops_ms"] and all(ms >= 0 for _, ms, _ in profile["top_cpu_ops_ms"])
    assert "where a step's time goes" in (tmp_path / "b.md").read_text()
    assert all("profile" not in row for row in timed_only.values())
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
    per_token, per_squared_length = model_flops(config, lora)
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
    judge(rows)
    assert rows[1]["speedup"] == 6.5 and rows[1]["goal_met"] is True
    assert rows[2]["goal_met"] is False and rows[2]["memory_ratio"] == 5.5 / 8.0  # 0.99x speed misses speed>=1
    assert "goal_met" not in rows[3]  # no memory measured: not judged


def test_deadline_stops_a_configuration_that_overruns():
    import time

    with pytest.raises(TimeoutError, match="past --time-budget"), deadline(0.2):
        time.sleep(5)
    with deadline(0):  # no limit
        time.sleep(0.01)


def test_the_timed_window_holds_whole_optimizer_steps():
    """With gradient accumulation the window starts and ends at optimizer steps, so it counts the optimizer's share
    (8-bit AdamW's step is over half a micro-batch's time for 7B) as often as the run takes it."""
    from measure import TimedWindow

    window = TimedWindow(warmup=2, target_tokens=300, profile_steps=0, device=torch.device("cpu"), accumulation=4)
    ends = []
    for step in range(20):
        window.begin_step(step)
        if window.end_step(step, 100, 100, [100]):
            ends.append(step)
            break
    # Warmup rounded up to one whole optimizer step (4 micro-batches); 300 tokens reached at step 6, closed at 7.
    assert window.warmup == 4 and ends == [7] and window.batches == 4 and window.tokens == 400


def test_the_timed_window_waits_for_an_optimizer_step_that_compiles_nothing(monkeypatch):
    """Compiled rows meet new graph variants in their first batches of each kind: the warmup goes on while the last
    optimizer step compiled a graph, up to `settle_steps` more steps, so no row pays for a compile while timed."""
    import measure

    compiles_before = {0: 0, 2: 1, 4: 2, 6: 3, 8: 3, 10: 3}  # graphs compiled before each optimizer step (of 2 micro-batches)
    step_now = {"step": 0}
    monkeypatch.setattr(measure, "compiled_graphs", lambda: compiles_before.get(step_now["step"], 3))

    def timed(settle_steps: int) -> tuple[int, int]:
        cpu = torch.device("cpu")
        window = measure.TimedWindow(warmup=2, target_tokens=200, profile_steps=0, device=cpu, accumulation=2, settle_steps=settle_steps)
        for step in range(20):
            step_now["step"] = step
            window.begin_step(step)
            if window.end_step(step, 100, 100, [100]):
                break
        result = window.result()
        return result["warmup_steps"], result["graphs_compiled_while_timed"]

    # Steps 0-5 each compiled a graph, 6-7 none: the window opens at step 8, with nothing compiled inside it.
    assert timed(settle_steps=4) == (8, 0)
    # Allowed one extra optimizer step only, it opens at step 4 anyway, and says that a graph was compiled in it.
    assert timed(settle_steps=1) == (4, 1)
