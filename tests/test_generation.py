"""Generation for predict: finish reasons, the KV cache, seeds, and generation.merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lima_lightning.generation import GenerationSettings, describe_completion, generate
from lima_lightning.models.loading import add_lora, load_adapter, load_base_model
from tests.conftest import demo_args, randomize_lora_b, run_cli


def test_describe_completion_by_hand(tiny_tokenizer):
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    hi = tiny_tokenizer.encode("hi there", add_special_tokens=False)
    # Stopped at EOS, then padded while longer rows of the batch went on: EOS counts, padding does not.
    assert describe_completion([*hi, eos, pad, pad], tiny_tokenizer) == {
        "response": "hi there",
        "finish_reason": "eos",
        "new_tokens": len(hi) + 1,
    }
    assert describe_completion(hi, tiny_tokenizer) == {"response": "hi there", "finish_reason": "length", "new_tokens": len(hi)}
    assert describe_completion([eos, pad], tiny_tokenizer) == {"response": "", "finish_reason": "eos", "new_tokens": 1}
    # EOS as the very last allowed token is still a stop at EOS; a later EOS after the first changes nothing.
    assert describe_completion([*hi, eos], tiny_tokenizer)["finish_reason"] == "eos"
    assert describe_completion([*hi, eos, *hi, eos], tiny_tokenizer)["new_tokens"] == len(hi) + 1


def test_generation_uses_the_kv_cache_although_training_turned_it_off(tiny_dir, tiny_tokenizer):
    base = load_base_model(str(tiny_dir), "none", torch.device("cpu"))
    assert base.config.use_cache is False
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as the 7B configs do
    model = add_lora(base, 8, 16, 0.0, ["q_proj", "v_proj"]).eval()
    lengths = []
    base.model.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    input_ids = torch.tensor([[0, 0, 1, 40, 41, 42], [1, 43, 44, 45, 46, 47]])  # left-padded
    attention_mask = (torch.arange(6) >= torch.tensor([[2], [0]])).long()
    generate(model, tiny_tokenizer, input_ids, attention_mask, GenerationSettings(max_new_tokens=5, do_sample=False))
    # The prompt once, then one new token per step: the cache holds the rest.
    assert lengths[0] == 6 and lengths[1:] and set(lengths[1:]) == {1}, lengths
    # Control: without the cache every step re-reads the whole sequence, so the hook above would tell.
    lengths.clear()
    model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=3, do_sample=False, use_cache=False)
    assert lengths == [6, 7, 8]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> tuple[Path, Path]:
    """A few steps of the demo fit: enough that some answers stop at EOS and others run to the limit."""
    root = tmp_path_factory.mktemp("generation")
    cli = run_cli(
        "fit",
        *demo_args(
            root, "--trainer.max_steps", "8", "--trainer.max_epochs", "1", "--samples.num_prompts", "0", "--adapters.every_epoch", "false"
        ),
    )
    return Path(cli.trainer.log_dir) / "adapters" / "final", root


def predictions(cli) -> list[dict]:
    return [json.loads(line) for line in (Path(cli.trainer.log_dir) / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_each_line_has_its_own_finish_reason_and_length(adapter, tiny_dir):
    """Batched, left-padded predict against one-prompt-at-a-time `generate` with plain transformers."""
    adapter_path, root = adapter
    cli = run_cli("predict", *demo_args(root, "--model.adapter_path", str(adapter_path), "--model.generation.max_new_tokens", "24"))
    rows = predictions(cli)
    assert {r["finish_reason"] for r in rows} == {"eos", "length"}, "the case needs both kinds of line"
    model, tokenizer = cli.model.model, cli.model.tokenizer
    for example in cli.datamodule.predict_dataset:
        row = rows[example["id"]]
        prompt = torch.tensor([example["input_ids"]])
        with torch.no_grad():
            new = model.generate(input_ids=prompt, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)[
                0, prompt.shape[1] :
            ]
        stopped = new[-1].item() == tokenizer.eos_token_id
        assert row["finish_reason"] == ("eos" if stopped else "length"), row
        assert row["new_tokens"] == len(new) and (stopped or len(new) == 24), row
        assert row["response"] == tokenizer.decode(new, skip_special_tokens=True), row


@pytest.mark.slow
def test_same_seed_same_samples(adapter):
    adapter_path, root = adapter

    def sample(seed: str, *extra: str) -> list[dict]:
        args = (
            "--model.adapter_path",
            str(adapter_path),
            "--model.generation.do_sample",
            "true",
            "--model.generation.temperature",
            "1.0",
            "--model.generation.seed",
            seed,
        )
        return predictions(
            run_cli("predict", *demo_args(root, *args, "--data.predict_batch_size", "8", "--model.generation.max_new_tokens", "16", *extra))
        )

    first = sample("3")
    assert sample("3") == first
    assert sample("4") != first  # sampling does happen, so the equality above means something
    merged = sample("3", "--model.generation.merge", "true")
    assert sample("3", "--model.generation.merge", "true") == merged


@pytest.mark.slow
def test_generation_merge_dequantizes_an_nf4_base(adapter, tiny_dir):
    import bitsandbytes as bnb

    adapter_path, root = adapter
    cli = run_cli(
        "predict",
        *demo_args(root, "--model.quantization", "nf4", "--model.adapter_path", str(adapter_path), "--model.generation.merge", "true"),
    )
    merged = cli.model.model
    assert type(merged).__name__ == "LlamaForCausalLM"  # no PEFT wrapper left
    assert not any(isinstance(m, bnb.nn.Linear4bit) or "lora" in name for name, m in merged.named_modules())
    assert len(predictions(cli)) == 20
    input_ids = torch.randint(3, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    reference = load_adapter(load_base_model(str(tiny_dir), "nf4", torch.device("cpu")), str(adapter_path), "tiny", trainable=False).eval()
    with torch.no_grad():
        expected = reference(input_ids=input_ids).logits.float()
        got = merged(input_ids=input_ids).logits.float()
    torch.testing.assert_close(got, expected, atol=0.02 * expected.abs().max().item(), rtol=0)


def left_padded_prompts(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Five prompts of different lengths, left-padded as the predict loader pads them (longest first)."""
    generator = torch.Generator().manual_seed(1)
    lengths = [9, 7, 6, 4, 2]
    input_ids = torch.full((5, 9), tokenizer.pad_token_id)
    for row, length in enumerate(lengths):
        input_ids[row, 9 - length :] = torch.randint(3, 300, (length,), generator=generator)
    return input_ids, (input_ids != tokenizer.pad_token_id).long()


