"""Write a Llama-2-7B-shaped model with random weights (and the Llama-2 tokenizer) to a local directory.

The hub is unreachable on the GPU machines here, so speed, memory and GPU correctness runs use
this stand-in: same shapes, dtypes and kernels as meta-llama/Llama-2-7b-hf, random values.

    python benchmarks/make_random_llama.py --out /tmp/llama2-7b-random --tokenizer ../shared/llama2-tokenizer
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

LLAMA2_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write (overwritten)")
    parser.add_argument("--tokenizer", required=True, help="directory of the Llama-2 tokenizer to copy in")
    parser.add_argument("--layers", type=int, default=32, help="fewer layers for a quicker stand-in")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    started = time.perf_counter()
    config = LlamaConfig(**{**LLAMA2_7B, "num_hidden_layers": args.layers})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, max_shard_size="5GB")
    for file in Path(args.tokenizer).iterdir():
        if file.is_file() and file.suffix in (".model", ".json"):
            shutil.copy(file, out / file.name)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {params / 1e9:.2f}B parameters, bf16, in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
