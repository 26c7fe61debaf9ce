"""Speed knobs on CPU: gradient checkpointing on/off/auto, attention fallback, bf16 adapters, compile."""

from __future__ import annotations

import os

import pytest
import torch

from lima_lightning.data.collate import collate_rows
from lima_lightning.memory import GIB, MemoryEstimate, decide_checkpointing, probe_activation_memory
from lima_lightning.models.speed import compile_decoder_layers, configure_for_training, set_attention, set_gradient_checkpointing
from lima_lightning.optim import optimizer_state_bytes
from tests.conftest import demo_args, run_cli
from tests.test_batching import assert_grads_close, examples, make_module  # noqa: F401 (fixture)


def layers(module):
    return module.model.get_base_model().get_decoder().layers


def test_memory_estimate_fits_only_with_the_margin():
    # No saving from checkpointing (same bytes per token either way): fits without, or not at all.
    estimate = MemoryEstimate(4 * GIB, 2**20, 2**20, num_layers=2, optimizer_bytes=1 * GIB, max_tokens=8192, budget_bytes=16 * GIB)
    assert estimate.predicted_peak_bytes == 13 * GIB  # 4 + 1 + 8192 x 1 MiB
    assert estimate.fits and estimate.checkpointed_layers == 0  # 13 x 1.15 + 1 = 15.95 GiB <= 16
    assert not MemoryEstimate(4 * GIB, 2**20, 2**20, 2, 1 * GIB, 8192, 15.9 * GIB).fits
    assert not MemoryEstimate(4 * GIB, 2**20, 2**20, 2, 1 * GIB, 16384, 16 * GIB).fits  # twice the tokens: 21 GiB


def test_auto_checkpoints_the_fewest_layers_that_fit():
    """1 MiB/token without checkpointing, 0.2 with all 4 layers: each checkpointed layer saves 0.2 MiB/token."""
    estimate = MemoryEstimate(2 * GIB, 2**20, 0.2 * 2**20, num_layers=4, optimizer_bytes=0, max_tokens=8192, budget_bytes=9 * GIB)
    peaks = [estimate.peak_bytes(k) / GIB for k in range(5)]
    assert peaks == pytest.approx([10.0, 8.4, 6.8, 5.2, 3.6])  # 2 + 8 x (1 - 0.2 k)
    # x1.15 + 1 GiB: 8.4 -> 10.66 > 9; 6.8 -> 8.82 <= 9: two layers, no more.
    assert estimate.checkpointed_layers == 2 and estimate.fits
    assert estimate.predicted_peak_bytes == pytest.approx(6.8 * GIB)
    assert "checkpointing 2 of 4 decoder layers" in estimate.describe()
    assert MemoryEstimate(2 * GIB, 2**20, 0.2 * 2**20, 4, 0, 8192, 100 * GIB).checkpointed_layers == 0  # a big GPU
    squeezed = MemoryEstimate(2 * GIB, 2**20, 0.2 * 2**20, 4, 0, 8192, 4 * GIB)
    assert squeezed.checkpointed_layers == 4 and not squeezed.fits  # all of them, and it says it does not fit


def test_optimizer_state_bytes():
    fp32 = [torch.nn.Parameter(torch.zeros(10, 10))]
    bf16 = [torch.nn.Parameter(torch.zeros(10, 10, dtype=torch.bfloat16))]
    assert optimizer_state_bytes(fp32, "adamw") == 800
    assert optimizer_state_bytes(bf16, "adamw") == 400
    assert optimizer_state_bytes(fp32, "adamw_8bit") == 200


def test_auto_is_off_on_cpu_and_on_when_the_batch_size_is_unknown():
    module = make_module()
    assert decide_checkpointing(module, torch.device("cpu"), 8192)[0] == 0
    # No probe runs (it would need CUDA): without a batch bound the safe answer is every layer.
    assert decide_checkpointing(module, torch.device("cuda"), None)[0] == len(layers(module))


