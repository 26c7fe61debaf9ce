"""Shared fixtures: CPU only, the tiny model built once per session, ../shared data when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LIMA_SHARED", REPO.parent / "shared"))
LIMA_TRAIN = SHARED / "lima" / "train.jsonl"
LIMA_TEST = SHARED / "lima" / "test.jsonl"
LLAMA2_TOKENIZER = SHARED / "llama2-tokenizer"

needs_lima = pytest.mark.skipif(not LIMA_TRAIN.is_file(), reason="../shared/lima is absent (a fresh clone)")
needs_llama2_tokenizer = pytest.mark.skipif(
    not (LLAMA2_TOKENIZER / "tokenizer.model").is_file(), reason="../shared/llama2-tokenizer is absent (a fresh clone)"
)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """The tiny model is built into a per-session cache, never into the user's home; the hub is never asked."""
    os.environ["LIMA_LIGHTNING_CACHE"] = str(tmp_path_factory.mktemp("lima-cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield


@pytest.fixture(scope="session")
def tiny_dir(_isolated_cache) -> Path:
    from lima_lightning.models.tiny import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from lima_lightning.models.loading import load_tokenizer

    return load_tokenizer(str(tiny_dir))


@pytest.fixture(scope="session")
def llama2_tokenizer():
    if not (LLAMA2_TOKENIZER / "tokenizer.model").is_file():
        pytest.skip("../shared/llama2-tokenizer is absent (a fresh clone)")
    from lima_lightning.models.loading import load_tokenizer

    return load_tokenizer(str(LLAMA2_TOKENIZER))


def quiet_cpu_trainer(**overrides):
    """A real Lightning Trainer on one CPU without logger, checkpoints, progress bar or summary, unless overridden."""
    import lightning as L

    quiet = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return L.Trainer(**{**quiet, **overrides})


def run_cli(*args: str):
    """Run `lima-lightning` in-process and return the LightningCLI (trainer, model, datamodule)."""
    from lima_lightning.cli import cli_main

    return cli_main(list(args))


def demo_args(root: Path, *extra: str) -> list[str]:
    """The demo config, made small enough for a test: a few steps on CPU, outputs under `root`."""
    return [
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--data.synthetic_size",
        "200",
        "--trainer.log_every_n_steps",
        "2",
        *extra,
    ]


def padded_batch(examples: list[dict], pad_id: int) -> dict:
    """The plain padded batch (one example per row, through the product's one collator) plus the attention
    mask a plain training loop would pass to the model: the reference the tests compare the product with."""
    from lima_lightning.data.collate import collate_rows

    batch = collate_rows([[e] for e in examples], pad_id)
    lengths = [len(e["input_ids"]) for e in examples]
    batch["attention_mask"] = (torch.arange(batch["input_ids"].shape[1]) < torch.tensor(lengths)[:, None]).long()
    return batch


def randomize_lora_b(model: torch.nn.Module, std: float) -> None:
    """PEFT starts every lora_B at zero, which makes a fresh adapter a no-op: draw it from N(0, std) instead, so
    that the adapter changes the logits and its A matrices get gradients too."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, std)
