"""benchmarks/bench_generate.py --smoke: every configuration runs on CPU with the tiny model and reports sane numbers."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))  # its helpers (measure) import by name


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_generate", REPO / "benchmarks" / "bench_generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_random_adapter_is_a_loadable_nonzero_peft_adapter(tmp_path, tiny_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    bench = load_bench()
    adapter = bench.write_random_adapter(str(tiny_dir), tmp_path / "adapter", r=4, alpha=8, seed=0)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), adapter)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert len(lora_b) == 2 * 7  # 2 layers x 7 projections, every one loaded (PEFT would leave missing ones at 0)
    assert all(p.abs().sum() > 0 for p in lora_b)
    ids = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            assert (adapted - model(input_ids=ids).logits).abs().max() > 1e-3


@pytest.mark.slow
def test_smoke_runs_every_configuration(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "bench.json"
    results = bench.main(["--smoke", "--work_dir", str(tmp_path), "--out", str(out)])
    names = [r.config for r in results]
    assert names == ["reference, batch 1", "reference, batched", *bench.PREDICT_CONFIGS]
    for r in results:
        # --smoke: 4 new tokens at most per prompt, at least 1 (EOS counts as a token).
        assert r.prompts_timed >= 1 and r.prompts_timed <= r.new_tokens <= 4 * r.prompts_timed, r
        assert r.generate_s > 0 and r.estimated_all_s >= r.generate_s, r
    saved = json.loads(out.read_text())
    assert [row["config"] for row in saved["results"]] == names
    table = capsys.readouterr().out
    assert "reference, batch 1" in table and "1.0x" in table and "the worst case" in table
