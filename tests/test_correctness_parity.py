"""Item 4: at predict time the model receives exactly the ids it was trained on, up to where the answer begins.

A prompt that differs from training by one token (a missing BOS, a space before `[INST]`, a different split
of `[/INST]`) is a prompt the model has never seen. Here the ids are taken where `predict` hands them to
generation: the LIMADataModule's predict dataloader, through a real `Trainer.predict` and `predict_step`.
"""

from __future__ import annotations

import pytest
import torch

from lima_lightning.data.datamodule import LIMADataModule
from lima_lightning.data.tokenization import IGNORE_INDEX
from tests.conftest import LIMA_TRAIN, LLAMA2_TOKENIZER, needs_lima, needs_llama2_tokenizer, quiet_cpu_trainer

pytestmark = [needs_lima, needs_llama2_tokenizer]


@pytest.fixture(scope="module")
def fed_to_generation():
    """{row id: (ids without left padding)} as `predict_step` passes them to `generate`, for all of LIMA's train file."""
    import lima_lightning.module as module_file
    from lima_lightning.generation import GenerationSettings
    from lima_lightning.module import LIMALoRAModule

    seen: dict[int, list[int]] = {}
    pad_checks: list[bool] = []

    def record(model, tokenizer, input_ids, attention_mask, settings, **progress):
        for row, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            n_pad = mask.index(1)
            pad_checks.append(mask == [0] * n_pad + [1] * (len(mask) - n_pad))  # padding only on the left
            seen[len(seen)] = row[n_pad:]
        return [{"response": "", "finish_reason": "eos", "new_tokens": 1}] * len(input_ids)

    datamodule = LIMADataModule(
        dataset=str(LIMA_TRAIN),
        predict_dataset=str(LIMA_TRAIN),
        tokenizer=str(LLAMA2_TOKENIZER),
        max_seq_length=4096,
        predict_batch_size=128,
    )
    module = LIMALoRAModule(base_model=str(LLAMA2_TOKENIZER), generation=GenerationSettings(max_new_tokens=1))
    module.model = torch.nn.Linear(1, 1)  # stands in for the 7B model: generation is recorded, not run
    patch = pytest.MonkeyPatch()
    patch.setattr(module_file, "generate", record)
    try:
        trainer = quiet_cpu_trainer()
        predictions = trainer.predict(module, datamodule=datamodule)
    finally:
        patch.undo()
    # `generate` saw rows in dataloader order (longest first); the predictions carry the row ids in that order.
    row_ids = [p["id"] for batch in predictions for p in batch]
    assert all(pad_checks) and len(row_ids) == len(seen) == 1030
    return {row_id: seen[i] for i, row_id in enumerate(row_ids)}, datamodule


@pytest.fixture(scope="module")
def trained_on(fed_to_generation):
    """The training examples of the same file, through the same data module (no validation split, no truncation)."""
    _, predict_datamodule = fed_to_generation
    datamodule = LIMADataModule(dataset=str(LIMA_TRAIN), tokenizer=str(LLAMA2_TOKENIZER), max_seq_length=4096, val_fraction=0.0)
    datamodule.setup("fit")
    from lima_lightning.data.conversations import read_conversations

    conversations = read_conversations(LIMA_TRAIN)
    assert len(datamodule.train_dataset) == len(conversations)  # in file order: row id i is conversation i
    return list(zip(conversations, datamodule.train_dataset, strict=True)), datamodule.tokenizer


def test_item4_predict_prompt_is_the_training_prefix_up_to_the_answer(fed_to_generation, trained_on):
    prompts, _ = fed_to_generation
    pairs, tok = trained_on
    checked = 0
    for row_id, (conversation, example) in enumerate(pairs):
        if conversation.ends_on_user:
            continue  # below
        labels = example["labels"]
        # The first token of the answer the model is asked for (the last assistant turn; the only one in 1000 of 1030).
        answer_start = max(i for i, label in enumerate(labels) if label == IGNORE_INDEX) + 1
        assert prompts[row_id] == example["input_ids"][:answer_start], conversation.where
        if len(conversation.turns) == 2:
            first_trained = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
            assert answer_start == first_trained
        assert prompts[row_id][0] == tok.bos_token_id and tok.decode(prompts[row_id][-4:]).endswith("[/INST]")
        checked += 1
    assert checked == 1029


def test_item4_trailing_user_turn_is_asked_after_the_whole_trained_conversation(fed_to_generation, trained_on):
    prompts, _ = fed_to_generation
    pairs, tok = trained_on
    ((row_id, (conversation, example)),) = [(i, p) for i, p in enumerate(pairs) if p[0].ends_on_user]
    prompt = prompts[row_id]
    n = len(example["input_ids"])
    assert prompt[:n] == example["input_ids"]  # everything trained on, answers included, then the unanswered question
    assert prompt[n] == tok.bos_token_id and tok.decode(prompt[n + 1 :]) == f"[INST] {conversation.turns[-1].strip()} [/INST]"
