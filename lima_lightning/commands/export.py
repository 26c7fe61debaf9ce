"""`lima-lightning export`: merge a LoRA adapter into its base and write a standalone model, checked.

    lima-lightning export --adapter_path runs/llama2-7b-qlora/lightning_logs/version_0/adapters/final --out exported/llama2-7b-lima
    lima-lightning export --adapter_path ... --out exported/llama2-7b-lima-gguf --format gguf --gguf_type q8_0

Before anything is written, the merged model's logits are compared with the adapter model's (base + unmerged
adapter) on a few prompts; beyond the bound the command fails and writes nothing. A GGUF file is read back by
transformers' GGUF loader and compared with the merged model the same way.

The result loads with `AutoModelForCausalLM.from_pretrained(out)`: no PEFT, no bitsandbytes. A QLoRA adapter
is merged onto the dequantized NF4 weights it was trained against (`lima_lightning.models.merging`). The
tokenizer's chat_template renders the run's `data.template`: `tokenizer.apply_chat_template(messages,
add_generation_prompt=True)` gives exactly the ids `predict` feeds the model (checked before writing).
"""

from __future__ import annotations

import argparse
import json
import typing
from dataclasses import fields
from pathlib import Path
from typing import Literal

import torch

from lima_lightning import runs
from lima_lightning.data.templates import TemplateName
from lima_lightning.errors import CheckFailed, UserError
from lima_lightning.generation import GenerationSettings

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def run_config(adapter_path: str | Path) -> tuple[dict, Path | None]:
    """The `model:` section of the config.yaml of the fit run the adapter belongs to, if there is one."""
    import yaml

    config_file = runs.config_file(runs.run_of_adapter(adapter_path))
    if not config_file.is_file():
        return {}, None
    return (yaml.safe_load(config_file.read_text()) or {}).get("model") or {}, config_file


def run_template(adapter_path: str | Path) -> str | None:
    """The `data.template` of the fit run the adapter belongs to (None without a config.yaml or the key)."""
    import yaml

    config_file = runs.config_file(runs.run_of_adapter(adapter_path))
    if not config_file.is_file():
        return None
    return ((yaml.safe_load(config_file.read_text()) or {}).get("data") or {}).get("template")


def generation_config(tokenizer, settings: GenerationSettings):
    """BOS/EOS/pad ids of the tokenizer (Llama-2: 1, 2, and <unk>=0 as pad) and the run's sampling settings."""
    from transformers import GenerationConfig

    sampling = {"temperature": settings.temperature, "top_k": settings.top_k, "top_p": settings.top_p} if settings.do_sample else {}
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        **sampling,
    )


def run_generation_settings(model_config: dict) -> GenerationSettings:
    """The run's `model.generation` group (defaults for what it does not set)."""
    known = {f.name for f in fields(GenerationSettings)}
    return GenerationSettings(**{k: v for k, v in (model_config.get("generation") or {}).items() if k in known})


def export(
    adapter_path: str,
    out: str,
    base_model: str | None = None,
    quantization: Literal["nf4", "none"] | None = None,
    dtype: Literal["bf16", "fp32"] = "bf16",
    device: str | None = None,
    template: str | None = None,
    format: Literal["hf", "gguf"] = "hf",
    gguf_type: Literal["f16", "q8_0"] = "q8_0",
) -> Path:
    """Merge `adapter_path` into its base, check the merge, and write a standalone model directory to `out` (atomically).

    Args:
        adapter_path: An `adapters/<name>` directory of a fit run (PEFT format + tokenizer).
        out: Directory to write (replaced if it holds an earlier export).
        base_model: The base the adapter was trained on; default: the run's config.yaml, else adapter_config.json.
        quantization: What the base was trained in (`nf4`: QLoRA, `none`: LoRA); default: the run's config.yaml.
        dtype: Weight dtype of the exported model.
        device: Where to load and merge (default: cuda if available, else cpu).
        template: The chat template the adapter was trained with, written into the tokenizer as its chat_template;
            default: the run's data.template, else llama2-chat.
        format: `hf` (safetensors, config and tokenizer for transformers) or `gguf` (one file for llama.cpp/ollama).
        gguf_type: With `gguf`: `f16`, or `q8_0` (about half the size, within a measured logit bound).
    """
    from lima_lightning.data.tokenization import set_chat_template
    from lima_lightning.io import write_dir_atomically
    from lima_lightning.models.loading import load_tokenizer

    adapter = Path(adapter_path).expanduser()
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"--adapter_path={adapter_path}: no adapter_config.json there; point it at an adapters/<name> directory of a run")
    target = Path(out).expanduser()
    if target.exists() and any(target.iterdir()) and not ((target / "config.json").is_file() or any(target.glob("*.gguf"))):
        raise UserError(f"--out={out}: exists and does not hold an exported model; pick a new directory")
    settings, config_file = run_config(adapter)
    base_model = (
        base_model or settings.get("base_model") or json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    )
    quantization = quantization or settings.get("quantization")
    if quantization not in ("nf4", "none"):
        raise UserError(
            f"--quantization: not given, and no model.quantization in {runs.config_file(runs.run_of_adapter(adapter))}; "
            "pass --quantization nf4 if the adapter was trained with QLoRA, none if with LoRA on a bf16 base"
        )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    source = f" (from {config_file})" if config_file else ""
    if quantization == "nf4":
        print(f"export: merging onto {base_model} loaded in NF4{source}, dequantized to {dtype}: the weights the adapter was trained on")
    else:
        print(f"export: merging onto {base_model} ({dtype}){source}")

    tokenizer = load_tokenizer(str(adapter) if (adapter / "tokenizer_config.json").is_file() else base_model)
    # apply_chat_template on the exported tokenizer then gives exactly the ids predict feeds the model.
    template = template or run_template(adapter) or "llama2-chat"
    set_chat_template(tokenizer, template)
    print(f"export: the tokenizer's chat_template renders data.template={template}, as in training")
    model = merged_and_checked(adapter, base_model, quantization, device, DTYPES[dtype], tokenizer, template)
    model.generation_config = generation_config(tokenizer, run_generation_settings(settings))

    def write(tmp: Path) -> None:
        if format == "gguf":
            write_checked_gguf(model, tokenizer, tmp / f"{target.name}.{gguf_type.upper()}.gguf", gguf_type, template)
            return
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    path = write_dir_atomically(target, write)
    print(f"export: wrote {path} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {dtype}, {format})")
    return path


