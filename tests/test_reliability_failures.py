"""What a user can meet, each as one line and an exit status (lima_lightning/failures.py), never a traceback:
the hub out of reach, a gated or unknown model, a GPU config without a GPU, CUDA out of memory in a step, an
unknown command, resuming a finished run; and a run that fails before training leaves no run dir behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, demo_args, run_cli
from tests.reliability_helpers import CUDA_OOM_TEXT

SHORT = ("--data.synthetic_size", "64", "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1", "--samples.num_prompts", "0")
ENDS_ONLY = ("--checkpoint.every_n_train_steps", "0")
HUB_MODEL = "meta-llama/Llama-2-7b-hf"  # the default base model


def last_err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err), err
    return err[-1]


@pytest.fixture
def fresh_hub_probe():
    from lima_lightning import hub

    hub.offline_reason.cache_clear()
    yield hub
    hub.offline_reason.cache_clear()


# ----------------------------------------------------------------------------- the hub
# Runs `lima-lightning ARGS` as the console script does, and prints how long it took after the imports: what the
# hub path costs (importing torch and Lightning takes 5-20 s on a loaded 2-core machine, whatever the network).
TIMED_MAIN = (
    "import sys, time; from lima_lightning.cli import main; t = time.monotonic(); sys.argv = ['lima-lightning', *sys.argv[1:]]\n"
    "try:\n    main()\nfinally:\n    print(f'after imports: {time.monotonic() - t:.1f} s', flush=True)"
)


def timed_cli(args: list[str], env: dict) -> subprocess.Popen:
    environment = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")}
    return subprocess.Popen(
        [sys.executable, "-c", TIMED_MAIN, *args],
        cwd=REPO,
        env={**environment, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_hub_out_of_reach_is_one_line_within_seconds(tmp_path, tiny_dir, fresh_hub_probe):
    """No network (the default endpoint, where this machine has none; a refused port; HF_HUB_OFFLINE=1), an empty HF
    cache, the default base model or dataset: one line naming the cause, the cache, a local path and HF_HUB_OFFLINE,
    in seconds (the hub client alone retried for ~53 s), exit status 1."""
    cache = {"HF_HOME": str(tmp_path / "hf-home")}

    def fit(root: str) -> list[str]:  # the two fits run at once, each in its own root (a shared root: the tidy-up test below)
        return ["fit", *demo_args(tmp_path / root, "--model.base_model", HUB_MODEL)]

    refused = {"HF_ENDPOINT": "http://127.0.0.1:9"}
    cases = {
        # name: (args, env, exit status, what the line says after "lima-lightning: error: ")
        "refused": (fit("refused"), refused, 1, f"model.base_model={HUB_MODEL}: the hub (http://127.0.0.1:9) is unreachable ("),
        "offline": (
            fit("offline"),
            {"HF_HUB_OFFLINE": "1"},
            1,
            f"model.base_model={HUB_MODEL}: HF_HUB_OFFLINE=1 is set, and the model is not in",
        ),
        "stats": (["stats"], refused, 1, "--dataset=GAIR/lima: the hub (http://127.0.0.1:9) is unreachable"),
    }
    if fresh_hub_probe._probe("https://huggingface.co", 3.0) is not None:  # this machine has no network: the real thing too
        says = f"--tokenizer={HUB_MODEL}: the hub (https://huggingface.co) "
        cases["default endpoint"] = (["stats", "--dataset", "synthetic"], {}, 1, says)
    running = {name: timed_cli(args, {**cache, **env}) for name, (args, env, _, _) in list(cases.items())[:2]}
    pending = list(cases)[2:]
    while running:
        name, process = next(iter(running.items()))
        out, err = running.pop(name).communicate(timeout=300)
        if pending:
            later = pending.pop(0)
            running[later] = timed_cli(cases[later][0], {**cache, **cases[later][1]})
        _, _, status, says = cases[name]
        assert process.returncode == status, (name, err[-3000:])
        assert len(err.splitlines()) == 1 and err.startswith(f"lima-lightning: error: {says}"), (name, err)
        assert f"HF cache ({tmp_path / 'hf-home' / 'hub'})" in err and "HF_HUB_OFFLINE" in err and "local" in err, (name, err)
        after_imports = float(out.strip().splitlines()[-1].split()[-2])
        # The probe waits at most 3 s; the rest is the CLI's own start, which reached 12 s on a 2-core CI machine
        # running other tests beside it. Without the probe the hub client retries for ~53 s, well past this bound.
        assert after_imports < 30, (name, out)


@pytest.mark.parametrize(
    "raised, says",
    [
        ("GatedRepoError", f"model.base_model={HUB_MODEL}: the model is gated; accept its terms on huggingface.co/{HUB_MODEL} and set"),
        ("RepositoryNotFoundError", f"model.base_model={HUB_MODEL}: no such model on the hub (or it is gated): set HF_TOKEN"),
    ],
)
def test_gated_or_unknown_model_is_one_line(raised, says, tmp_path, capsys, monkeypatch, fresh_hub_probe):
    """The hub answers, and refuses: simulated where the hub client raises, so transformers wraps it as it would."""
    import httpx2
    import huggingface_hub.errors
    import transformers.utils.hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(fresh_hub_probe, "_offline_mode", lambda: False)
    monkeypatch.setattr(fresh_hub_probe, "_probe", lambda url, timeout: None)  # the hub answers
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    response = httpx2.Response(401 if raised == "GatedRepoError" else 404, request=httpx2.Request("GET", "https://huggingface.co/x"))

    def refuse(*args, **kwargs):
        raise getattr(huggingface_hub.errors, raised)(f"{raised} for {HUB_MODEL}", response=response)

    monkeypatch.setattr(transformers.utils.hub, "hf_hub_download", refuse)
    monkeypatch.setattr(transformers.utils.hub, "snapshot_download", refuse)
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", *demo_args(tmp_path, "--model.base_model", HUB_MODEL))
    assert exit_info.value.code == 2
    assert last_err_line(capsys).startswith(f"lima-lightning: error: {says}")


def test_a_hub_that_answers_late_counts_as_out_of_reach(monkeypatch, fresh_hub_probe):
    """The probe gives up after its timeout, name lookup included (a thread: a hanging lookup ignores timeouts)."""
    import huggingface_hub.utils

    class Hanging:
        def head(self, url, timeout):
            time.sleep(30)

    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: Hanging())
    started = time.monotonic()
    assert fresh_hub_probe._probe("https://huggingface.co", 0.5) == "did not answer within 0.5 s"
    assert time.monotonic() - started < 2


# ----------------------------------------------------------------------------- a GPU config without a GPU
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("config", ["demo-on-gpu", "llama2-7b-qlora.yaml"])
def test_gpu_config_without_a_gpu_is_one_line_with_the_fix(config, tmp_path, capsys):
    if config == "demo-on-gpu":
        args = demo_args(tmp_path, "--trainer.accelerator", "gpu")
    else:
        args = ["--config", str(REPO / "configs" / config), "--trainer.default_root_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", *args)
    assert exit_info.value.code == 2
    assert last_err_line(capsys) == (
        "lima-lightning: error: trainer.accelerator=gpu: no CUDA GPU found (No supported gpu backend found!); on this machine use "
        "--trainer.accelerator cpu --trainer.precision 32-true (slow beyond a tiny model), or --config configs/demo.yaml"
    )
    assert not (tmp_path / "lightning_logs").exists()


# ----------------------------------------------------------------------------- unknown command
@pytest.mark.parametrize("typed, nearest", [("fitt", "fit"), ("stat", "stats"), ("predcit", "predict"), ("xyzzy", None)])
def test_unknown_command_is_one_line_with_the_nearest_and_the_list(typed, nearest, capsys):
    from lima_lightning.cli import COMMANDS, main

    with pytest.raises(SystemExit) as exit_info:
        main([typed, "--config", "x.yaml"])
    assert exit_info.value.code == 2
    line = last_err_line(capsys)
    guess = f"did you mean `lima-lightning {nearest}`? " if nearest else ""
    commands = ", ".join(COMMANDS)
    assert commands.startswith("fit, validate, test, predict, report, export, stats, inspect")
    help_hint = "(`lima-lightning COMMAND --help` for each)"
    assert line == f"lima-lightning: error: unknown command '{typed}'; {guess}commands: {commands} {help_hint}"


# ----------------------------------------------------------------------------- CUDA out of memory
def lora_weights(module) -> dict[str, torch.Tensor]:
    """The trainable weights under the names PEFT saves them with."""
    return {n.removeprefix("model.").replace(".default", ""): p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_cuda_oom_in_a_step_is_one_line_with_the_plan_the_fix_and_the_last_good_adapter(tmp_path, capsys, monkeypatch):
    """Forward at step 3 runs out of memory: the weights are those after step 3, and they are what is saved."""
    from lima_lightning.module import LIMALoRAModule

    weights_before_oom: dict[str, torch.Tensor] = {}
    real_masked_nll = LIMALoRAModule.masked_nll

    def runs_out_at_step_3(self, batch, per_row=False):
        if self.trainer.training and self.global_step == 3:
            weights_before_oom.update(lora_weights(self))
            raise torch.cuda.OutOfMemoryError(CUDA_OOM_TEXT)
        return real_masked_nll(self, batch, per_row)

    monkeypatch.setattr(LIMALoRAModule, "masked_nll", runs_out_at_step_3)
    plan = ("--trainer.callbacks+=tests.reliability_helpers.PlannedMemory",)
    grouped = ("--data.batching", "length_grouped", "--data.max_tokens_per_batch", "1024")
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", *demo_args(tmp_path, *SHORT, *grouped, *plan))
    assert exit_info.value.code == 1
    adapter = tmp_path / "lightning_logs" / "version_0" / "adapters" / "last-good"
    # (23.5 / 1.15 - 1 - 6 - 1) GiB / 2 MiB per token = 6366 tokens would fit; half of 1024 is smaller still.
    assert last_err_line(capsys) == (
        "lima-lightning: error: CUDA out of memory at step 3 (epoch 0): tried to allocate 2.00 GiB, 1.06 GiB free of 23.53 GiB, "
        "21.80 GiB allocated by PyTorch; planned peak 23.0 GiB for the largest 8192-token micro-batch of 23.5 GiB available; "
        "settings that lower it: --model.gradient_checkpointing true, --data.max_tokens_per_batch 512, --model.loss_chunk_size 1024, "
        f"--config configs/llama2-7b-qlora-lowmem.yaml (5.2 GiB peak for 7B); the last good adapter (after step 3) is in {adapter}"
    )
    saved = load_file(adapter / "adapter_model.safetensors")
    assert saved.keys() == weights_before_oom.keys()
    assert all(torch.equal(saved[name], weights_before_oom[name]) for name in saved)


@pytest.mark.slow
def test_cuda_oom_inside_the_optimizer_update_saves_no_adapter_and_points_at_the_checkpoint(tmp_path, capsys, monkeypatch):
    """An update that ran out half-way (one tensor changed, the rest not) is not passed off as a good adapter."""
    real_step = torch.optim.AdamW.step
    calls = []

    def half_applied_at_step_4(self, closure=None):
        calls.append(1)
        if len(calls) < 4:
            return real_step(self, closure)
        closure()
        with torch.no_grad():
            self.param_groups[0]["params"][0].add_(1.0)
        raise torch.cuda.OutOfMemoryError(CUDA_OOM_TEXT)

    monkeypatch.setattr(torch.optim.AdamW, "step", half_applied_at_step_4)
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", *demo_args(tmp_path, *SHORT, "--checkpoint.every_n_train_steps", "2"))
    assert exit_info.value.code == 1
    run = tmp_path / "lightning_logs" / "version_0"
    assert last_err_line(capsys).endswith(
        f"--config configs/llama2-7b-qlora-lowmem.yaml (5.2 GiB peak for 7B); it ran out inside the optimizer update of step 4, "
        f"so no adapter was saved; {run / 'checkpoints' / 'last.ckpt'} resumes"
    )
    assert not (run / "adapters" / "last-good").exists()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


def test_oom_settings_follow_the_run(tiny_dir):
    """Checkpointing already on is not suggested again; padded batches get a smaller batch_size."""
    from types import SimpleNamespace

    from lima_lightning.failures import fitting_settings

    module = SimpleNamespace(
        hparams=SimpleNamespace(gradient_checkpointing=True, loss_chunk_size=512, offload_checkpoints=False),
        speed_settings={"gradient_checkpointing": True},
    )
    padded = SimpleNamespace(hparams={"batching": "padded", "batch_size": 4})
    lowmem = "--config configs/llama2-7b-qlora-lowmem.yaml (5.2 GiB peak for 7B)"
    assert fitting_settings(module, padded) == ["--data.batch_size 2", "--model.offload_checkpoints true", lowmem]
    module.hparams.offload_checkpoints = True  # already offloaded: not suggested again
    assert fitting_settings(module, padded) == ["--data.batch_size 2", lowmem]
    packed = SimpleNamespace(hparams={"batching": "packed", "max_tokens_per_batch": 2048, "max_seq_length": 2048})
    assert fitting_settings(module, packed)[0] == "--data.max_seq_length 1024 --data.max_tokens_per_batch 1024"


# ----------------------------------------------------------------------------- finished runs, failed runs
@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_dir) -> Path:
    """A short run trained to its end (1 epoch, 4 steps)."""
    root = tmp_path_factory.mktemp("finished")
    run_cli("fit", *demo_args(root, *SHORT, *ENDS_ONLY))
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    "more, says",
    [
        ((), "is finished (epoch 1 of 1); to train longer raise --trainer.max_epochs"),
        (("--trainer.max_steps", "4", "--trainer.max_epochs", "5"), "is finished (step 4 of 4); to train longer raise --trainer.max_steps"),
    ],
)
def test_resuming_a_finished_run_says_so_and_trains_nothing(finished, more, says, capsys):
    run = finished / "lightning_logs" / "version_0"
    before = sorted(p.name for p in run.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", *demo_args(finished, *SHORT, *ENDS_ONLY, *more), "--ckpt_path", "last")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"lima-lightning: the run in {run} {says}"
    assert sorted(p.name for p in run.rglob("*")) == before and [p.name for p in run.parent.iterdir()] == ["version_0"]


@pytest.mark.slow
def test_a_resumed_run_that_fails_keeps_its_run_dir(finished, capsys):
    run = finished / "lightning_logs" / "version_0"
    with pytest.raises(SystemExit) as exit_info:  # another batch size: the checkpoint's data position does not fit
        args = demo_args(finished, *SHORT, *ENDS_ONLY, "--trainer.max_epochs", "2", "--data.batch_size", "8")
        run_cli("fit", *args, "--ckpt_path", "last")
    assert exit_info.value.code == 2
    assert "training batches per epoch" in last_err_line(capsys)
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "adapters" / "final").is_dir()


@pytest.mark.parametrize(
    "failure, says",
    [
        (("--data.dataset", "BAD_FILE"), "invalid JSON"),  # in the data module's setup, after the logger made its dir
        (("--model.adapter_path", "NO_ADAPTER"), "no adapter_config.json there"),  # loading the model, after the config was saved
    ],
)
def test_a_run_that_fails_before_training_leaves_no_run_dir(failure, says, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": ["hi"\n')
    root = tmp_path / "root"
    earlier = root / "lightning_logs" / "version_0"  # a finished earlier run's dir is left alone
    earlier.mkdir(parents=True)
    (earlier / "config.yaml").write_text("x: 1\n")
    (earlier / "adapters").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        paths = {"BAD_FILE": str(bad), "NO_ADAPTER": str(tmp_path)}
        run_cli("fit", *demo_args(root, *(paths.get(a, a) for a in failure)))
    assert exit_info.value.code == 2
    assert says in last_err_line(capsys)
    assert [p.name for p in (root / "lightning_logs").iterdir()] == ["version_0"]
    assert (earlier / "adapters").is_dir()


def test_only_a_run_dir_without_anything_of_value_counts_as_unused(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from lima_lightning.failures import unused_run_dir

    run = tmp_path / "version_0"
    run.mkdir()
    (run / "config.yaml").write_text("x: 1\n")
    SummaryWriter(str(run)).close()  # an events file with its header only
    assert unused_run_dir(run)
    with SummaryWriter(str(run)) as writer:
        writer.add_scalar("train/loss", 1.0, 0)
    assert not unused_run_dir(run)
    for kept in ("checkpoints", "adapters", "samples.jsonl"):
        other = tmp_path / kept
        other.mkdir()
        (other / kept).mkdir() if "." not in kept else (other / kept).write_text("{}\n")
        assert not unused_run_dir(other), kept


def test_a_failed_runs_tidy_up_leaves_lightning_logs_to_a_run_starting_beside_it(tmp_path):
    """Two runs started together in one root: the one that fails early removes its own version dir only. Removing an
    emptied `lightning_logs` as well crashed the other run with a traceback when it was creating its version dir."""
    from types import SimpleNamespace

    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.tensorboard import SummaryWriter

    from lima_lightning.failures import remove_unused_run_dir

    logger = TensorBoardLogger(str(tmp_path), version=0)
    SummaryWriter(logger.log_dir).close()  # the failed run's dir: an events file, nothing of value
    trainer = SimpleNamespace(loggers=[logger], is_global_zero=True)
    assert remove_unused_run_dir(trainer) == tmp_path / "lightning_logs" / "version_0"
    assert (tmp_path / "lightning_logs").is_dir() and not any((tmp_path / "lightning_logs").iterdir())
