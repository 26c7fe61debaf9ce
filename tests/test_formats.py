"""Data people already have: Alpaca and ShareGPT rows read into the same conversations as LIMA and chat rows,
one format per file, every bad row a one-line `file:N` error, through local files and hub datasets alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lima_lightning.data.conversations import Conversation, read_conversations
from lima_lightning.data.tokenization import IGNORE_INDEX, encode_conversation, encode_prompt
from lima_lightning.errors import UserError

# One conversation, system prompt and two exchanges, written in each format (Alpaca holds one exchange, no system).
SYSTEM, U1, A1, U2, A2 = "Answer briefly.", "What is 2 + 3?", "5", "And times 4?", "20"
SAME_CONVERSATION = {
    "lima": {"conversations": [U1, A1, U2, A2]},
    "chat": {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": U1},
            {"role": "assistant", "content": A1},
            {"role": "user", "content": U2},
            {"role": "assistant", "content": A2},
        ]
    },
    "sharegpt": {
        "conversations": [
            {"from": "system", "value": SYSTEM},
            {"from": "human", "value": U1},
            {"from": "gpt", "value": A1},
            {"from": "human", "value": U2},
            {"from": "gpt", "value": A2},
        ]
    },
}


def write_jsonl(path: Path, *rows: object) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_alpaca_rows_become_instruction_then_input_then_output(tmp_path):
    path = write_jsonl(
        tmp_path / "alpaca.jsonl",
        {"instruction": "Add the numbers. ", "input": " 2 and 3\n", "output": "5"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},  # empty input: the instruction alone
        {"instruction": "Name a fruit.", "output": "Apple."},  # no input key
        {"instruction": "Say hi.", "input": None},  # no output: a prompt, for predict
    )
    rows = read_conversations(path)
    assert [c.turns for c in rows] == [
        ("Add the numbers.\n\n2 and 3", "5"),
        ("Name a colour.", "Blue."),
        ("Name a fruit.", "Apple."),
        ("Say hi.",),
    ]
    assert [c.where for c in rows] == [f"{path}:{i}" for i in (1, 2, 3, 4)] and rows[3].ends_on_user


def test_sharegpt_rows_read_like_chat_rows_and_accept_user_assistant(tmp_path):
    sharegpt = read_conversations(write_jsonl(tmp_path / "s.jsonl", SAME_CONVERSATION["sharegpt"]))
    chat = read_conversations(write_jsonl(tmp_path / "c.jsonl", SAME_CONVERSATION["chat"]))
    assert (sharegpt[0].system, sharegpt[0].turns) == (chat[0].system, chat[0].turns) == (SYSTEM, (U1, A1, U2, A2))
    aliases = {"conversations": [{"from": "user", "value": U1}, {"from": "assistant", "value": A1}, {"from": "human", "value": U2}]}
    row = read_conversations(write_jsonl(tmp_path / "a.jsonl", aliases))[0]
    assert (row.system, row.turns, row.ends_on_user) == (None, (U1, A1, U2), True)


@pytest.mark.parametrize("file_format", ["lima", "chat", "sharegpt", "alpaca"])
def test_every_format_trains_and_prompts_exactly_as_the_same_lima_conversation(file_format, tmp_path, tiny_tokenizer):
    """Same turns, so the same ids and labels (the label-mask and predict-prefix proofs of LIMA rows apply)."""
    tok = tiny_tokenizer
    if file_format == "alpaca":
        row, reference = {"instruction": "Add:", "input": "2 and 3", "output": A1}, Conversation(("Add:\n\n2 and 3", A1))
    else:
        row, reference = SAME_CONVERSATION[file_format], Conversation((U1, A1, U2, A2), system=None if file_format == "lima" else SYSTEM)
    conversation = read_conversations(write_jsonl(tmp_path / "d.jsonl", row))[0]
    example = encode_conversation(conversation, tok)
    assert example == encode_conversation(reference, tok)
    trained = [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != IGNORE_INDEX]
    answers = reference.turns[1::2]
    assert trained == [t for a in answers for t in [*tok(a, add_special_tokens=False)["input_ids"], tok.eos_token_id]]
    last_answer = len(example["labels"]) - 1 - example["labels"][::-1].index(IGNORE_INDEX)  # last untrained position
    assert encode_prompt(conversation, tok) == example["input_ids"][: last_answer + 1]


def test_the_first_row_decides_the_format_and_a_later_row_in_another_is_one_line(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", {"conversations": ["hi", "yo"]}, {"instruction": "hi", "output": "yo"})
    with pytest.raises(UserError) as error:
        read_conversations(path)
    assert str(error.value) == (
        f"{path}:2: row is in Alpaca format, but the file's first row ({path}:1) is in LIMA format; expected one format per file"
    )
    # LIMA and ShareGPT share the `conversations` key: strings are LIMA, objects ShareGPT.
    path = write_jsonl(tmp_path / "mixed2.jsonl", SAME_CONVERSATION["sharegpt"], {"conversations": ["hi", "yo"]})
    with pytest.raises(UserError, match=r"mixed2.jsonl:2: row is in LIMA format, but the file's first row \(.*:1\) is in ShareGPT"):
        read_conversations(path)


MESSAGE = {"role": "user", "content": "ok"}
# (bad row, what the error says after "file:2: "); each file's first row is a good one in the bad row's format.
BAD_ROWS = {
    "alpaca_instruction_number": ({"instruction": 3, "output": "x"}, "instruction is a number; expected a non-empty string"),
    "alpaca_instruction_null": ({"instruction": None, "output": "x"}, "instruction is null; expected a non-empty string"),
    "alpaca_instruction_empty": ({"instruction": " ", "output": "x"}, "instruction is empty; expected a non-empty string"),
    "alpaca_input_list": ({"instruction": "a", "input": ["b"], "output": "x"}, "input is an array; expected a string (empty or"),
    "alpaca_output_empty": ({"instruction": "a", "output": "\n"}, "output is empty; expected a non-empty string"),
    "alpaca_output_object": ({"instruction": "a", "output": {}}, "output is an object; expected a non-empty string"),
    "sharegpt_value_empty": ({"conversations": [{"from": "human", "value": ""}]}, "conversations[0].value is empty"),
    "sharegpt_value_number": ({"conversations": [{"from": "human", "value": 1}]}, "conversations[0].value is a number"),
    "sharegpt_unknown_from": (
        {"conversations": [{"from": "bing", "value": "x"}]},
        "conversations[0].from is 'bing'; expected 'human' or 'gpt' (or 'user', 'assistant'), or 'system' first",
    ),
    "sharegpt_from_not_string": ({"conversations": [{"from": ["human"], "value": "x"}]}, "conversations[0].from is ['human']"),
    "sharegpt_gpt_first": (
        {"conversations": [{"from": "gpt", "value": "x"}]},
        "conversations[0] has from 'gpt' where 'human' was expected; froms must be an optional 'system' first",
    ),
    "sharegpt_two_humans": (
        {"conversations": [{"from": "human", "value": "x"}, {"from": "user", "value": "y"}]},
        "conversations[1] has from 'user' where 'gpt' was expected",
    ),
    "sharegpt_late_system": (
        {"conversations": [{"from": "human", "value": "x"}, {"from": "system", "value": "y"}]},
        "conversations[1] has from 'system' where 'gpt' was expected",
    ),
    "sharegpt_only_system": ({"conversations": [{"from": "system", "value": "x"}]}, "'conversations' holds only a system prompt"),
    "sharegpt_not_an_object": ({"conversations": [{"from": "human", "value": "x"}, "y"]}, "conversations[1] is 'y'; expected {'from'"),
    "sharegpt_no_value": ({"conversations": [{"from": "human", "text": "x"}]}, "conversations[0] is {'from': 'human', 'text': 'x'}"),
    "chat_content_empty": ({"messages": [{"role": "user", "content": "  "}]}, "messages[0].content is empty; expected a non-empty"),
    "chat_content_number": ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content is a number; expected a non-empty"),
    "chat_content_null": ({"messages": [{"role": "user", "content": None}]}, "messages[0].content is null; expected a non-empty"),
    "chat_role_list": ({"messages": [{"role": ["user"], "content": "x"}]}, "messages[0] has role ['user'] where 'user' was expected"),
    "lima_turn_object": ({"conversations": ["x", {"a": 1}]}, "conversations[1] is an object; expected a non-empty string"),
}
GOOD_FIRST = {
    "alpaca": {"instruction": "ok", "output": "ok"},
    "sharegpt": {"conversations": [{"from": "human", "value": "ok"}]},
    "chat": {"messages": [MESSAGE]},
    "lima": {"conversations": ["ok"]},
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_in_every_format_are_one_line_naming_file_and_line(case, tmp_path):
    row, says = BAD_ROWS[case]
    path = write_jsonl(tmp_path / "bad.jsonl", GOOD_FIRST[case.split("_")[0]], row)
    with pytest.raises(UserError) as error:
        read_conversations(path)
    message = str(error.value)
    assert message.startswith(f"{path}:2: {says}") and "\n" not in message, message


def test_json_rows_are_numbered_from_1_like_jsonl_lines(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": ""}], indent=2))
    with pytest.raises(UserError, match=r"rows.json:2: output is empty"):
        read_conversations(path)
    path.write_text(json.dumps([GOOD_FIRST["sharegpt"]]))
    assert read_conversations(path)[0].where == f"{path}:1"


def test_hub_datasets_go_through_the_same_reader(tmp_path, monkeypatch):
    """`data.dataset=<hub id>` downloads `<split>.jsonl` and reads it like a local file: formats and errors alike."""
    from lima_lightning.data import sources

    (tmp_path / "bad").mkdir()
    files = {
        "people/sharegpt-set": write_jsonl(tmp_path / "train.jsonl", SAME_CONVERSATION["sharegpt"]),
        "people/bad-alpaca": write_jsonl(tmp_path / "bad" / "train.jsonl", GOOD_FIRST["alpaca"], {"instruction": "a", "output": 3}),
    }
    asked = []

    def download(repo_id, filename, option):
        asked.append((repo_id, filename, option))
        return str(files[repo_id])

    monkeypatch.setattr(sources, "download_dataset_file", download)
    rows = sources.load_conversations("people/sharegpt-set", "train", "data.dataset")
    assert rows[0].turns == (U1, A1, U2, A2) and rows[0].system == SYSTEM
    with pytest.raises(UserError, match=r"bad/train.jsonl:2: output is a number"):
        sources.load_conversations("people/bad-alpaca", "train", "data.dataset")
    assert asked == [("people/sharegpt-set", "train.jsonl", "data.dataset"), ("people/bad-alpaca", "train.jsonl", "data.dataset")]


def test_alpaca_file_through_the_data_module(tmp_path, tiny_dir):
    """fit's data module on an Alpaca file: one example per answered row; a row without output is counted, not trained."""
    from lima_lightning.data.datamodule import LIMADataModule

    rows = [{"instruction": f"Echo {i}", "input": "" if i % 2 else "now", "output": f"{i}"} for i in range(6)] + [{"instruction": "Hi"}]
    datamodule = LIMADataModule(dataset=str(write_jsonl(tmp_path / "a.jsonl", *rows)), tokenizer=str(tiny_dir), val_fraction=0)
    datamodule.setup("fit")
    stats = datamodule.stats["train"]
    assert (stats.conversations, stats.examples, stats.trailing_user_turns) == (7, 6, 1)
    first = encode_conversation(Conversation(("Echo 0\n\nnow", "0")), datamodule.tokenizer)
    assert datamodule.train_dataset[0] == first
