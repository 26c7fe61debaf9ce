"""Checkpoints a killed run can resume from exactly, written atomically and read without unpickling code.

- `AtomicCheckpointIO`: Lightning's TorchCheckpointIO writes through fsspec, which stages the file in
  the system temp dir and then `shutil.move`s it: a copy, not a rename, when /tmp is another
  filesystem (usual on clusters), so a kill mid-copy leaves a truncated `last.ckpt`. Here the file is
  staged next to its target, fsync'ed and renamed. Loading is always `weights_only=True`.
- `AsyncAtomicCheckpointIO` (the CLI's): `ResumableCheckpoint`'s saves return once every tensor of the checkpoint
  is copied to host memory (the next optimizer step changes the live ones in place); the file is written the atomic
  way above in one background thread while training goes on (7B r=64: ~2 GB, seconds per write). One write at a
  time, in order: a save first waits for the previous one, and a failed write (a full disk) is raised, as its
  one line, at the next save or at the end of fit. What must see the file waits for it first: the end of fit, a
  preemption stop (before its line says the file is written), an exception, an OOM's "last.ckpt resumes". Other
  saves (`trainer.save_checkpoint`, a user's ModelCheckpoint) and a logger that uploads checkpoint files stay
  synchronous; `checkpoint.async_writes: false` makes every write synchronous.
- `ResumableCheckpoint`: ModelCheckpoint every N optimizer steps plus `last.ckpt`, which also saves
  the RNG states (LoRA dropout) and flushes the loggers first, so the resumed run is bit-identical on CPU.
- `check_resume_config` / `check_adapter_fits`: a checkpoint holds only the LoRA weights and is loaded
  with `strict=False` onto a freshly loaded base; these refuse one trained on another base model or
  with another adapter layout, naming the options, instead of loading what happens to match.
- `resolve_resume`: `--ckpt_path last` finds the newest `last.ckpt` of the run dirs under
  `trainer.default_root_dir`, and the resumed run logs into that same run dir; `check_not_finished` stops a
  resume of a run that has nothing left to train, in one line.
- Preemption (`ResumableCheckpoint`, during fit): on SIGTERM or Ctrl-C (and, under SLURM with auto-requeue, its
  requeue signal, SIGUSR1) the current optimizer step is finished, `last.ckpt` is written for the position after
  it, exactly as the periodic checkpoint would be, and the run stops with `failures.Preempted` (one line naming
  the command that resumes; exit status 128 + the signal). At an epoch's last step the epoch is finished first
  (validation, its adapter, its checkpoint). A second Ctrl-C stops at once, without a new checkpoint.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future
from concurrent.futures import wait as wait_for_futures
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning_utilities.core.apply_func import apply_to_collection

from lima_lightning import runs
from lima_lightning.errors import UserError
from lima_lightning.failures import PROG, Preempted, RunFinished, write_error_line
from lima_lightning.io import WriteError, write_file_atomically

RNG_KEY = "lima_rng_states"
# What `--ckpt_path` must match for a resume; shapes are checked too (they catch most of these anyway).
ADAPTER_HPARAMS = ("base_model", "lora_r", "lora_alpha", "target_modules")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write `<dir>/.<name>.tmp-<pid>`, fsync, rename over `<dir>/<name>`; read with `weights_only=True`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        # A full disk part-way through is a WriteError naming the path (torch itself says only "unexpected pos").
        write_file_atomically(Path(path), lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        # Always weights_only, whatever the caller asks: a checkpoint is data, and unpickling runs code.
        return load_checkpoint_file(path, map_location or "cpu")


def host_snapshot(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint with every tensor copied to host memory and every container rebuilt: what it holds now.

    `.to("cpu", copy=True)`, never a clone on the device (2 GB more GPU memory at a 24 GiB budget is an OOM risk);
    a tensor found twice is copied once, so the file stores it once, as a synchronous save would. The other
    values a weights_only checkpoint may hold (numbers, strings, None) cannot change in place.
    """
    copies: dict[int, torch.Tensor] = {}

    def to_host(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in copies:
            copies[id(tensor)] = tensor.detach().to("cpu", copy=True)
        return copies[id(tensor)]

    return apply_to_collection(checkpoint, torch.Tensor, to_host)


class AsyncAtomicCheckpointIO(AsyncCheckpointIO):
    """`AtomicCheckpointIO`'s writes in one background thread, for the saves made inside `writing_behind()`.

    Lightning's AsyncCheckpointIO (whose executor this reuses) clones the tensors on their device, queues any number
    of snapshots behind a slow write, raises a failed write only after the next one is queued, and again at every
    teardown. Here: a host copy, one write in flight (a save waits for the previous one), a failure raised once.
    """

    def __init__(self, checkpoint_io: TorchCheckpointIO | None = None) -> None:
        super().__init__(checkpoint_io if checkpoint_io is not None else AtomicCheckpointIO())
        self._in_flight: Future | None = None
        self._behind = False

    @contextmanager
    def writing_behind(self):
        """Saves made inside return once their snapshot is taken; the file is written in the background."""
        before, self._behind = self._behind, True
        try:
            yield
        finally:
            self._behind = before

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        self.wait()  # in order, one at a time; the previous write's failure surfaces here
        if not self._behind:
            self.checkpoint_io.save_checkpoint(checkpoint, path, storage_options)
            return
        snapshot = host_snapshot(checkpoint)
        self._ensure_setup()
        self._in_flight = self._executor.submit(self.checkpoint_io.save_checkpoint, snapshot, path, storage_options)

    def finish(self) -> None:
        """Block until the write in flight, if any, is on disk or has failed (its error is kept for `wait`)."""
        future = self._in_flight
        if future is None:
            return
        if not future.done():
            from lima_lightning.phases import PHASES

            with PHASES.timed("checkpoint wait"):  # training stands still for the write: counted, not hidden
                wait_for_futures([future])
        self._in_flight = None  # only once done: a Ctrl-C in the wait leaves it for the next one (teardown)
        self._error = future.exception() or self._error

    def take_error(self) -> BaseException | None:
        """`finish`, then the failed write's error, if any, which is then no longer raised anywhere else."""
        self.finish()
        error, self._error = self._error, None
        return error

    def wait(self) -> None:
        """`finish`, then raise the failed write's error (once)."""
        error = self.take_error()
        if error is not None:
            raise error

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.finish()
        return super().load_checkpoint(*args, **kwargs)

    def remove_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        self.finish()
        super().remove_checkpoint(*args, **kwargs)

    def teardown(self) -> None:
        """The end of fit (Lightning's strategy teardown, also after an exception): the file is on disk first."""
        try:
            self.wait()
        finally:
            super().teardown()  # shuts the thread down; nothing left to raise there


def finish_checkpoint_write(trainer) -> None:
    """Block until the trainer's `last.ckpt` in flight is on disk (a failure is kept for the next save or the end)."""
    checkpoint_io = trainer.strategy.checkpoint_io
    if isinstance(checkpoint_io, AsyncAtomicCheckpointIO):
        checkpoint_io.finish()


def wait_for_checkpoint(trainer) -> None:
    """Block until the trainer's `last.ckpt` in flight is on disk; raise its write's failure."""
    checkpoint_io = trainer.strategy.checkpoint_io
    if isinstance(checkpoint_io, AsyncAtomicCheckpointIO):
        checkpoint_io.wait()


def reads_checkpoint_files(logger) -> bool:
    """Whether a logger may read the file as soon as it is saved (W&B, MLflow, Neptune upload checkpoints)."""
    from lightning.pytorch.loggers import Logger, TensorBoardLogger

    return type(logger).after_save_checkpoint not in (Logger.after_save_checkpoint, TensorBoardLogger.after_save_checkpoint)


def load_checkpoint_file(path, map_location="cpu", mmap: bool = False) -> dict[str, Any]:
    """torch.load with weights_only=True; a missing, truncated or code-carrying file is a one-line UserError."""
    if not Path(path).is_file():
        raise UserError(f"--ckpt_path={path}: no such file; pass `last` or a <run dir>/checkpoints/*.ckpt file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL (\S+)", str(e))
        raise UserError(
            f"--ckpt_path={path}: refused: the file holds a pickled Python object ({refused.group(1) if refused else 'unknown'}), "
            "not only tensors and plain values; checkpoints are loaded with weights_only=True, so no code in them runs"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        reason = str(e).splitlines()[0][:120] if str(e) else ""
        raise UserError(f"--ckpt_path={path}: not a readable checkpoint ({type(e).__name__}: {reason}); is it truncated?") from None


def rng_states() -> dict[str, Any]:
    """Every RNG a training step may draw from, as plain values and tensors (loadable with weights_only)."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        states["numpy"] = (name, keys.tolist(), int(pos), int(has_gauss), float(cached))
    except ImportError:
        pass
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        import numpy as np

        name, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


class ResumableCheckpoint(ModelCheckpoint):
    def __init__(
        self, every_n_train_steps: int = 50, save_last: bool = True, dirpath: str | None = None, async_writes: bool = True
    ) -> None:
        """
        Args:
            every_n_train_steps: Save `last.ckpt` every this many optimizer steps (and at each epoch end),
                overwriting the previous one atomically; 0: only at epoch ends. A kill loses at most this
                many steps. The file holds the LoRA weights, optimizer, LR scheduler, loop, data position
                and RNG states (~3x the adapter size), never the frozen base.
            save_last: Write `last.ckpt` (what `--ckpt_path last` resumes from); false: no checkpoints at all.
            dirpath: Where checkpoints go; default `<run dir>/checkpoints`, where `--ckpt_path last` looks
                (elsewhere, pass the file itself to `--ckpt_path`).
            async_writes: Training goes on while `last.ckpt` is written: a save copies the checkpoint's tensors to
                host memory and a background thread writes the file (the same file, atomically). False: training
                waits for each write, and no host copy (~3x the adapter, 2 GB for 7B r=64) is held meanwhile.
        """
        # save_top_k=0: no metric to rank by; one rolling `last.ckpt` per run dir (no last-v1.ckpt).
        super().__init__(
            dirpath=dirpath, save_last=save_last, save_top_k=0, every_n_train_steps=every_n_train_steps, enable_version_counter=False
        )
        self._rng_to_restore: dict[str, Any] | None = None
        self._signal: int | None = None  # the stop signal received, until acted on
        self._requeue = False  # the signal was SLURM's requeue signal
        self._pending: Preempted | None = None  # raised at the next hook: the checkpoint is written
        self._stop_at_epoch_end: int | None = None
        self._step_seen = 0
        self._handlers: dict[int, Any] = {}
        self._trainer = None
        self.async_writes = async_writes

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        from lima_lightning.phases import PHASES

        checkpoint_io = trainer.strategy.checkpoint_io
        # A logger that uploads the file right after the save (after_save_checkpoint) must find it written.
        behind = (
            self.async_writes
            and isinstance(checkpoint_io, AsyncAtomicCheckpointIO)
            and not any(reads_checkpoint_files(logger) for logger in trainer.loggers)
        )
        # Asynchronous: the phase is the snapshot; a wait for the previous write is counted as "checkpoint wait".
        with PHASES.timed("checkpoints"), checkpoint_io.writing_behind() if behind else nullcontext():
            super()._save_checkpoint(trainer, filepath)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # Lightning 2.6 writes last.ckpt at an epoch end only when a top-k checkpoint was written at the same
        # step, and there is no top-k here (save_top_k=0): write it, unless this step was just saved.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if self._stop_at_epoch_end is not None and not self._training_ends(trainer, epoch_end=True):
            self._stop(trainer, self._stop_at_epoch_end, written=self._last_path())

    # ----------------------------------------------------------------------------- preemption
    def _install_stop_handlers(self, trainer) -> None:
        """Replace Lightning's SIGTERM handler (which stops mid-step, with no checkpoint) and Ctrl-C's KeyboardInterrupt."""
        self._trainer, self._signal, self._pending, self._stop_at_epoch_end = trainer, None, None, None
        self._step_seen = trainer.global_step
        if threading.current_thread() is not threading.main_thread():
            return
        signals = [signal.SIGTERM, signal.SIGINT]
        requeue = _slurm_requeue_signal(trainer)
        if requeue is not None:
            signals.append(requeue)
        for signum in signals:
            self._handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _restore_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._handlers.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._handlers = {}

    def _on_signal(self, signum: int, frame) -> None:
        # No printing here: the interrupted code may hold stdout's lock. Act at the next optimizer-step boundary.
        if self._signal is not None and signum == signal.SIGINT:
            trainer = self._trainer
            self._restore_handlers()
            raise Preempted(
                signum, trainer.global_step, trainer.current_epoch, None, note=" (Ctrl-C twice: stopped at once, nothing saved)"
            )
        if self._signal is None:
            self._signal = signum
            self._requeue = signum not in (signal.SIGTERM, signal.SIGINT)

    def _stop_requested(self, trainer) -> int | None:
        """The signal to stop for, decided at a step boundary, the same on every rank (any rank's signal stops all)."""
        if trainer.global_step == self._step_seen:  # mid-accumulation: the step's other micro-batches come first
            return None
        self._step_seen = trainer.global_step
        flag = self._signal is not None
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce_boolean_decision(flag, all=False)
        return (self._signal or signal.SIGTERM) if flag else None

    def _training_ends(self, trainer, epoch_end: bool) -> bool:
        """Whether training ends now anyway (max_steps, or the last epoch's end): then it just finishes."""
        if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
            return True
        return epoch_end and trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs

    def _last_path(self) -> Path | None:
        return Path(self.last_model_path) if self.save_last and self.last_model_path else None

    def _stop(self, trainer, signum: int, written: Path | None) -> None:
        # The line says the file is written, and a requeued job reads it: on disk first (a failed write is raised).
        wait_for_checkpoint(trainer)
        self._restore_handlers()
        note = "" if written is not None else " (checkpoint.save_last is off: no checkpoint written)"
        if self._requeue and trainer.is_global_zero:
            note += _requeue_slurm_job()
        raise Preempted(signum, trainer.global_step, trainer.current_epoch, written, note=note)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        signum = self._stop_requested(trainer)
        if signum is None or self._training_ends(trainer, epoch_end=False):
            return
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._stop_at_epoch_end = signum  # finish the epoch: validation, its adapter and its checkpoint
            return
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))  # as the periodic save does here
        # Raised at the next hook, once Lightning has logged this step's metrics (the resumed run starts after them).
        try:
            self._stop(trainer, signum, self._last_path())
        except Preempted as e:
            self._pending = e

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is not None:
            raise self._pending

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._pending is not None and trainer.state.fn == "fit":
            raise self._pending

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handlers()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handlers()
        # The file is on disk before the process goes; a write that failed too is said, and the run's own error stays
        # what ends it (raised now, it would replace that error).
        checkpoint_io = trainer.strategy.checkpoint_io
        failed = checkpoint_io.take_error() if isinstance(checkpoint_io, AsyncAtomicCheckpointIO) else None
        if failed is not None:
            what = write_error_line(failed, []) if isinstance(failed, WriteError) else f"{type(failed).__name__}: {failed}"
            print(f"{PROG}: error: {what}", file=sys.stderr, flush=True)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # Metrics logged so far reach disk before the checkpoint does: a resumed run never leaves a gap.
        for logger in trainer.loggers:
            logger.save()
        checkpoint[RNG_KEY] = rng_states()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get(RNG_KEY)

    def on_train_start(self, trainer, pl_module) -> None:
        # After Lightning registered its own signal handlers (which this replaces until training ends).
        self._install_stop_handlers(trainer)
        # As late as possible: model loading, LoRA init and dataloader set-up between the restore and here
        # draw random numbers that the original run drew before it saved.
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None


def _slurm_requeue_signal(trainer) -> int | None:
    """SLURM's requeue signal (SIGUSR1 unless configured) when Lightning runs under SLURM with auto-requeue."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    environment = trainer._accelerator_connector.cluster_environment
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
        return environment.requeue_signal or signal.SIGUSR1
    return None


def _requeue_slurm_job() -> str:
    """`scontrol requeue` this job (what Lightning's own SIGUSR1 handler does), after last.ckpt is written."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"[0-9_]+", job):
        return f"; not requeued: SLURM_JOB_ID={job!r}"
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"; scontrol requeue {job} failed ({type(e).__name__}): resubmit the job"
    if result.returncode != 0:
        return f"; scontrol requeue {job} failed ({(result.stderr or result.stdout).strip()[:80]}): resubmit the job"
    return f"; SLURM job {job} requeued (its command must end with --ckpt_path last)"


def check_not_finished(checkpoint: dict[str, Any], trainer_config, ckpt_path: str) -> None:
    """`fit --ckpt_path` of a checkpoint taken where this config's training ends: RunFinished (one line, exit 0)."""
    path = Path(ckpt_path)
    where = f"the run in {runs.run_of_checkpoint(path)}" if path.parent.name == runs.CHECKPOINTS_DIR else f"the run of {path}"
    step = int(checkpoint.get("global_step", 0))
    max_steps = trainer_config.get("max_steps")
    max_epochs = trainer_config.get("max_epochs")
    if max_steps not in (None, -1) and step >= max_steps:
        raise RunFinished(f"{where} is finished (step {step} of {max_steps}); to train longer raise --trainer.max_steps")
    if max_epochs is None and max_steps in (None, -1):
        max_epochs = 1000  # Lightning's default
    position = (checkpoint.get("LIMADataModule") or {}).get("train_position") or {}
    epochs_done = position.get("epoch") if position.get("batches") == 0 else None
    if max_epochs not in (None, -1) and epochs_done is not None and epochs_done >= max_epochs:
        raise RunFinished(f"{where} is finished (epoch {epochs_done} of {max_epochs}); to train longer raise --trainer.max_epochs")


def adapter_differences(saved: dict[str, Any], current) -> list[str]:
    """The options that define the adapter and differ between a checkpoint's hparams and this run's model config."""
    return [
        f"model.{k}={_plain(saved[k])!r} there, {_plain(current[k])!r} here"
        for k in ADAPTER_HPARAMS
        if k in saved and k in current and _plain(saved[k]) != _plain(current[k])
    ]


def check_resume_config(saved: dict[str, Any], current, ckpt_path: str) -> None:
    """Refuse to resume a checkpoint under another base model or adapter shape; name each differing option."""
    differs = adapter_differences(saved, current)
    if differs:
        raise UserError(
            f"--ckpt_path={ckpt_path}: the checkpoint's adapter does not fit this model ({'; '.join(differs)}); "
            "resume with the run's own config.yaml"
        )


def check_adapter_fits(module, checkpoint: dict[str, Any], ckpt_path: str | None) -> None:
    """Refuse a checkpoint whose LoRA weights are not exactly this model's trainable tensors (names and shapes)."""
    expected = {name: tuple(p.shape) for name, p in module.named_parameters() if p.requires_grad}
    found = {name: tuple(t.shape) for name, t in checkpoint.get("state_dict", {}).items()}
    differs = adapter_differences(checkpoint.get("hyper_parameters", {}), module.hparams)
    if expected == found and not differs:
        return
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    detail = [f"{len(missing)} adapter tensors missing", f"{len(unexpected)} unexpected", f"{len(reshaped)} of another shape"]
    example = (reshaped and f"{reshaped[0]}: {found[reshaped[0]]} vs {expected[reshaped[0]]}") or (missing + unexpected + [""])[0]
    raise UserError(
        f"--ckpt_path={ckpt_path}: the checkpoint's adapter does not fit this model ({'; '.join(differs + detail)}"
        f"{', e.g. ' + example if example else ''}); resume with the run's own config.yaml"
    )


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def resolve_resume(ckpt_path: str | None, root_dir: str | os.PathLike) -> tuple[str | None, int | None]:
    """(checkpoint file, version of the run dir it belongs to) for `--ckpt_path`.

    `last` is the newest `last.ckpt` of the run dirs under `root_dir` (see `runs`); None if there is none
    (set-and-forget: a job that always passes `--ckpt_path last` starts fresh the first time). The version
    is set when the file lies in a run dir under `root_dir`, so the resumed run appends to that run dir.
    """
    if ckpt_path is None:
        return None, None
    if ckpt_path == "last":
        latest = runs.latest_checkpoint(root_dir)
        if latest is None:
            rank_zero_info(f"--ckpt_path last: no checkpoint under {runs.logs_dir(root_dir)}/version_*/checkpoints yet; starting a new run")
            return None, None
        ckpt_path = str(latest)
    path = Path(ckpt_path)
    if not path.is_file():
        raise UserError(f"--ckpt_path={ckpt_path}: no such file; pass `last` or a <run dir>/checkpoints/*.ckpt file")
    return str(path), runs.run_version(runs.run_of_checkpoint(path), root_dir)
