"""Several devices through Lightning's strategies, on CPU: DDP on gloo as real `python -m lima_lightning`
processes (Lightning's launcher re-executes the command), and the FSDP set-up as far as it goes without CUDA.

- 2 processes x batch 2 train the same adapter as 1 process x batch 4 (and log the same loss and gradient
  norm at every step): same examples per optimizer step, token-weighted loss over all ranks, masked padding.
- Outputs are written once: one run dir, one adapters/final, samples.jsonl without repeated rows, and one
  predictions.jsonl in input order with every id exactly once (prompts sharded without repeats).
- The training shards (padded and token-budget batching) hold, per optimizer step, exactly the batches one
  device takes while accumulating.
- FSDP (CUDA only): the wrap policy, the NF4 storage dtype, and the strategy settings `prepare_fsdp` fills in.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lima_lightning.data.sampling import ExampleRows, Masked, MicroBatchSampler
from lima_lightning.data.tokenization import IGNORE_INDEX
from lima_lightning.distributed import (
    clean_param_name,
    decoder_layer_classes,
    fsdp_quant_storage,
    global_grad_norm,
    lora_fsdp_wrap_policy,
    prepare_fsdp,
)
from tests.conftest import REPO, randomize_lora_b

# 41 synthetic conversations: 2 held out, 39 trained: 10 batches of 2 (the last holding one), so the 2-process
# run's last step holds one conversation on rank 0 and a Masked copy of a batch on rank 1.
FIT_ARGS = [
    "--config", str(REPO / "configs/demo.yaml"),
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--trainer.accelerator", "cpu",
    "--trainer.max_epochs", "1",
    "--trainer.log_every_n_steps", "1",
    "--data.synthetic_size", "41",
    "--data.batching", "padded",
    "--model.quantization", "none",
    "--model.lora_dropout", "0",
    "--model.gradient_checkpointing", "false",
    "--samples.num_prompts", "2",
    "--samples.max_new_tokens", "8",
]  # fmt: skip
DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]


def lima(*args: str, timeout: int = 240) -> str:
    """Run `python -m lima_lightning ...` as a user would; a hang (a collective one rank never joins) fails fast."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lima_lightning", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # Lightning's DDP launcher starts rank 1 as a child: kill the whole group
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"lima-lightning {args[0]} did not finish in {timeout} s (a distributed hang?):\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    return output


def only_run_dir(root: Path) -> Path:
    runs = sorted((root / "lightning_logs").iterdir())
    assert len(runs) == 1, f"expected one run dir, found {runs}"  # a rank writing its own would make a second
    return runs[0]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapters/final/adapter_model.safetensors")


def scalars(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return [e.value for e in EventAccumulator(str(run_dir)).Reload().Scalars(tag)]


# ----------------------------------------------------------------------------- DDP, end to end
@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_dir) -> Path:
    root = tmp_path_factory.mktemp("ddp-1x4")
    lima("fit", *FIT_ARGS, "--trainer.default_root_dir", str(root), "--trainer.devices", "1", "--data.batch_size", "4")
    return only_run_dir(root)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, tiny_dir) -> Path:
    root = tmp_path_factory.mktemp("ddp-2x2")
    lima("fit", *FIT_ARGS, "--trainer.default_root_dir", str(root), *DDP, "--data.batch_size", "2")
    return only_run_dir(root)


@pytest.mark.slow
def test_two_ranks_train_the_adapter_one_process_trains_with_the_same_global_batch(one_process, two_processes):
    one, two = adapter(one_process), adapter(two_processes)
    assert one.keys() == two.keys() and one
    initial_b = [k for k in one if "lora_B" in k]
    assert all(one[k].abs().max() > 1e-3 for k in initial_b)  # B starts at 0: it trained
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=2e-6, msg=name)
    # Step by step: the loss (token-weighted over both ranks) and the norm of the all-reduced gradient.
    for tag in ("train/loss", "train/grad_norm"):
        a, b = scalars(one_process, tag), scalars(two_processes, tag)
        assert len(a) == len(b) == 10, (tag, a, b)  # ceil(39 / 4) optimizer steps either way
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=0, msg=tag)