def test_auto_never_plans_below_the_shape_model(monkeypatch):
    """What the probe measured on an H200 at a 24 GiB budget chose 26 layers, and that step reached 21.7 GiB
    (predicted 19.0) and died of fragmentation; the shape model (21.0 GiB for 26 layers) makes it 27."""
    from types import SimpleNamespace

    from transformers import LlamaConfig

    from lima_lightning import memory
    from lima_lightning.cli import parse_fit_config
    from tests.conftest import REPO

    config = parse_fit_config(["--config", str(REPO / "configs/llama2-7b-qlora.yaml"), "--model.base_model", "tiny"]).model
    shape = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000)
    base = SimpleNamespace(config=shape, get_decoder=lambda: SimpleNamespace(layers=[None] * 32))
    module = SimpleNamespace(model=SimpleNamespace(get_base_model=lambda: base), hparams=config)
    probed = MemoryEstimate(4.5 * GIB, 7.72 * 2**20, 0.27 * 2**20, 32, 1.19 * GIB, max_tokens=8192, budget_bytes=24 * GIB)
    monkeypatch.setattr(memory, "estimate_memory", lambda module, device, max_tokens: probed)
    assert probed.checkpointed_layers == 26
    layers, estimate, reason = decide_checkpointing(module, torch.device("cuda"), 8192)
    assert layers == 27 and estimate.peak_bytes(26) / GIB == pytest.approx(21.7, rel=0.05) and "27 of 32" in reason


def test_the_cli_asks_for_expandable_allocator_segments_unless_told_otherwise(monkeypatch, capsys):
    from lima_lightning.cli import main
    from tests.conftest import REPO

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    main(["plan", "--config", str(REPO / "configs/demo.yaml")])
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    main(["plan", "--config", str(REPO / "configs/demo.yaml")])
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"


def test_checkpointing_toggles_every_layer_and_keeps_the_loss(examples):  # noqa: F811
    module = make_module()
    module.model.train()
    batch = collate_rows([examples[:4], examples[4:]], 0)
    nll, _ = module.masked_nll(batch)
    nll.backward()
    plain = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    set_gradient_checkpointing(module.model.get_base_model(), True)
    assert all(layer.gradient_checkpointing for layer in layers(module))
    module.zero_grad(set_to_none=True)
    checkpointed, _ = module.masked_nll(batch)
    checkpointed.backward()
    torch.testing.assert_close(checkpointed, nll)
    assert_grads_close({n: p.grad for n, p in module.named_parameters() if p.requires_grad}, plain)
    set_gradient_checkpointing(module.model.get_base_model(), 1)  # what auto chooses when one layer is enough
    assert [layer.gradient_checkpointing for layer in layers(module)] == [True, False]
    module.zero_grad(set_to_none=True)
    partial, _ = module.masked_nll(batch)
    partial.backward()
    torch.testing.assert_close(partial, nll)
    assert_grads_close({n: p.grad for n, p in module.named_parameters() if p.requires_grad}, plain)
    set_gradient_checkpointing(module.model.get_base_model(), False)
    assert not any(layer.gradient_checkpointing for layer in layers(module))


def test_flex_attention_falls_back_to_sdpa_on_cpu():
    module = make_module()
    with pytest.warns(UserWarning, match="flex_attention needs a CUDA GPU"):
        assert set_attention(module.model.get_base_model(), "flex_attention", torch.device("cpu")) == "sdpa"
    assert module.model.get_base_model().config._attn_implementation == "sdpa"


def test_bf16_adapters_are_cast_and_train(examples):  # noqa: F811
    module = make_module(lora_dtype="bfloat16", gradient_checkpointing="auto")
    module.trainer = None
    report = configure_for_training(module, torch.device("cpu"), max_tokens=None)
    assert report["gradient_checkpointing"] is False and report["attn_implementation"] == "sdpa"
    assert {p.dtype for p in module.trainable_parameters()} == {torch.bfloat16}
    nll, _ = module.masked_nll(collate_rows([examples], 0))
    nll.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in module.trainable_parameters())


def eager_loss_and_gradients(module, batch) -> tuple[torch.Tensor, dict]:
    nll, _ = module.masked_nll(batch)
    nll.backward()
    gradients = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    module.zero_grad(set_to_none=True)
    return nll, gradients


@pytest.mark.slow
def test_compiled_layers_give_the_same_loss_and_gradients(examples):  # noqa: F811
    # aot_eager traces the layers through dynamo and AOTAutograd as inductor would, without generating C++.
    module = make_module()
    batch = collate_rows([examples[:4], examples[4:]], 0)
    nll, eager = eager_loss_and_gradients(module, batch)
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    compile_decoder_layers(module.model.get_base_model(), backend="aot_eager")
    compiled, _ = module.masked_nll(batch)
    compiled.backward()
    assert counters["stats"]["unique_graphs"] - before == 1  # one graph serves every layer, the first one too
    torch.testing.assert_close(compiled, nll, rtol=1e-5, atol=1e-5)
    assert_grads_close({n: p.grad for n, p in module.named_parameters() if p.requires_grad}, eager)
    # Validation (no grad) and generation (samples during fit, predict) run the compiled layers eagerly
    # instead of compiling graphs of their own.
    graphs = counters["stats"]["unique_graphs"]
    module.hparams.compile = True
    module.on_validation_epoch_start()
    with torch.no_grad():
        module.validation_step(batch, 0)
    assert counters["stats"]["unique_graphs"] == graphs
    module.eval()
    prompt = collate_rows([examples[:1]], 0)["input_ids"]
    [result] = module.generate(prompt, torch.ones_like(prompt), max_new_tokens=3, do_sample=False)
    assert result["new_tokens"] >= 1 and counters["stats"]["unique_graphs"] == graphs


