"""bench_train.py's report: one row of figures per configuration, ratios against the plain loop of the same
run, the goals judged, and the JSON + markdown written after every configuration."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
from measure import GIB, peak_gib
from train_rows import Setup


def settings_of(row, ran: dict) -> dict:
    """The knobs a row ran with: for ours, the module's and data module's own values (`ran`, from ours_fit);
    for a plain row, the plain loop's fixed ones."""
    if row.plain:
        return {
            "path": "plain",
            "batching": f"{row.plain} x{row.batch_size}",
            "tokens_per_batch": None,
            "checkpointing": row.checkpointing,
            "attn": "sdpa",
            "compile": False,
            "optimizer": "adamw",
            "lora_dtype": "float32",
            "loss_chunk_size": 0,
            "offloaded_layers": 0,
        }
    return {
        "path": "ours",
        "batching": ran["batching"],
        "tokens_per_batch": ran["max_tokens_per_batch"] if ran["batching"] != "padded" else None,
        "checkpointing": ran["gradient_checkpointing"],
        "attn": ran["attn_implementation"],
        **{k: ran[k] for k in ("compile", "optimizer", "lora_dtype", "loss_chunk_size")},
        "offloaded_layers": ran.get("offloaded_layers", 0),
    }


def summarize(setup: Setup, run: dict, flops: tuple[float, float], total_tokens: int, device, peak_tflops: float) -> dict:
    """The report row of one configuration's timed window (`run`, from measure.TimedWindow.result)."""
    tok_s = run["tokens"] / run["seconds"]
    model_flops_done = flops[0] * run["tokens"] + flops[1] * sum(n * n for n in run["lengths"])
    chosen = run.get("settings", {})  # what the module decided (auto checkpointing, attention fallback)
    row = {"config": setup.row.name, "method": setup.method, "config_file": setup.row.config, "overrides": list(setup.row.overrides)}
    row.update(settings_of(setup.row, run.get("ran", {})))
    row.update(
        checkpointing_setting=row["checkpointing"],
        checkpointing=chosen.get("gradient_checkpointing", row["checkpointing"]),
        attn=chosen.get("attn_implementation", row["attn"]),
        timed_batches=run["batches"],
        timed_tokens=run["tokens"],
        seconds=run["seconds"],
        tokens_per_s=tok_s,
        padding=1 - run["tokens"] / run["cells"],
        epoch_s=total_tokens / tok_s,
        peak_gib=peak_gib(device),
        mfu=model_flops_done / run["seconds"] / (peak_tflops * 1e12) if device.type == "cuda" else None,
        memory_estimate=chosen.get("memory_estimate"),
        graphs_compiled_while_timed=run.get("graphs_compiled_while_timed", 0),
        reference=setup.row.reference,
        goal=setup.row.goal,
    )
    if run.get("profile"):
        row["profile"] = run["profile"]
    return row


def judge(rows: list[dict]) -> None:
    """Ratios against the reference measured in this run, and whether each goal is met."""
    by_name = {r["config"]: r for r in rows if "tokens_per_s" in r}
    for row in rows:
        reference = by_name.get(row.get("reference"))
        if "tokens_per_s" not in row or reference is None:
            continue
        row["speedup"] = row["tokens_per_s"] / reference["tokens_per_s"]
        if row["peak_gib"] is not None and reference["peak_gib"]:
            row["memory_ratio"] = row["peak_gib"] / reference["peak_gib"]
        checks = []
        for term in filter(None, row["goal"].split(",")):
            key, bound = term.split("<=") if "<=" in term else term.split(">=")
            value = row["speedup"] if key == "speed" else row["peak_gib"]
            checks.append(None if value is None else value <= float(bound) if "<=" in term else value >= float(bound))
        if checks and None not in checks:  # a goal is judged only when every part was measured (no GPU memory on CPU)
            row["goal_met"] = all(checks)