@pytest.mark.slow
def test_two_ranks_write_each_output_once(two_processes):
    run_dir = two_processes
    assert (run_dir / "adapters/final/adapter_model.safetensors").is_file()
    leftovers = [p.name for p in (run_dir / "adapters").iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers  # no half-written copies from a second writer
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    # One validation at the end of the epoch, 2 prompts: 2 rows, not 2 per rank.
    assert len(samples) == 2 and len({s["prompt"] for s in samples}) == 2, samples


@pytest.mark.slow
def test_two_ranks_predict_every_prompt_once_into_one_file_in_input_order(two_processes, tmp_path):
    # 11 prompts of different lengths, batches of 2: ranks get 6 and 5 prompts (no padding repeat), 3 batches each.
    prompts = [f"Reverse the word {'abcdefghijk'[: i + 1]}" + " please" * (i % 4) for i in range(11)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"conversations": [p]}) + "\n" for p in prompts))
    output = lima(
        "predict", *FIT_ARGS, *DDP,
        "--trainer.default_root_dir", str(tmp_path / "predict"),
        "--model.adapter_path", str(two_processes / "adapters/final"),
        "--data.predict_dataset", str(data),
        "--data.predict_batch_size", "2",
        "--model.generation.max_new_tokens", "6",
    )  # fmt: skip
    rows = [json.loads(line) for line in (only_run_dir(tmp_path / "predict") / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(11))
    assert [r["prompt"] for r in rows] == prompts
    assert "answered twice" not in output


@pytest.mark.slow
def test_nf4_base_trains_under_ddp(tmp_path, tiny_dir):
    # DDP broadcasts every parameter from rank 0 at start-up, the packed 4-bit weights included.
    lima("fit", *FIT_ARGS, *DDP, "--trainer.default_root_dir", str(tmp_path), "--model.quantization", "nf4", "--trainer.max_steps", "2")
    run_dir = only_run_dir(tmp_path)
    assert (run_dir / "adapters/final/adapter_model.safetensors").is_file()
    assert all(torch.isfinite(torch.tensor(scalars(run_dir, "train/loss"))))


def test_token_weighting_differs_from_a_mean_of_per_rank_means(tiny_dir, tiny_tokenizer):
    """What the equality above rules out: averaging each rank's per-token mean (the naive DDP loss) moves the
    gradient far more than the 1e-4 tolerance, whenever the ranks hold different numbers of trained tokens."""
    from lima_lightning.data.synthetic import synthetic_conversations
    from lima_lightning.data.tokenization import tokenize_for_training
    from lima_lightning.loss import masked_nll_sum
    from lima_lightning.models.loading import LLAMA_PROJECTIONS, add_lora, load_base_model
    from tests.conftest import padded_batch

    torch.manual_seed(0)
    model = add_lora(load_base_model(str(tiny_dir), "none", torch.device("cpu")), 4, 8, 0.0, LLAMA_PROJECTIONS)
    randomize_lora_b(model, std=0.02)  # as after a few steps: gradients reach A too
    examples, _ = tokenize_for_training(synthetic_conversations("train", 8), tiny_tokenizer, "llama2-chat", 256)
    shards = [examples[0:2], examples[2:4]]  # ranks 0 and 1 of one step, as MicroBatchSampler hands them out

    def grad(shard: list[dict]) -> torch.Tensor:
        """Gradient of one rank's summed NLL."""
        model.zero_grad()
        batch = padded_batch(shard, tiny_tokenizer.pad_token_id)
        masked_nll_sum(model(input_ids=batch["input_ids"]).logits, batch["labels"])[0].backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    counts = [sum(label != IGNORE_INDEX for e in shard for label in e["labels"][1:]) for shard in shards]
    assert counts[0] != counts[1], counts
    g0, g1 = grad(shards[0]), grad(shards[1])
    token_weighted = (g0 + g1) / sum(counts)  # what the module computes
    naive = (g0 / counts[0] + g1 / counts[1]) / 2
    assert (naive - token_weighted).norm() / token_weighted.norm() > 1e-2


def test_lightning_shards_the_longest_first_predict_order_without_repeats(tiny_dir):
    """What Lightning does to `predict_dataloader` under DDP: its UnrepeatedDistributedSampler deals the
    longest-first order out (rank r: positions r, r + N, ...), so each rank's prompts stay longest first,
    ranks differ by at most one prompt, and no prompt is repeated to even them out."""
    from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
    from lightning.pytorch.trainer.states import RunningStage

    from lima_lightning.data.datamodule import LIMADataModule

    data = LIMADataModule(predict_dataset="synthetic", tokenizer=str(tiny_dir), synthetic_size=230)  # 23 prompts
    data.setup("predict")
    loader = data.predict_dataloader()
    lengths = [len(p["input_ids"]) for p in data.predict_dataset]
    shares = [
        list(_get_distributed_sampler(loader, shuffle=False, overfit_batches=0, mode=RunningStage.PREDICTING, num_replicas=3, rank=r))
        for r in range(3)
    ]
    assert sorted(i for share in shares for i in share) == list(range(23))  # every prompt once
    assert [len(share) for share in shares] == [8, 8, 7]
    for share in shares:
        assert [lengths[i] for i in share] == sorted((lengths[i] for i in share), reverse=True)


# ----------------------------------------------------------------------------- training shards
@pytest.mark.parametrize("n, batch_size, ranks", [(39, 2, 2), (40, 4, 2), (10, 3, 4), (3, 4, 2), (7, 1, 3)])
def test_rank_r_takes_micro_batch_s_times_ranks_plus_r_of_the_one_device_order(n, batch_size, ranks):
    lengths = [5 + i % 7 for i in range(n)]
    device = MicroBatchSampler(lengths, "padded", batch_size, seed=3)
    samplers = [MicroBatchSampler(lengths, "padded", batch_size, seed=3, num_replicas=ranks, rank=r) for r in range(ranks)]
    one_device = device.epoch_batches(0)
    shares = [s.rank_batches(0) for s in samplers]
    assert len({len(share) for share in shares}) == 1  # every rank the same number of steps
    assert all(len(s) == len(shares[0]) for s in samplers)
    trained = [b for share in shares for b in share if not isinstance(b, Masked)]
    assert sorted(map(str, trained)) == sorted(map(str, one_device))  # a partition: nothing twice, nothing lost
    for s, step in enumerate(zip(*shares, strict=True)):  # step s, rank r: the device's micro-batch s * ranks + r
        for r, batch in enumerate(step):
            if s * ranks + r < len(one_device):
                assert batch == one_device[s * ranks + r]
            else:
                assert isinstance(batch, Masked)  # the padding of an uneven last step


def test_sharded_sampler_pads_with_masked_copies_and_follows_set_epoch():
    lengths = [10] * 5
    samplers = [MicroBatchSampler(lengths, "padded", 2, seed=0, num_replicas=2, rank=r) for r in range(2)]
    order0 = MicroBatchSampler(lengths, "padded", 2, seed=0).epoch_batches(0)  # 3 batches: 2, 2 and 1 examples
    rank0, rank1 = (list(s) for s in samplers)
    assert rank0 == [order0[0], order0[2]] and rank1[0] == order0[1]
    assert isinstance(rank1[1], Masked) and rank1[1].batch == order0[0]  # a copy of the epoch's first batch
    samplers[0].set_epoch(1)
    order1 = MicroBatchSampler(lengths, "padded", 2, seed=0).epoch_batches(1)
    assert order1 != order0 and list(samplers[0]) == [order1[0], order1[2]]
    assert len(samplers[0]) == len(samplers[1]) == 2


def test_masked_padding_trains_nothing():
    examples = [{"input_ids": [1, 5, 6, 2], "labels": [-100, -100, 6, 2]}]
    data = ExampleRows(examples)
    assert data[[[0]]] == [[examples[0]]]
    assert data[Masked([[0], [0]])] == [[{"input_ids": [1, 5, 6, 2], "labels": [IGNORE_INDEX] * 4}]] * 2
    assert examples[0]["labels"] == [-100, -100, 6, 2]  # the original is left as it was


def test_validation_is_every_conversation_once_under_ddp(tiny_dir):
    """Validation batches are the conversations in order, dealt out by batch; the uneven end is Masked padding,
    not repeated conversations (which would weigh some twice in val/loss)."""
    shards = [_datamodule(tiny_dir, "padded", 2, 3, r) for r in range(3)]
    seen = Counter()
    for data in shards:
        for batch_idx in range(len(data.val_dataloader())):
            rows = data.val_batch_rows(batch_idx)
            if not isinstance(rows, Masked):
                seen.update(i for row in rows for i in row)
    assert seen == Counter(range(len(shards[0].val_dataset)))
    assert len({len(data.val_dataloader()) for data in shards}) == 1


def _datamodule(tiny_dir, batching: str, batch_size: int, ranks: int, rank: int, accumulate: int = 1):
    from lima_lightning.data.datamodule import LIMADataModule

    data = LIMADataModule(
        dataset="synthetic", tokenizer=str(tiny_dir), synthetic_size=61, batch_size=batch_size, batching=batching,
        max_seq_length=256, max_tokens_per_batch=512, val_fraction=0.05,
    )  # fmt: skip
    data.setup("fit")
    data.trainer = SimpleNamespace(world_size=ranks, global_rank=rank, accumulate_grad_batches=accumulate)
    return data


def _content(batch: dict) -> Counter:
    """The (ids, labels) rows of a collated batch, padding stripped: what it trains on, whatever its layout."""
    rows = Counter()
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        while ids and labels[-1] == IGNORE_INDEX and len(ids) > 1 and ids[-1] == 0:
            ids, labels = ids[:-1], labels[:-1]
        rows[(tuple(ids), tuple(labels))] += 1
    return rows


@pytest.mark.parametrize("batching", ["padded", "length_grouped", "packed"])
def test_each_rank_trains_the_micro_batch_one_device_takes_while_accumulating(tiny_dir, batching):
    """One device accumulating 2 micro-batches vs 2 ranks with one each (the benchmark's 1 GPU x batch 4 x
    accumulate 2 vs 2 GPUs x batch 4): rank r's micro-batch of step s is the device's micro-batch 2s + r, so
    losses, padding and work per step are the same; in the last, partial round the same examples are split
    evenly instead (what lets every rank run the same number of steps)."""
    ranks = 2
    one = _datamodule(tiny_dir, batching, 2, 1, 0, accumulate=ranks)
    shards = [_datamodule(tiny_dir, batching, 2, ranks, r) for r in range(ranks)]
    for epoch in (0, 1):
        single = one.train_dataloader()
        single.sampler.set_epoch(epoch)
        device = [_content(b) for b in single]
        per_rank = []
        for data in shards:
            loader = data.train_dataloader()
            loader.sampler.set_epoch(epoch)
            per_rank.append([_trained(_content(b)) for b in loader])
        assert len({len(batches) for batches in per_rank}) == 1  # DDP: the same number of steps on every rank
        steps = len(per_rank[0])
        assert steps == -(-len(device) // ranks)
        for s in range(steps):
            expected = device[s * ranks : (s + 1) * ranks]
            if s < steps - 1 or len(expected) == ranks and batching != "padded":
                assert [per_rank[r][s] for r in range(ranks)] == expected, f"epoch {epoch} step {s}"
            else:
                assert sum((per_rank[r][s] for r in range(ranks)), Counter()) == sum(expected, Counter()), f"epoch {epoch} step {s}"


def _trained(rows: Counter) -> Counter:
    """Rows with at least one trained label: what is left of a batch once Masked padding is dropped."""
    return Counter({k: v for k, v in rows.items() if any(x != IGNORE_INDEX for x in k[1])})


# ----------------------------------------------------------------------------- FSDP (set-up only: FSDP needs CUDA)
@pytest.fixture(scope="module")
def nf4_lora(tiny_dir):
    from lima_lightning.models.loading import LLAMA_PROJECTIONS, add_lora, load_base_model

    def build(quant_storage):
        base = load_base_model(str(tiny_dir), "nf4", torch.device("cpu"), quant_storage=quant_storage)
        return add_lora(base, 4, 8, 0.0, LLAMA_PROJECTIONS)

    return build


def fsdp_units(model: torch.nn.Module, policy) -> dict[str, list[torch.nn.Parameter]]:
    """The parameters each FSDP unit would flatten together: a wrapped module's own, minus nested units'."""
    wrapped = {name for name, m in model.named_modules() if name and policy(module=m, recurse=False, nonwrapped_numel=0)}
    units: dict[str, list] = {"<root>": []}
    for name, p in model.named_parameters():
        owner = max((w for w in wrapped if name.startswith(w + ".")), key=len, default="<root>")
        units.setdefault(owner, []).append(p)
    return units


@pytest.mark.parametrize("storage, uniform", [(torch.bfloat16, True), (None, False)], ids=["bf16-storage", "uint8-storage"])
def test_fsdp_units_of_nf4_lora_have_one_dtype_only_with_bf16_storage(nf4_lora, storage, uniform):
    model = nf4_lora(storage)
    policy = lora_fsdp_wrap_policy(decoder_layer_classes(model.get_base_model()))
    units = fsdp_units(model, policy)
    layers = [n for n in units if n.endswith(tuple(f"layers.{i}" for i in range(2)))]
    assert len(layers) == 2 and sum("lora_A" in n for n in units) == 14  # 2 layers x 7 projections
    for name, params in units.items():
        assert len({p.requires_grad for p in params}) == 1, name  # frozen and trainable never share a unit
    mixed = [name for name, params in units.items() if len({p.dtype for p in params}) > 1]
    # uint8-packed NF4 next to bf16 norms in one decoder layer: FSDP cannot flatten those, hence bf16 storage.
    assert (not mixed) == uniform, mixed


def test_fsdp_strategy_gets_storage_wrap_policy_no_casts_and_its_own_checkpointing(nf4_lora):
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
    from torch.distributed.fsdp import MixedPrecision
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    assert fsdp_quant_storage(FSDPStrategy()) == torch.bfloat16 and fsdp_quant_storage(DDPStrategy()) is None
    model = nf4_lora(torch.bfloat16)
    base = model.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    strategy = FSDPStrategy()
    prepare_fsdp(strategy, model)
    assert strategy.kwargs["use_orig_params"] is True  # Lightning's default, kept
    assert callable(strategy.kwargs["auto_wrap_policy"])
    assert strategy.mixed_precision == MixedPrecision()  # no casts: RoPE's fp32 inv_freq stays fp32
    check = strategy._activation_checkpointing_kwargs["check_fn"]
    assert check(base.model.layers[0]) and not check(base.model.layers[0].mlp)
    assert not any(getattr(layer, "gradient_checkpointing", False) for layer in base.model.layers)  # FSDP's instead

    # What the user set stays.
    own = FSDPStrategy(auto_wrap_policy={torch.nn.Linear}, mixed_precision=MixedPrecision(param_dtype=torch.bfloat16))
    prepare_fsdp(own, model)
    assert own.mixed_precision.param_dtype == torch.bfloat16 and isinstance(own.kwargs["auto_wrap_policy"], ModuleWrapPolicy)
    # DDP is left alone: transformers' checkpointing stays on.
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    prepare_fsdp(DDPStrategy(), model)
    assert all(layer.gradient_checkpointing for layer in base.model.layers)


def test_fsdp_config_builds_an_fsdp_strategy_and_parses_for_fit(capsys):
    import yaml
    from lightning.pytorch.strategies import FSDPStrategy

    from tests.test_configs import print_config

    config = REPO / "configs/llama2-7b-qlora-fsdp.yaml"
    parsed = print_config(capsys, "fit", "--config", str(config))
    strategy = parsed["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    instance = FSDPStrategy(**yaml.safe_load(config.read_text())["trainer"]["strategy"]["init_args"])
    assert instance.kwargs["use_orig_params"] is True
    assert parsed["model"]["quantization"] == "nf4" and parsed["trainer"]["precision"] == "bf16-mixed"


def test_fsdp_refuses_predict_in_one_line(tiny_dir):
    from lightning.pytorch.strategies import FSDPStrategy

    from lima_lightning.errors import UserError
    from lima_lightning.module import LIMALoRAModule

    module = LIMALoRAModule(base_model=str(tiny_dir), quantization="none")
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(parallel_devices=[torch.device("cpu")]), precision="bf16-mixed")
    with pytest.raises(UserError, match="strategy=ddp"):
        module.setup("predict")
    module.setup("fit")  # training is what FSDP is for


def test_gradient_norm_adds_the_shards_of_all_ranks_under_fsdp():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    grads = [torch.tensor([3.0]), torch.tensor([4.0])]  # this rank's shards: norm 5
    fsdp = FSDPStrategy()
    fsdp.reduce = lambda tensor, reduce_op: tensor * 4  # 4 ranks holding shards of norm 5 each
    assert global_grad_norm(grads, fsdp).item() == pytest.approx(10.0)
    assert global_grad_norm(grads, DDPStrategy()).item() == pytest.approx(5.0)  # DDP: every rank has it all


def test_adapter_saved_from_gathered_weights_equals_the_direct_save(tiny_dir, tmp_path):
    """Under FSDP the adapter is written from the full state dict (LightningModule names), while the decoder
    layers sit inside FSDP's checkpoint wrappers; it must equal the adapter PEFT writes for the plain model, and
    reload in plain PEFT. (On the H200, peft 0.21's save_pretrained(state_dict=...) wrote an empty adapter there.)"""
    from peft import PeftModel
    from safetensors.torch import load_file
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from transformers import AutoModelForCausalLM

    from lima_lightning.callbacks import save_adapter
    from lima_lightning.distributed import adapter_state_from_full, decoder_layer_classes
    from lima_lightning.module import LIMALoRAModule

    module = LIMALoRAModule(base_model=str(tiny_dir), quantization="none", lora_r=4)
    module.configure_model()
    torch.manual_seed(0)
    randomize_lora_b(module.model, std=0.1)
    names = module.trainable_parameter_names()
    assert names and all(n.startswith("model.") and "lora_" in n for n in names)
    direct_dir = save_adapter(module, tmp_path / "direct")
    # What FSDP's activation checkpointing does to the module tree: each decoder layer gets a wrapper.
    layers = decoder_layer_classes(module.model.get_base_model())
    apply_activation_checkpointing(module, check_fn=lambda m: isinstance(m, layers))
    assert any("_checkpoint_wrapped_module" in n for n, _ in module.named_modules())
    state = adapter_state_from_full(module.state_dict(), names)  # the state dict hooks give clean names
    assert len(state) == len(names)
    gathered_dir = save_adapter(module, tmp_path / "gathered", state)
    direct, gathered = load_file(direct_dir / "adapter_model.safetensors"), load_file(gathered_dir / "adapter_model.safetensors")
    assert direct.keys() == gathered.keys() and len(direct) == len(names)
    for key in direct:
        torch.testing.assert_close(gathered[key], direct[key], rtol=0, atol=0)
    configs = [json.loads((d / "adapter_config.json").read_text()) for d in (gathered_dir, direct_dir)]
    for config in configs:  # a set in PEFT, written in hash order
        config["target_modules"] = sorted(config["target_modules"])
    assert configs[0] == configs[1]
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), gathered_dir)
    ids = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():
        expected = module.model.eval()(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_wrapper_prefixes_are_dropped_from_parameter_names():
    layer = "model.base_model.model.model.layers.0."
    name = layer + "_fsdp_wrapped_module._checkpoint_wrapped_module.mlp.up_proj.lora_A.default._fsdp_wrapped_module.weight"
    assert clean_param_name(name) == layer + "mlp.up_proj.lora_A.default.weight"
