"""A merged Llama and its tokenizer as one GGUF file, for llama.cpp and ollama (`export --format gguf`).

    path = write_gguf(merged_model, tokenizer, "exported/llama2-7b-lima.Q8_0.gguf", "q8_0")
    difference = verify_gguf(path, merged_model, prompt_ids)   # relative to the largest reference logit
    assert difference <= gguf_logit_bound("q8_0", torch.bfloat16)

The file is written with the `gguf` package (maintained by the llama.cpp project) following the conventions
of llama.cpp's own `convert_hf_to_gguf.py` for the `llama` architecture, so llama.cpp reads it as it reads
one of its own conversions:

- Tensors take llama.cpp's names (`blk.N.attn_q.weight`...), through the `gguf` package's own name map.
- q_proj and k_proj rows are reordered: transformers' rotary embedding rotates each head's first half
  against its second half, llama.cpp's rotates adjacent pairs (see `rope_rows_for_llama_cpp`).
- 1-D tensors (the RMSNorm weights) stay float32: llama.cpp's kernels take norms in f32 only. The 2-D
  weights become f16, or Q8_0 (blocks of 32 int8 values sharing one f16 scale, about 8.5 bits a weight,
  quantized by `gguf.quants`, which reproduces ggml's reference quantizer bit for bit).
- The vocabulary is the `llama` (SentencePiece) tokenizer model: tokens, scores and token types, BOS/EOS/
  UNK/pad ids and whether to add BOS, plus a Llama-2 chat template so that chat front ends format
  prompts the way the model was trained (`LLAMA2_CHAT_TEMPLATE`); `gguf_vocab` writes it.

Tensors are converted one at a time while the file is written, so the export needs about one tensor of
memory beyond the model itself (a whole-model copy would be another 13 GB for Llama-2-7B in f16).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

import torch

from lima_lightning.errors import UserError
from lima_lightning.gguf_vocab import add_tokenizer_metadata
from lima_lightning.models.verify import max_logit_difference

OutType = Literal["f16", "q8_0"]

# The largest logit difference `verify_gguf` may measure for a file written by `write_gguf`, relative to the
# largest reference logit, by file type and by the dtype the reference model computes in. Measured on three
# tiny Llamas (tests/test_gguf.py's with Llama-2's 32000-token vocabulary and with the built-in 354-token one,
# and models/tiny.py's; 4 prompts of 24 tokens, logits up to 12.3), relative (abs):
#   f16,  fp32 model:  4.5e-4 - 4.7e-4  (4.2e-3 - 5.5e-3)  f16 rounding of fp32 weights
#   f16,  bf16 model:  5.6e-3 - 7.7e-3  (6.3e-2 - 9.4e-2)  bf16 weights are exact in f16; this is the reference's
#         own rounding: `model.to(bfloat16)` also casts the rotary inv_freq buffer to bf16, which transformers'
#         GGUF loader keeps in fp32 (with an fp32 inv_freq in the reference the difference is exactly 0)
#   q8_0, fp32 model:  1.1e-2 - 1.2e-2  (1.2e-1 - 1.4e-1)  32-value blocks sharing one f16 scale
#   q8_0, bf16 model:  1.3e-2 - 1.6e-2  (1.4e-1 - 1.9e-1)
# llama.cpp itself (llama-cpp-python 0.3.36, CPU) on the Llama-2-vocabulary files against the fp32 model: f16
# 6.9e-4 (8.5e-3 abs), q8_0 1.5e-2 (1.8e-1 abs); it also rounds activations (f16 KV cache, Q8_0 matmul inputs).
# Each bound is about 3x the largest figure. On the same models, leaving out the q/k reordering measures
# 0.28 - 0.39 and leaving out rope.freq_base 0.07 - 0.10; a wrong rms epsilon (1e-6 for 1e-5) 1.4e-2 - 2.1e-2,
# which only the fp32 f16 bound tells apart.
GGUF_LOGIT_BOUNDS: dict[tuple[str, torch.dtype], float] = {
    ("f16", torch.float32): 1.5e-3,
    ("f16", torch.bfloat16): 2.5e-2,
    ("q8_0", torch.float32): 3.5e-2,
    ("q8_0", torch.bfloat16): 5e-2,
}


def gguf_logit_bound(outtype: OutType, dtype: torch.dtype) -> float:
    """The bound `verify_gguf`'s result must stay within for a file of `outtype` written from a `dtype` model."""
    try:
        return GGUF_LOGIT_BOUNDS[(outtype, dtype)]
    except KeyError:
        raise ValueError(f"no measured GGUF logit bound for {outtype} from a {dtype} model (measured: fp32, bf16)") from None


