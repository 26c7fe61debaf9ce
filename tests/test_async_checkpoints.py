"""`last.ckpt` written behind training: the file equals a synchronous write's, steps go on while it is written, a
tensor changed after the save does not reach it, a failed write is raised at the next save or the end of fit, and
preemption and the end of fit find the file on disk. A toy module in a real Trainer, on CPU."""

from __future__ import annotations

import errno
import shutil
import signal
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import quiet_cpu_trainer
from tests.reliability_helpers import SignalAtBatch
from tests.test_reliability_disk import FullAfter, leftovers, visible


class Toy(L.LightningModule):
    """A linear layer under dropout (so the saved RNG state matters) trained with AdamW: weights and moments change
    in place at every step."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 8)
        self.dropout = torch.nn.Dropout(0.1)

    def training_step(self, batch, batch_idx):
        return self.dropout(self.layer(batch[0])).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(64, 8, generator=torch.Generator().manual_seed(0))), batch_size=4)


def fit(dirpath: Path, *callbacks, async_writes: bool = True, max_steps: int = 8, every: int = 3, **trainer):
    from lima_lightning.checkpointing import AsyncAtomicCheckpointIO, ResumableCheckpoint

    L.seed_everything(0, verbose=False)
    model = Toy()
    checkpoint = ResumableCheckpoint(every_n_train_steps=every, dirpath=str(dirpath), async_writes=async_writes)
    run = quiet_cpu_trainer(
        max_steps=max_steps, enable_checkpointing=True, callbacks=[*callbacks, checkpoint], plugins=[AsyncAtomicCheckpointIO()], **trainer
    )
    run.fit(model)
    return run


class Writer:
    """Stands in for the file write (`AtomicCheckpointIO.save_checkpoint`): records each write, holds the first
    `hold` of them until `release` is set, or sleeps `delay` seconds before each."""

    def __init__(self, monkeypatch, hold: int = 0, delay: float = 0.0) -> None:
        from lima_lightning.checkpointing import AtomicCheckpointIO

        real = AtomicCheckpointIO.save_checkpoint
        self.release, self.entered = threading.Event(), threading.Event()
        self.steps: list[int] = []
        self.threads: set[str] = set()
        self.in_flight = self.most_in_flight = 0

        def save_checkpoint(io, checkpoint, path, storage_options=None):
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.threads.add(threading.current_thread().name)
            self.entered.set()
            if len(self.steps) < hold:
                self.release.wait(timeout=10)  # a synchronous write would stand training still here
            time.sleep(delay)
            self.steps.append(checkpoint["global_step"])
            try:
                real(io, checkpoint, path, storage_options)
            finally:
                self.in_flight -= 1

        monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save_checkpoint)


class CopyAt(L.Callback):
    def __init__(self, step: int, to: Path, writer: Writer | None = None) -> None:
        """At the start of step `step + 1`: note whether the file is still being written, release `writer`, wait
        for the file, and copy it to `to`."""
        self.step, self.to, self.writer = step, to, writer
        self.pending_at: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        from lima_lightning.checkpointing import wait_for_checkpoint

        path = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
        if self.writer is not None and self.writer.entered.is_set() and not self.writer.release.is_set() and not path.exists():
            self.pending_at.append(trainer.global_step)
        if trainer.global_step == self.step:
            if self.writer is not None:
                self.writer.release.set()
            wait_for_checkpoint(trainer)
            shutil.copy(path, self.to)


def assert_same(a, b, where="checkpoint") -> None:
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


# ----------------------------------------------------------------------------- what is written, while training goes on
def test_a_checkpoint_written_behind_training_equals_the_synchronous_one(tmp_path, monkeypatch):
    """The step-3 checkpoint is held in the writer until step 5 has run: steps 4 and 5 change the weights and AdamW's
    moments in place meanwhile, and the file still holds step 3's, exactly as a synchronous write does."""
    dirpath = tmp_path / "checkpoints"
    fit(dirpath, CopyAt(5, tmp_path / "sync-step3.ckpt"), async_writes=False)
    sync_final = load(dirpath / "last.ckpt")
    shutil.rmtree(dirpath)

    writer = Writer(monkeypatch, hold=1)
    copy = CopyAt(5, tmp_path / "async-step3.ckpt", writer)
    fit(dirpath, copy)
    assert copy.pending_at == [3, 4, 5]  # still being written after 3, 4 and 5 steps: steps 4 and 5 ran meanwhile
    assert writer.steps == [3, 6, 8] and writer.threads.isdisjoint({threading.main_thread().name})
    step3 = load(tmp_path / "async-step3.ckpt")
    assert step3["global_step"] == 3 and step3["optimizer_states"][0]["state"]  # weights, moments, RNG, loops
    assert_same(step3, load(tmp_path / "sync-step3.ckpt"))
    assert_same(load(dirpath / "last.ckpt"), sync_final)
    assert visible(dirpath) == ["last.ckpt"] and not leftovers(dirpath)


