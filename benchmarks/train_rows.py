"""bench_train.py's rows: the shipped configs/*.yaml as `lima-lightning fit` reads them, plus overrides.

A row of ours is a config file and `fit` command-line overrides: `cli.parse_fit_config` reads them exactly
as `lima-lightning fit --config configs/X.yaml OVERRIDES` would (types, choices, links; nothing loaded), and
the row runs the module and data module built from those values (`LIMALoRAModule.around`,
`LIMADataModule.from_examples`) around the benchmark's loaded model and tokenized examples, in a real
Lightning Trainer. A row with no overrides is the config as shipped. A plain row names the config whose
model it trains (QLoRA or LoRA) and how the plain loop batches (reference.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from measure import TimedWindow

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
QLORA, LORA, LOWMEM = "llama2-7b-qlora.yaml", "llama2-7b-lora.yaml", "llama2-7b-qlora-lowmem.yaml"
TEMPLATE = "llama2-chat"  # the examples are tokenized once, with this template, for every row
EAGER = ("--model.compile", "false")
PACKED, GROUPED, PADDED = (("--data.batching", b) for b in ("packed", "length_grouped", "padded"))
CHECKPOINTED = ("--model.gradient_checkpointing", "true")
FLEX = ("--model.attn_implementation", "flex_attention")
LOWMEM_GOAL = "speed>=1.5,peak<=5"  # issue 13's memory mode: <= 5.0 GiB at >= 1.5x the plain loop on 2048-token rows
LOWMEM_REFERENCE = "qlora-plain-2048x1"
ON_GPU = ("--model.offload_checkpoints", "false")


@dataclass(frozen=True)
class Row:
    name: str
    config: str  # a file in configs/: ours runs it, a plain row trains the model it describes
    overrides: tuple[str, ...] = ()  # `lima-lightning fit` arguments after --config
    plain: str | None = None  # the plain loop's batching, `padded` or `rows`; None: a row of ours
    batch_size: int = 4  # plain padded: conversations per batch
    checkpointing: bool = False  # plain: transformers' gradient checkpointing
    reference: str | None = None  # the plain row of the same run this one is compared with
    goal: str = ""
    essential: bool = False  # run even when time is short; extras run only if the essentials still fit
    expected_s: float = 12.0  # H200 estimate of its duration, for the time budget
    warmup: int = 2  # steps before the timed window (flex and compile build kernels at the first steps)


# In running order. Essential ones run while they fit --time-budget; the others only when every pending
# essential one still fits after them. Compiled layers stay compiled: compile comes last for its method.
ROWS = [
    Row("qlora-plain", QLORA, plain="padded", checkpointing=True, essential=True, expected_s=22),
    Row("qlora-plain-2048x1", QLORA, plain="rows", batch_size=1, checkpointing=True, essential=True, expected_s=12),
    Row("qlora-fast", QLORA, EAGER, reference="qlora-plain", goal="speed>=6", essential=True),
    # The memory mode uncompiled: each step is bound by Python and kernel launches (the GPU is busy ~1/3 of it).
    Row("qlora-lowmem-grouped", LOWMEM, (*EAGER, *GROUPED), reference=LOWMEM_REFERENCE, goal=LOWMEM_GOAL, expected_s=20),
    Row("qlora-lowmem-eager", LOWMEM, EAGER, reference=LOWMEM_REFERENCE, goal=LOWMEM_GOAL, expected_s=20),
    Row("qlora-packed", QLORA, (*EAGER, *PACKED), reference="qlora-plain", essential=True),
    Row("qlora-fast-gc", QLORA, (*EAGER, *CHECKPOINTED), reference="qlora-plain", expected_s=15),
    Row("qlora-padded-ours", QLORA, (*EAGER, *PADDED, *CHECKPOINTED), reference="qlora-plain", expected_s=16),
    Row("qlora-packed-flex", QLORA, (*EAGER, *PACKED, *FLEX), reference="qlora-plain", expected_s=60, warmup=3),
    Row("qlora-fast-compile", QLORA, reference="qlora-plain", goal="speed>=6", essential=True, expected_s=120, warmup=4),
    Row("qlora-lowmem", LOWMEM, reference=LOWMEM_REFERENCE, goal=LOWMEM_GOAL, essential=True, expected_s=120, warmup=4),
    # The same compiled layers: the layer inputs kept on the GPU; two rows per micro-batch; a smaller loss chunk.
    Row("qlora-lowmem-on-gpu", LOWMEM, ON_GPU, reference=LOWMEM_REFERENCE, goal=LOWMEM_GOAL, expected_s=25),
    Row("qlora-lowmem-2rows", LOWMEM, ("--data.max_tokens_per_batch", "4096"), reference=LOWMEM_REFERENCE, expected_s=40, warmup=3),
    Row("qlora-lowmem-chunk256", LOWMEM, ("--model.loss_chunk_size", "256"), reference=LOWMEM_REFERENCE, goal=LOWMEM_GOAL, expected_s=25),
    Row("lora-plain", LORA, plain="padded", essential=True, expected_s=14),
    Row("lora-fast", LORA, EAGER, reference="lora-plain", goal="speed>=5", essential=True, expected_s=10),
    Row("lora-packed-flex", LORA, (*EAGER, *PACKED, *FLEX), reference="lora-plain", expected_s=40, warmup=3),
    Row("lora-fast-compile", LORA, reference="lora-plain", goal="speed>=5", essential=True, expected_s=90, warmup=4),
]
MODEL_KEYS = ("base_model", "quantization", "lora_r", "lora_alpha", "lora_dropout", "target_modules")  # what the loaded model is


@dataclass(frozen=True)
class Setup:
    """A row as it runs: the `model.*`, `data.*` and `trainer.*` values `lima-lightning fit` would use."""

    row: Row
    model: dict  # LIMALoRAModule's arguments
    data: dict  # LIMADataModule's arguments
    trainer: dict

    @property
    def method(self) -> str:
        return "qlora" if self.model["quantization"] == "nf4" else "lora"

    @property
    def loaded_model(self) -> tuple:
        """What the loaded model must be for this row: every row of a method shares one load."""
        return tuple(str(self.model[k]) for k in MODEL_KEYS)


def parse_row(row: Row, common: list[str], max_seq_length: int) -> Setup:
    """The row's config + its overrides + `common` (model path, LoRA shape), read by the product's own parser.

    `max_seq_length` below the config's scales the token budget with it (the smoke run's 256-token cap keeps
    each config's rows per micro-batch: the memory mode's one row, the main configs' four).
    """
    from lima_lightning.cli import parse_fit_config

    # --seed_everything false: parsing would otherwise seed the global RNGs (and set PL_GLOBAL_SEED) per row.
    args = ["--config", str(CONFIG_DIR / row.config), *row.overrides, *common, "--seed_everything", "false"]
    config = parse_fit_config(args).as_dict()
    model, data = config["model"], config["data"]
    if data["template"] != TEMPLATE:
        raise ValueError(f"{row.name}: data.template={data['template']}; the benchmark tokenizes with {TEMPLATE}")
    if max_seq_length != data["max_seq_length"]:
        budget = data["max_tokens_per_batch"] * max_seq_length // data["max_seq_length"]
        data.update(max_seq_length=max_seq_length, max_tokens_per_batch=max(max_seq_length, budget))
    return Setup(row, model, data, config["trainer"])


def parse_rows(rows: list[Row], common: list[str], max_seq_length: int) -> list[Setup]:
    """Every row parsed before any model loads, so a bad override fails in seconds; rows of a method must
    describe the same model (base, quantization, LoRA shape), which is loaded once for all of them."""
    setups = [parse_row(row, common, max_seq_length) for row in rows]
    first = {}
    for s in setups:
        if first.setdefault(s.method, s).loaded_model != s.loaded_model:
            raise ValueError(f"{s.row.name} needs another model than {first[s.method].row.name}: {s.loaded_model}")
    return setups


# ----------------------------------------------------------------------------- a row of ours
class KeepOnDevice(SingleDeviceStrategy):
    """Lightning moves the model to the CPU after fit; the benchmark trains the loaded model again instead."""

    def teardown(self) -> None:
        self.precision_plugin.teardown()
        self.accelerator.teardown()


class StepTimer(L.Callback):
    """Feeds each training step to the timed window; stops the Trainer when the window says so."""

    def __init__(self, window: TimedWindow, plan: list, examples: list[dict]) -> None:
        self.window, self.plan, self.examples = window, plan, examples

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.window.begin_step(batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        lengths = [len(self.examples[i]["input_ids"]) for row in self.plan[batch_idx] for i in row]
        if self.window.end_step(batch_idx, batch["num_tokens"], batch["input_ids"].numel(), lengths):
            trainer.should_stop = True


def ours_fit(model, tokenizer, examples: list[dict], setup: Setup, window: TimedWindow, device: torch.device) -> dict:
    """A real Trainer on a real LIMALoRAModule and LIMADataModule built from the row's config, stopped after the window."""
    from lima_lightning.data.datamodule import LIMADataModule
    from lima_lightning.module import LIMALoRAModule

    datamodule = LIMADataModule.from_examples(examples, loaded_tokenizer=tokenizer, **setup.data)  # tokenized once for all rows
    module = LIMALoRAModule.around(model, tokenizer, **setup.model)
    # The smoke run checks the benchmark's compile path (warmup, graph counter, dynamo reset), not a compiler:
    # dynamo's `eager` backend traces the same graphs without aot_eager's autograd tracing or a C++ build.
    module.compile_backend = "inductor" if device.type == "cuda" else "eager"
    plan = datamodule.train_dataloader().sampler.epoch_batches(0)  # the order the Trainer's epoch 0 trains
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        strategy=KeepOnDevice(device=device),
        precision=setup.trainer["precision"] if device.type == "cuda" else "32-true",  # as configs/demo.yaml on CPU
        max_epochs=1,
        # The config's: 8-bit AdamW's step over 7B r=64's 448 adapter tensors takes ~256 ms (S12-1's profile), a
        # share of the time that accumulation divides; the timed window holds whole optimizer steps.
        accumulate_grad_batches=setup.trainer["accumulate_grad_batches"],
        gradient_clip_val=setup.trainer["gradient_clip_val"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[StepTimer(window, plan, examples)],
    )
    trainer.fit(module, datamodule=datamodule)
    # What the module and data module ran with, for the report (not what the row asked for).
    ran = {k: module.hparams[k] for k in ("gradient_checkpointing", "attn_implementation", "compile", "lora_dtype", "optimizer")}
    ran.update(loss_chunk_size=module.hparams.loss_chunk_size, **{k: datamodule.hparams[k] for k in ("batching", "max_tokens_per_batch")})
    ran["offloaded_layers"] = module.speed_settings.get("offloaded_layers", 0)
    return {**window.result(), "settings": module.speed_settings, "ran": ran}
