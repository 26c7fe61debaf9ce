"""Progress a user can read wherever the output goes.

- `GenerationProgress`: predict's progress in prompts and tokens, as they are generated (Lightning's bar would
  count batches: 0/1).
- `LogLineProgressBar`: fit's progress where stdout is a file (a batch job's log, `> fit.log`). There Rich's bar
  prints nothing until the run ends, and a tqdm bar is one endless line of carriage returns; this prints a plain
  line every `PLAIN_LINE_EVERY_S` seconds, one at each epoch's end and one per validation.
"""

from __future__ import annotations

import sys
import time

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

PLAIN_LINE_EVERY_S = 15  # seconds between two progress lines in a log file


def clock(seconds: float) -> str:
    """1:02:03 or 2:03."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def shown_metrics(metrics: dict) -> str:
    return ", ".join(f"{name} {value:.3f}" if isinstance(value, float) else f"{name} {value}" for name, value in metrics.items())


class LogLineProgressBar(ProgressBar):
    """Lightning's progress bar for output that is not a terminal: plain lines, rank 0 only."""

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True
        self.started = self.last_line = 0.0
        self.first_step = 0  # a resumed run starts past 0: its time left comes from this process's steps

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def get_metrics(self, trainer, pl_module):
        from lima_lightning.console import without_version

        return without_version(super().get_metrics(trainer, pl_module))

    def write(self, text: str) -> None:
        if self.enabled and self.trainer.is_global_zero:
            print(text, flush=True)

    def train_line(self, trainer, pl_module) -> str:
        now = time.perf_counter()
        self.last_line = now
        step, total = trainer.global_step, trainer.estimated_stepping_batches
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        where = f"epoch {trainer.current_epoch + 1}{epochs}, step {step}"
        elapsed = now - self.started
        if total and total != float("inf"):
            where += f"/{int(total)} ({100 * step / total:.0f}%)"
            if step > self.first_step:
                left = elapsed * (total - step) / (step - self.first_step)
                where += f", {clock(elapsed)} elapsed, ~{clock(left)} left"
        speed = trainer.callback_metrics.get("train/tokens_per_sec")
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if not k.startswith(("val/", "test/"))}
        parts = [where, shown_metrics(metrics)] + ([f"{float(speed):,.0f} tokens/s"] if speed is not None else [])
        return ", ".join(part for part in parts if part)

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = self.last_line = time.perf_counter()
        self.first_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if time.perf_counter() - self.last_line >= PLAIN_LINE_EVERY_S:
            self.write(self.train_line(trainer, pl_module))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.write(self.train_line(trainer, pl_module))

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":  # `validate` ends with Lightning's own table
            return
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k.startswith("val/")}
        if metrics:
            self.write(f"validation: {shown_metrics(metrics)}")


class GenerationProgress(Callback):
    """Prompts answered, with the tokens generated so far and their rate, on rank 0 during predict: a bar on a
    terminal, plain lines in a log file. On stdout, with Lightning's own progress (stderr: warnings and errors)."""

    def on_predict_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or not getattr(trainer, "enable_progress_bar", True):
            return
        if trainer.progress_bar_callback is not None:
            trainer.progress_bar_callback.disable()  # its bar counts batches, one for the whole LIMA test set
        self.total = len(getattr(trainer.datamodule, "predict_dataset", None) or [])
        self.generated, self.answered, self.closed = 0, 0, False
        self.started = self.last_line = time.perf_counter()
        self.bar = None
        if sys.stdout.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total or None, unit="prompt", desc="generate", dynamic_ncols=True, mininterval=0.5, file=sys.stdout)
        pl_module.generation_progress = self

    def status(self) -> str:
        rate = self.generated / max(time.perf_counter() - self.started, 1e-9)
        return f"{self.generated:,} tokens, {rate:,.0f} tokens/s"

    def print_line(self) -> None:
        self.last_line = time.perf_counter()
        of = f"/{self.total}" if self.total else ""
        print(f"generate: {self.answered}{of} prompts, {self.status()}", flush=True)

    def tokens(self, n: int) -> None:
        self.generated += n
        if self.bar is not None:
            self.bar.set_postfix_str(self.status(), refresh=False)
            self.bar.update(0)
        elif time.perf_counter() - self.last_line >= PLAIN_LINE_EVERY_S:
            self.print_line()

    def prompts(self, n: int) -> None:
        self.answered += n
        if self.bar is not None:
            self.bar.update(n)
        if self.total and self.answered >= self.total:
            self.close()  # before the lines predict prints at its end

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        else:
            self.print_line()

    def on_predict_end(self, trainer, pl_module) -> None:
        if getattr(pl_module, "generation_progress", None) is self:
            self.close()
            pl_module.generation_progress = None