_FILE_TYPES = {"f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}
_QUANT_TYPES = {"f16": "F16", "q8_0": "Q8_0"}


def rope_rows_for_llama_cpp(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder a q_proj or k_proj weight's rows from transformers' rotary layout to llama.cpp's.

    Within each head of `head_dim` rows, transformers' `rotate_half` pairs row i with row i + head_dim/2;
    llama.cpp's rope (the `llama` architecture) pairs rows 2i and 2i+1. Row 2i of a head must therefore
    hold transformers' row i and row 2i+1 its row i + head_dim/2. For k_proj, `n_heads` is the number
    of key/value heads. Skipping this leaves a file that loads and runs but computes wrong attention.
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows cannot be split into {n_heads} heads of an even size")
    halves = weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
    return halves.transpose(1, 2).reshape(weight.shape)


def _check_architecture(config) -> None:
    """Refuse models llama.cpp's `llama` architecture would read differently: one line, naming the setting."""
    if config.model_type != "llama":
        raise UserError(f"GGUF export: the model is a {config.model_type!r}, not a Llama; only Llama models are written")
    problems = []
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config.hidden_act}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("attention_bias/mlp_bias")
    rope = _rope_parameters(config)
    if rope.get("rope_type", "default") not in ("default", "linear"):
        problems.append(f"rope_type={rope.get('rope_type')}")
    if problems:
        raise UserError(f"GGUF export: {', '.join(problems)} is not a Llama-2 layout; only plain Llama-2-style models are written")


def _rope_parameters(config) -> dict:
    """transformers >= 5 keeps rope_theta in `rope_parameters`; earlier versions on the config and in `rope_scaling`."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope["type"]
    return rope


def _add_model_metadata(writer, config, outtype: OutType, name: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    rope = _rope_parameters(config)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[_FILE_TYPES[outtype]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * config.num_attention_heads != config.hidden_size:  # llama.cpp assumes hidden/heads otherwise
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)


def _tensor_plan(model, outtype: OutType) -> list[tuple[str, torch.Tensor, str, object]]:
    """(HF name, tensor, GGUF name, GGML type) per tensor, in the model's order; raises on a tensor llama.cpp has no name for.

    `state_dict()` returns views of the model's own storage: nothing is copied here.
    """
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    plan = []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"GGUF export: no llama.cpp name for tensor {hf_name}; only plain Llama weights are written")
        if tensor.dim() <= 1 or gguf_name.endswith("_norm.weight"):
            qtype = gguf.GGMLQuantizationType.F32  # llama.cpp's kernels take norms and 1-D tensors in f32 only
        else:
            qtype = gguf.GGMLQuantizationType[_QUANT_TYPES[outtype]]
            if qtype == gguf.GGMLQuantizationType.Q8_0 and tensor.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
                qtype = gguf.GGMLQuantizationType.F16  # rows not a whole number of 32-blocks: llama.cpp's converter falls back the same way
        plan.append((hf_name, tensor, gguf_name, qtype))
    return plan


def _converted(config, hf_name: str, tensor: torch.Tensor, qtype):
    """One tensor as the numpy array the file stores: q/k rows reordered, cast or quantized."""
    import gguf

    data = tensor.detach().to("cpu", torch.float32)
    if hf_name.endswith("self_attn.q_proj.weight"):
        data = rope_rows_for_llama_cpp(data, config.num_attention_heads)
    elif hf_name.endswith("self_attn.k_proj.weight"):
        data = rope_rows_for_llama_cpp(data, getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return gguf.quants.quantize(data.numpy(), qtype)


def write_gguf(
    model,
    tokenizer,
    path: str | Path,
    outtype: OutType = "q8_0",
    *,
    name: str | None = None,
    chat_template: str | None = None,
) -> Path:
    """Write `model` (a merged `LlamaForCausalLM`, bf16 or fp32) and its Llama-2 tokenizer to one GGUF file.

    Args:
        model: A plain transformers Llama (no PEFT wrappers, no NF4 layers): `export`'s merged model.
        tokenizer: Its tokenizer. The SentencePiece `tokenizer.model` it was loaded from is used if it still
            exists, else its tokenizer.json, which must be Llama-style (see `gguf_vocab._vocab_from_tokenizer_json`).
        path: The file to write (`.gguf`). Written to a temporary file beside it, then renamed into place:
            a crash leaves the previous file (or none), never half a file.
        outtype: `f16` (a bf16 model's weights exactly, bar those under f16's normal range, 6e-5, which round
            by at most 3e-8) or `q8_0` (53% of the f16 size; see `GGUF_LOGIT_BOUNDS` for what it costs).
        name: `general.name` in the file (default: the base model's name).
        chat_template: Jinja chat template to embed (default: the tokenizer's, else `gguf_vocab.LLAMA2_CHAT_TEMPLATE`).
    """
    import gguf
    import numpy as np

    if outtype not in _FILE_TYPES:
        raise UserError(f"--gguf_type={outtype}: expected one of {', '.join(_FILE_TYPES)}")
    config = model.config
    _check_architecture(config)
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    plan = _tensor_plan(model, outtype)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        _add_model_metadata(writer, config, outtype, name or Path(config.name_or_path or "llama").name or "llama")
        add_tokenizer_metadata(writer, tokenizer, config.vocab_size, chat_template)
        # Announce every tensor's shape and type first (the header needs them), then convert and write one at a time.
        for _, tensor, gguf_name, qtype in plan:
            byte_shape = gguf.quant_shape_to_byte_shape(tuple(tensor.shape), qtype)
            writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for hf_name, tensor, _, qtype in plan:
            writer.write_tensor_data(_converted(config, hf_name, tensor, qtype))
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, target)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return target


def verify_gguf(path: str | Path, reference_model, input_ids) -> float:
    """Load `path` back with transformers' GGUF loader and return its largest logit difference from `reference_model`.

    The difference is relative: max |logit_gguf - logit_reference| / max |logit_reference| over every position
    of every prompt in `input_ids` (see `lima_lightning.models.verify`), to compare with `gguf_logit_bound`.
    transformers undoes the q/k reordering and dequantizes every tensor into a plain torch model, in the
    reference's dtype, so the two compute alike and only what the file stores can differ. An independent
    reader: a file that round-trips here has the names, layout and hyperparameters llama.cpp reads too.

    The loaded copy is a second full model (13 GB for Llama-2-7B in bf16), built on the CPU and moved to the
    reference's device for the comparison. Reading the file's metadata takes transformers ~2.5 s for
    Llama-2's 32000-token vocabulary, whatever the model's size.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    dtype = next(reference_model.parameters()).dtype
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, device_map={"": "cpu"})
    try:
        return max_logit_difference(loaded.to(next(reference_model.parameters()).device), reference_model, input_ids, relative=True)
    finally:
        del loaded
