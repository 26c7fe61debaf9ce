"""Atomic saves: a crash or kill while writing an adapter or a checkpoint leaves the previous good one in place."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO


@pytest.fixture(scope="module")
def module(tiny_dir):
    from lima_lightning.module import LIMALoRAModule

    module = LIMALoRAModule(base_model="tiny", quantization="none", lora_r=4, gradient_checkpointing=False)
    module.configure_model()
    return module


def visible(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize("dies_by", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_a_crash_inside_an_adapter_save_keeps_the_previous_adapter(module, tmp_path, monkeypatch, dies_by):
    from lima_lightning.callbacks import save_adapter

    target = tmp_path / "adapters" / "final"
    save_adapter(module, target)
    before = load_file(target / "adapter_model.safetensors")
    real_save_pretrained = module.model.save_pretrained

    def writes_half_then_dies(directory, **kwargs):
        real_save_pretrained(directory, **kwargs)
        weights = Path(directory) / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])  # a torn write
        raise dies_by

    monkeypatch.setattr(module.model, "save_pretrained", writes_half_then_dies)
    with torch.no_grad():
        next(p for p in module.model.parameters() if p.requires_grad).add_(1.0)
    with pytest.raises(type(dies_by)):
        save_adapter(module, target)
    assert visible(target.parent) == ["final"] and not list(target.parent.iterdir())[1:]  # the staging dir is gone
    after = load_file(target / "adapter_model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_kill_inside_an_adapter_save_leaves_only_a_dot_prefixed_staging_dir(module, tmp_path, monkeypatch):
    from lima_lightning.callbacks import save_adapter

    target = tmp_path / "adapters" / "epoch=0"
    save_adapter(module, target)

    def killed(directory, **kwargs):
        (Path(directory) / "adapter_config.json").write_text("{")
        raise SystemExit(-9)

    monkeypatch.setattr(module.model, "save_pretrained", killed)
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)  # a killed process cleans nothing up
    with pytest.raises(SystemExit):
        save_adapter(module, target)
    leftovers = [p.name for p in target.parent.iterdir() if p.name != "epoch=0"]
    assert leftovers and all(name.startswith(".epoch=0.tmp-") for name in leftovers)
    assert load_file(target / "adapter_model.safetensors")


def cli_checkpoint_io(root: Path):
    """The CheckpointIO of the Trainer that `lima-lightning fit` builds (parsed, nothing loaded or run)."""
    from lima_lightning.cli import LimaCLI
    from lima_lightning.data.datamodule import LIMADataModule
    from lima_lightning.module import LIMALoRAModule

    args = ["--config", str(REPO / "configs" / "demo.yaml"), "--trainer.default_root_dir", str(root)]
    cli = LimaCLI(
        LIMALoRAModule, LIMADataModule, args=args, run=False, auto_configure_optimizers=False, parser_kwargs={"default_env": False}
    )
    return cli.trainer.strategy.checkpoint_io


def writing(io, how: str):
    """`how` a save goes: "synchronous", or "behind" training (last.ckpt's way: `io.wait()` is where it ends)."""
    return io.writing_behind() if how == "behind" else contextlib.nullcontext()


def test_the_cli_writes_last_ckpt_behind_training_by_default(tmp_path):
    from lima_lightning.checkpointing import AsyncAtomicCheckpointIO, AtomicCheckpointIO

    io = cli_checkpoint_io(tmp_path)
    assert type(io) is AsyncAtomicCheckpointIO and type(io.checkpoint_io) is AtomicCheckpointIO


@pytest.mark.parametrize("how", ["synchronous", "behind"])
def test_a_kill_while_a_checkpoint_is_written_keeps_the_previous_one_even_across_filesystems(tmp_path, monkeypatch, how):
    """Lightning's TorchCheckpointIO stages the file in the system temp dir and `shutil.move`s it: across
    filesystems (a local /tmp, a network run dir) that is a copy, and a kill mid-copy leaves half a last.ckpt."""
    io = cli_checkpoint_io(tmp_path)
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "weights": torch.arange(10_000.0)}, target)

    real_rename, real_replace = os.rename, os.replace

    def same_filesystem_only(real):
        def rename(src, dst, *args, **kwargs):
            if Path(src).resolve().parent != Path(dst).resolve().parent:
                raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
            return real(src, dst, *args, **kwargs)

        return rename

    def copy_killed_halfway(src, dst, *args, **kwargs):
        Path(dst).write_bytes(Path(src).read_bytes()[:1000])
        raise KeyboardInterrupt  # SIGKILL mid-copy: nothing after this line runs

    monkeypatch.setattr(os, "rename", same_filesystem_only(real_rename))
    monkeypatch.setattr(os, "replace", same_filesystem_only(real_replace))
    monkeypatch.setattr(shutil, "copy2", copy_killed_halfway)
    monkeypatch.setattr(shutil, "copyfile", copy_killed_halfway)
    try:
        with writing(io, how):
            io.save_checkpoint({"global_step": 2, "weights": torch.arange(10_000.0)}, target)
        io.wait()
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert io.load_checkpoint(target)["global_step"] in (1, 2)  # the old one or the new one, whole
    assert visible(target.parent) == ["last.ckpt"]


@pytest.mark.parametrize("how", ["synchronous", "behind"])
def test_a_failing_checkpoint_write_removes_its_temporary_file(tmp_path, monkeypatch, how):
    from lima_lightning.checkpointing import AsyncAtomicCheckpointIO

    io = AsyncAtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, target)

    def torn(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(OSError):
        with writing(io, how):
            io.save_checkpoint({"global_step": 2}, target)
        io.wait()
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"] and io.load_checkpoint(target)["global_step"] == 1
