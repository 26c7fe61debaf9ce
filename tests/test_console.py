"""A quiet console that hides nothing useful, and endings that tell: the demo fit through a real process prints
no line of the known noise, keeps the data statistics, and ends with the losses, the adapter and the exact
predict command, which runs as printed."""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lima_lightning import console
from tests.conftest import REPO

# Each line is noise that was seen on main (issue #15): none may come back.
NOISE = {
    "bitsandbytes' optional hub kernel": r"Failed to load CPU gemm_4bit_forward|kernels-community",
    "a deprecation warning": r"[Dd]eprecat",
    "the litlogger advertisement": r"litlogger|💡",
    "Lightning's model table": r"┏|┃|FLOPs|Total estimated model params size|Non-trainable params|Modules in (train|eval) mode",
    "the run version in the progress bar": r"v_num",
    "the Tensor Cores hint": r"set_float32_matmul_precision|Tensor Cores",
    "the TPU line": r"TPU available",
    "LightningCLI's args warning": r"LightningCLI's args parameter",
    "an internal step": r"to estimate number of stepping batches",
    "a progress bar in a log": r"Loading weights:.*\d+%\||━+ +\d+/\d+",
    "any Python warning": r"\b\w*Warning\b|warnings\.warn\(",
    "a traceback": r"Traceback",
}
FIT = ["fit", "--config", "configs/demo.yaml", "--data.synthetic_size", "60", "--trainer.max_epochs", "1", "--samples.max_new_tokens", "8"]


