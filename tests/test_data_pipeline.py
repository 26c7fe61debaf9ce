"""format -> tokenize -> mask -> collate, against hand-built expectations (tiny tokenizer)."""

from __future__ import annotations

import json

import pytest
import torch

from lima_lightning.data.collate import pad_for_generation
from lima_lightning.data.conversations import Conversation, parse_row, read_conversations
from lima_lightning.data.datamodule import LIMADataModule, split_conversations
from lima_lightning.data.synthetic import synthetic_conversations
from lima_lightning.data.templates import llama2_chat_prompt
from lima_lightning.data.tokenization import IGNORE_INDEX, encode_conversation, encode_prompt, tokenize_for_training
from lima_lightning.errors import UserError
from tests.conftest import padded_batch


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_llama2_chat_prompt_matches_meta_format():
    assert llama2_chat_prompt("Hi ") == "[INST] Hi [/INST]"
    assert llama2_chat_prompt("Hi", "Be brief.") == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"


def test_single_turn_labels_are_the_answer_and_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    example = encode_conversation(Conversation(("Hi", "Yo")), tok)
    prompt = [tok.bos_token_id, *ids(tok, "[INST] Hi [/INST]")]
    answer = [*ids(tok, "Yo"), tok.eos_token_id]
    assert example["input_ids"] == prompt + answer
    assert example["labels"] == [IGNORE_INDEX] * len(prompt) + answer


def test_multi_turn_trains_every_answer_with_full_context(tiny_tokenizer):
    tok = tiny_tokenizer
    example = encode_conversation(Conversation(("Q1", "A1", "Q2", "A2"), system="S"), tok)
    p1 = [tok.bos_token_id, *ids(tok, "[INST] <<SYS>>\nS\n<</SYS>>\n\nQ1 [/INST]")]
    a1 = [*ids(tok, "A1"), tok.eos_token_id]
    p2 = [tok.bos_token_id, *ids(tok, "[INST] Q2 [/INST]")]
    a2 = [*ids(tok, "A2"), tok.eos_token_id]
    assert example["input_ids"] == p1 + a1 + p2 + a2
    assert example["labels"] == [IGNORE_INDEX] * len(p1) + a1 + [IGNORE_INDEX] * len(p2) + a2


def test_trailing_user_turn_is_dropped_not_trained(tiny_tokenizer):
    with_tail = encode_conversation(Conversation(("Q1", "A1", "Q2")), tiny_tokenizer)
    assert with_tail == encode_conversation(Conversation(("Q1", "A1")), tiny_tokenizer)


def test_prompt_is_the_training_prefix(tiny_tokenizer):
    conversation = Conversation(("Q1", "A1", "Q2", "A2"))
    train = encode_conversation(conversation, tiny_tokenizer)
    prompt = encode_prompt(conversation, tiny_tokenizer)
    first_trained_of_last_answer = max(i for i, label in enumerate(train["labels"]) if label == IGNORE_INDEX) + 1
    assert prompt == train["input_ids"][:first_trained_of_last_answer]


def test_truncation_keeps_labels_aligned_and_counts(tiny_tokenizer):
    conversations = [Conversation(("Q", "A" * 40)), Conversation(("Q" * 60, "A"))]
    examples, stats = tokenize_for_training(conversations, tiny_tokenizer, "llama2-chat", max_seq_length=30)
    full = encode_conversation(conversations[0], tiny_tokenizer)
    assert examples == [{k: v[:30] for k, v in full.items()}]
    assert tiny_tokenizer.eos_token_id not in examples[0]["input_ids"]  # no EOS invented at the cut
    assert (stats.truncated, stats.dropped_no_target, stats.examples) == (2, 1, 1)