def merged_and_checked(adapter: Path, base_model: str, quantization: str, device, dtype, tokenizer, template: str):
    """The merged model, after checking its logits against the adapter model's (base + unmerged adapter)."""
    from lima_lightning.models.loading import load_adapter, load_base_model
    from lima_lightning.models.merging import merge_into_base
    from lima_lightning.models.verify import MERGE_BOUNDS, check_prompts, logits_on, relative_difference

    prompts = check_prompts(tokenizer, template)
    adapter_model = load_adapter(load_base_model(base_model, quantization, device), str(adapter), base_model, trainable=False)
    expected = logits_on(adapter_model, prompts)
    model = merge_into_base(adapter_model.unload(), str(adapter), base_model, dtype)
    difference, bound = relative_difference(logits_on(model, prompts), expected), MERGE_BOUNDS[dtype]
    print(
        f"export: merged vs adapter model on {len(prompts)} prompts: largest logit difference {difference:.1e} of the logits' "
        f"range (bound {bound:.0e})"
    )
    if not difference <= bound:  # NaN fails too
        raise CheckFailed(
            f"export: the merged model's logits differ from the adapter model's by {difference:.2e} of their range, beyond "
            f"{bound:.0e}; nothing was written (try --dtype fp32, or check the adapter with lima-lightning predict)"
        )
    return model


def write_checked_gguf(model, tokenizer, path: Path, gguf_type: str, template: str) -> None:
    """Write the GGUF file, read it back with transformers' GGUF loader, and compare logits with the merged model."""
    from lima_lightning.gguf_export import gguf_logit_bound, verify_gguf, write_gguf
    from lima_lightning.models.verify import check_prompts

    write_gguf(model, tokenizer, path, gguf_type, chat_template=tokenizer.chat_template)
    dtype = next(model.parameters()).dtype
    difference, bound = verify_gguf(path, model, check_prompts(tokenizer, template)), gguf_logit_bound(gguf_type, dtype)
    print(f"export: {path.name} read back by transformers: largest logit difference {difference:.1e} of the range (bound {bound:.0e})")
    if not difference <= bound:
        raise CheckFailed(
            f"export: {path.name}'s logits differ from the merged model's by {difference:.2e}, beyond {bound:.0e}; nothing was written"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lima-lightning export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapter_path", required=True, help="an adapters/<name> directory of a fit run")
    parser.add_argument("--out", required=True, help="directory to write (replaced if it holds an earlier export)")
    parser.add_argument("--base_model", help="the adapter's base (default: the run's config.yaml, else adapter_config.json)")
    parser.add_argument(
        "--quantization",
        choices=["nf4", "none"],
        help="what the base was trained in: nf4 (QLoRA) or none (LoRA); default: the run's config.yaml",
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="weight dtype of the exported model (default: bf16)")
    parser.add_argument("--device", help="where to load and merge (default: cuda if available, else cpu)")
    parser.add_argument("--format", choices=["hf", "gguf"], default="hf", help="hf: a transformers directory; gguf: a llama.cpp file")
    parser.add_argument("--gguf_type", choices=["f16", "q8_0"], default="q8_0", help="--format gguf: f16, or q8_0 (default, half the size)")
    parser.add_argument(
        "--template",
        choices=list(typing.get_args(TemplateName)),
        help="chat template written into the tokenizer (default: the run's data.template, else llama2-chat)",
    )
    return parser


def main(argv: list[str]) -> None:
    export(**vars(build_parser().parse_args(argv)))
