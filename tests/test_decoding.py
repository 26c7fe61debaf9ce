"""decoding.decode, our loop over a static cache: the tokens of transformers' `generate`, greedy and sampled."""

from __future__ import annotations

import copy

import pytest
import torch

from lima_lightning import decoding
from lima_lightning.decoding import decode
from lima_lightning.generation import GenerationSettings
from lima_lightning.models.loading import add_lora, load_base_model
from lima_lightning.models.speed import set_attention
from tests.conftest import randomize_lora_b
from tests.test_generation import left_padded_prompts


@torch.no_grad()
def stop_every_row_early(model, tokenizer, input_ids, attention_mask) -> None:
    """Point EOS's output row along the mean hidden state of the model's answers: every row then stops at EOS
    within a few dozen tokens, at different steps."""
    greedy = dict(max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    answered = model.generate(input_ids=input_ids, attention_mask=attention_mask, **greedy)
    answered_mask = torch.cat([attention_mask, torch.ones_like(answered[:, input_ids.shape[1] :])], 1)
    hidden = model(input_ids=answered, attention_mask=answered_mask, output_hidden_states=True).hidden_states[-1][:, input_ids.shape[1] :]
    direction = model.get_base_model().model.norm(hidden).flatten(0, 1).float().mean(0)
    head = model.get_output_embeddings().weight
    head[tokenizer.eos_token_id] = (2 * head.float().norm(dim=1).mean() * direction / direction.norm()).to(head.dtype)


@pytest.fixture(scope="module")
def models(tiny_dir, tiny_tokenizer):
    """A random adapter on the tiny base (rows run to the limit), and a copy whose rows all stop at EOS early."""
    torch.manual_seed(0)
    model = add_lora(load_base_model(str(tiny_dir), "none", torch.device("cpu")), 8, 16, 0.0, ["q_proj", "v_proj"]).eval()
    randomize_lora_b(model, std=0.05)
    stopping = copy.deepcopy(model)
    stop_every_row_early(stopping, tiny_tokenizer, *left_padded_prompts(tiny_tokenizer))
    return {"running": model, "stopping": stopping}


def generate_new_tokens(model, tokenizer, input_ids, attention_mask, settings) -> torch.Tensor:
    sampling = dict(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p) if settings.do_sample else {}
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        cache_implementation="static",
        disable_compile=True,
        **sampling,
    )
    return output[:, input_ids.shape[1] :]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["running", "stopping"])
def test_decode_gives_the_tokens_of_generate(models, tiny_tokenizer, attention, kind):
    model = models[kind]
    set_attention(model.get_base_model(), attention, torch.device("cpu"))
    try:
        input_ids, attention_mask = left_padded_prompts(tiny_tokenizer)
        pad = tiny_tokenizer.pad_token_id
        for settings in (GenerationSettings(30, do_sample=False), GenerationSettings(30, temperature=1.3, top_k=20, top_p=0.8)):
            torch.manual_seed(5)
            expected = generate_new_tokens(model, tiny_tokenizer, input_ids, attention_mask, settings)
            torch.manual_seed(5)
            told = []
            ours = decode(model, input_ids, attention_mask, settings, tiny_tokenizer.eos_token_id, pad, on_tokens=told.append)
            # generate stops at the step where the last row finished; the loop notices within STOP_CHECK_EVERY steps
            # and only pads meanwhile.
            assert torch.equal(ours[:, : expected.shape[1]], expected), (settings, ours, expected)
            assert set(ours[:, expected.shape[1] :].flatten().tolist()) <= {pad}
            assert expected.shape[1] <= ours.shape[1] < expected.shape[1] + decoding.STOP_CHECK_EVERY
            eos = tiny_tokenizer.eos_token_id
            finished = (expected == eos).any(1)
            assert finished.all() if kind == "stopping" else not finished.all(), expected  # ends by the check / the limit
            # Progress: every real token told once, the EOS included, none of the padding after it.
            real = [row.index(eos) + 1 if eos in row else len(row) for row in expected.tolist()]
            assert sum(told) == sum(real), (told, real)
    finally:
        set_attention(model.get_base_model(), "sdpa", torch.device("cpu"))


def test_a_streamer_gets_the_prompt_then_each_token(models, tiny_tokenizer):
    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended = True

    input_ids, attention_mask = left_padded_prompts(tiny_tokenizer)
    input_ids, attention_mask = input_ids[:1], attention_mask[:1]  # chat: one row
    recorder, settings = Recorder(), GenerationSettings(12, do_sample=False)
    ours = decode(
        models["stopping"], input_ids, attention_mask, settings, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id, streamer=recorder
    )
    assert recorder.puts[0] == input_ids.tolist() and recorder.ended
    assert [token for (token,) in recorder.puts[1:]] == ours[0].tolist()


def test_attention_it_does_not_mask_goes_through_generate(models):
    model = models["running"]
    assert decoding.decodes_in_own_loop(model)
    config = copy.copy(model.config)
    config._attn_implementation = "flex_attention"
    assert not decoding.decodes_in_own_loop(type("Model", (), {"config": config})())


def test_every_cache_length_is_rounded_to_one_alignment_and_the_tokens_stay_those_of_generate(models, tiny_tokenizer):
    """cuDNN compiles a kernel per alignment of the key length: each chunk's cache is a multiple of 16 slots,
    the fewest that hold its prompt and new tokens, and the slots past those are never attended."""
    assert [decoding.cache_slots(width, 500) for width in (16, 17, 20, 29, 33, 216)] == [528, 528, 528, 528, 544, 720]
    for width in range(1, 40):
        slots = decoding.cache_slots(width, 12)
        assert slots % decoding.CACHE_SLOT_MULTIPLE == 0 and width + 11 <= slots < width + 11 + decoding.CACHE_SLOT_MULTIPLE
    model = models["running"]
    input_ids, attention_mask = left_padded_prompts(tiny_tokenizer)
    lengths = []
    hook = model.get_base_model().register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs.get("cache", kwargs.get("past_key_values")).layers[0].max_cache_len),
        with_kwargs=True,
    )
    settings = GenerationSettings(12, do_sample=False)
    try:
        ours = decode(model, input_ids, attention_mask, settings, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id)
    finally:
        hook.remove()
    assert set(lengths) == {decoding.cache_slots(input_ids.shape[1], 12)} and lengths[0] > input_ids.shape[1] + 11
    assert torch.equal(ours, generate_new_tokens(model, tiny_tokenizer, input_ids, attention_mask, settings))
