"""predict's progress in prompts and tokens, as they are generated (Lightning's bar would count batches: 0/1)."""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import Callback


class GenerationProgress(Callback):
    """A bar of prompts answered, with the tokens generated so far and their rate, on rank 0 during predict."""

    def on_predict_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or not getattr(trainer, "enable_progress_bar", True):
            return
        from tqdm.auto import tqdm

        total = len(getattr(trainer.datamodule, "predict_dataset", None) or [])
        if trainer.progress_bar_callback is not None:
            trainer.progress_bar_callback.disable()  # its bar counts batches, one for the whole LIMA test set
        self.bar = tqdm(total=total or None, unit="prompt", desc="generate", dynamic_ncols=True, mininterval=0.5)
        self.generated, self.started = 0, time.perf_counter()
        pl_module.generation_progress = self

    def tokens(self, n: int) -> None:
        self.generated += n
        rate = self.generated / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{self.generated:,} tokens, {rate:,.0f} tokens/s", refresh=False)
        self.bar.update(0)

    def prompts(self, n: int) -> None:
        self.bar.update(n)
        if self.bar.total is not None and self.bar.n >= self.bar.total:
            self.bar.close()  # before the lines predict prints at its end

    def on_predict_end(self, trainer, pl_module) -> None:
        if getattr(pl_module, "generation_progress", None) is self:
            self.bar.close()
            pl_module.generation_progress = None
