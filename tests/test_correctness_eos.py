"""Item 5: the model learns to stop. A fit that never sees EOS as a target rambles until max_new_tokens."""

from __future__ import annotations

import json

import lightning as L
import pytest

from lima_lightning.data.datamodule import LIMADataModule
from lima_lightning.data.synthetic import synthetic_conversations
from lima_lightning.generation import GenerationSettings
from lima_lightning.module import LIMALoRAModule
from tests.conftest import quiet_cpu_trainer

MAX_NEW_TOKENS = 64


@pytest.mark.slow
def test_item5_fitted_tiny_model_reproduces_answers_and_stops_at_eos(tmp_path, tiny_tokenizer):
    """8 synthetic conversations, 40 full-batch steps on CPU (~2 s on an idle 2-core CPU), then `predict` on the same prompts, greedy."""
    conversations = synthetic_conversations("train", 8)
    path = tmp_path / "handful.jsonl"
    path.write_text("".join(json.dumps({"conversations": list(c.turns)}) + "\n" for c in conversations))

    L.seed_everything(0)
    datamodule = LIMADataModule(
        dataset=str(path), predict_dataset=str(path), tokenizer="tiny", val_fraction=0.0, batch_size=8, max_seq_length=256
    )
    module = LIMALoRAModule(
        base_model="tiny",
        quantization="none",
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        gradient_checkpointing=False,
        learning_rate=5e-3,
        warmup_ratio=0.0,
        scheduler="constant",
        generation=GenerationSettings(do_sample=False, max_new_tokens=MAX_NEW_TOKENS),
    )
    trainer = quiet_cpu_trainer(max_steps=40, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    predictions = sorted((row for batch in trainer.predict(module, datamodule=datamodule) for row in batch), key=lambda r: r["id"])

    assert [p["reference"] for p in predictions] == [c.turns[1] for c in conversations]
    for p in predictions:
        assert p["response"] == p["reference"], p
        assert p["finish_reason"] == "eos", p
        # it stops right after the answer: the answer's tokens, then EOS, far below the limit
        answer_tokens = len(tiny_tokenizer(p["reference"], add_special_tokens=False)["input_ids"])
        assert p["new_tokens"] == answer_tokens + 1 <= MAX_NEW_TOKENS // 2, p
