"""Read the runs `benchmarks/bench_ddp.sh` made and say what they show (TensorBoard events and output files).

    python benchmarks/ddp_report.py speedup RUN_1GPU RUN_2GPU [--skip 2] [--goal 1.85]
    python benchmarks/ddp_report.py fit RUN [--steps N]           # an FSDP (or any) smoke run: trained, saved
    python benchmarks/ddp_report.py predict RUN --expect N        # one predictions.jsonl, each id once, in order

Exit status 1 when a check fails, so the shell script can report each phase as passed or failed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path


def events(run_dir: Path, tag: str) -> list[tuple[int, float, float]]:
    """(step, wall time, value) of every event of `tag`, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir)).Reload()
    if tag not in accumulator.Tags()["scalars"]:
        return []
    return sorted((e.step, e.wall_time, e.value) for e in accumulator.Scalars(tag))


def run_dir(path: str) -> Path:
    """A run dir, or a default_root_dir holding exactly one lightning_logs/version_N."""
    path = Path(path)
    if (path / "lightning_logs").is_dir():
        versions = sorted((path / "lightning_logs").iterdir())
        if len(versions) != 1:
            raise SystemExit(f"{path}: expected one run dir under lightning_logs, found {[v.name for v in versions]}")
        return versions[0]
    return path


def seconds_per_step(loss: list[tuple[int, float, float]], skip: int) -> tuple[float, float]:
    """(mean, median) wall time per optimizer step after the first `skip` steps (CUDA warm-up, first allocations).

    Times are those of the step's loss event, logged right after its optimizer step.
    """
    timed = loss[skip:]
    if len(timed) < 2:
        raise SystemExit(f"only {len(loss)} logged steps; need more than skip={skip} + 1")
    gaps = [b[1] - a[1] for a, b in zip(timed[:-1], timed[1:], strict=True)]
    return (timed[-1][1] - timed[0][1]) / len(gaps), statistics.median(gaps)


def speedup(args) -> int:
    one, two = run_dir(args.one), run_dir(args.two)
    loss1, loss2 = events(one, "train/loss"), events(two, "train/loss")
    (t1, m1), (t2, m2) = seconds_per_step(loss1, args.skip), seconds_per_step(loss2, args.skip)
    tps1 = statistics.median(v for _, _, v in events(one, "train/tokens_per_sec")[args.skip :])
    tps2 = statistics.median(v for _, _, v in events(two, "train/tokens_per_sec")[args.skip :])
    ratio = t1 / t2
    print(f"== {args.label}: 1 GPU {one}  vs  2 GPUs {two}")
    print(f"  steps logged: {len(loss1)} / {len(loss2)}; timed: steps {args.skip + 2}..{len(loss1)} (the first {args.skip + 1} warm up)")
    print(f"  wall time per optimizer step: 1 GPU {t1:.3f} s, 2 GPUs {t2:.3f} s -> speedup {ratio:.2f}x (efficiency {ratio / 2:.0%})")
    print(f"  median step: 1 GPU {m1:.3f} s, 2 GPUs {m2:.3f} s -> {m1 / m2:.2f}x")
    print(f"  train/tokens_per_sec (median, all GPUs): 1 GPU {tps1:,.0f}, 2 GPUs {tps2:,.0f} -> {tps2 / tps1:.2f}x")
    for tag in ("train/peak_memory_gib",):
        p1, p2 = events(one, tag), events(two, tag)
        if p1 and p2:
            print(f"  {tag} (rank 0): 1 GPU {max(v for *_, v in p1):.1f}, 2 GPUs {max(v for *_, v in p2):.1f}")
    print(f"  goal >= {args.goal}x: {'MET' if ratio >= args.goal else 'NOT MET'}")
    # Same global batch and the same micro-batches per step (StepShardedSampler): the curves must coincide,
    # up to bf16 rounding and the order in which gradients are summed.
    print("  step   loss 1 GPU   loss 2 GPUs   rel. diff")
    worst = 0.0
    steps2 = {s: v for s, _, v in loss2}
    shown = loss1[: args.rows]
    for step, _, v1 in shown:
        v2 = steps2.get(step, math.nan)
        rel = abs(v1 - v2) / abs(v1)
        worst = max(worst, rel) if not math.isnan(rel) else math.inf
        print(f"  {step:4d}   {v1:10.6f}   {v2:11.6f}   {rel:9.2e}")
    first = abs(loss1[0][2] - loss2[0][2]) / abs(loss1[0][2])
    ok_curve = worst < args.loss_tolerance and len(loss1) == len(loss2)
    print(f"  first step (same weights, same batches): rel. diff {first:.2e}; worst over {len(shown)} steps {worst:.2e}: "
          f"{'MATCH' if ok_curve else 'DIFFER'} (tolerance {args.loss_tolerance})")  # fmt: skip
    return 0 if ok_curve else 1


