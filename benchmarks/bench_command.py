"""Time from command to result: the shipped CLI, run as a user runs it, at the full GPU and at smaller budgets.

    python benchmarks/bench_command.py --model /tmp/llama2-7b-random --lima .gpu/lima --out $OUT/bench_command.json \
        --runs qlora@141,qlora@24,predict-qlora@141,predict-qlora@24

Each run is one `lima-lightning` process started from scratch (`python -m lima_lightning ...`), so its wall time is
what a user waits: imports, data, loading and quantizing, the memory probe, compiling, training, validation and
samples, checkpoints, saving. RUN@GIB runs it under `--gpu_memory_gib GIB` (an H200 standing in for a smaller
card); RUN@GIB:STEPS stops that fit after STEPS optimizer steps; full 3-epoch fits unless that or `--max-steps` says
otherwise. Per run it records the wall time, the phase split
the command writes (`phases.json`), steady-state tokens/s (the median of `train/tokens_per_sec` after the first
`--skip-steps` optimizer steps), the peak memory (`train/peak_memory_gib`), the checkpointing plan it logged, the
last losses, and for predict the generation time, prompts and tokens. Rows are written to --out after every run.

Runs (configs/*.yaml with the local model and data):
    qlora, lora, lowmem          fit with configs/llama2-7b-{qlora,lora,qlora-lowmem}.yaml
    predict-qlora, predict-lora  predict the 300 LIMA test prompts with configs/predict.yaml over that config, with
                                 the adapter of the last fit of the same method (the base model alone if none ran)
    plain-qlora, plain-lora      the plain transformers + PEFT + bitsandbytes loop under the same budget
                                 (bench_train.py's qlora-plain / lora-plain rows: steady tokens/s and peak), with
                                 its 3-epoch time estimated as load + 3 LIMA epochs at that rate
A run may end in /OPTION=VALUE pairs, added to its command only: predict-qlora@24/model.generation.compile=true.
`--extra` adds options to every command (the CPU rehearsal: `--extra "--trainer.accelerator cpu ..."`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lima_lightning.planning import LIMA_TOKENS_PER_EPOCH  # noqa: E402  (one home for LIMA's token count)

FIT_CONFIGS = {"qlora": "llama2-7b-qlora.yaml", "lora": "llama2-7b-lora.yaml", "lowmem": "llama2-7b-qlora-lowmem.yaml"}
PLAN_LINE = re.compile(r"model\.gradient_checkpointing=auto -> (.*)")


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def newest_run_dir(root: Path) -> Path | None:
    runs = sorted((root / "lightning_logs").glob("version_*"), key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else None


def base_row(run: str, budget: float, wall: float, status: int) -> dict:
    return {"run": run, "budget_gib": budget, "wall_s": round(wall, 1), "exit": status}


def last_line(output: str) -> str:
    """A failed command's last line of output: its one-line error."""
    return output.strip().splitlines()[-1][:300] if output.strip() else ""


def plain_command(run: str, budget: float, args, root: Path) -> list[str]:
    """bench_train.py's plain-loop row of `run`'s method under the budget; its report goes to root/bench_train.json.

    Without its parity check: that runs a whole batch without checkpointing, which a 24 GiB budget cannot hold
    (S6-3: out of memory before the plain loop ran).
    """
    method = run.removeprefix("plain-")
    return [str(REPO / "benchmarks/bench_train.py"), "--model", args.model, "--lima", f"{args.lima}/train.jsonl",
            "--configs", f"{method}-plain", "--gpu-memory-gib", str(budget), "--time-budget", "300", "--no-parity",
            "--out", str(root / "bench_train.json"), *args.plain_extra.split()]  # fmt: skip


def summarize_plain(run: str, budget: float, root: Path, output: str, wall: float, status: int) -> dict:
    row = base_row(run, budget, wall, status)
    report = root / "bench_train.json"
    results = json.loads(report.read_text())["results"] if report.is_file() else []
    measured = next((r for r in results if "tokens_per_s" in r), None)
    if measured is None:
        row["error"] = next((r["error"] for r in results if "error" in r), last_line(output))
        return row
    load = re.search(r"model loaded in (\d+) s", output)
    load_s = float(load.group(1)) if load else 0.0
    rate, peak = measured["tokens_per_s"], measured["peak_gib"]
    row.update(steady_tokens_per_s=round(rate), peak_gib=peak and round(peak, 2), load_s=load_s)
    row["three_epochs_estimate_s"] = round(load_s + 3 * LIMA_TOKENS_PER_EPOCH / rate)
    return row


def command(run: str, budget: float, steps: int, args, adapters: dict[str, str], root: Path) -> list[str]:
    method = run.removeprefix("predict-")
    config = REPO / "configs" / FIT_CONFIGS[method]
    common = ["--config", str(config), "--model.base_model", args.model, "--trainer.default_root_dir", str(root)]
    common += ["--gpu_memory_gib", str(budget), "--trainer.enable_progress_bar", "false"]
    if run.startswith("predict-"):
        adapter = ["--model.adapter_path", adapters[method]] if method in adapters else []
        prompts = ["--data.predict_dataset", f"{args.lima}/test.jsonl"]
        return ["predict", *common, "--config", str(REPO / "configs/predict.yaml"), *prompts, *adapter, *args.extra.split()]
    stop = ["--trainer.max_steps", str(steps)] if steps else []
    return ["fit", *common, "--data.dataset", f"{args.lima}/train.jsonl", *stop, *args.extra.split()]


