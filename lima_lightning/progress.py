"""predict's progress in prompts and tokens, as they are generated (Lightning's bar would count batches: 0/1)."""

from __future__ import annotations

import sys
import time

from lightning.pytorch.callbacks import Callback

# Where the output is a file (a batch job's log, `> run.log`), a redrawn bar is one endless line of carriage
# returns: a plain line this often (seconds) instead, and one at the end.
PLAIN_LINE_EVERY_S = 15


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