def test_packed_rows_compile_one_graph_whether_a_row_holds_one_conversation_or_several(examples):  # noqa: F811
    """transformers gives sdpa no mask for a packed row of one conversation, a block-diagonal one for several: two
    graphs (~19 s more compiling on the H200) unless packed_rows_mask builds the mask for both. Same loss."""
    from torch._dynamo.utils import counters

    module = make_module()
    several = collate_rows([examples[:3]], 0, packed=True)
    one = collate_rows([examples[3:4]], 0, packed=True)
    uncompiled = [module.masked_nll(batch)[0] for batch in (several, one)]
    before = counters["stats"]["unique_graphs"]
    compile_decoder_layers(module.model.get_base_model(), backend="aot_eager")  # dynamo's guards, as inductor's
    compiled = [module.masked_nll(batch)[0] for batch in (several, one, several)]
    assert counters["stats"]["unique_graphs"] - before == 1
    torch.testing.assert_close(compiled, [*uncompiled, uncompiled[0]], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_layers_under_gradient_checkpointing_give_the_same_gradients(examples):  # noqa: F811
    """The LoRA config compiles the layers, and `auto` turns checkpointing on below ~80 GB: both at once."""
    module = make_module()
    batch = collate_rows([examples[:4], examples[4:]], 0)
    nll, eager = eager_loss_and_gradients(module, batch)
    set_gradient_checkpointing(module.model.get_base_model(), True)
    assert module.model.training and all(layer.gradient_checkpointing for layer in layers(module))  # really recomputing
    compile_decoder_layers(module.model.get_base_model(), backend="aot_eager")
    both, _ = module.masked_nll(batch)
    both.backward()
    torch.testing.assert_close(both, nll, rtol=1e-5, atol=1e-5)
    assert_grads_close({n: p.grad for n, p in module.named_parameters() if p.requires_grad}, eager)


def record_offloaded_tensors(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes that `SavedOnHost` sends to host memory, in order (its own pack hook runs, only watched)."""
    from lima_lightning.models.speed import SavedOnHost

    sent, pack = [], SavedOnHost.pack
    monkeypatch.setattr(SavedOnHost, "pack", staticmethod(lambda tensor: sent.append(tuple(tensor.shape)) or pack(tensor)))
    return sent


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_offloaded_checkpoints_send_only_each_layers_input_to_the_host_and_keep_the_gradients(examples, monkeypatch, compiled):  # noqa: F811
    module = make_module()
    batch = collate_rows([examples[:4], examples[4:]], 0)
    nll, eager = eager_loss_and_gradients(module, batch)
    sent = record_offloaded_tensors(monkeypatch)
    base = module.model.get_base_model()
    set_gradient_checkpointing(base, 1, offload=True)  # the first layer checkpointed and offloaded, the second as it was
    if compiled:
        compile_decoder_layers(base, backend="aot_eager")
    offloaded, _ = module.masked_nll(batch)
    offloaded.backward()
    hidden = base.config.hidden_size
    # The checkpoint's input, the hidden states of the 2 rows, and nothing of the layer's inside.
    assert sent == [(*batch["input_ids"].shape, hidden)]
    torch.testing.assert_close(offloaded, nll, rtol=1e-5, atol=1e-5)
    assert_grads_close({n: p.grad for n, p in module.named_parameters() if p.requires_grad}, eager)
    set_gradient_checkpointing(base, True, offload=True)  # again, all layers: each wrapped once, not twice
    sent.clear()
    module.zero_grad(set_to_none=True)
    module.masked_nll(batch)[0].backward()
    assert sent == [(*batch["input_ids"].shape, hidden)] * len(layers(module))
    assert_grads_close({n: p.grad for n, p in module.named_parameters() if p.requires_grad}, eager)


def test_offloading_is_off_on_cpu_and_counted_per_layer(examples, monkeypatch):  # noqa: F811
    from lima_lightning.models.speed import offloaded_layer_count

    module = make_module(gradient_checkpointing=True, offload_checkpoints=True)
    report = configure_for_training(module, torch.device("cpu"), 1024)
    assert report["checkpointed_layers"] == len(layers(module)) and report["offloaded_layers"] == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # wrapping the layers needs no CUDA
    set_gradient_checkpointing(module.model.get_base_model(), True, offload=True)
    assert offloaded_layer_count(module.model.get_base_model()) == len(layers(module))
    set_gradient_checkpointing(module.model.get_base_model(), False, offload=True)
    assert offloaded_layer_count(module.model.get_base_model()) == 0


def test_fit_with_the_speed_knobs_through_the_cli(tmp_path):
    cli = run_cli(
        "fit",
        *demo_args(tmp_path, "--trainer.max_steps", "3", "--trainer.max_epochs", "1", "--samples.num_prompts", "0"),
        "--data.batching=packed",
        "--data.max_tokens_per_batch=1024",
        "--model.gradient_checkpointing=auto",
        "--model.lora_dtype=bfloat16",
        "--model.loss_chunk_size=64",
        "--model.attn_implementation=flex_attention",
    )
    assert cli.model.speed_settings["gradient_checkpointing"] is False  # auto on CPU
    assert cli.model.speed_settings["attn_implementation"] == "sdpa"  # flex falls back on CPU
    assert cli.trainer.global_step == 3 and torch.isfinite(cli.trainer.callback_metrics["loss"])


def fake_cuda(monkeypatch, peak_of_tokens):
    from types import SimpleNamespace

    """Stand-ins for the CUDA memory calls, so the probe's plumbing runs on CPU with real forward/backward steps."""
    state = {"peak": 0}
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * GIB, 141 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 5 * GIB)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(total_memory=141 * GIB))
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: torch.zeros(1, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: None)
    return lambda *args: state.update(peak=peak_of_tokens(*args))


