"""Checkpoints a killed run can resume from exactly, written atomically and read without unpickling code.

- `AtomicCheckpointIO`: Lightning's TorchCheckpointIO writes through fsspec, which stages the file in
  the system temp dir and then `shutil.move`s it: a copy, not a rename, when /tmp is another
  filesystem (usual on clusters), so a kill mid-copy leaves a truncated `last.ckpt`. Here the file is
  staged next to its target, fsync'ed and renamed. Loading is always `weights_only=True`.
- `ResumableCheckpoint`: ModelCheckpoint every N optimizer steps plus `last.ckpt`, which also saves
  the RNG states (LoRA dropout) and flushes the loggers first, so the resumed run is bit-identical on CPU.
- `check_resume_config` / `check_adapter_fits`: a checkpoint holds only the LoRA weights and is loaded
  with `strict=False` onto a freshly loaded base; these refuse one trained on another base model or
  with another adapter layout, naming the options, instead of loading what happens to match.
- `resolve_resume`: `--ckpt_path last` finds the newest `last.ckpt` of the run dirs under
  `trainer.default_root_dir`, and the resumed run logs into that same run dir.
"""

from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from lima_lightning import runs
from lima_lightning.errors import UserError

RNG_KEY = "lima_rng_states"
# What `--ckpt_path` must match for a resume; shapes are checked too (they catch most of these anyway).
ADAPTER_HPARAMS = ("base_model", "lora_r", "lora_alpha", "target_modules")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write `<dir>/.<name>.tmp-<pid>`, fsync, rename over `<dir>/<name>`; read with `weights_only=True`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with tmp.open("wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never a part
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        # Always weights_only, whatever the caller asks: a checkpoint is data, and unpickling runs code.
        return load_checkpoint_file(path, map_location or "cpu")


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
    def __init__(self, every_n_train_steps: int = 50, save_last: bool = True, dirpath: str | None = None) -> None:
        """
        Args:
            every_n_train_steps: Save `last.ckpt` every this many optimizer steps (and at each epoch end),
                overwriting the previous one atomically; 0: only at epoch ends. A kill loses at most this
                many steps. The file holds the LoRA weights, optimizer, LR scheduler, loop, data position
                and RNG states (~3x the adapter size), never the frozen base.
            save_last: Write `last.ckpt` (what `--ckpt_path last` resumes from); false: no checkpoints at all.
            dirpath: Where checkpoints go; default `<run dir>/checkpoints`, where `--ckpt_path last` looks
                (elsewhere, pass the file itself to `--ckpt_path`).
        """
        # save_top_k=0: no metric to rank by; one rolling `last.ckpt` per run dir (no last-v1.ckpt).
        super().__init__(
            dirpath=dirpath, save_last=save_last, save_top_k=0, every_n_train_steps=every_n_train_steps, enable_version_counter=False
        )
        self._rng_to_restore: dict[str, Any] | None = None

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        from lima_lightning.phases import PHASES

        with PHASES.timed("checkpoints"):
            super()._save_checkpoint(trainer, filepath)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # Lightning 2.6 writes last.ckpt at an epoch end only when a top-k checkpoint was written at the same
        # step, and there is no top-k here (save_top_k=0): write it, unless this step was just saved.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # Metrics logged so far reach disk before the checkpoint does: a resumed run never leaves a gap.
        for logger in trainer.loggers:
            logger.save()
        checkpoint[RNG_KEY] = rng_states()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get(RNG_KEY)

    def on_train_start(self, trainer, pl_module) -> None:
        # As late as possible: model loading, LoRA init and dataloader set-up between the restore and here
        # draw random numbers that the original run drew before it saved.
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None


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