def test_padding_for_training_and_generation():
    batch = padded_batch([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    # Right padding to a width of 8 (`collate.WIDTH_MULTIPLE`), trained on nowhere.
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0, 0, 0, 0], [8, 0, 0, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7] + [-100] * 5, [8] + [-100] * 7]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]]
    gen = pad_for_generation([{"id": 0, "prompt": "a", "input_ids": [5, 6]}, {"id": 1, "prompt": "b", "input_ids": [7]}], pad_id=0)
    assert gen["input_ids"].tolist() == [[5, 6], [0, 7]]
    assert gen["attention_mask"].tolist() == [[1, 1], [0, 1]]


def test_chat_and_lima_formats_read_alike(tmp_path):
    lima = tmp_path / "lima.jsonl"
    chat = tmp_path / "chat.json"
    lima.write_text(json.dumps({"conversations": ["Hi", "Yo"]}) + "\n")
    chat.write_text(json.dumps([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}]))
    assert read_conversations(lima)[0].turns == read_conversations(chat)[0].turns == ("Hi", "Yo")
    system = parse_row({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]}, "x")
    assert (system.system, system.turns, system.ends_on_user) == ("S", ("Hi",), True)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "bad.jsonl:2: invalid JSON"),
        ('{"text": "hi"}', "bad.jsonl:2: row has no 'conversations', 'messages' or 'instruction'"),
        ('{"conversations": ["hi", 3]}', "bad.jsonl:2: conversations[1] is a number"),
        ('{"conversations": ["hi", "  "]}', "bad.jsonl:2: conversations[1] is empty"),
        ('{"messages": [{"role": "assistant", "content": "x"}]}', "bad.jsonl:2: messages[0] has role 'assistant' where 'user'"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    # A good first row in the bad row's own format (the first row decides a file's format).
    first = {"messages": [{"role": "user", "content": "ok"}]} if line.startswith('{"messages"') else {"conversations": ["ok", "ok"]}
    path.write_text(json.dumps(first) + "\n" + line + "\n")
    with pytest.raises(
        UserError,
        match="^" + str(tmp_path).replace("\\", "\\\\") + "/" + message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\("),
    ):
        read_conversations(path)


def test_empty_file_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="empty.jsonl: the file has no rows"):
        read_conversations(tmp_path / "empty.jsonl")


def test_synthetic_set_is_deterministic_and_splits_are_disjoint():
    train, again = synthetic_conversations("train", 50), synthetic_conversations("train", 50)
    assert train == again
    assert {c.turns[0] for c in synthetic_conversations("predict", 50)} != {c.turns[0] for c in train}
    a, b = split_conversations(train, 0.1, seed=3)
    assert (len(a), len(b)) == (45, 5) and split_conversations(train, 0.1, seed=3) == (a, b)
    assert not set(map(id, a)) & set(map(id, b))


def test_datamodule_setup_fit_and_predict(tiny_dir):
    dm = LIMADataModule(dataset="synthetic", predict_dataset="synthetic", tokenizer=str(tiny_dir), synthetic_size=40, batch_size=4)
    dm.setup("fit")
    assert len(dm.train_dataset) == 38 and len(dm.val_dataset) == 2
    example = dm.train_dataset[0]
    assert set(example) >= {"input_ids", "labels"} and len(example["input_ids"]) == len(example["labels"])
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape and batch["input_ids"].shape[0] == 4
    dm.setup("predict")
    prompt = dm.predict_dataset[1]
    assert prompt["id"] == 1 and prompt["input_ids"] == encode_prompt(synthetic_conversations("predict", 4)[1], dm.tokenizer)
    lengths = [len(dm.predict_dataset[i]["input_ids"]) for i in dm.predict_dataloader().sampler]
    assert lengths == sorted(lengths, reverse=True)  # longest first


def test_datamodule_options_are_validated_together():
    with pytest.raises(UserError, match=r"data.max_seq_length=4: .*data.val_fraction=1.5: must be in \[0, 1\)"):
        LIMADataModule(max_seq_length=4, val_fraction=1.5)


def test_masked_nll_matches_independent_cross_entropy():
    from lima_lightning.loss import masked_nll_sum

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 7, 8, 9, 10]])
    total, count = masked_nll_sum(logits, labels)
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert count == 6
    torch.testing.assert_close(total / count, reference)