def test_probe_fits_a_line_through_two_measured_steps(monkeypatch):
    record = fake_cuda(monkeypatch, lambda n: 3 * GIB + 2**20 * n)
    sizes = []
    fixed, per_token = probe_activation_memory(lambda n: (sizes.append(n), record(n)), torch.device("cuda"))
    assert sizes == [512, 1024] and fixed == 3 * GIB and per_token == 2**20


def test_estimate_memory_probes_real_steps_without_checkpointing_or_rng_use(monkeypatch):
    from contextlib import nullcontext
    from types import SimpleNamespace

    from lima_lightning.memory import estimate_memory

    module = make_module(gradient_checkpointing="auto", lora_dropout=0.1)
    set_gradient_checkpointing(module.model.get_base_model(), True)
    module.model.eval()
    seen = []
    masked_nll = module.masked_nll

    def spy(batch):
        checkpointed = [layer.gradient_checkpointing for layer in layers(module)]
        seen.append((batch["input_ids"].shape, bool((batch["labels"][:, 1:] == batch["input_ids"][:, 1:]).all()), all(checkpointed)))
        record(batch["input_ids"].numel(), all(checkpointed))
        return masked_nll(batch)

    # 1 MiB per token without checkpointing, a quarter of that with every layer checkpointed.
    record = fake_cuda(monkeypatch, lambda n, checkpointed: 4 * GIB + (2**18 if checkpointed else 2**20) * n)
    monkeypatch.setattr(module, "masked_nll", spy)
    module.trainer = SimpleNamespace(precision_plugin=SimpleNamespace(train_step_context=nullcontext))
    rng = torch.get_rng_state()
    estimate = estimate_memory(module, torch.device("cpu"), max_tokens=8192)
    sizes = [torch.Size([1, 512]), torch.Size([1, 1024])] * 2
    # Every target trained (the worst case), twice without and twice with every layer checkpointed.
    assert seen == [(size, True, checkpointed) for size, checkpointed in zip(sizes, [False, False, True, True], strict=True)]
    assert torch.equal(torch.get_rng_state(), rng)  # dropout masks drawn in the probe do not shift training's
    assert all(p.grad is None for p in module.trainable_parameters()) and not module.model.training
    assert not any(layer.gradient_checkpointing for layer in layers(module))  # measured without it
    trainable = sum(p.numel() for p in module.trainable_parameters())
    assert estimate.fixed_bytes == 4 * GIB and estimate.bytes_per_token == 2**20 and estimate.optimizer_bytes == 8 * trainable
    assert estimate.checkpointed_bytes_per_token == 2**18 and estimate.num_layers == 2
    assert estimate.budget_bytes == 105 * GIB and estimate.fits  # 4 + 8 GiB predicted, x1.15 + 1 <= 105