def run(args: list[str], cwd: Path = REPO) -> tuple[int, list[str]]:
    """`python -m lima_lightning ARGS` in a real process: (exit status, its stdout and stderr lines)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
    done = subprocess.run([sys.executable, "-m", "lima_lightning", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return done.returncode, (done.stdout + done.stderr).splitlines()


def assert_quiet(lines: list[str]) -> None:
    found = [f"{what}: {line!r}" for line in lines for what, pattern in NOISE.items() if re.search(pattern, line)]
    assert not found, "\n".join(found + ["--- the whole console:", *lines])


@pytest.fixture(scope="module")
def demo_fit(tmp_path_factory):
    root = tmp_path_factory.mktemp("quiet")
    status, lines = run([*FIT, "--trainer.default_root_dir", str(root), "--trainer.log_every_n_steps", "1"])
    assert status == 0, "\n".join(lines)
    return root, lines


@pytest.mark.slow
def test_demo_fit_prints_no_known_noise_and_keeps_what_is_useful(demo_fit):
    root, lines = demo_fit
    assert_quiet(lines)
    text = "\n".join(lines)
    # The data statistics, the seed, the device, the one-line model summary stay.
    assert re.search(r"^train: 57 examples from 57 conversations, 0 truncated to 256 tokens", text, re.M)
    assert re.search(r"^val: 3 examples", text, re.M) and "Seed set to 42" in text and "GPU available: False, used: False" in text
    assert re.search(r"^model: 18\d K parameters, 38.9 K trainable \(21%, the LoRA adapter\); weights 731 KB \(float32 base\)$", text, re.M)
    # Progress as plain lines (the output is not a terminal): each validation, each epoch's end.
    assert re.search(r"^validation: val/loss \d+\.\d{3}, val/perplexity \d+\.\d{3}$", text, re.M)
    assert re.search(r"^epoch 1/1, step 4/4 \(100%\), \d+:\d\d elapsed, ~0:00 left, loss \d+\.\d{3}, [\d,]+ tokens/s$", text, re.M)


@pytest.mark.slow
def test_demo_fit_ends_with_losses_the_adapter_and_the_exact_predict_command(demo_fit):
    root, lines = demo_fit
    fit, adapter, predict, chat = lines[-4:]
    assert re.fullmatch(r"fit: train/loss \d+\.\d{3} \(last step\), val/loss \d+\.\d{3} \(last validation\); 1 epoch, 4 steps", fit)
    adapter_dir = root / "lightning_logs/version_0/adapters/final"
    assert adapter == f"adapter: {adapter_dir}" and (adapter_dir / "adapter_model.safetensors").is_file()
    # The configs and overrides as typed, fit-only options left out, then the adapter.
    expected = ["lima-lightning", "predict", "--config", "configs/demo.yaml", "--data.synthetic_size", "60"]
    expected += ["--trainer.default_root_dir", str(root), "--model.adapter_path", str(adapter_dir)]
    assert shlex.split(predict.removeprefix("next: ")) == expected, predict
    assert shlex.split(chat.removeprefix("next: ")) == ["lima-lightning", "chat", *expected[2:]], chat
    # ... and it runs as printed, as quietly, and `make demo`'s summary scores its answers.
    status, out = run(shlex.split(predict.removeprefix("next: "))[1:])
    assert status == 0, "\n".join(out)
    assert_quiet(out)
    assert (root / "lightning_logs/version_1/predictions.jsonl").is_file()
    done = subprocess.run(
        [sys.executable, "-m", "lima_lightning.commands.demo_summary", str(root)], capture_output=True, text=True, check=True
    )
    assert re.search(r"^exact match: \d+/6 held-out prompts \(\d+%\); \d+ stopped at EOS$", done.stdout, re.M), done.stdout
    assert f"tiny + {adapter_dir}" in done.stdout


@pytest.mark.slow
def test_nf4_demo_fit_is_as_quiet_and_sizes_the_packed_weights(tmp_path):
    status, lines = run(
        [*FIT, "--model.quantization", "nf4", "--trainer.default_root_dir", str(tmp_path), "--trainer.log_every_n_steps", "1"]
    )
    assert status == 0, "\n".join(lines)
    assert_quiet(lines)
    # Lightning's table said 0.731 MB for this NF4 model: it counted each packed byte as a float32 parameter.
    (summary,) = [line for line in lines if line.startswith("model: ")]
    assert re.fullmatch(r"model: 18\d K parameters, 38.9 K trainable \(21%, the LoRA adapter\); weights \d{3} KB \(NF4 base\)", summary), (
        summary
    )
    assert int(re.search(r"weights (\d+) KB", summary).group(1)) < 400
    assert lines[-2].startswith("next: lima-lightning predict --config configs/demo.yaml") and "--model.quantization nf4" in lines[-2]


# ----------------------------------------------------------------------------- the pieces
def test_warning_filters_match_by_message_only():
    console.setup()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.setup()  # inside catch_warnings, as at CLI start: its filters go first
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
        warnings.warn("`is_gradient_checkpointing` is deprecated", UserWarning, stacklevel=1)  # another category
    assert [str(w.message) for w in caught] == ["something else is deprecated", "`is_gradient_checkpointing` is deprecated"]


def test_log_filters_drop_only_the_known_lines(caplog):
    console.setup()
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    kernels_hub = logging.getLogger("kernels._internals.hf_hub")
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO):
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "No module named 'kernels'")
        bnb.warning("a real bitsandbytes problem")
        kernels_hub.warning("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because ...")
        kernels_hub.warning("Skipping publisher trust check for 'someone/else' because Hugging Face Hub is in offline mode.")
        rank_zero.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger")
        rank_zero.info("TPU available: False, using: 0 TPU cores")
        rank_zero.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == [
        "a real bitsandbytes problem",
        "Skipping publisher trust check for 'someone/else' because Hugging Face Hub is in offline mode.",
        "GPU available: False, used: False",
    ]


def test_float32_matmul_precision_is_high_on_a_gpu_only(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", chosen.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    console.choose_matmul_precision()
    assert chosen == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "medium")  # a user's choice stays
    console.choose_matmul_precision()
    assert chosen == []
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    console.choose_matmul_precision()
    assert chosen == ["high"]


def test_every_trainer_subcommand_chooses_the_precision(monkeypatch, capsys):
    from lima_lightning.cli import cli_main

    chosen = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", chosen.append)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(REPO / "configs/demo.yaml"), "--print_config"])
    assert chosen == ["high"]


def test_progress_bar_metrics_leave_out_v_num(monkeypatch):
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from lima_lightning.trainer_cli import quiet_trainer

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # a terminal: Lightning's bars stay
    trainer = SimpleNamespace(callbacks=[RichProgressBar(), TQDMProgressBar(refresh_rate=7)])
    quiet_trainer(trainer)
    for bar in trainer.callbacks:
        assert type(bar).get_metrics is not RichProgressBar.get_metrics and type(bar).get_metrics is not TQDMProgressBar.get_metrics
    assert trainer.callbacks[1].refresh_rate == 7  # the bar keeps its settings
    assert console.without_version({"v_num": 3, "loss": 0.5}) == {"loss": 0.5}


def test_user_configured_callbacks_are_kept():
    from lightning.pytorch.callbacks import RichModelSummary

    from lima_lightning.trainer_cli import ParameterSummary, quiet_trainer

    mine, default = RichModelSummary(max_depth=2), RichModelSummary()
    trainer = SimpleNamespace(callbacks=[mine, default])
    quiet_trainer(trainer, keep=[mine])
    assert trainer.callbacks[0] is mine and type(trainer.callbacks[1]) is ParameterSummary


def test_parameter_summary_counts_packed_nf4_weights_as_the_values_they_hold():
    model = torch.nn.Linear(64, 64, bias=False)
    lora = torch.nn.Linear(64, 2, bias=False)
    packed = torch.nn.Parameter(torch.zeros(64 * 64 // 2, 1, dtype=torch.uint8), requires_grad=False)
    packed.quant_state = SimpleNamespace(shape=torch.Size([64, 64]))  # as bitsandbytes' Params4bit carries it
    model.weight = packed
    both = torch.nn.ModuleList([model, lora])
    line = console.parameter_summary(both)
    assert line == "model: 4.22 K parameters, 128 trainable (3%, the LoRA adapter); weights 2.56 KB (NF4 base)", line


def test_next_command_keeps_configs_and_overrides_but_not_fit_only_options():
    argv = ["fit", "-c", "a.yaml", "--config=b.yaml", "--model.lora_r", "8", "--trainer.max_epochs", "3", "--ckpt_path", "last"]
    argv += ["--samples.num_prompts=2", "--model.adapter_path", "old", "--data.dataset", "x.jsonl", "--trainer.devices", "2"]
    expected = ["-c", "a.yaml", "--config=b.yaml", "--model.lora_r", "8", "--data.dataset", "x.jsonl", "--trainer.devices", "2"]
    assert console.next_command_args(argv) == expected


def test_demo_summary_lines():
    from lima_lightning.commands.demo_summary import summary_lines

    rows = [
        {"prompt": "What is 1 + 2?", "response": "3", "reference": "3", "finish_reason": "eos"},
        {"prompt": "Reverse 'ab'.", "response": "ab", "reference": "ba", "finish_reason": "length"},
    ]
    lines = summary_lines(rows)
    assert lines[0].endswith("-> '3'  (right)") and lines[1].endswith("-> 'ab'  (wrong, expected 'ba')")
    assert lines[-1] == "exact match: 1/2 held-out prompts (50%); 1 stopped at EOS"


def test_make_demo_predicts_with_the_newest_adapter_and_ends_with_the_answers():
    # --no-print-directory: under `make test` this is a sub-make, which names its directory (a path that may
    # itself contain "lima-lightning").
    recipe = subprocess.run(["make", "-n", "--no-print-directory", "demo"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    steps = [line for line in recipe.splitlines() if "lima-lightning" in line or "lima_lightning" in line]
    assert "lima-lightning fit --config configs/demo.yaml" in steps[0]
    assert (
        "python -m lima_lightning.runs latest-adapter runs/demo" in steps[1]
        and "lima-lightning predict --config configs/demo.yaml" in recipe
    )
    assert steps[-1].endswith("python -m lima_lightning.commands.demo_summary runs/demo")
