"""What a user can cause or meet, as one line on stderr and an exit status, never a traceback.

| what | exit status |
|---|---|
| a mistake in the input or the options (`UserError`), an unknown subcommand, a GPU config on a machine without one | 2 |
| something unavailable: the hub out of reach, a full or read-only disk (`WriteError`), CUDA out of memory | 1 |
| a self-check of the product failed (`CheckFailed`, e.g. export's merged-vs-adapter logits) | 1 |
| SIGTERM or Ctrl-C during fit (`Preempted`: last.ckpt written at the current step) | 128 + the signal (143, 130) |
| `--ckpt_path last` of a run that is already finished (`RunFinished`) | 0 |

Anything else is a bug of lima-lightning and keeps its traceback (exit status 1), which is what a report of it needs.
"""

from __future__ import annotations

import difflib
import errno
import re
import shlex
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

from lima_lightning import runs
from lima_lightning.errors import CheckFailed, UserError
from lima_lightning.io import WRITE_ERRORS, WriteError

PROG = "lima-lightning"
LOWMEM_CONFIG = "configs/llama2-7b-qlora-lowmem.yaml"


class Preempted(Exception):
    """SIGTERM/SIGINT during fit: the run stopped at an optimizer-step boundary, `checkpoint` written there (or None)."""

    def __init__(self, signum: int, step: int | None, epoch: int | None, checkpoint: Path | None, note: str = "") -> None:
        super().__init__(f"{signal.Signals(signum).name} at step {step}")
        self.signum, self.step, self.epoch, self.checkpoint, self.note = signum, step, epoch, checkpoint, note


class RunFinished(Exception):
    """`fit --ckpt_path` of a checkpoint taken at the end of training: there is nothing left to train."""


# ----------------------------------------------------------------------------- the one line
def describe(exc: BaseException, argv: list[str]) -> tuple[str, int] | None:
    """(the line to print, the exit status) for a failure a user can cause or meet; None for a bug."""
    if isinstance(exc, UserError):
        return f"{PROG}: error: {exc}", exc.exit_status
    if isinstance(exc, CheckFailed):
        return f"{PROG}: check failed: {exc}", 1
    if isinstance(exc, RunFinished):
        return f"{PROG}: {exc}", 0
    if isinstance(exc, Preempted):
        return preempted_line(exc, argv), 128 + exc.signum
    if isinstance(exc, WriteError):
        return f"{PROG}: error: {write_error_line(exc, argv)}", 1
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRORS and exc.filename:  # a write by Lightning or another library
        line = write_error_line(WriteError(exc.errno, Path(exc.filename), None), argv, verb="access")
        return f"{PROG}: error: {line}", 1
    if _is_cuda_oom(exc):
        line = getattr(exc, "lima_line", None) or oom_line(exc)
        return f"{PROG}: error: {line}", 1
    if isinstance(exc, KeyboardInterrupt):
        return f"{PROG}: interrupted (Ctrl-C) before training started; nothing was written that needs keeping", 128 + signal.SIGINT
    return None


def exit_for(exc: BaseException, argv: list[str]) -> None:
    """Print the line and exit for a failure `describe` knows; return (so that the caller re-raises) for anything else."""
    described = describe(exc, argv)
    if described is None:
        return
    line, status = described
    print(line, file=sys.stdout if status == 0 else sys.stderr, flush=True)
    sys.exit(status)


def _is_cuda_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError)


def command_of(argv: list[str]) -> str:
    return argv[0] if argv and not argv[0].startswith("-") else ""


def write_error_line(e: WriteError, argv: list[str], verb: str = "write") -> str:
    code = errno.errorcode.get(e.errno, str(e.errno))
    what = WRITE_ERRORS.get(e.errno, e.strerror)
    name = Path(e.filename).name
    kept = {True: f"the previous {name} is intact; ", False: "nothing was left half-written; ", None: ""}[e.existed]
    elsewhere = "--out" if command_of(argv) in ("export", "report") else "--trainer.default_root_dir"
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = f"free some space, or write elsewhere with {elsewhere}"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"write elsewhere with {elsewhere}, or make {Path(e.filename).parent} writable"
    else:
        fix = f"check the disk, or write elsewhere with {elsewhere}"
    return f"cannot {verb} {e.filename}: {what} ({code}); {kept}{fix}"


# ----------------------------------------------------------------------------- subcommands
def unknown_command_line(name: str, commands: list[str]) -> str:
    """`fitt` -> one line with the nearest command and the list of them."""
    near = difflib.get_close_matches(name, commands, n=1, cutoff=0.5)
    guess = f"did you mean `{PROG} {near[0]}`? " if near else ""
    return f"{PROG}: error: unknown command {name!r}; {guess}commands: {', '.join(commands)} (`{PROG} COMMAND --help` for each)"


