"""`max_logit_difference`, the measure behind export's self-check: a merged model against its adapter model."""

from __future__ import annotations

import copy

import pytest
import torch

from lima_lightning.models.loading import LLAMA_PROJECTIONS, add_lora
from lima_lightning.models.tiny import build_tiny_model, build_tiny_tokenizer
from lima_lightning.models.verify import as_prompts, max_logit_difference
from tests.conftest import randomize_lora_b

VOCAB = len(build_tiny_tokenizer())
PROMPTS = [list(range(3, 40)), [1, 5, 9, 200, 7]]  # two lengths: each prompt runs on its own, unpadded


def adapter_model(dtype=torch.float32):
    """The tiny Llama with a LoRA adapter far from zero on every projection (PEFT starts lora_B at 0)."""
    model = add_lora(build_tiny_model(VOCAB).to(dtype), 8, 16, 0.0, LLAMA_PROJECTIONS)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        randomize_lora_b(model, std=0.05)
    return model.eval()


def merged(model):
    return copy.deepcopy(model).merge_and_unload(safe_merge=True).eval()


def test_a_merged_model_matches_its_adapter_model_to_fp32_rounding():
    model = adapter_model()
    merged_model = merged(model)
    assert max_logit_difference(merged_model, model, PROMPTS) < 5e-5  # measured 5.0e-6
    assert max_logit_difference(merged_model, model, PROMPTS, relative=True) < 1e-5  # measured 4.7e-7
    # ... and the adapter matters: the base alone is far off, so the agreement above is not the base's.
    with model.disable_adapter():
        assert max_logit_difference(merged_model, model, PROMPTS, relative=True) > 0.1


def test_a_wrong_merge_is_seen():
    model = adapter_model()
    wrong = merged(model)
    with torch.no_grad():  # as if one projection's LoRA update had been added twice
        layer = model.base_model.model.model.layers[1].self_attn.v_proj
        wrong.model.layers[1].self_attn.v_proj.weight += (
            layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
        )
    assert max_logit_difference(wrong, model, PROMPTS) > 1e-3


def test_bf16_merge_differs_by_bf16_rounding_only():
    """Measured 7.4e-3 relative (7.0e-2 abs) on this model; the base alone is 1.0 away."""
    model = adapter_model(torch.bfloat16)
    assert max_logit_difference(merged(model), model, PROMPTS, relative=True) < 0.03


def test_nan_logits_never_pass_a_bound():
    model = build_tiny_model(VOCAB).eval()
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.model.norm.weight[0] = float("nan")
    assert max_logit_difference(broken, model, PROMPTS) == float("inf")
    assert max_logit_difference(model, model, torch.tensor(PROMPTS[0])) == 0.0


def test_prompt_shapes():
    assert [p.tolist() for p in as_prompts(torch.tensor([[1, 2], [3, 4]]))] == [[1, 2], [3, 4]]
    assert [p.tolist() for p in as_prompts([[1, 2, 3], [4]])] == [[1, 2, 3], [4]]
    with pytest.raises(ValueError):
        as_prompts([[]])
    with pytest.raises(ValueError, match="differ in shape"):
        max_logit_difference(build_tiny_model(VOCAB), build_tiny_model(VOCAB + 1), [[1, 2]])