def fmt(value, spec: str = ".2f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def result_line(r: dict) -> str:
    if "error" in r or "skipped" in r:
        return f"| {r['config']} | {r.get('error') or 'skipped: ' + r['skipped']} |" + " |" * 11
    extras = [
        f"{r['tokens_per_batch']} tok/batch" if r["tokens_per_batch"] else "",
        "compile" if r["compile"] else "",
        r["optimizer"] if r["optimizer"] != "adamw" else "",
        "bf16 LoRA" if r["lora_dtype"] == "bfloat16" else "",
        f"loss chunk {r['loss_chunk_size']}" if r["loss_chunk_size"] else "",
        f"{r['offloaded_layers']} layer inputs on host" if r.get("offloaded_layers") else "",
        f"**{r['graphs_compiled_while_timed']} graphs compiled while timed**" if r.get("graphs_compiled_while_timed") else "",
    ]
    versus = ""
    if "speedup" in r:
        memory = f", {r['memory_ratio']:.2f}x mem" if "memory_ratio" in r else ""
        versus = f"{r['speedup']:.2f}x speed{memory} vs {r['reference']}"
    cells = [
        r["config"],
        r["path"],
        r["batching"],
        str(r["checkpointing"]).lower() + (" (auto)" if r["checkpointing_setting"] == "auto" else ""),
        r["attn"],
        ", ".join(e for e in extras if e),
        f"{r['tokens_per_s']:.0f}",
        f"{r['padding']:.1%}",
        f"{r['epoch_s']:.0f}",
        fmt(r["peak_gib"]),
        fmt(r["mfu"], ".1%"),
        versus,
        r["goal"] + (" ✓" if r.get("goal_met") else " ✗" if "goal_met" in r else ""),
    ]
    return "| " + " | ".join(cells) + " |"


def estimate_lines(results: list[dict]) -> list[str]:
    estimates = [r for r in results if r.get("memory_estimate")]
    if not estimates:
        return []
    lines = ["", "gradient_checkpointing=auto: the probe's prediction without checkpointing vs the measured peak", ""]
    for r in estimates:
        e = r["memory_estimate"]
        lines.append(
            f"- {r['config']}: {e['max_tokens']}-token micro-batches -> {e['predicted_peak_gib']:.1f} GiB predicted "
            f"({e['bytes_per_token'] / 2**20:.2f} MiB/token), {e['budget_bytes'] / GIB:.1f} GiB available -> checkpointing "
            f"{'off' if e['fits'] else 'on'}; measured peak {fmt(r['peak_gib'])} GiB"
        )
    return lines


def profile_lines(results: list[dict]) -> list[str]:
    profiled = [r for r in results if r.get("profile")]
    if not profiled:
        return []
    lines = ["", "where a step's time goes (torch.profiler, steps after the timed window; busy = kernel time / wall time)", ""]
    for r in profiled:
        p = r["profile"]
        busy = f" ({p['gpu_busy']:.0%} busy)" if p["gpu_busy"] is not None else ""
        syncs = ", ".join(f"{k} {v:g}" for k, v in p["syncs_per_step"].items()) or "none"
        kernels = "; ".join(f"{k} {ms:.1f}" for k, ms in p["top_kernels_ms"][:5])
        cpu = "; ".join(f"{k} {ms:.1f} (x{n})" for k, ms, n in p["top_cpu_ops_ms"][:6])
        lines.append(
            f"- {r['config']}: {p['wall_ms_per_step']:.0f} ms/micro-batch, kernels {p['kernel_ms_per_step']:.0f} ms{busy}, "
            f"{p['kernels_per_step']:.0f} kernels/micro-batch, CPU ops {p['cpu_op_ms_per_step']:.0f} ms; syncs/micro-batch: {syncs}; "
            f"top kernels (ms/micro-batch): {kernels or '-'}; top CPU ops (ms/micro-batch): {cpu}"
        )
    return lines


def parity_lines(parity: dict) -> list[str]:
    lines = []
    for method, rows in parity.items():
        if not rows:  # --no-parity
            lines += ["", f"loss parity, {method}: not checked (--no-parity)"]
            continue
        lines += ["", f"loss parity, {method}: one identical batch of 4 conversations, dropout off (bf16 autocast on GPU)", ""]
        for row in rows:
            if "error" in row:
                lines.append(f"- {row['path']}: {row['error']}")
            elif "loss_diff" in row:
                diff = f"(diff {row['loss_diff']:+.2e}), LoRA gradients rel. diff {row['grad_rel_diff']:.2e}"
                lines.append(f"- {row['path']}: loss {row['loss']:.5f} {diff}")
            else:
                lines.append(f"- {row['path']}: loss {row['loss']:.5f}")
    return lines


def row_sources(results: list[dict], common: list[str]) -> list[str]:
    """What each row of ours ran, as the `lima-lightning fit` arguments it was read from."""
    ours = [r for r in results if r.get("path") == "ours"]
    if not ours:
        return []
    lines = ["", f"rows of ours: `lima-lightning fit --config configs/<file> <overrides> {' '.join(common)}`", ""]
    return lines + [f"- {r['config']}: `{r['config_file']}` {' '.join(r['overrides']) or '(as shipped)'}" for r in ours]


def markdown(report: dict) -> str:
    env, data = report["environment"], report["data"]
    lines = [
        f"## bench_train: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
        f"bitsandbytes {env['bitsandbytes']}, lightning {env['lightning']}",
        "",
        f"command: `{report['command']}`  ",
        f"data: {data['examples']} conversations, {data['tokens']} real tokens (max_seq_length {data['max_seq_length']}); "
        f"each configuration timed over >= {report['timed_tokens']} real tokens; MFU against {report['peak_tflops']:.0f} "
        f"TFLOP/s; whole run {report['wall_s']:.0f} s",
        "",
        "| config | path | batching | ckpt | attn | extras | real tok/s | padding | LIMA epoch s | peak GiB | MFU | vs reference | goal |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---|---|",
        *(result_line(r) for r in report["results"]),
    ]
    lines += (
        row_sources(report["results"], report["common_overrides"]) + estimate_lines(report["results"]) + profile_lines(report["results"])
    )
    return "\n".join(lines + parity_lines(report["parity"])) + "\n"


def environment(device: torch.device) -> dict:
    import bitsandbytes
    import lightning
    import peft
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    return {
        "device": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "lightning": lightning.__version__,
        "cuda": torch.version.cuda,
    }


def write_report(report: dict, out: str | None, started: float) -> str:
    """Judge, render and (with --out) write the report; called after every configuration, so a run cut short keeps its rows."""
    judge(report["results"])
    report["wall_s"] = time.perf_counter() - started
    text = markdown(report)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
        path.with_suffix(".md").write_text(text)
    return text
