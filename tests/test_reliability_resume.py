"""Exact resume: a run killed with SIGKILL mid-epoch, or stopped by SIGTERM / Ctrl-C / SLURM's requeue signal, and
resumed from its checkpoint ends bit-identical on CPU."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import demo_args, run_cli
from tests.reliability_helpers import lima_subprocess, scalars

# 114 training conversations / 16 = 8 batches an epoch, 16 steps in 2 epochs; dropout on, so the RNG matters.
# last.ckpt every 5 steps: the kill at step 12 finds it at step 10, 2 batches into epoch 1.
SMALL = (
    "--data.synthetic_size", "120", "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "1",
    "--model.lora_dropout", "0.1", "--checkpoint.every_n_train_steps", "5",
    "--samples.num_prompts", "1", "--samples.max_new_tokens", "8",
)  # fmt: skip
TAGS = ("train/loss", "train/lr", "val/loss")


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapters" / "final" / "adapter_model.safetensors")


def assert_same_adapter(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), (name, (a[name] - b[name]).abs().max())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dir) -> Path:
    """The uninterrupted run."""
    cli = run_cli("fit", *demo_args(tmp_path_factory.mktemp("reference"), *SMALL))
    return Path(cli.trainer.log_dir)


@pytest.fixture(scope="module")
def killed(tmp_path_factory, tiny_dir) -> Path:
    """The same run in a real process, SIGKILLed at the start of step 12 (its last.ckpt is from step 10)."""
    root = tmp_path_factory.mktemp("killed")
    marker = root / "hanging"
    hang = ("--trainer.callbacks+=tests.reliability_helpers.HangAtStep", "--trainer.callbacks.step", "12")
    process = lima_subprocess("fit", *demo_args(root, *SMALL), *hang, "--trainer.callbacks.marker", str(marker))
    deadline = time.monotonic() + 240
    try:
        while not marker.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the run never reached step 12"
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate()
    assert process.returncode == -signal.SIGKILL
    # For the explicit-path test, whichever runs first: the resume below overwrites last.ckpt.
    shutil.copy(root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", root / "step10.ckpt")
    return root


@pytest.mark.slow
def test_sigkill_mid_epoch_then_ckpt_path_last_ends_bit_identical(reference, killed):
    run_dir = killed / "lightning_logs" / "version_0"
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 10
    assert checkpoint["LIMADataModule"]["train_position"] == {"epoch": 1, "batches": 2, "batches_per_epoch": 8}
    assert not (run_dir / "adapters" / "final").exists()
    assert max(step for step, _ in scalars(run_dir, "train/loss")) == 11  # logged after the checkpoint, then killed

    resumed = run_cli("fit", *demo_args(killed, *SMALL), "--ckpt_path", "last")
    assert resumed.trainer.ckpt_path == str(run_dir / "checkpoints" / "last.ckpt")
    assert [p.name for p in (killed / "lightning_logs").iterdir()] == ["version_0"]  # continued in its own run dir
    assert_same_adapter(adapter(run_dir), adapter(reference))
    for tag in TAGS:  # what the killed process logged after step 10 is purged and logged again, identically
        assert scalars(run_dir, tag) == scalars(reference, tag), tag


@pytest.mark.slow
def test_explicit_ckpt_path_restores_onto_a_fresh_base_in_a_new_run(reference, killed, tmp_path):
    cli = run_cli("fit", *demo_args(tmp_path, *SMALL), "--ckpt_path", str(killed / "step10.ckpt"))
    run_dir = Path(cli.trainer.log_dir)
    assert_same_adapter(adapter(run_dir), adapter(reference))
    # A file outside any run dir starts a new run dir, which logs from step 10 on.
    assert scalars(run_dir, "train/loss") == [(s, v) for s, v in scalars(reference, "train/loss") if s >= 10]


@pytest.mark.slow
def test_checkpoint_holds_the_adapter_its_optimizer_and_loop_state_never_the_base(reference, tiny_dir):
    from transformers import AutoModelForCausalLM

    from lima_lightning.module import LIMALoRAModule

    ckpt_file = reference / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt_file, weights_only=True)
    lora = adapter(reference)
    lora_bytes = sum(t.numel() * t.element_size() for t in lora.values())
    base_bytes = sum(p.numel() * p.element_size() for p in AutoModelForCausalLM.from_pretrained(tiny_dir).parameters())
    # weights + AdamW's two moments, plus loop/RNG state; the base is 4x the adapter here, so it would show.
    assert 3 * lora_bytes < ckpt_file.stat().st_size < 3 * lora_bytes + 100_000 < base_bytes + 3 * lora_bytes
    assert len(checkpoint["state_dict"]) == len(lora) and all("lora_" in k for k in checkpoint["state_dict"])
    assert {"optimizer_states", "lr_schedulers", "loops", "LIMADataModule", "lima_rng_states"} <= checkpoint.keys()
    # Taken at the end of the last epoch: a resume starts the next epoch at its first batch.
    assert checkpoint["LIMADataModule"]["train_position"] == {"epoch": 2, "batches": 0, "batches_per_epoch": 8}

    # Loaded with strict=False onto a fresh base: what is missing is exactly the frozen base, nothing is unexpected.
    module = LIMALoRAModule(base_model="tiny", quantization="none", lora_r=16, lora_alpha=32, gradient_checkpointing=False)
    module.configure_model()
    missing, unexpected = module.load_state_dict(checkpoint["state_dict"], strict=False)
    frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
    assert set(missing) == frozen and not unexpected


@pytest.mark.parametrize(
    "change, named",
    [
        (("--model.lora_r", "8"), "model.lora_r=16 there, 8 here"),
        (("--model.target_modules", "[q_proj,v_proj]"), "model.target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj',"),
    ],
)
@pytest.mark.slow
def test_checkpoint_of_another_rank_or_layout_is_refused_in_one_line(reference, tmp_path, capsys, change, named):
    ckpt = reference / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", *demo_args(tmp_path, *SMALL, *change), "--ckpt_path", str(ckpt))
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"lima-lightning: error: --ckpt_path={ckpt}: the checkpoint's adapter does not fit") and named in line


@pytest.mark.slow
def test_a_module_refuses_a_state_dict_of_another_shape_even_outside_the_cli(reference):
    from lima_lightning.checkpointing import check_adapter_fits
    from lima_lightning.errors import UserError
    from lima_lightning.module import LIMALoRAModule

    checkpoint = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"] = {}  # e.g. Trainer.fit(model, ckpt_path=...) with hand-made hparams
    module = LIMALoRAModule(base_model="tiny", quantization="none", lora_r=8, lora_alpha=32, gradient_checkpointing=False)
    module.configure_model()
    with pytest.raises(
        UserError, match=r"0 adapter tensors missing; 0 unexpected; 28 of another shape, e.g. .*lora_A.*: \(16, \d+\) vs \(8, \d+\)"
    ):
        check_adapter_fits(module, checkpoint, "x.ckpt")


@pytest.mark.slow
def test_checkpoint_of_another_base_is_refused(reference, tmp_path, tiny_dir, capsys):
    other_base = tmp_path / "other-base"  # same shapes, another model as far as anyone can tell
    shutil.copytree(tiny_dir, other_base)
    with pytest.raises(SystemExit):
        run_cli(
            "fit",
            *demo_args(tmp_path, *SMALL, "--model.base_model", str(other_base)),
            "--ckpt_path",
            str(reference / "checkpoints/last.ckpt"),
        )
    assert f"model.base_model='tiny' there, '{other_base}' here" in capsys.readouterr().err


def test_ckpt_path_last_with_no_checkpoint_starts_fresh_and_a_missing_file_is_one_line(tmp_path, capsys):
    from lima_lightning.checkpointing import resolve_resume

    assert resolve_resume("last", tmp_path) == (None, None)  # set-and-forget: the first run of a requeued job
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", *demo_args(tmp_path), "--ckpt_path", str(tmp_path / "nope.ckpt"))
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith("nope.ckpt: no such file; pass `last` or a <run dir>/checkpoints/*.ckpt file")
    )


def test_epoch_order_is_a_function_of_seed_and_epoch_and_the_loader_skips_what_was_trained():
    from lima_lightning.data.datamodule import TrainLoader
    from lima_lightning.data.sampling import ExampleRows, MicroBatchSampler

    examples = [{"input_ids": [i], "labels": [-100]} for i in range(50)]

    def loader_of(sampler) -> TrainLoader:
        return TrainLoader(
            ExampleRows(examples), sampler=sampler, batch_size=None, collate_fn=lambda rows: [r[0]["input_ids"][0] for r in rows]
        )

    def batches(epoch: int, skip: int = 0, warm_up_epochs: int = 0) -> list[list[int]]:
        sampler = MicroBatchSampler([1] * 50, "padded", 8, seed=7)
        loader = loader_of(sampler)
        for e in range(warm_up_epochs):  # a long-running process that iterated earlier epochs first
            sampler.set_epoch(e)
            list(loader)
        sampler.resume_at(epoch, skip)
        return list(loader)

    assert batches(2) == batches(2, warm_up_epochs=2) != batches(1)
    assert batches(2, skip=3) == batches(2)[3:]
    sampler = MicroBatchSampler([1] * 50, "padded", 8, seed=7)
    sampler.resume_at(0, 3)
    loader = loader_of(sampler)
    assert len(list(loader)) == 4 and len(list(loader)) == 7  # the skip applies to the first iteration only

    # FSDP restores the checkpoint after Lightning made the iterator; the skip still applies at the first batch.
    late = MicroBatchSampler([1] * 50, "padded", 8, seed=7)
    iterator = iter(loader_of(late))
    late.resume_at(2, 3)
    assert list(iterator) == batches(2)[3:]


# ----------------------------------------------------------------------------- preemption: SIGTERM, Ctrl-C, SLURM
@pytest.fixture(scope="module")
def terminated(tmp_path_factory, tiny_dir) -> tuple[Path, int, str]:
    """The same run in a real process, sent SIGTERM in the middle of step 12 (13 steps done when it stops)."""
    root = tmp_path_factory.mktemp("terminated")
    marker = root / "paused"
    pause = ("--trainer.callbacks+=tests.reliability_helpers.PauseAtStep", "--trainer.callbacks.step", "12")
    process = lima_subprocess("fit", *demo_args(root, *SMALL), *pause, "--trainer.callbacks.marker", str(marker))
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never reached step 12"
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=240)
    return root, process.returncode, err


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_the_current_step_and_the_printed_command_resumes_bit_identical(reference, terminated):
    import shlex

    root, returncode, err = terminated
    run_dir = root / "lightning_logs" / "version_0"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"lima-lightning: interrupted by SIGTERM at step 13 (epoch 1), {ckpt} written; resume: lima-lightning fit ")
    command = line.split("; resume: ", 1)[1]
    assert command.endswith(" --ckpt_path last")
    # The step under way when the signal came was finished and saved (not the periodic step-10 checkpoint).
    checkpoint = torch.load(ckpt, weights_only=True)
    assert checkpoint["global_step"] == 13
    assert checkpoint["LIMADataModule"]["train_position"] == {"epoch": 1, "batches": 5, "batches_per_epoch": 8}
    assert not (run_dir / "adapters" / "final").exists() and not list(ckpt.parent.glob(".*"))

    run_cli(*shlex.split(command)[1:])  # the command exactly as printed
    assert [p.name for p in (root / "lightning_logs").iterdir()] == ["version_0"]
    assert_same_adapter(adapter(run_dir), adapter(reference))
    for tag in TAGS:
        assert scalars(run_dir, tag) == scalars(reference, tag), tag


@pytest.mark.slow
@pytest.mark.parametrize(
    "batch, accumulate, saved_step, position",
    [
        (4, 2, 3, {"epoch": 0, "batches": 6, "batches_per_epoch": 8}),  # 1st micro-batch of step 3: step 3 is finished first
        (7, 1, 8, {"epoch": 1, "batches": 0, "batches_per_epoch": 8}),  # the epoch's last step: the epoch is finished first
    ],
    ids=["mid-accumulation", "epoch-end"],
)
def test_ctrl_c_finishes_the_step_it_interrupts_saves_and_exits_130(batch, accumulate, saved_step, position, tmp_path, capsys):
    ctrl_c = ("--trainer.callbacks+=tests.reliability_helpers.SignalAtBatch", "--trainer.callbacks.batch", str(batch))
    args = demo_args(tmp_path, *SMALL, "--trainer.accumulate_grad_batches", str(accumulate), *ctrl_c)
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", *args)
    assert exit_info.value.code == 130
    run_dir = tmp_path / "lightning_logs" / "version_0"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    line = capsys.readouterr().err.strip().splitlines()[-1]
    epoch = position["epoch"] - (position["batches"] == 0)
    assert line.startswith(f"lima-lightning: interrupted by SIGINT at step {saved_step} (epoch {epoch}), {ckpt} written; resume: ")
    checkpoint = torch.load(ckpt, weights_only=True)
    assert checkpoint["global_step"] == saved_step and checkpoint["LIMADataModule"]["train_position"] == position
    assert (run_dir / "adapters" / "epoch=0").exists() == (position["batches"] == 0)  # the finished epoch's adapter
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers are given back


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path, capsys):
    twice = ("--trainer.callbacks+=tests.reliability_helpers.SignalAtBatch", "--trainer.callbacks.batch", "2")
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", *demo_args(tmp_path, *SMALL, *twice, "--trainer.callbacks.times", "2"))
    assert exit_info.value.code == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("lima-lightning: interrupted by SIGINT at step 2 (Ctrl-C twice: stopped at once, nothing saved); resume ")
    assert not (tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
def test_slurm_requeue_signal_saves_the_current_step_and_requeues_the_job(tmp_path, capsys, monkeypatch):
    """Under SLURM (`#SBATCH --signal=SIGUSR1@90`, `--requeue`) the requeue signal stops at a step boundary like
    SIGTERM, then `scontrol requeue`s the job, whose command's `--ckpt_path last` resumes it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol-calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "lima", "SLURM_NODELIST": "localhost"}
    for key, value in {**slurm, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    usr1 = ("--trainer.callbacks+=tests.reliability_helpers.SignalAtBatch", "--trainer.callbacks.batch", "3")
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", *demo_args(tmp_path / "runs", *SMALL, *usr1, "--trainer.callbacks.signum", str(int(signal.SIGUSR1))))
    assert exit_info.value.code == 128 + signal.SIGUSR1
    # Under SLURM, Lightning names the run dir after the job: the requeued job logs into the same one.
    ckpt = tmp_path / "runs" / "lightning_logs" / "version_4242" / "checkpoints" / "last.ckpt"
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(
        f"lima-lightning: interrupted by SIGUSR1 at step 4 (epoch 0), {ckpt} written; SLURM job 4242 requeued "
        "(its command must end with --ckpt_path last); resume: "
    )
    assert calls.read_text() == "requeue 4242\n"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4
    assert not list((tmp_path / "runs").glob("hpc_ckpt_*.ckpt"))  # Lightning's own mid-step save is not used
