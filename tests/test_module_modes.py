"""The base must be in train mode during fit: transformers skips gradient checkpointing in eval mode."""

from __future__ import annotations

import lightning as L

from lima_lightning.data.datamodule import LIMADataModule
from lima_lightning.module import LIMALoRAModule
from tests.conftest import quiet_cpu_trainer


class RecordTrainingModes(L.Callback):
    def __init__(self) -> None:
        self.modes: set[bool] = set()
        self.checkpointing: set[bool] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.modes |= {m.training for m in pl_module.model.modules()}
        self.checkpointing |= {layer.gradient_checkpointing for layer in pl_module.model.base_model.model.model.layers}


def test_fit_runs_every_module_in_train_mode_with_checkpointing(tiny_dir, tmp_path):
    record = RecordTrainingModes()
    trainer = quiet_cpu_trainer(
        max_steps=2, limit_val_batches=1, val_check_interval=1, num_sanity_val_steps=1, default_root_dir=tmp_path, callbacks=[record]
    )
    model = LIMALoRAModule(base_model=str(tiny_dir), quantization="none", lora_r=4, gradient_checkpointing=True)
    data = LIMADataModule(dataset="synthetic", tokenizer=str(tiny_dir), synthetic_size=40, batch_size=4)
    trainer.fit(model, data)
    # Validation (and sanity checking) in between must hand training back in train mode too.
    assert record.modes == {True}
    assert record.checkpointing == {True}
