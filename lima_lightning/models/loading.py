"""Load tokenizers, base models (NF4 or bf16/fp32) and LoRA adapters, with errors a person can act on."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lima_lightning.errors import UserError
from lima_lightning.hub import hub_errors, hub_token

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def resolve_base_model(name: str, need_weights: bool = True) -> str:
    """`tiny` becomes the directory of the built-in tiny model; anything else is a hub id or a local path."""
    if name == "tiny":
        from lima_lightning.models.tiny import tiny_model_dir

        return str(tiny_model_dir())
    path = Path(name).expanduser()
    if path.is_dir():
        if need_weights and not any(path.glob("*.safetensors")):
            raise UserError(
                f"model.base_model={name}: the directory holds no *.safetensors weights; point it at a saved Hugging Face model"
            )
        return str(path)
    if name.startswith((".", "/", "~")):
        raise UserError(
            f"model.base_model={name}: no such directory; use a hub id such as meta-llama/Llama-2-7b-hf, a model directory, or 'tiny'"
        )
    return name


def _from_hub_or_disk(path: str, name: str):
    """Hub failures become one-line errors only for hub ids; a local directory's own errors stay as they are.

    Yields the loader's extra keyword arguments (`local_files_only` when the hub is out of reach; see `hub`).
    """
    from contextlib import nullcontext

    return nullcontext({}) if Path(path).is_dir() else hub_errors("model.base_model", name)


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """The base model's tokenizer, with a pad id chosen among existing tokens (Llama-2 has none)."""
    from transformers import AutoTokenizer

    path = resolve_base_model(name, need_weights=False)
    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise UserError(
            f"model.base_model={name}: the directory holds no tokenizer (tokenizer.json or tokenizer.model); "
            "point it at a saved Hugging Face model"
        )
    with _from_hub_or_disk(path, name) as hub:
        tokenizer = AutoTokenizer.from_pretrained(path, token=hub_token(), trust_remote_code=trust_remote_code, **hub)
    if tokenizer.pad_token is None:
        # Padding never reaches the loss (labels are -100 there) and <unk> is never generated,
        # so reusing it keeps the vocabulary, and the embedding matrix, unchanged.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise UserError(f"model.base_model={name}: the tokenizer has no BOS/EOS token; a Llama-family tokenizer is expected")
    return tokenizer


def load_base_model(
    name: str, quantization: str, device: torch.device, trust_remote_code: bool = False, quant_storage: torch.dtype | None = None
):
    """Frozen base weights on `device`: NF4 with double quantization and bf16 compute, or plain bf16 (fp32 on CPU).

    quant_storage: dtype the packed NF4 bytes are stored as (bitsandbytes' default: uint8); FSDP needs a float
    dtype matching the rest of the model to shard them (see `lima_lightning.distributed.fsdp_quant_storage`).
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = resolve_base_model(name)
    kwargs = {}
    if quantization == "nf4":
        # bf16 compute, never fp16: fp16 overflows in Llama's activations (the old project's bug).
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            **({"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}),
        )
        dtype = torch.bfloat16
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with _from_hub_or_disk(path, name) as hub:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            device_map={"": device},
            token=hub_token(),
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            **kwargs,
            **hub,
        )
    model.config.use_cache = False  # no KV cache while training; generation turns it on per call
    return model


def add_lora(model, r: int, alpha: int, dropout: float, target_modules: list[str]):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def load_adapter(model, adapter_path: str, base_name: str, trainable: bool):
    """Attach a saved adapter, refusing one that was trained on a different base."""
    from peft import PeftModel

    path = Path(adapter_path).expanduser()
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(
            f"model.adapter_path={adapter_path}: no adapter_config.json there; point it at an adapters/<name> directory of a run"
        )
    if not (path / "adapter_model.safetensors").is_file():
        # PEFT would fall back to a pickled adapter_model.bin; weights are only ever read as safetensors here.
        raise UserError(
            f"model.adapter_path={adapter_path}: no adapter_model.safetensors there (a pickled adapter_model.bin is not read); "
            "save the adapter with save_pretrained(safe_serialization=True)"
        )
    try:
        return PeftModel.from_pretrained(model, str(path), is_trainable=trainable)
    except RuntimeError as e:
        if "size mismatch" not in str(e):
            raise
        trained_on = json.loads(config_file.read_text()).get("base_model_name_or_path")
        raise UserError(
            f"model.adapter_path={adapter_path}: its weights do not fit model.base_model={base_name} "
            f"(the adapter was trained on {trained_on}); set model.base_model to the adapter's base"
        ) from None