def test_a_tensor_changed_after_the_save_does_not_reach_the_file(tmp_path, monkeypatch):
    from lima_lightning.checkpointing import AsyncAtomicCheckpointIO

    writer = Writer(monkeypatch, hold=1)
    io, target = AsyncAtomicCheckpointIO(), tmp_path / "last.ckpt"
    weights = torch.zeros(1000)
    moments = {"exp_avg": torch.zeros(10), "step": torch.tensor(1.0)}
    shared = torch.arange(4.0)
    with io.writing_behind():
        io.save_checkpoint({"global_step": 1, "w": weights, "state": [moments], "a": shared, "b": shared}, target)
    assert not writer.release.is_set() and not target.exists()  # returned while the write is held
    weights.add_(1.0), moments["exp_avg"].add_(1.0), moments["step"].add_(1.0), shared.mul_(2)  # the next step
    moments["exp_avg_sq"] = torch.ones(10)
    writer.release.set()
    io.wait()
    saved = load(target)
    assert_same(saved, {"global_step": 1, "w": torch.zeros(1000), "state": [{"exp_avg": torch.zeros(10), "step": torch.tensor(1.0)}],
                        "a": torch.arange(4.0), "b": torch.arange(4.0)})  # fmt: skip
    assert saved["a"].untyped_storage().data_ptr() == saved["b"].untyped_storage().data_ptr()  # shared, stored once


def test_one_write_at_a_time_in_order_and_other_saves_stay_synchronous(tmp_path, monkeypatch):
    from lima_lightning.checkpointing import AsyncAtomicCheckpointIO

    writer = Writer(monkeypatch, delay=0.2)
    io, target = AsyncAtomicCheckpointIO(), tmp_path / "last.ckpt"
    for step in (1, 2, 3):
        with io.writing_behind():
            io.save_checkpoint({"global_step": step}, target)
    assert writer.most_in_flight == 1 and writer.steps == [1, 2]  # each save waited for the one before
    io.save_checkpoint({"global_step": 4}, target)  # not behind (trainer.save_checkpoint, another callback)
    assert writer.steps == [1, 2, 3, 4] and load(target)["global_step"] == 4
    io.teardown()


def test_a_logger_that_uploads_checkpoints_finds_each_file_written(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger

    class Uploads(CSVLogger):
        seen: list[int] = []

        def after_save_checkpoint(self, checkpoint_callback) -> None:
            self.seen.append(load(Path(checkpoint_callback.last_model_path))["global_step"])

    writer = Writer(monkeypatch, delay=0.2)
    fit(tmp_path / "checkpoints", logger=Uploads(tmp_path), max_steps=6)
    assert Uploads.seen == writer.steps == [3, 6] and writer.threads == {threading.main_thread().name}


def test_the_checkpoints_phase_is_the_snapshot_and_waits_are_counted_apart(tmp_path, monkeypatch):
    from lima_lightning import phases

    clock = phases.PhaseClock()
    monkeypatch.setattr(phases, "PHASES", clock)
    Writer(monkeypatch, delay=1.0)
    fit(tmp_path / "checkpoints", max_steps=6)  # saves at step 3 and 6: the second and the end of fit wait
    assert clock.seconds["checkpoints"] < 0.5 < 1.5 < clock.seconds["checkpoint wait"]


# ----------------------------------------------------------------------------- a failed write
def test_a_failed_write_is_raised_once_at_the_next_save_and_the_previous_file_is_intact(tmp_path, monkeypatch):
    from lima_lightning.checkpointing import AsyncAtomicCheckpointIO
    from lima_lightning.io import WriteError

    io, target = AsyncAtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.zeros(1000)}, target)
    with monkeypatch.context() as patched:
        FullAfter(patched, "last.ckpt", after=700)
        with io.writing_behind():
            io.save_checkpoint({"global_step": 2, "w": torch.ones(1000)}, target)  # returns: the disk fills behind it
        io.finish()
    with pytest.raises(WriteError) as error, io.writing_behind():
        io.save_checkpoint({"global_step": 3, "w": torch.ones(1000)}, target)
    assert (error.value.errno, error.value.filename, error.value.existed) == (errno.ENOSPC, str(target), True)
    assert load(target)["global_step"] == 1 and visible(tmp_path) == ["last.ckpt"] and not leftovers(tmp_path)
    with io.writing_behind():
        io.save_checkpoint({"global_step": 3}, target)  # raised once: the next save goes ahead
    io.teardown()
    assert load(target)["global_step"] == 3