def summarize(run: str, budget: float, run_dir: Path | None, output: str, wall: float, status: int, args) -> dict:
    row = base_row(run, budget, wall, status)
    plan = PLAN_LINE.findall(output)
    if plan:
        row["checkpointing_plan"] = plan[-1]
    if status != 0:
        row["error"] = last_line(output)
    if run_dir is None:
        return row
    phases = run_dir / "phases.json"
    report = json.loads(phases.read_text()) if phases.is_file() else {}
    if report:
        row["phases_s"] = report["seconds"]
    if run.startswith("predict-"):
        row["peak_gib"] = report.get("peak_gpu_memory_gib")  # the whole command's: loading, merging, every chunk
        predictions = run_dir / "predictions.jsonl"
        if predictions.is_file():
            rows = [json.loads(line) for line in predictions.read_text(encoding="utf-8").split("\n") if line.strip()]
            row.update(prompts=len(rows), new_tokens=sum(r["new_tokens"] for r in rows), eos=sum(r["finish_reason"] == "eos" for r in rows))
        return row
    speeds = [v for step, v in scalars(run_dir, "train/tokens_per_sec") if step >= args.skip_steps]
    peaks = [v for _, v in scalars(run_dir, "train/peak_memory_gib")]
    losses = scalars(run_dir, "train/loss")
    val = scalars(run_dir, "val/loss")
    row.update(
        steady_tokens_per_s=round(statistics.median(speeds)) if speeds else None,
        peak_gib=round(max(peaks), 2) if peaks else None,
        steps=losses[-1][0] + 1 if losses else 0,
        last_train_loss=round(losses[-1][1], 4) if losses else None,
        last_val_loss=round(val[-1][1], 4) if val else None,
        adapter=str(run_dir / "adapters/final") if (run_dir / "adapters/final/adapter_model.safetensors").is_file() else None,
    )
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local Llama-2-7B-shaped model directory")
    parser.add_argument("--lima", required=True, help="a directory holding LIMA's train.jsonl and test.jsonl")
    parser.add_argument("--runs", required=True, help="comma-separated RUN@GIB[:STEPS], e.g. qlora@141,qlora@24:10,predict-qlora@24")
    parser.add_argument("--out", required=True, help="JSON file for the rows (rewritten after every run)")
    parser.add_argument("--root", default="/tmp/bench_command", help="where the runs' directories go")
    parser.add_argument("--max-steps", type=int, default=0, help="stop each fit after this many optimizer steps (0: all epochs)")
    parser.add_argument("--skip-steps", type=int, default=5, help="optimizer steps left out of the steady-state tokens/s")
    parser.add_argument("--timeout", type=float, default=560, help="seconds a run may take before it is stopped")
    parser.add_argument("--extra", default="", help="options added to every command, e.g. for a CPU rehearsal")
    parser.add_argument("--plain-extra", default="", help="options added to bench_train.py for the plain-* runs (CPU rehearsal: --smoke)")
    args = parser.parse_args(argv)
    rows: list[dict] = []
    adapters: dict[str, str] = {}
    for spec in args.runs.split(","):
        spec, *options = spec.split("/")
        run, _, rest = spec.partition("@")
        gib, _, steps = rest.partition(":")
        budget = float(gib or 141)
        root = Path(args.root) / "-".join([spec.replace("@", "-").replace(":", "-"), *options]).replace("=", "-")
        if run.startswith("plain-"):
            cli = [sys.executable, *plain_command(run, budget, args, root)]
        else:
            own = []  # this run's /OPTION=VALUE pairs, after everything else so that they win
            for option in options:
                key, _, value = option.partition("=")
                own += [f"--{key}", value]
            cli = [sys.executable, "-m", "lima_lightning", *command(run, budget, int(steps or args.max_steps), args, adapters, root), *own]
        print(f"== {'/'.join([spec, *options])}: {' '.join(cli[1:])}", flush=True)
        started = time.perf_counter()
        try:
            proc = subprocess.run(cli, cwd=REPO, capture_output=True, text=True, timeout=args.timeout, env=os.environ)
            output, status = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            output, status = f"{e.stdout or ''}{e.stderr or ''}\nstopped after {args.timeout} s", -9
        wall = time.perf_counter() - started
        # The command's whole output beside the JSON, for what the summary leaves out (e.g. TORCH_LOGS=recompiles).
        Path(args.out).with_name(f"{root.name}.log").write_text(output)
        if run.startswith("plain-"):
            row = summarize_plain(run, budget, root, output, wall, status)
        else:
            row = summarize(run, budget, newest_run_dir(root), output, wall, status, args)
        if options:
            row["options"] = options
        if row.get("adapter") and not run.startswith("predict-"):
            adapters[run] = row["adapter"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        shown = [line for line in output.splitlines() if any(key in line.lower() for key in (" took ", "auto ->", "generation:", "error"))]
        print("\n".join(shown)[-2000:])
        Path(args.out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
