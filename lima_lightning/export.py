"""`lima-lightning export`: merge a LoRA adapter into its base and write a standalone Hugging Face model.

    lima-lightning export --adapter_path runs/llama2-7b-qlora/lightning_logs/version_0/adapters/final --out exported/llama2-7b-lima

The result loads with `AutoModelForCausalLM.from_pretrained(out)`: no PEFT, no bitsandbytes.

An adapter trained with QLoRA learned to correct the *NF4* weights, not the original bf16 ones, so it is
merged onto those: the base is loaded in NF4 exactly as in training, each 4-bit weight is dequantized
(bitsandbytes' `dequantize_4bit`, through transformers' `model.dequantize`), then the LoRA update is added.
Merging onto the original bf16 base instead would shift every projection by the quantization error.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
from pathlib import Path
from typing import Literal

import torch

from lima_lightning.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def run_config(adapter_path: str | Path) -> tuple[dict, Path | None]:
    """The `model:` section of the fit run's config.yaml (`<run dir>/adapters/<name>` -> `<run dir>/config.yaml`), if any."""
    import yaml

    config_file = Path(adapter_path).expanduser().resolve().parent.parent / "config.yaml"
    if not config_file.is_file():
        return {}, None
    return (yaml.safe_load(config_file.read_text()) or {}).get("model") or {}, config_file


def dequantize_nf4(model, dtype: torch.dtype):
    """Replace each bitsandbytes Linear4bit by an nn.Linear holding its dequantized weight, cast to `dtype`.

    These are the weights every NF4 forward pass multiplied by in training (bnb dequantizes to the compute
    dtype, bf16, then multiplies), so an adapter merged onto them reproduces the QLoRA model.
    """
    import bitsandbytes as bnb

    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            # bnb repacks CPU weights at the first eval forward; dequantize_4bit does not read that layout.
            raise RuntimeError(f"{name}: NF4 weights were repacked for the CPU by a forward pass; dequantize a freshly loaded model")
    return model.dequantize(dtype=dtype)


MERGE_AUTO_SHARE = 0.75  # merge_for_generation=auto: the most of the GPU the NF4 base plus its merged copy may take


def merged_weight_bytes(model, dtype_bytes: int = 2) -> int:
    """Bytes of `model`'s weights once every NF4 layer is dequantized to a `dtype_bytes`-wide dtype."""
    total = 0
    for parameter in model.parameters():
        # bitsandbytes keeps the unpacked shape in the quant state; the packed tensor holds two weights per byte.
        shape = getattr(getattr(parameter, "quant_state", None), "shape", None)
        total += (math.prod(shape) if shape is not None else parameter.numel()) * dtype_bytes
    return total


def merged_copy_fits(base, device: torch.device) -> tuple[bool, str]:
    """Whether a bf16 merged copy of `base` fits beside it with room left for generation (predict's `auto`)."""
    if device.type != "cuda":
        return True, "on the CPU host memory is not planned for"
    total = torch.cuda.get_device_properties(device).total_memory
    # The copy is made while the loaded base is still allocated.
    need = torch.cuda.memory_allocated(device) + merged_weight_bytes(base, 2)
    verdict = need <= MERGE_AUTO_SHARE * total
    return verdict, f"base + bf16 copy {need / 2**30:.1f} GiB {'<=' if verdict else '>'} {MERGE_AUTO_SHARE:.0%} of {total / 2**30:.1f} GiB"


def merge_into_base(base, adapter_path: str | None, base_name: str, dtype: torch.dtype):
    """A plain transformers model: `base` (NF4 weights dequantized first) with the adapter at `adapter_path` added in.

    Without `adapter_path` only the dequantization happens. Used by `export` and by predict's `merge_for_generation`.
    """
    from lima_lightning.models.loading import load_adapter

    if getattr(base, "is_loaded_in_4bit", False):
        base = dequantize_nf4(base, dtype)
        # The replaced 4-bit weights sit in reference cycles: without a collection they stay allocated (3.1 GiB
        # for 7B, measured on the H200) and shrink what generation can use for KV caches.
        gc.collect()
    model = base.to(dtype)
    if adapter_path:
        # safe_merge checks the merged weights for NaN/inf before replacing the originals.
        model = load_adapter(model, adapter_path, base_name, trainable=False).merge_and_unload(safe_merge=True)
    model.config.use_cache = True  # training turned the KV cache off; a standalone model generates
    return model.eval()


def generation_config(tokenizer, settings: dict):
    """BOS/EOS/pad ids of the tokenizer (Llama-2: 1, 2, and <unk>=0 as pad) and the run's sampling defaults."""
    from transformers import GenerationConfig

    sampling = (
        {"temperature": settings.get("temperature", 0.8), "top_p": settings.get("top_p", 0.9)} if settings.get("do_sample", True) else {}
    )
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=settings.get("max_new_tokens", 500),
        do_sample=settings.get("do_sample", True),
        **sampling,
    )


def export(
    adapter_path: str,
    out: str,
    base_model: str | None = None,
    quantization: Literal["nf4", "none"] | None = None,
    dtype: Literal["bf16", "fp32"] = "bf16",
    device: str | None = None,
) -> Path:
    """Merge `adapter_path` into its base and write a standalone model directory to `out` (atomically).

    Args:
        adapter_path: An `adapters/<name>` directory of a fit run (PEFT format + tokenizer).
        out: Directory to write (replaced if it holds an earlier export).
        base_model: The base the adapter was trained on; default: the run's config.yaml, else adapter_config.json.
        quantization: What the base was trained in (`nf4`: QLoRA, `none`: LoRA); default: the run's config.yaml.
        dtype: Weight dtype of the exported model.
        device: Where to load and merge (default: cuda if available, else cpu).
    """
    from lima_lightning.io import write_dir_atomically
    from lima_lightning.models.loading import load_base_model, load_tokenizer

    adapter = Path(adapter_path).expanduser()
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"--adapter_path={adapter_path}: no adapter_config.json there; point it at an adapters/<name> directory of a run")
    target = Path(out).expanduser()
    if target.exists() and any(target.iterdir()) and not (target / "config.json").is_file():
        raise UserError(f"--out={out}: exists and does not hold an exported model; pick a new directory")
    settings, config_file = run_config(adapter)
    base_model = (
        base_model or settings.get("base_model") or json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    )
    quantization = quantization or settings.get("quantization")
    if quantization not in ("nf4", "none"):
        raise UserError(
            f"--quantization: not given, and no model.quantization in {adapter.resolve().parent.parent / 'config.yaml'}; "
            "pass --quantization nf4 if the adapter was trained with QLoRA, none if with LoRA on a bf16 base"
        )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    source = f" (from {config_file})" if config_file else ""
    if quantization == "nf4":
        print(f"export: merging onto {base_model} loaded in NF4{source}, dequantized to {dtype}: the weights the adapter was trained on")
    else:
        print(f"export: merging onto {base_model} ({dtype}){source}")

    tokenizer = load_tokenizer(str(adapter) if (adapter / "tokenizer_config.json").is_file() else base_model)
    base = load_base_model(base_model, quantization, device)
    model = merge_into_base(base, str(adapter), base_model, DTYPES[dtype])
    model.generation_config = generation_config(tokenizer, settings)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    path = write_dir_atomically(target, write)
    print(f"export: wrote {path} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {dtype})")
    return path


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
    return parser


def main(argv: list[str]) -> None:
    export(**vars(build_parser().parse_args(argv)))