# ----------------------------------------------------------------------------- a GPU config without a GPU
GPU_MISSING = re.compile(
    r"No supported gpu backend found|`(CUDA|MPS)Accelerator` can not run on your system|requires a GPU accelerator|"
    r"You requested gpu|but your machine only has|CUDA is not available",
    re.IGNORECASE,
)


@contextmanager
def trainer_config_errors(accelerator: object = None):
    """Lightning's refusals of a Trainer configuration (MisconfigurationException, ValueError) as one `UserError`."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        yield
    except (MisconfigurationException, ValueError) as e:
        message = " ".join(str(e).split())
        if GPU_MISSING.search(message):
            import torch

            found = f"{torch.cuda.device_count()} CUDA GPU(s) found" if torch.cuda.is_available() else "no CUDA GPU found"
            raise UserError(
                f"trainer.accelerator={accelerator}: {found} ({message[:120]}); on this machine use "
                "--trainer.accelerator cpu --trainer.precision 32-true (slow beyond a tiny model), or --config configs/demo.yaml"
            ) from None
        raise UserError(f"trainer: {message[:300]}") from None


# ----------------------------------------------------------------------------- CUDA out of memory
GIB = 2**30


def _allocator_numbers(exc: BaseException) -> str:
    """What ran out: the allocation that failed and the device's memory, from the error text and the allocator."""
    import torch

    text = " ".join(str(exc).split())
    tried = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", text)
    parts = [f"tried to allocate {tried.group(1)}"] if tried else []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device = torch.cuda.current_device()
        total = torch.cuda.get_device_properties(device).total_memory
        parts.append(
            f"{torch.cuda.memory_allocated(device) / GIB:.1f} GiB allocated (peak {torch.cuda.max_memory_allocated(device) / GIB:.1f}), "
            f"{torch.cuda.memory_reserved(device) / GIB:.1f} GiB reserved, of {total / GIB:.1f} GiB"
        )
    else:
        capacity = re.search(r"total capacity of ([\d.]+ [KMGT]?i?B) of which ([\d.]+ [KMGT]?i?B) is free", text)
        by_torch = re.search(r"([\d.]+ [KMGT]?i?B) is allocated by PyTorch", text)
        if capacity:
            parts.append(f"{capacity.group(2)} free of {capacity.group(1)}")
        if by_torch:
            parts.append(f"{by_torch.group(1)} allocated by PyTorch")
    return ", ".join(parts) or text[:120]


def _margins():
    try:
        from lima_lightning.memory import MemoryEstimate
    except ImportError:  # before the memory model moved out of models/speed.py
        from lima_lightning.models.speed import MemoryEstimate
    return MemoryEstimate.MARGIN, MemoryEstimate.SLACK_BYTES


