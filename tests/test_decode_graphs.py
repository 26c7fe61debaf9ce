"""Decoding steps replayed from one capture (decode_graphs): the same tokens as decoding step by step.

CUDA graphs need a GPU (tests/test_gpu.py compares the real thing). Here a stand-in capture keeps the one
property replays depend on, on the CPU: capturing runs nothing (the cache is put back as it was), and each
replay runs the recorded call again on the captured input tensors, writing into the captured output. So a
replay that read anything but the inputs copied in for its own step would give other tokens.
"""

from __future__ import annotations

import gc

import pytest
import torch
from transformers import StaticCache

from lima_lightning.decode_graphs import GraphedForward, call_signature, graphed_decoding, is_decoding_step
from lima_lightning.models.loading import add_lora, load_base_model
from tests.conftest import randomize_lora_b


def static_cache_tensors() -> list[torch.Tensor]:
    tensors = []
    for cache in (o for o in gc.get_objects() if isinstance(o, StaticCache)):
        for layer in cache.layers:
            if getattr(layer, "is_initialized", False):
                tensors += [layer.keys, layer.values, layer.cumulative_length]
    return tensors


class ReplayOnCPU:
    """Captures as a CUDA graph does, without effects (every static cache is restored), and replays by running
    the recorded call again and copying its result into the output the capture returned."""

    def capture(self, fn):
        saved = [(t, t.clone()) for t in static_cache_tensors()]
        self.fn, self.output = fn, fn()
        for tensor, before in saved:
            tensor.copy_(before)
        return self.output

    def replay(self) -> None:
        self.output.logits.copy_(self.fn().logits)


@pytest.fixture(scope="module")
def lora_model(tiny_dir):
    base = load_base_model(str(tiny_dir), "none", torch.device("cpu"))
    torch.manual_seed(0)
    model = add_lora(base, 8, 16, 0.0, ["q_proj", "v_proj", "down_proj"]).eval()
    randomize_lora_b(model, std=0.5)  # LoRA B starts at zero: make the adapter change the tokens
    return model


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.parametrize("do_sample", [False, True])
def test_replayed_steps_give_the_tokens_of_step_by_step_decoding(lora_model, tiny_tokenizer, do_sample):
    ids, mask = left_padded([[1, 40, 41, 42, 43], [1, 44, 45], [1, 46, 47, 48]])
    options = dict(max_new_tokens=12, do_sample=do_sample, temperature=1.5, top_p=0.95, cache_implementation="static")
    options |= dict(pad_token_id=0, eos_token_id=None)
    torch.manual_seed(3)
    expected = lora_model.generate(input_ids=ids, attention_mask=mask, **options)
    with graphed_decoding(lora_model, make_step=ReplayOnCPU) as graphed:
        torch.manual_seed(3)
        got = lora_model.generate(input_ids=ids, attention_mask=mask, **options)
        # A second call (another chunk): a new cache, so it runs its first step eagerly and captures again.
        torch.manual_seed(3)
        again = lora_model.generate(input_ids=ids[:2, 2:], attention_mask=mask[:2, 2:], **options)
    # Prefill gives the first token, the first step runs eagerly, the other 10 of each call are replays.
    assert graphed.replays == 2 * 10
    assert torch.equal(got, expected)
    torch.manual_seed(3)
    assert torch.equal(again, lora_model.generate(input_ids=ids[:2, 2:], attention_mask=mask[:2, 2:], **options))
    assert "forward" not in lora_model.get_base_model().__dict__  # the model's own forward is back


def test_a_replay_reads_its_own_steps_inputs(lora_model, monkeypatch):
    """The control for the test above: a capture that is not fed each step's inputs gives other tokens."""
    ids, mask = left_padded([[1, 40, 41, 42, 43], [1, 44, 45]])
    options = dict(max_new_tokens=10, do_sample=False, cache_implementation="static", pad_token_id=0, eos_token_id=None)
    expected = lora_model.generate(input_ids=ids, attention_mask=mask, **options)

    class StaleInputs(GraphedForward):  # forgets to copy the step's inputs in: every replay repeats the capture's
        def __call__(self, **kwargs):
            if self.step is not None and call_signature(kwargs) == self.signature:
                self.step.replay()
                return self.output
            return super().__call__(**kwargs)

    import lima_lightning.decode_graphs as decode_graphs

    monkeypatch.setattr(decode_graphs, "GraphedForward", StaleInputs)
    with graphed_decoding(lora_model, make_step=ReplayOnCPU):
        got = lora_model.generate(input_ids=ids, attention_mask=mask, **options)
    assert not torch.equal(got, expected)


def test_only_single_token_steps_on_a_static_cache_are_replayed():
    cache = type("Static", (), {"is_compileable": True})()
    dynamic = type("Dynamic", (), {"is_compileable": False})()
    one, prompt = torch.ones(2, 1, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)
    mask4d, mask2d = torch.ones(2, 1, 1, 9, dtype=torch.bool), torch.ones(2, 6)
    assert is_decoding_step({"input_ids": one, "past_key_values": cache, "attention_mask": mask4d})
    assert is_decoding_step({"input_ids": one, "cache": cache, "attention_mask": mask4d})  # transformers >= 5.2x
    assert not is_decoding_step({"input_ids": prompt, "past_key_values": cache, "attention_mask": mask4d})  # prefill
    assert not is_decoding_step({"input_ids": one, "past_key_values": dynamic, "attention_mask": mask4d})
    assert not is_decoding_step({"input_ids": one, "past_key_values": cache, "attention_mask": mask2d})  # grows each step
    block_mask = type("BlockMask", (), {"shape": (2, 1, 1, 9)})()  # flex attention's: no tensor
    assert not is_decoding_step({"input_ids": one, "past_key_values": cache, "attention_mask": block_mask})
    # The same shapes with another cache object, or another batch size: another graph.
    step = {"input_ids": one, "past_key_values": cache, "use_cache": True}
    assert call_signature(step) == call_signature({**step, "input_ids": one.clone()})
    assert call_signature(step) != call_signature({**step, "past_key_values": type(cache)()})
    assert call_signature(step) != call_signature({**step, "input_ids": torch.ones(3, 1, dtype=torch.long)})


def test_a_capture_that_fails_falls_back_to_eager_steps(lora_model):
    ids, mask = left_padded([[1, 40, 41, 42, 43], [1, 44, 45]])
    options = dict(max_new_tokens=8, do_sample=False, cache_implementation="static", pad_token_id=0, eos_token_id=None)
    expected = lora_model.generate(input_ids=ids, attention_mask=mask, **options)

    class Uncapturable:
        def capture(self, fn):
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")

    with graphed_decoding(lora_model, make_step=Uncapturable) as graphed:
        got = lora_model.generate(input_ids=ids, attention_mask=mask, **options)
    assert torch.equal(got, expected) and graphed.failed and graphed.replays == 0
