"""The run-directory layout: where a run's files live, and how a run is found from one of them.

A run dir is Lightning's log dir, `<trainer.default_root_dir>/lightning_logs/version_N/`:

    config.yaml                 the full configuration (LightningCLI writes it)
    events.out.tfevents.*       TensorBoard scalars and sample texts
    adapters/<name>/            PEFT adapters: epoch=E, final, last-good
    checkpoints/last.ckpt       the resumable checkpoint
    samples.jsonl               sample generations after each validation
    predictions.jsonl           `predict`'s answers
    validation.jsonl            `validate`'s per-conversation answer NLL (report's intervals)

Every module that reads or writes one of these asks this one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

LOGS_NAME = "lightning_logs"
CONFIG_FILE = "config.yaml"
ADAPTERS_DIR = "adapters"
CHECKPOINTS_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
SAMPLES_FILE = "samples.jsonl"
PREDICTIONS_FILE = "predictions.jsonl"
VALIDATION_FILE = "validation.jsonl"
FINAL_ADAPTER = "final"
LAST_GOOD_ADAPTER = "last-good"
EVENTS_GLOB = "events.out.tfevents.*"
_VERSION = re.compile(r"version_(\d+)")


def run_dir(trainer) -> Path:
    """Lightning's log dir (`<default_root_dir>/lightning_logs/version_N`): config, events, adapters, outputs.

    Read from the logger, not `trainer.log_dir`: that broadcasts from rank 0, a collective, and the callbacks
    here call this on rank 0 alone; the other ranks would never join it (a hang under DDP).
    """
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    logger = trainer.loggers[0] if trainer.loggers else None
    if isinstance(logger, (TensorBoardLogger, CSVLogger)):
        return Path(logger.log_dir)
    return Path((logger.save_dir if logger is not None else None) or trainer.default_root_dir)


def adapter_dir(run: Path, name: str) -> Path:
    """`<run>/adapters/<name>`: `final`, `epoch=E` or `last-good`."""
    return Path(run) / ADAPTERS_DIR / name


def epoch_adapter_name(epoch: int) -> str:
    return f"epoch={epoch}"


def epoch_of_adapter(path: Path) -> int | None:
    """E for an `adapters/epoch=E` directory, else None."""
    match = re.fullmatch(r"epoch=(\d+)", Path(path).name)
    return int(match.group(1)) if match else None


def epoch_adapters(run: Path) -> list[Path]:
    """A run's per-epoch adapters, in epoch order."""
    found = [p for p in (Path(run) / ADAPTERS_DIR).glob("epoch=*") if epoch_of_adapter(p) is not None and p.is_dir()]
    return sorted(found, key=epoch_of_adapter)


def config_file(run: Path) -> Path:
    return Path(run) / CONFIG_FILE


def samples_file(run: Path) -> Path:
    return Path(run) / SAMPLES_FILE


def checkpoint_dir(run: Path) -> Path:
    return Path(run) / CHECKPOINTS_DIR


def run_of_adapter(adapter_path: str | os.PathLike) -> Path:
    """The run dir an `adapters/<name>` directory belongs to (it may not be one: check `config_file`)."""
    return Path(adapter_path).expanduser().resolve().parent.parent


def run_of_checkpoint(ckpt_path: str | os.PathLike) -> Path:
    """The run dir a `checkpoints/<file>.ckpt` belongs to."""
    return Path(ckpt_path).resolve().parent.parent


def logs_dir(root_dir: str | os.PathLike) -> Path:
    """`<default_root_dir>/lightning_logs`: every run dir of one config lies here."""
    return Path(root_dir) / LOGS_NAME


def run_version(run: Path, root_dir: str | os.PathLike) -> int | None:
    """N when `run` is `<root_dir>/lightning_logs/version_N`, else None."""
    run = Path(run).resolve()
    match = _VERSION.fullmatch(run.name)
    return int(match.group(1)) if match and run.parent == logs_dir(root_dir).resolve() else None


def run_dirs(root_dir: str | os.PathLike) -> list[Path]:
    """Every `version_N` under `<root_dir>/lightning_logs`, oldest (lowest N) first."""
    logs = logs_dir(root_dir)
    found = [p for p in logs.glob("version_*") if p.is_dir() and _VERSION.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(_VERSION.fullmatch(p.name).group(1)))


def latest_checkpoint(root_dir: str | os.PathLike) -> Path | None:
    """The newest `last.ckpt` of the run dirs under `root_dir` (`--ckpt_path last`)."""
    candidates = [run / CHECKPOINTS_DIR / LAST_CHECKPOINT for run in run_dirs(root_dir)]
    candidates = [c for c in candidates if c.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def latest_adapter(root_dir: str | os.PathLike, name: str = FINAL_ADAPTER) -> Path | None:
    """The newest `adapters/<name>` of the run dirs under `root_dir`."""
    candidates = [adapter_dir(run, name) for run in run_dirs(root_dir)]
    candidates = [c for c in candidates if (c / "adapter_config.json").is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def main(argv: list[str] | None = None) -> None:
    """`python -m lima_lightning.runs latest-adapter ROOT`: print the newest final adapter under ROOT (for make)."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "latest-adapter":
        sys.exit("usage: python -m lima_lightning.runs latest-adapter ROOT_DIR")
    found = latest_adapter(argv[1])
    if found is None:
        sys.exit(f"no {ADAPTERS_DIR}/{FINAL_ADAPTER} under {logs_dir(argv[1])}/version_*: run fit first")
    print(found)


if __name__ == "__main__":
    main()