def fitting_settings(module, datamodule) -> list[str]:
    """Concrete options that would lower the peak, most effective first, from the run's own plan where there is one."""
    hp = module.hparams
    speed = getattr(module, "speed_settings", None) or {}
    estimate = speed.get("memory_estimate")
    data = getattr(datamodule, "hparams", {}) or {}
    suggestions = []
    layers = (estimate or {}).get("num_layers")
    checkpointed = speed.get("checkpointed_layers")
    if checkpointed is not None and layers:
        all_checkpointed = checkpointed >= layers
    else:
        all_checkpointed = bool(speed.get("gradient_checkpointing", hp.gradient_checkpointing is True))
    if not all_checkpointed:
        suggestions.append("--model.gradient_checkpointing true")
    batching = data.get("batching", "padded")
    if batching == "padded":
        if data.get("batch_size", 1) > 1:
            suggestions.append(f"--data.batch_size {max(1, data['batch_size'] // 2)}")
    else:
        current, floor = data.get("max_tokens_per_batch", 8192), data.get("max_seq_length", 2048)
        fit = None
        if estimate:
            margin, slack = _margins()
            per_token = estimate["bytes_per_token"]
            if layers and checkpointed and "checkpointed_bytes_per_token" in estimate:  # per token with k layers checkpointed
                per_token -= checkpointed * (per_token - estimate["checkpointed_bytes_per_token"]) / layers
            usable = estimate["budget_bytes"] / margin - slack
            fit = int((usable - estimate["fixed_bytes"] - estimate["optimizer_bytes"]) / max(per_token, 1))
        smaller = min(current // 2, fit) if fit else current // 2
        if smaller >= floor:
            suggestions.append(f"--data.max_tokens_per_batch {smaller // 256 * 256 or smaller}")
        elif floor > 512:
            suggestions.append(f"--data.max_seq_length {floor // 2} --data.max_tokens_per_batch {max(floor // 2, current // 2)}")
    if hp.loss_chunk_size == 0:
        suggestions.append("--model.loss_chunk_size 1024")
    if all_checkpointed and not hp.offload_checkpoints:  # the checkpointed layers' inputs, out to host memory
        suggestions.append("--model.offload_checkpoints true")
    suggestions.append(f"--config {LOWMEM_CONFIG} (5.2 GiB peak for 7B)")
    return suggestions


def oom_line(exc: BaseException, trainer=None, module=None, kept: str = "") -> str:
    """CUDA out of memory: the plan, what ran out, what would fit, and what was kept."""
    where = f"at step {trainer.global_step} (epoch {trainer.current_epoch})" if trainer is not None else ""
    parts = [f"CUDA out of memory {where}".strip() + f": {_allocator_numbers(exc)}"]
    if module is not None:
        estimate = (getattr(module, "speed_settings", None) or {}).get("memory_estimate")
        if estimate:
            parts.append(
                f"planned peak {estimate['predicted_peak_gib']:.1f} GiB for the largest {estimate['max_tokens']}-token micro-batch "
                f"of {estimate['budget_bytes'] / GIB:.1f} GiB available"
            )
        parts.append("settings that lower it: " + ", ".join(fitting_settings(module, getattr(trainer, "datamodule", None))))
    else:
        parts.append(
            "lower --data.predict_batch_size or --model.generation.max_new_tokens, or use --model.quantization nf4 "
            "(predict); see --config " + LOWMEM_CONFIG + " for training"
        )
    if kept:
        parts.append(kept)
    return "; ".join(parts)


# ----------------------------------------------------------------------------- preemption
def resume_command(argv: list[str]) -> str:
    """The command that continues this run: the same arguments, `--ckpt_path last` instead of any other."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--ckpt_path":
            skip = True
            continue
        if arg.startswith("--ckpt_path="):
            continue
        kept.append(arg)
    return shlex.join([PROG, *kept, "--ckpt_path", "last"])


def preempted_line(e: Preempted, argv: list[str]) -> str:
    name = signal.Signals(e.signum).name
    if e.checkpoint is None:
        return f"{PROG}: interrupted by {name} at step {e.step}{e.note}; resume from the last checkpoint: {resume_command(argv)}"
    written = f"{e.checkpoint} written{e.note}"
    return f"{PROG}: interrupted by {name} at step {e.step} (epoch {e.epoch}), {written}; resume: {resume_command(argv)}"


def cli_argv(args: list[str] | None) -> list[str]:
    return list(sys.argv[1:] if args is None else args)


# ----------------------------------------------------------------------------- a run that never trained
KEEPABLE = {runs.CONFIG_FILE, "hparams.yaml"}


def _events_hold_data(path: Path) -> bool:
    """True if a TensorBoard events file holds anything but its header and the run's hparams."""
    try:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

        for event in EventFileLoader(str(path)).Load():
            if event.HasField("summary") and any(not v.tag.startswith("_hparams_") for v in event.summary.value):
                return True
        return False
    except Exception:
        return True  # unreadable: keep it


def unused_run_dir(run: Path) -> bool:
    """A run dir that holds only what the logger and the CLI create before training: its config, hparams, empty events."""
    if not run.is_dir():
        return False
    for entry in run.iterdir():
        if entry.is_dir() or not (entry.name in KEEPABLE or entry.name.startswith("events.out.tfevents.")):
            return False
        if entry.name.startswith("events.out.tfevents.") and _events_hold_data(entry):
            return False
    return True


def remove_unused_run_dir(trainer) -> Path | None:
    """After a failure: remove this run's `version_N` if it holds nothing of value (rank 0; a resumed run's dir never)."""
    import shutil

    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    logger = trainer.loggers[0] if trainer.loggers else None
    if not trainer.is_global_zero or not isinstance(logger, (TensorBoardLogger, CSVLogger)):
        return None
    run = Path(logger.log_dir)
    if getattr(trainer, "lima_resumed_run", False) or not unused_run_dir(run):
        return None
    # Only the run's own dir: `lightning_logs` stays even when empty, since a run starting beside this one in the same
    # root may be creating its version dir in it right now (removing it then crashed that run: os.makedirs saw
    # the parent, then found it gone).
    shutil.rmtree(run, ignore_errors=True)
    return run


def _callback_base():
    from lightning.pytorch.callbacks import Callback

    return Callback


class TidyFailedRun(_callback_base()):
    """Added to every Trainer the CLI builds (last, after the callbacks that save on failure): on any exception in
    fit/validate/test/predict, a run dir holding nothing of value is removed, so TensorBoard lists no empty runs."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        try:
            remove_unused_run_dir(trainer)
        except OSError:
            pass