def test_a_failed_last_write_is_raised_at_the_end_of_fit(tmp_path, monkeypatch):
    from lima_lightning.io import WriteError

    dirpath = tmp_path / "checkpoints"
    FullAfter(monkeypatch, "last.ckpt", code=errno.EDQUOT, after=0)
    with pytest.raises(WriteError) as error:
        fit(dirpath, every=0, max_steps=4)  # the one write is the epoch end's, the last thing before teardown
    assert (error.value.errno, error.value.filename) == (errno.EDQUOT, str(dirpath / "last.ckpt"))
    assert not dirpath.exists() or (not visible(dirpath) and not leftovers(dirpath))


# ----------------------------------------------------------------------------- what must find the file waits for it
def test_the_end_of_fit_waits_for_the_file(tmp_path, monkeypatch):
    Writer(monkeypatch, delay=1.0)
    fit(tmp_path / "checkpoints", max_steps=4)
    assert load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 4  # the epoch end's, written behind


class SeenAtException(L.Callback):
    """What `last.ckpt` holds when the exception reaches the callbacks (before the strategy's teardown)."""

    step: int | None = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        path = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
        SeenAtException.step = load(path)["global_step"] if path.exists() else None


def test_a_preemption_stop_finds_its_checkpoint_written_before_it_says_so(tmp_path, monkeypatch):
    from lima_lightning.failures import Preempted

    writer = Writer(monkeypatch, delay=1.0)
    with pytest.raises(Preempted) as stopped:
        fit(tmp_path / "checkpoints", SignalAtBatch(5, signal.SIGINT), SeenAtException(), every=0, max_steps=12)
    assert stopped.value.step == 6 and stopped.value.checkpoint == tmp_path / "checkpoints" / "last.ckpt"
    assert SeenAtException.step == 6 and writer.steps == [6] and writer.threads != {threading.main_thread().name}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_exception_finds_the_file_written_and_keeps_its_own_error(tmp_path, monkeypatch, capsys):
    """A write in flight when the run fails is on disk before the loggers close (`finalize("failed")`, where one may
    upload it); had it failed too, that is one more line, and the run's own error is still what ends it."""
    from lightning.pytorch.loggers import CSVLogger

    class FailsAt(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 4:
                raise ValueError("a bug at step 4")

    class SeenAtFinalize(CSVLogger):
        step: int | None = None

        def finalize(self, status: str) -> None:
            path = tmp_path / "ok" / "last.ckpt"
            SeenAtFinalize.step = load(path)["global_step"] if path.exists() else None

    Writer(monkeypatch, delay=1.0)
    with pytest.raises(ValueError, match="a bug at step 4"):
        fit(tmp_path / "ok", FailsAt(), every=3, logger=SeenAtFinalize(tmp_path))
    assert SeenAtFinalize.step == 3

    FullAfter(monkeypatch, "last.ckpt", after=0)
    with pytest.raises(ValueError, match="a bug at step 4"):
        fit(tmp_path / "full", FailsAt(), every=3)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"lima-lightning: error: cannot write {tmp_path / 'full' / 'last.ckpt'}: no space left on the device")
