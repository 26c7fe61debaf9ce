"""The GPU checks, as tests (`make test-gpu`; on the carried-wheel GPU machines `bash benchmarks/gpu_test.sh`).

Skipped without CUDA. On the built-in tiny model they run the GPU-only code paths in about a minute: bf16
autocast and NF4 on CUDA in benchmarks/gpu_correctness.py, and what the CPU smoke runs cannot reach in the
benchmarks (peak memory, MFU, kernel time in the profile, `gradient_checkpointing: auto`'s memory probe,
compiled decoding). LIMA_GPU_MODEL=/tmp/llama2-7b-random (benchmarks/make_random_llama.py) with
LIMA_GPU_DATA=.gpu/lima/train.jsonl runs the correctness checks at the Llama-2-7B shape on LIMA, as
benchmarks/RESULTS.md reports them (~1.5 min on an H200).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from tests.conftest import REPO, randomize_lora_b

sys.path.insert(0, str(REPO / "benchmarks"))

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_gpu_correctness_checks_pass(capsys):
    import gpu_correctness

    model = os.environ.get("LIMA_GPU_MODEL", "tiny")
    data = os.environ.get("LIMA_GPU_DATA", "synthetic")
    status = gpu_correctness.main(["--model", model, "--lima", data, *(["--max_seq_length", "128"] if model == "tiny" else [])])
    out = capsys.readouterr().out
    print(out)  # the figures, for the log of the GPU session
    lines = [line for line in out.splitlines() if line.startswith(("PASS", "FAIL"))]
    # 3 checks of item 3 and one of item 6 per mode, item 7 once: all printed, all passing; both modes' peak memory.
    assert status == 0 and len(lines) == 9 and all(line.startswith("PASS") for line in lines), out
    assert out.count("peak GPU memory") == 2, out


def test_training_benchmark_measures_on_the_gpu(tmp_path, tiny_dir):
    import bench_train

    rows = "qlora-plain,qlora-fast,lora-plain,lora-fast"
    args = ["--model", str(tiny_dir), "--configs", rows, "--max-seq-length", "128", "--timed-tokens", "500", "--profile-steps", "2"]
    report = bench_train.main([*args, "--out", str(tmp_path / "bench.json")])
    results = {r["config"]: r for r in report["results"]}
    assert list(results) == rows.split(",")
    for name, r in results.items():
        assert "error" not in r and "skipped" not in r, r
        assert r["peak_gib"] > 0 and 0 < r["mfu"] < 1, name
        profile = r["profile"]  # CUDA kernels timed: busy is kernel time over wall time, so at most 1
        assert profile["kernels_per_step"] > 0 and 0 < profile["gpu_busy"] <= 1, (name, profile)
    for name in ("qlora-fast", "lora-fast"):  # auto: decided by the memory probe, which needs CUDA
        estimate = results[name]["memory_estimate"]
        assert results[name]["checkpointing_setting"] == "auto" and estimate["predicted_peak_gib"] > 0, results[name]
    for method, rows in report["parity"].items():  # bf16 autocast: the per-token loss to rounding
        measured = [p for p in rows if "loss_diff" in p]
        assert len(measured) == 2 and all(abs(p["loss_diff"]) < 1e-2 * p["loss"] for p in measured), (method, rows)
    assert "| qlora-fast | ours |" in (tmp_path / "bench.md").read_text()


def test_generation_benchmark_runs_every_configuration_on_the_gpu(tmp_path):
    import bench_generate

    args = ["--model", "tiny", "--prompts", "synthetic", "--max_new_tokens", "8", "--batch_size", "4", "--reference_batch_size", "4"]
    results = bench_generate.main([*args, "--lora_r", "8", "--work_dir", str(tmp_path), "--out", str(tmp_path / "g.json")])
    # A configuration that fails is printed and left out (the GPU run keeps going), so every name must be here.
    assert [r.config for r in results] == ["reference, batch 1", "reference, batched", *bench_generate.PREDICT_CONFIGS]
    for r in results:
        assert r.prompts_timed >= 1 and r.prompts_timed <= r.new_tokens <= 8 * r.prompts_timed, r
        assert r.peak_memory_gib is not None and r.peak_memory_gib > 0, r


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_cuda_graph_decoding_gives_the_tokens_of_eager_decoding(tiny_dir, tiny_tokenizer, quantization):
    """decode_graphs on the real thing: captured and replayed steps, the same tokens as launching them one by one,
    for an NF4 base with LoRA (the samples during fit) and a bf16 one under autocast (predict), greedy and
    sampled, over two chunks (two captures)."""
    from lima_lightning.decode_graphs import graphed_decoding
    from lima_lightning.generation import GenerationSettings, generate
    from lima_lightning.models.loading import add_lora, load_base_model

    base = load_base_model(str(tiny_dir), quantization, torch.device("cuda"))
    torch.manual_seed(0)
    model = add_lora(base, 8, 16, 0.0, ["q_proj", "v_proj", "down_proj"]).eval()
    randomize_lora_b(model, std=0.5)  # LoRA B starts at zero: make the adapter change the tokens
    rows = [[1, 40, 41, 42, 43, 44], [1, 45, 46], [1, 47, 48, 49]]
    ids = torch.tensor([[0] * (6 - len(r)) + r for r in rows], device="cuda")
    mask = (ids != 0).long()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=quantization == "none")
    for do_sample in (False, True):
        options = dict(max_new_tokens=24, do_sample=do_sample, cache_implementation="static", disable_compile=True)
        options |= dict(pad_token_id=0, eos_token_id=None)
        with autocast:
            torch.manual_seed(1)
            eager = [model.generate(input_ids=ids[c], attention_mask=mask[c], **options) for c in (slice(0, 2), slice(2, 3))]
            with graphed_decoding(model) as graphed:
                torch.manual_seed(1)
                replayed = [model.generate(input_ids=ids[c], attention_mask=mask[c], **options) for c in (slice(0, 2), slice(2, 3))]
        assert not graphed.failed and graphed.replays == 2 * 22, (do_sample, graphed.replays)
        assert all(torch.equal(a, b) for a, b in zip(eager, replayed, strict=True)), (do_sample, eager, replayed)
        # Through generation.generate, as predict and the samples call it: the same answers either way.
        with autocast:
            answers = {}
            for graphs in (False, True):
                torch.manual_seed(2)
                settings = GenerationSettings(max_new_tokens=24, do_sample=do_sample, cuda_graphs=graphs)
                answers[graphs] = generate(model, tiny_tokenizer, ids, mask, settings)
        assert answers[True] == answers[False], answers


@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_our_decoding_loop_gives_the_tokens_of_generate_on_cuda(tiny_dir, tiny_tokenizer, quantization, monkeypatch):
    """decoding.decode with its steps replayed as CUDA graphs (and without) against transformers' `generate` with a
    static cache, launched step by step: the same tokens, greedy and sampled, rows running to the limit and rows
    all stopping at EOS early; NF4 + LoRA (the samples during fit) and bf16 under autocast (predict)."""
    import contextlib

    from lima_lightning import decoding
    from lima_lightning.generation import GenerationSettings
    from lima_lightning.models.loading import add_lora, load_base_model
    from tests.test_decoding import generate_new_tokens, stop_every_row_early

    base = load_base_model(str(tiny_dir), quantization, torch.device("cuda"))
    torch.manual_seed(0)
    model = add_lora(base, 8, 16, 0.0, ["q_proj", "v_proj", "down_proj"]).eval()
    randomize_lora_b(model, std=0.5)
    rows = [[1, 40, 41, 42, 43, 44], [1, 45, 46], [1, 47, 48, 49], [1, 50]]
    ids = torch.tensor([[0] * (6 - len(r)) + r for r in rows], device="cuda")
    mask = (ids != 0).long()
    graphed = []
    original = decoding.graphed_decoding

    @contextlib.contextmanager
    def recorded(model):
        with original(model) as forward:
            graphed.append(forward)
            yield forward

    monkeypatch.setattr(decoding, "graphed_decoding", recorded)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=quantization == "none"):
        for kind in ("running", "stopping"):
            if kind == "stopping":
                stop_every_row_early(model, tiny_tokenizer, ids, mask)
            for settings in (GenerationSettings(40, do_sample=False), GenerationSettings(40, temperature=1.3, top_k=20, top_p=0.8)):
                torch.manual_seed(5)
                expected = generate_new_tokens(model, tiny_tokenizer, ids, mask, settings)
                for graphs in (False, True):
                    torch.manual_seed(5)
                    ours = decoding.decode(model, ids, mask, settings, eos, pad, graphs=graphs)
                    assert torch.equal(ours[:, : expected.shape[1]], expected), (kind, settings, graphs, ours, expected)
                    assert set(ours[:, expected.shape[1] :].flatten().tolist()) <= {pad}
            if kind == "stopping":  # EOS reached, so the finished rows' padding is compared too
                assert (expected == eos).any(1).any(), expected
    assert len(graphed) == 4 and all(not g.failed and g.replays > 0 for g in graphed), [(g.failed, g.replays) for g in graphed]


def test_offloaded_checkpoints_free_each_layers_input_on_the_gpu():
    """`model.offload_checkpoints`: with every layer checkpointed, the step's peak drops by the layer inputs that wait
    in host memory (all but the one in use), the loss stays bit-identical and the LoRA gradients within what the same
    step gives twice on the GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lima_lightning.models.loading import add_lora
    from lima_lightning.models.speed import offloaded_layer_count, set_gradient_checkpointing

    config = LlamaConfig(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8, vocab_size=1000
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    model = add_lora(base, 8, 16, 0.0, ["q_proj", "v_proj", "down_proj"]).train()
    randomize_lora_b(model, std=0.05)
    ids = torch.randint(0, config.vocab_size, (2, 2048), device="cuda")

    def step(offload: bool):
        set_gradient_checkpointing(base, True, offload=offload)
        assert offloaded_layer_count(base) == (config.num_hidden_layers if offload else 0)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.cuda.synchronize()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads, torch.cuda.max_memory_allocated() - before

    step(False)  # cuBLAS workspaces and the allocator's first segments, outside the comparison
    loss, grads, on_gpu = step(False)
    _, again, _ = step(False)
    offloaded_loss, offloaded_grads, offloaded = step(True)
    layer_input = ids.numel() * config.hidden_size * 2  # bf16 hidden states
    print(f"peak above the model: {on_gpu / 2**20:.1f} MiB checkpointed, {offloaded / 2**20:.1f} MiB offloaded")
    # The peak falls inside a layer's backward, where that layer's input is back and the rest are not all counted:
    # on an H200 it dropped by 3.7 of the 6 inputs (and by 0.37 of the 0.5 GiB for Llama-2-7B at 2048 tokens).
    assert on_gpu - offloaded >= config.num_hidden_layers / 2 * layer_input, (on_gpu, offloaded, layer_input)
    assert torch.equal(offloaded_loss, loss)
    # The same step twice on the GPU may differ where a backward kernel accumulates with atomics; the offloaded
    # step may differ from it by no more than that (bit-identical where the kernels are deterministic).
    noise = max((again[n] - g).abs().max().item() for n, g in grads.items())
    worst = max((offloaded_grads[n] - g).abs().max().item() for n, g in grads.items())
    assert worst <= 2 * noise, (worst, noise)


def test_offloaded_tensors_go_out_and_back_without_waiting_for_the_gpu():
    """`SavedOnHost` queues both copies: under CUDA's sync debug mode "error" a copy that waited for the GPU would
    raise (torch 2.11's `save_on_cpu(pin_memory=True)` does, once per tensor), and the gradient is the one computed
    with the tensor kept on the GPU."""
    from lima_lightning.models.speed import SavedOnHost

    weight = torch.randn(4096, 4096, device="cuda", requires_grad=True)
    x = torch.randn(2048, 4096, device="cuda")

    def grad(offload: bool) -> torch.Tensor:
        weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with SavedOnHost() if offload else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                y = torch.tanh(x @ weight)  # saves x, weight and tanh's output for backward
            (y * y).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return weight.grad.clone()

    assert torch.equal(grad(True), grad(False))


def test_compiled_layers_compile_one_graph_for_every_packed_batch():
    """Inductor on CUDA guards on whether the width is a multiple of 8 (S13-1 recompiled for it), and dynamo on
    whether a mask comes (transformers gives none for a packed row of one conversation): batches collated to
    `collate.WIDTH_MULTIPLE` and `packed_rows_mask` leave one graph for rows of any width and any count of
    conversations, forward and backward."""
    from torch._dynamo.utils import counters
    from transformers import LlamaConfig, LlamaForCausalLM

    from lima_lightning.data.collate import collate_rows
    from lima_lightning.models.loading import add_lora
    from lima_lightning.models.speed import compile_decoder_layers
    from lima_lightning.module import LIMALoRAModule

    config = LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=1000
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    model = add_lora(base, 8, 16, 0.0, ["q_proj", "v_proj"]).train()
    module = LIMALoRAModule.around(model, None, base_model="tiny", quantization="none", lora_r=8, lora_alpha=16, lora_dropout=0.0)

    def example(n: int) -> dict:
        ids = torch.randint(3, config.vocab_size, (n,)).tolist()
        return {"input_ids": [1, *ids], "labels": [-100, *ids]}

    lengths = [[301], [90, 120, 77], [413], [57, 33], [250, 199], [130]]  # rows of one and of several conversations
    batches = [collate_rows([[example(n) for n in row]], 0, packed=True) for row in lengths]
    compile_decoder_layers(base, "inductor")
    before = counters["stats"]["unique_graphs"]
    for batch in batches:
        batch = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        nll, _ = module.masked_nll(batch)
        nll.backward()
    assert counters["stats"]["unique_graphs"] - before == 1
