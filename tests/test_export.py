"""`lima-lightning export`: the merged model computes what the adapter model computes, and loads without PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lima_lightning.errors import UserError
from lima_lightning.models.loading import LLAMA_PROJECTIONS, add_lora, load_adapter, load_base_model, load_tokenizer
from tests.conftest import randomize_lora_b

INPUT_IDS = torch.randint(3, 300, (2, 17), generator=torch.Generator().manual_seed(0))


def make_run(root: Path, tiny_dir: Path, quantization: str | None) -> Path:
    """A run dir as `fit` leaves it: adapters/final (PEFT format + tokenizer) and config.yaml; returns the adapter dir.

    The adapter is random but far from zero (PEFT starts lora_B at 0, which would make any merge look right).
    """
    model = add_lora(load_base_model(str(tiny_dir), "none", torch.device("cpu")), 8, 16, 0.0, LLAMA_PROJECTIONS)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        randomize_lora_b(model, std=0.05)
    adapter = root / "adapters" / "final"
    model.save_pretrained(adapter)
    load_tokenizer(str(tiny_dir)).save_pretrained(adapter)
    if quantization is not None:
        (root / "config.yaml").write_text(yaml.safe_dump({"model": {"base_model": str(tiny_dir), "quantization": quantization}}))
    return adapter


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model.eval()(input_ids=INPUT_IDS).logits.float()


@torch.no_grad()
def peft_logits(tiny_dir: Path, adapter: Path, quantization: str) -> torch.Tensor:
    """The adapter on its base, as predict runs it without merging."""
    base = load_base_model(str(tiny_dir), quantization, torch.device("cpu"))
    return logits(load_adapter(base, str(adapter), str(tiny_dir), trainable=False))


def export(*args: str) -> None:
    from lima_lightning.cli import main

    main(["export", *args])


def test_fp32_export_loads_without_peft_and_equals_the_adapter_model(tmp_path, tiny_dir, capsys):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    adapter = make_run(tmp_path / "run", tiny_dir, "none")
    out = tmp_path / "merged"
    export("--adapter_path", str(adapter), "--out", str(out), "--dtype", "fp32")
    assert f"merging onto {tiny_dir} (fp32) (from {tmp_path / 'run' / 'config.yaml'})" in capsys.readouterr().out

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert type(merged).__name__ == "LlamaForCausalLM" and merged.dtype == torch.float32
    with safe_open(out / "model.safetensors", "pt") as f:
        assert not any("lora" in key or "base_layer" in key for key in f.keys())
    torch.testing.assert_close(logits(merged), peft_logits(tiny_dir, adapter, "none"), atol=1e-4, rtol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert (logits(base) - logits(merged)).abs().max() > 0.1  # the adapter is in there

    generation = GenerationConfig.from_pretrained(out)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 0)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 0
    assert merged.config.use_cache and "quantization_config" not in json.loads((out / "config.json").read_text())


def test_nf4_export_merges_onto_the_dequantized_base(tmp_path, tiny_dir, capsys):
    from transformers import AutoModelForCausalLM, GenerationConfig

    adapter = make_run(tmp_path / "run", tiny_dir, "nf4")
    out = tmp_path / "merged"
    export("--adapter_path", str(adapter), "--out", str(out))  # quantization and base from the run's config.yaml
    assert "loaded in NF4" in capsys.readouterr().out

    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    assert GenerationConfig.from_pretrained(out).eos_token_id == 2
    merged = logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16))
    reference = peft_logits(tiny_dir, adapter, "nf4")  # the adapter on the NF4 base, bf16 compute
    tolerance = 0.02 * reference.abs().max().item()  # bf16 rounding through two layers
    torch.testing.assert_close(merged, reference, atol=tolerance, rtol=0)
    # The same adapter merged onto the original (unquantized) weights misses the NF4 model by far more:
    # dequantizing is what makes the export reproduce what was trained.
    original = AutoModelForCausalLM.from_pretrained(tiny_dir)
    undequantized = logits(load_adapter(original, str(adapter), "tiny", trainable=False).merge_and_unload())
    assert (undequantized - reference).abs().max() > 3 * tolerance


def test_export_errors_name_the_fix(tmp_path, tiny_dir, capsys):
    from lima_lightning.commands.export import main as export_main

    adapter = make_run(tmp_path / "run", tiny_dir, quantization=None)  # no config.yaml beside the adapter
    with pytest.raises(SystemExit) as exit_info:  # through the CLI: one line, exit status 2
        export("--adapter_path", str(adapter), "--out", str(tmp_path / "out"))
    assert exit_info.value.code == 2
    expected = f"--quantization: not given, and no model.quantization in {tmp_path / 'run' / 'config.yaml'}; pass --quantization nf4"
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"lima-lightning: error: {expected}")
    with pytest.raises(UserError, match="no adapter_config.json"):
        export_main(["--adapter_path", str(tmp_path), "--out", str(tmp_path / "out"), "--quantization", "none"])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="does not hold an exported model"):
        export_main(["--adapter_path", str(adapter), "--out", str(tmp_path / "busy"), "--quantization", "none"])
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_merging_frees_the_nf4_weights_at_once(tiny_dir):
    """The replaced 4-bit weights sit in reference cycles; left to the next automatic collection they stayed
    allocated on the H200 (3.1 GiB for 7B), so predict's merged model got less KV-cache memory and split its
    300 prompts into two chunks (36.7 s instead of 24.1 s)."""
    import gc
    import weakref

    import bitsandbytes as bnb

    from lima_lightning.models.merging import merge_into_base

    base = load_base_model(str(tiny_dir), "nf4", torch.device("cpu"))
    nf4_weights = [weakref.ref(m.weight) for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert nf4_weights
    gc.disable()  # only the collection merge_into_base runs itself may free them
    try:
        merged = merge_into_base(base, None, "tiny", torch.float32)
        del base
        assert [w for w in nf4_weights if w() is not None] == []
    finally:
        gc.enable()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())


def test_export_checks_the_merge_and_writes_nothing_when_it_is_off(tmp_path, tiny_dir, capsys, monkeypatch):
    import lima_lightning.models.merging as merging

    adapter = make_run(tmp_path / "run", tiny_dir, "none")
    export("--adapter_path", str(adapter), "--out", str(tmp_path / "ok"), "--dtype", "fp32")
    line = next(line for line in capsys.readouterr().out.splitlines() if "merged vs adapter model" in line)
    measured = float(line.split("difference ")[1].split(" ")[0])
    assert measured <= 1e-5  # fp32: rounding only
    real_merge = merging.merge_into_base

    def merge_dropping_the_adapter(base, adapter_path, base_name, dtype):
        return real_merge(base, None, base_name, dtype)  # a merge that loses the adapter: the base alone

    monkeypatch.setattr(merging, "merge_into_base", merge_dropping_the_adapter)
    with pytest.raises(SystemExit) as exit_info:
        export("--adapter_path", str(adapter), "--out", str(tmp_path / "bad"), "--dtype", "fp32")
    assert exit_info.value.code == 1  # not the user's mistake
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("lima-lightning: check failed: export: the merged model's logits differ") and "nothing was written" in error
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))


def test_merging_keeps_rope_in_fp32(tiny_dir):
    from lima_lightning.models.merging import merge_into_base

    merged = merge_into_base(load_base_model(str(tiny_dir), "none", torch.device("cpu")), None, "tiny", torch.bfloat16)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert merged.model.rotary_emb.inv_freq.dtype == torch.float32  # bf16 would shift every position's angle


def test_gguf_export_round_trips_within_its_bound(tmp_path, llama2_tokenizer, capsys):
    """The whole command with --format gguf, on a tiny Llama with the real Llama-2 tokenizer (skipped without it)."""
    from tests.test_gguf import tiny_llama  # the gguf tests' tiny model (Llama-2's 32000-token vocabulary)

    base_dir = tmp_path / "base"
    model = tiny_llama()
    model.save_pretrained(base_dir)
    llama2_tokenizer.save_pretrained(base_dir)
    lora = add_lora(load_base_model(str(base_dir), "none", torch.device("cpu")), 8, 16, 0.0, LLAMA_PROJECTIONS)
    randomize_lora_b(lora, std=0.05)
    adapter = tmp_path / "run" / "adapters" / "final"
    lora.save_pretrained(adapter)
    llama2_tokenizer.save_pretrained(adapter)
    export("--adapter_path", str(adapter), "--out", str(tmp_path / "gguf"), "--format", "gguf", "--quantization", "none")
    [file] = list((tmp_path / "gguf").glob("*.gguf"))
    assert file.name == "gguf.Q8_0.gguf"
    line = next(line for line in capsys.readouterr().out.splitlines() if "read back by transformers" in line)
    assert float(line.split("difference ")[1].split(" ")[0]) <= 5e-2