def fit(args) -> int:
    from safetensors.torch import load_file

    path = run_dir(args.run)
    problems = []
    loss = events(path, "train/loss")
    values = [v for *_, v in loss]
    if not values or not all(math.isfinite(v) for v in values):
        problems.append(f"train/loss: {values}")
    if args.steps and len(values) != args.steps:
        problems.append(f"{len(values)} logged steps, expected {args.steps}")
    val = [v for *_, v in events(path, "val/loss")]
    adapter_file = path / "adapters/final/adapter_model.safetensors"
    if adapter_file.is_file():
        weights = load_file(adapter_file)
        b_max = max((w.abs().max().item() for k, w in weights.items() if "lora_B" in k), default=0.0)
        finite = all(bool(w.isfinite().all()) for w in weights.values())
        print(f"  adapters/final: {len(weights)} tensors, all finite: {finite}, max |lora_B| {b_max:.3g} (0 before training)")
        if not weights or not finite or b_max == 0.0:
            problems.append("adapters/final: empty, non-finite or untrained")
    else:
        problems.append("no adapters/final")
    checkpoints = sorted((path / "checkpoints").glob("*.ckpt")) if (path / "checkpoints").is_dir() else []
    if checkpoints:
        import torch

        state = torch.load(checkpoints[-1], map_location="cpu", weights_only=True)["state_dict"]
        lora_only = bool(state) and all("lora_" in k for k in state)
        print(f"  {checkpoints[-1].name}: {len(state)} tensors, LoRA only: {lora_only}")
        if not lora_only:
            problems.append(f"{checkpoints[-1].name}: state_dict empty or holds more than LoRA weights")
    peak = [v for *_, v in events(path, "train/peak_memory_gib")]
    losses, val_losses = " ".join(f"{v:.4f}" for v in values), " ".join(f"{v:.4f}" for v in val)
    print(f"  train/loss [{losses}]; val/loss [{val_losses}]; peak memory (rank 0) {max(peak) if peak else float('nan'):.1f} GiB")
    for problem in problems:
        print(f"  PROBLEM: {problem}")
    print(f"  {'OK' if not problems else 'FAILED'}: {path}")
    return 1 if problems else 0


def predict(args) -> int:
    path = run_dir(args.run)
    rows = [json.loads(line) for line in (path / "predictions.jsonl").read_text(encoding="utf-8").split("\n") if line.strip()]
    ids = [r["id"] for r in rows]
    problems = []
    if len(ids) != len(set(ids)):
        problems.append("an id appears twice")
    if ids != sorted(ids):
        problems.append("not in input order")
    if args.expect and len(rows) != args.expect:
        problems.append(f"{len(rows)} rows, expected {args.expect}")
    finished = sum(r["finish_reason"] == "eos" for r in rows)
    print(f"  predictions.jsonl: {len(rows)} rows, ids {ids[:6]}...{ids[-3:]}, {finished} stopped at EOS")
    for problem in problems:
        print(f"  PROBLEM: {problem}")
    print(f"  {'OK' if not problems else 'FAILED'}: {path}")
    return 1 if problems else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    s = commands.add_parser("speedup", help="1 GPU vs 2 GPUs with the same global batch")
    s.add_argument("one")
    s.add_argument("two")
    s.add_argument("--label", default="run")
    s.add_argument("--skip", type=int, default=2, help="first steps left out of the timing")
    s.add_argument("--goal", type=float, default=1.85)
    s.add_argument("--rows", type=int, default=8, help="steps of the loss curves printed and compared")
    s.add_argument("--loss-tolerance", type=float, default=1e-2)
    f = commands.add_parser("fit", help="a training run: finite losses, trained adapter, LoRA-only checkpoint")
    f.add_argument("run")
    f.add_argument("--steps", type=int, default=0)
    p = commands.add_parser("predict", help="one predictions.jsonl, every id once, in input order")
    p.add_argument("run")
    p.add_argument("--expect", type=int, default=0)
    args = parser.parse_args()
    sys.exit({"speedup": speedup, "fit": fit, "predict": predict}[args.command](args))


if __name__ == "__main__":
    main()