@pytest.fixture(scope="module")
def greedy_model(tiny_dir):
    # A random adapter (B not zero) on the tiny base, so the adapter takes part in every step.
    torch.manual_seed(0)
    model = add_lora(load_base_model(str(tiny_dir), "none", torch.device("cpu")), 8, 16, 0.0, ["q_proj", "v_proj"]).eval()
    randomize_lora_b(model, std=0.05)
    return model


def test_static_and_dynamic_cache_give_the_same_greedy_answers(greedy_model, tiny_tokenizer):
    input_ids, attention_mask = left_padded_prompts(tiny_tokenizer)
    answers = {
        cache: generate(greedy_model, tiny_tokenizer, input_ids, attention_mask, GenerationSettings(12, do_sample=False, cache=cache))
        for cache in ("static", "dynamic")
    }
    assert answers["static"] == answers["dynamic"]
    assert len({a["response"] for a in answers["static"]}) > 1  # the prompts do lead to different answers


@pytest.mark.parametrize("cache", ["static", "dynamic"])  # our decoding loop, transformers' generate
def test_a_batch_larger_than_memory_is_generated_in_chunks_with_the_same_answers(greedy_model, tiny_tokenizer, monkeypatch, cache):
    import lima_lightning.generation as generation
    from lima_lightning import decoding

    input_ids, attention_mask = left_padded_prompts(tiny_tokenizer)
    settings = GenerationSettings(12, do_sample=False, cache=cache)
    whole = generate(greedy_model, tiny_tokenizer, input_ids, attention_mask, settings)
    prefills, cache_lengths = [], []

    def record_prefill(module, args, kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            prefills.append(tuple(kwargs["input_ids"].shape))
            layers = getattr(kwargs.get("cache", kwargs.get("past_key_values")), "layers", None) or [None]
            cache_lengths.append(getattr(layers[0], "max_cache_len", None))

    # A budget of 2.5 rows at the longest prompt (9 tokens): the first two rows, then the other three (prompts of
    # 6, 4 and 2 tokens) trimmed to 6 columns, where three rows' caches fit.
    per_row = generation.generation_bytes_per_row(greedy_model.config, 9, 12, dtype_bytes=4)
    monkeypatch.setattr(generation, "generation_memory_budget", lambda device: 2 * per_row + per_row // 2)
    monkeypatch.setattr(decoding, "CACHE_SLOT_MULTIPLE", 1)  # unrounded, so that the two caches' lengths differ
    hook = greedy_model.get_base_model().register_forward_pre_hook(record_prefill, with_kwargs=True)
    try:
        chunked = generate(greedy_model, tiny_tokenizer, input_ids, attention_mask, settings)
    finally:
        hook.remove()
    assert prefills == [(2, 9), (3, 6)]
    if cache == "static":  # each chunk's cache as long as its own prompt + max_new_tokens - 1 (the last token's slot)
        assert cache_lengths == [9 + 12 - 1, 6 + 12 - 1]
    assert chunked == whole


def test_chunks_decoded_from_cuda_graphs_answer_the_same_and_free_each_chunks_cache(greedy_model, tiny_tokenizer, monkeypatch):
    """generation.cuda_graphs over chunks, with the CPU stand-in for a capture (tests/test_decode_graphs.py)."""
    import functools
    import gc

    from transformers import StaticCache

    import lima_lightning.generation as generation
    from lima_lightning import decoding
    from tests.test_decode_graphs import ReplayOnCPU

    input_ids, attention_mask = left_padded_prompts(tiny_tokenizer)
    settings = GenerationSettings(12, do_sample=False)
    eager = generate(greedy_model, tiny_tokenizer, input_ids, attention_mask, settings)
    per_row = generation.generation_bytes_per_row(greedy_model.config, 9, 12, dtype_bytes=4)
    monkeypatch.setattr(generation, "generation_memory_budget", lambda device: 2 * per_row + per_row // 2)  # 2 chunks
    monkeypatch.setattr(generation, "uses_cuda_graphs", lambda settings, device: settings.cuda_graphs)
    monkeypatch.setattr(decoding, "graphed_decoding", functools.partial(decoding.graphed_decoding, make_step=ReplayOnCPU))
    caches_at_prefill = []

    def count_caches(module, args, kwargs):
        if kwargs["input_ids"].shape[1] > 1:  # a chunk's prefill: the caches still alive besides its own
            gc.collect()
            caches_at_prefill.append(sum(isinstance(o, StaticCache) for o in gc.get_objects()))

    hook = greedy_model.get_base_model().model.register_forward_pre_hook(count_caches, with_kwargs=True)
    try:
        graphed = generate(greedy_model, tiny_tokenizer, input_ids, attention_mask, settings)
    finally:
        hook.remove()
    assert graphed == eager
    # Each prefill sees its own new cache only: the last chunk's went with its graph (a 24 GiB run ran out of
    # memory while the first chunk's graph still held its cache).
    assert caches_at_prefill == [1, 1]


def test_compiled_decoding_keeps_one_shape_for_every_chunk(greedy_model, tiny_tokenizer, monkeypatch):
    import lima_lightning.generation as generation

    input_ids, attention_mask = left_padded_prompts(tiny_tokenizer)
    calls = []
    original = greedy_model.generate
    # Record the shapes, and decode uncompiled: the CPU has no CUDA graphs to compile to.
    uncompiled = lambda **kw: calls.append(tuple(kw["input_ids"].shape)) or original(**{**kw, "disable_compile": True})  # noqa: E731
    monkeypatch.setattr(greedy_model, "generate", uncompiled)
    per_row = generation.generation_bytes_per_row(greedy_model.config, 9, 12, dtype_bytes=4)
    monkeypatch.setattr(generation, "generation_memory_budget", lambda device: 2 * per_row + per_row // 2)
    generate(greedy_model, tiny_tokenizer, input_ids, attention_mask, GenerationSettings(12, do_sample=False, compile=True))
    assert calls == [(2, 9), (2, 9), (1, 9)]


def test_rows_per_chunk_for_llama2_7b_by_hand():
    from types import SimpleNamespace

    from lima_lightning.generation import kv_cache_bytes_per_token, rows_per_chunk

    llama2_7b = SimpleNamespace(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, num_hidden_layers=32,
                                intermediate_size=11008, vocab_size=32000)  # fmt: skip
    # keys + values, 32 layers, 32 heads of 128, bf16: 512 KiB per token.
    assert kv_cache_bytes_per_token(llama2_7b, 2) == 2 * 32 * 32 * 128 * 2 == 512 * 1024
    # A 216-token prompt + 500 new tokens: 715 positions fed to the model, rounded up to 720 cache slots (a multiple of
    # 16): 720 x 512 KiB = 360 MiB of cache, plus prefill activations and logits.
    per_row = 720 * 512 * 1024 + 216 * 2 * (4 * 4096 + 3 * 11008) + 16 * 32000
    assert rows_per_chunk(llama2_7b, 300, 216, 500, 2, budget_bytes=100 * per_row + 1) == 100
    assert rows_per_chunk(llama2_7b, 300, 216, 500, 2, budget_bytes=None) == 300  # CPU: not planned
    assert rows_per_chunk(llama2_7b, 30, 216, 500, 2, budget_bytes=100 * per_row) == 30
    with pytest.raises(torch.cuda.OutOfMemoryError, match="model.generation.max_new_tokens"):
        rows_per_chunk(llama2_7b, 300, 216, 500, 2, budget_bytes=per_row - 1)


def test_chunks_of_short_prompts_hold_more_rows_for_llama2_7b_by_hand():
    from types import SimpleNamespace

    from lima_lightning.generation import plan_chunks

    llama2_7b = SimpleNamespace(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, num_hidden_layers=32,
                                intermediate_size=11008, vocab_size=32000)  # fmt: skip
    # Cache slots: 215 + 500 rounded up to 720, 50 + 499 rounded up to 560 (multiples of 16).
    per_row_216 = 720 * 512 * 1024 + 216 * 2 * (4 * 4096 + 3 * 11008) + 16 * 32000  # 360.0 MiB + 21.3 MB + 0.5 MB
    per_row_50 = 560 * 512 * 1024 + 50 * 2 * (4 * 4096 + 3 * 11008) + 16 * 32000  # 280.0 MiB + 4.9 MB + 0.5 MB
    budget = 100 * per_row_216
    assert budget // per_row_50 == 133
    # 10 long prompts and 200 short ones, longest first: 100 rows padded to 216 tokens, then up to 133 rows of 50 tokens.
    assert plan_chunks(llama2_7b, [216] * 10 + [50] * 200, 500, 2, budget) == [range(0, 100), range(100, 210)]
    assert plan_chunks(llama2_7b, [216] * 10 + [50] * 300, 500, 2, budget) == [range(0, 100), range(100, 233), range(233, 310)]
    assert plan_chunks(llama2_7b, [216] * 10, 500, 2, None) == [range(0, 10)]  # CPU: not planned
    assert plan_chunks(llama2_7b, [], 500, 2, budget) == []
    with pytest.raises(torch.cuda.OutOfMemoryError, match="model.generation.max_new_tokens"):
        plan_chunks(llama2_7b, [216, 50], 500, 2, per_row_216 - 1)


@pytest.mark.slow
def test_generation_merge_auto_merges_when_the_copy_fits(adapter, caplog):
    adapter_path, root = adapter
    cli = run_cli(
        "predict",
        *demo_args(root, "--model.quantization", "nf4", "--model.adapter_path", str(adapter_path), "--model.generation.merge", "auto"),
    )
    assert type(cli.model.model).__name__ == "LlamaForCausalLM"  # merged: no PEFT wrapper, no 4-bit layers


def test_merge_auto_decides_from_the_gpu_size(monkeypatch):
    """Llama-2-7B (built on the meta device): base + merged bf16 copy vs 3/4 of a 24 GB and a 16 GB GPU."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, LlamaConfig

    import lima_lightning.models.merging as export

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000)
    with torch.device("meta"):
        llama2_7b = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    bf16_bytes = export.merged_weight_bytes(llama2_7b)
    assert bf16_bytes == 2 * 6_738_415_616  # Llama-2-7B's parameter count
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: int(3.6 * gib))  # the NF4 base, loaded
    for total_gib, expected in ((24, True), (16, False), (80, True)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, t=total_gib: SimpleNamespace(total_memory=t * gib))
        fits, reason = export.merged_copy_fits(llama2_7b, torch.device("cuda"))
        assert fits is expected, (total_gib, reason)
    assert export.merged_copy_fits(llama2_7b, torch.device("cpu"))[0] is True


def test_merged_weight_bytes_counts_nf4_weights_unpacked(tiny_dir):
    from lima_lightning.models.merging import merged_weight_bytes

    nf4 = load_base_model(str(tiny_dir), "nf4", torch.device("cpu"))
    plain = load_base_model(str(tiny_dir), "none", torch.device("cpu"))
    assert merged_weight_bytes(nf4, 2) == 2 * sum(p.numel() for p in plain.parameters())
    assert sum(p.numel() for p in nf4.parameters()) < sum(p.numel() for p in plain.parameters())  # packed: really unpacked above


def test_cuda_graphs_are_used_on_cuda_with_a_static_cache_unless_compiled_or_off():
    from lima_lightning.generation import uses_cuda_graphs

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert uses_cuda_graphs(GenerationSettings(), cuda)
    assert not uses_cuda_graphs(GenerationSettings(), cpu)
    assert not uses_cuda_graphs(GenerationSettings(cache="dynamic"), cuda)  # shapes change every step
    assert not uses_cuda_graphs(GenerationSettings(compile=True), cuda)  # compiled decoding has graphs of its own
    assert not uses_cuda_graphs(GenerationSettings(cuda_graphs=False), cuda)
