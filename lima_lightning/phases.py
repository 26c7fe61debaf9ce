"""Where the time from command to result goes: one clock per process, one line and `phases.json` at the end.

What users feel is the time from pressing enter to holding an adapter (or predictions), not steady-state
tokens/s: startup (Python and imports), reading and tokenizing data, loading (and quantizing) the model,
the memory probe, compiling, training, validation with samples, checkpoints (the copy a save takes; the file
is written behind training, and a wait for it is `checkpoint wait`), saving adapters, generating. Code that does
one of these wraps it in `PHASES.timed(name)`; `PhaseReport` prints and saves the split when the command ends,
with the process's peak GPU memory (what a smaller card must hold).
Compile time is torch's own count of it (dynamo and backward compiles), taken out of the steps it happened in.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

PHASES_FILE = "phases.json"


def process_start_time() -> float:
    """`time.time()` when this process started (Linux: /proc), else when this module was imported."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        start_ticks = float(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
        return boot + start_ticks / ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


_IMPORTED = time.time()


def compile_seconds() -> float:
    """Seconds torch.compile has spent in this process (forward frames and lazily compiled backwards)."""
    try:
        from torch._dynamo.utils import calculate_time_spent

        return float(calculate_time_spent().get("total_wall_time", 0.0))
    except (ImportError, AttributeError):
        return 0.0


class PhaseClock:
    """Seconds per phase, summed over every time the phase ran; a phase inside another is not counted twice."""

    def __init__(self) -> None:
        self.started = process_start_time()
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[dict] = []

    @contextmanager
    def timed(self, name: str):
        frame = {"time": time.perf_counter(), "compile": compile_seconds(), "inner_time": 0.0, "inner_compile": 0.0}
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            elapsed = time.perf_counter() - frame["time"]
            compiled = compile_seconds() - frame["compile"]
            own_compile = compiled - frame["inner_compile"]  # compiles inside this phase are counted as compile
            self.seconds[name] += elapsed - frame["inner_time"] - own_compile
            self.seconds["compile"] += own_compile
            if self._stack:
                self._stack[-1]["inner_time"] += elapsed
                self._stack[-1]["inner_compile"] += compiled

    def mark_startup(self) -> None:
        """Everything before the command's real work: interpreter, imports, argument parsing."""
        self.seconds.clear()
        self.seconds["startup"] = time.time() - self.started

    def split(self) -> dict[str, float]:
        total = time.time() - self.started
        phases = {name: round(seconds, 2) for name, seconds in self.seconds.items() if seconds >= 0.005}
        phases["other"] = round(max(0.0, total - sum(self.seconds.values())), 2)
        return {"total": round(total, 2), **phases}


PHASES = PhaseClock()


def peak_gpu_memory_gib() -> float | None:
    """The most GPU memory this process's tensors held at once (the allocator's count, as `train/peak_memory_gib`),
    or None where no GPU was used."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def describe(split: dict[str, float], what: str, peak_gib: float | None = None) -> str:
    parts = [f"{name} {seconds:.0f} s" if seconds >= 1 else f"{name} {seconds:.1f} s" for name, seconds in split.items()]
    peak = "" if peak_gib is None else f"; peak GPU memory {peak_gib:.1f} GiB"
    return f"{what} took {split['total']:.0f} s from the command: {', '.join(parts[1:])}{peak}"


class PhaseReport(Callback):
    """Times the fit and predict loops, and at the end prints the split and writes `<run dir>/phases.json`."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._enter("train")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._leave()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._leave()  # validation runs inside the training epoch
        self._enter("validation")

    def on_validation_end(self, trainer, pl_module) -> None:
        self._leave()
        if trainer.state.fn == "fit" and not trainer.sanity_checking:  # back to the epoch it interrupted
            self._enter("train")

    def on_predict_start(self, trainer, pl_module) -> None:
        self._enter("generate")

    def _enter(self, name: str) -> None:
        self._leave()
        self._open = PHASES.timed(name)
        self._open.__enter__()

    def _leave(self) -> None:
        if getattr(self, "_open", None) is not None:
            self._open.__exit__(None, None, None)
            self._open = None

    @rank_zero_only
    def _report(self, trainer, what: str) -> None:
        from lima_lightning import runs

        self._leave()
        split, peak_gib = PHASES.split(), peak_gpu_memory_gib()
        rank_zero_info(describe(split, what, peak_gib))
        if trainer.loggers:
            run = runs.run_dir(trainer)
            run.mkdir(parents=True, exist_ok=True)
            report = {"command": what, "seconds": split, "peak_gpu_memory_gib": peak_gib}
            (run / PHASES_FILE).write_text(json.dumps(report, indent=1) + "\n")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._report(trainer, "fit")

    def on_predict_end(self, trainer, pl_module) -> None:
        self._report(trainer, "predict")
