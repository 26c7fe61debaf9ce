"""`lima-lightning plan`: will this fit run fit my GPU, what will it checkpoint, how fast will it be? In seconds.

    lima-lightning plan --config configs/llama2-7b-qlora.yaml --gpu_memory_gib 24
    lima-lightning plan --config configs/llama2-7b-qlora.yaml --model.base_model /models/Llama-2-7b-hf --json

Takes fit's arguments (configs, overrides) plus `--gpu_memory_gib` and `--json`, loads no weights (the model is
built on the meta device from its config.json) and prints the predicted peak GPU memory, how many decoder layers
`gradient_checkpointing: auto` would checkpoint, whether the run fits, and tokens/s, LIMA epoch-time and
whole-fit (command to adapter) estimates for the GPUs measured in benchmarks/RESULTS.md. Without
`--gpu_memory_gib` the budget is this machine's GPU; on a machine without one, the plan is shown for 24, 40, 80
and 141 GiB cards. How the prediction is made, and how close it came to measured peaks and run times:
`lima_lightning/planning.py` and benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from lima_lightning.errors import UserError
from lima_lightning.memory import GIB

COMMON_CARDS_GIB = (24, 40, 80, 141)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="lima-lightning plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu_memory_gib", type=float, help="the GPU memory budget to plan for (default: this machine's GPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (peak_gib, checkpointed_layers, fits, ...)")
    return parser.parse_known_args(argv)


# Published config.json shapes of the Llama-2 sizes (fixed forever): plan answers for them without the hub or
# HF_TOKEN, e.g. before the licence is accepted. Vocabulary 32,000, context 4,096.
LLAMA2_SHAPES = {  # hidden, MLP, layers, attention heads, key/value heads
    "Llama-2-7b": (4096, 11008, 32, 32, 32),
    "Llama-2-13b": (5120, 13824, 40, 40, 40),
    "Llama-2-70b": (8192, 28672, 80, 64, 8),
}


def published_llama2_config(base_model: str):
    """The config of a meta-llama/Llama-2-{7b,13b,70b}[-chat]-hf id, or None for any other name."""
    from transformers import LlamaConfig

    owner, _, name = base_model.partition("/")
    size = name.removesuffix("-hf").removesuffix("-chat")
    if owner != "meta-llama" or size not in LLAMA2_SHAPES:
        return None
    hidden, mlp, layers, heads, kv_heads = LLAMA2_SHAPES[size]
    return LlamaConfig(
        hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=32000, max_position_embeddings=4096,
    )  # fmt: skip


def model_config(base_model: str, trust_remote_code: bool):
    """The base model's transformers config: config.json of a local directory or the hub (or `tiny`); for the
    Llama-2 hub ids, their published shapes when the hub cannot give it (offline, gated without HF_TOKEN)."""
    from pathlib import Path

    from transformers import AutoConfig

    from lima_lightning.errors import Unavailable
    from lima_lightning.hub import hub_errors, hub_token
    from lima_lightning.models.loading import resolve_base_model

    path = resolve_base_model(base_model, need_weights=False)
    if Path(path).is_dir():
        if not (Path(path) / "config.json").is_file():
            raise UserError(f"model.base_model={base_model}: no config.json there; plan needs the model's config (no weights)")
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    try:
        with hub_errors("model.base_model", base_model) as offline:
            return AutoConfig.from_pretrained(path, token=hub_token(), trust_remote_code=trust_remote_code, **offline)
    except (Unavailable, UserError) as e:
        published = published_llama2_config(base_model)
        if published is None:
            raise
        print(f"note: {e}; planning with the published shapes of {base_model}", file=sys.stderr)
        return published


def budgets(requested: float | None) -> list[float]:
    import torch

    if requested is not None:
        if requested <= 0:
            raise UserError(f"--gpu_memory_gib={requested}: must be a positive number of GiB, e.g. 24")
        return [requested * GIB]
    if torch.cuda.is_available():
        return [float(torch.cuda.get_device_properties(0).total_memory)]
    return [gib * GIB for gib in COMMON_CARDS_GIB]


def planned_epochs(trainer) -> int | None:
    """The epochs the fit would run, or None where it stops on a step count (or runs without an epoch limit)."""
    if trainer.max_steps not in (None, -1) or not trainer.max_epochs or trainer.max_epochs < 0:
        return None
    return int(trainer.max_epochs)


def describe(plan, data, epochs: int | None) -> list[str]:
    from lima_lightning.planning import largest_fitting_tokens, speed_estimates

    e, result = plan.estimate, plan.as_dict()
    needed = e.predicted_peak_bytes * e.MARGIN + e.SLACK_BYTES  # what `auto` demands of the budget
    offloaded = " (their inputs in host memory)" if plan.settings["offload_checkpoints"] and e.checkpointed_layers else ""
    compiled = f" with compiled layers ({result['uncompiled_peak_gib']:.1f} GiB uncompiled)" if plan.settings["compile"] else ""
    lines = [
        f"on a {e.budget_bytes / GIB:.0f} GiB budget, micro-batches of up to {e.max_tokens} tokens: checkpointing "
        f"{e.checkpointed_layers} of {e.num_layers} decoder layers{offloaded}, predicted peak {result['peak_gib']:.1f} GiB{compiled}: "
        + ("fits" if e.fits else f"does NOT fit (with the run's headroom it needs {needed / GIB:.1f} GiB)")
    ]
    if not e.fits:
        fitting = largest_fitting_tokens(plan, data.max_seq_length)
        fix = f"--data.max_tokens_per_batch {fitting} (with every layer checkpointed)" if fitting else "a smaller --data.max_seq_length"
        lines.append(f"  to fit: {fix}, or configs/llama2-7b-qlora-lowmem.yaml (one 2048-token row per micro-batch, ~5.2 GiB for 7B)")
    for speed in speed_estimates(plan, epochs):
        if speed["tokens_per_s"]:
            line = f"  on an {speed['gpu']} (measured): ~{speed['tokens_per_s']:,} tokens/s, a LIMA epoch in ~{speed['epoch_s']} s"
            if epochs:  # the whole fit, with the fixed costs measured on that GPU
                line += f"; {epochs} epoch{'s' if epochs > 1 else ''} ~{speed['fit_s']} s from the command"
            lines.append(line)
        else:
            lines.append(f"  on an {speed['gpu']}: no measured speed for this setting")
    return lines


def main(argv: list[str]) -> None:
    from lima_lightning.cli import parse_fit_config
    from lima_lightning.planning import plan_training, speed_estimates

    args, fit_args = parse_args(argv)
    config = parse_fit_config(fit_args)
    model_options, data = config.model, config.data
    shape = model_config(model_options.base_model, model_options.trust_remote_code)
    plans = [plan_training(shape, model_options, data, budget) for budget in budgets(args.gpu_memory_gib)]
    epochs = planned_epochs(config.trainer)
    if args.json:
        if len(plans) > 1:
            raise UserError("--json: no GPU here to plan for; pass --gpu_memory_gib, e.g. --gpu_memory_gib 24")
        print(json.dumps({**plans[0].as_dict(), "epochs": epochs, "estimates": speed_estimates(plans[0], epochs)}))
        return
    trainable = plans[0].settings["lora_parameters"] / 1e6
    base = "NF4" if model_options.quantization == "nf4" else "bf16"
    print(
        f"plan: {model_options.base_model} ({shape.num_hidden_layers} layers, hidden {shape.hidden_size}), {base} base, "
        f"LoRA r={model_options.lora_r} ({trainable:.0f}M trainable), data.batching={data.batching}"
    )
    for plan in plans:
        print("\n".join(describe(plan, data, epochs)))
