"""Bad data and bad config: one line naming the file:line or option, exit status 2, no traceback, no model loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import demo_args, run_cli
from tests.reliability_helpers import lima_subprocess

LONG_PROMPT = "Please answer the following question with great care and in detail: " * 3

# (file name, content, what the one error line must say after "lima-lightning: error: <path>")
BAD_DATA = {
    "invalid_json": (
        "d.jsonl",
        '{"conversations": ["hi", "yo"]}\n{"conversations": ["hi", "yo"\n',
        ":2: invalid JSON (",
        "one JSON object per line",
    ),
    "not_utf8": (
        "d.jsonl",
        b'{"conversations": ["hi", "yo"]}\n{"conversations": ["h\xffi", "yo"]}\n',
        ":2: not UTF-8 text",
        "expected UTF-8",
    ),
    "no_turns_key": (
        "d.jsonl",
        '{"conversations": ["hi", "yo"]}\n{"text": "hi"}\n',
        ":2: row has no 'conversations', 'messages' or 'instruction'",
        "(LIMA format)",
    ),
    "null_row": ("d.jsonl", "null\n", ":1: row is null", "expected {"),
    "number_turn": ("d.jsonl", '{"conversations": ["hi", 3]}\n', ":1: conversations[1] is a number", "expected a non-empty string"),
    "empty_turn": ("d.jsonl", '{"conversations": ["hi", "  "]}\n', ":1: conversations[1] is empty", "expected a non-empty string"),
    "role_order": (
        "d.jsonl",
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}) + "\n",
        ":1: messages[1] has role 'user' where 'assistant' was expected",
        "'user' and 'assistant' alternating",
    ),
    # A chat turn is validated like a LIMA turn (`content` here, a `conversations` item there).
    "empty_content": (
        "d.jsonl",
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " \n"}]}) + "\n",
        ":1: messages[1].content is empty",
        "expected a non-empty string",
    ),
    "number_content": (
        "d.jsonl",
        json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "yo"}]}) + "\n",
        ":1: messages[0].content is a number",
        "expected a non-empty string",
    ),
    "list_content": (
        "d.jsonl",
        json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}) + "\n",
        ":1: messages[0].content is an array",
        "expected a non-empty string",
    ),
    "null_content": (
        "d.jsonl",
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]}) + "\n",
        ":1: messages[1].content is null",
        "expected a non-empty string",
    ),
    "empty_file": ("d.jsonl", "\n", ": the file has no rows", "expected {"),
    "json_not_a_list": ("d.json", '{"conversations": ["hi", "yo"]}', ": top level is an object", "expected a JSON list"),
    "all_dropped": (
        "d.jsonl",
        "".join(json.dumps({"conversations": [LONG_PROMPT, "yes"]}) + "\n" for _ in range(4)),
        ": every one of 4 training conversations was dropped",
        "raise max_seq_length",
    ),
}


def write_bad(tmp_path: Path, case: str) -> tuple[Path, str, str]:
    name, content, wrong, expected = BAD_DATA[case]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path, wrong, expected


def bad_data_args(root: Path, path: Path) -> list[str]:
    return ["fit", *demo_args(root, "--data.dataset", str(path), "--data.max_seq_length", "32", "--data.val_fraction", "0")]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if any model weights are loaded."""
    import transformers

    from lima_lightning.models import loading

    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a model was loaded for bad data")

    monkeypatch.setattr(loading, "load_base_model", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    return calls


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_one_line_before_any_model_loads(case, tmp_path, capsys, no_model_loading, tiny_dir):
    path, wrong, expected = write_bad(tmp_path, case)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*bad_data_args(tmp_path, path))
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    where = f"data.dataset={path}" if case == "all_dropped" else str(path)
    assert line.startswith(f"lima-lightning: error: {where}{wrong}") and expected in line, line
    assert not no_model_loading


# One case per place a bad input is caught (reading a line, validating a row, after tokenizing, parsing options),
# each through `python -m lima_lightning fit` in a real process; the in-process test above covers every case.
REAL_CLI_CASES = ["invalid_json", "role_order", "all_dropped", "int3"]
BAD_OPTIONS = {"int3": ("--model.quantization", "int3")}


@pytest.mark.slow
def test_bad_input_through_the_real_cli_is_exactly_one_line_on_stderr(tmp_path, tiny_dir):
    """stderr holds the error line alone (Lightning's info goes to stdout), exit status 2, no weights read."""
    pending = list(REAL_CLI_CASES)
    running: dict[str, object] = {}
    while pending or running:
        while pending and len(running) < 2:  # two at a time: each process spends ~5 s importing torch and Lightning
            case = pending.pop()
            (tmp_path / case).mkdir()
            if case in BAD_OPTIONS:
                args = ["fit", *demo_args(tmp_path / case, *BAD_OPTIONS[case])]
            else:
                args = bad_data_args(tmp_path / case, write_bad(tmp_path / case, case)[0])
            running[case] = lima_subprocess(*args)
        case, process = next(iter(running.items()))
        out, err = running.pop(case).communicate(timeout=300)
        assert process.returncode == 2, (case, err[-2000:])
        assert len(err.splitlines()) == 1 and err.startswith("lima-lightning: error: "), (case, err)
        if case in BAD_OPTIONS:
            assert BAD_OPTIONS[case][0].lstrip("-") in err, err
        else:
            _, _, wrong, expected = BAD_DATA[case]
            assert wrong in err and expected in err, (case, err)
        # No weights were read: transformers reports loading on stderr, and there is nothing else there.
        assert "Loading weights" not in out + err, case


def test_recoverable_oddities_are_counted_not_fatal(tmp_path, tiny_dir):
    from lima_lightning.data.datamodule import LIMADataModule

    rows = [
        {"conversations": ["What is 2 + 2?", "4"]},
        {"conversations": ["Hi", "Hello!", "And a follow-up that is never answered"]},  # ends on a user turn
        {"conversations": ["Write a lot.", "word " * 200]},  # longer than max_seq_length: truncated
        {"conversations": [LONG_PROMPT * 4, "yes"]},  # nothing of the answer fits: dropped
    ]
    path = tmp_path / "odd.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = LIMADataModule(dataset=str(path), tokenizer=str(tiny_dir), max_seq_length=128, val_fraction=0)
    data.setup("fit")
    stats = data.stats["train"]
    assert (stats.conversations, stats.examples) == (4, 3)
    assert (stats.trailing_user_turns, stats.truncated, stats.dropped_no_target) == (1, 2, 1)
    assert all(len(example["input_ids"]) <= 128 for example in data.train_dataset)


@pytest.mark.parametrize(
    "option, says",
    [
        (("--model.quantization", "int3"), ['"model.quantization"', "'nf4', 'none'", "int3"]),
        (("--model.lora_r", "0"), ["model.lora_r=0: must be a positive integer"]),
        (("--model.lora_r", "-4"), ["model.lora_r=-4: must be a positive integer"]),
        (("--data.val_fraction", "1.0"), ["data.val_fraction=1.0: must be in [0, 1)"]),
        (("--data.val_fraction", "-0.1"), ["data.val_fraction=-0.1: must be in [0, 1)"]),
        (("--model.nonsense", "1"), ["unrecognized arguments: --model.nonsense 1", "--help"]),
    ],
)
def test_bad_option_is_one_line_naming_the_option_and_valid_values(option, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", *demo_args(tmp_path, *option))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lima-lightning: error: ") and all(s in err[-1] for s in says), err
    assert not any("Traceback" in line for line in err)


def test_base_model_directory_without_weights_or_tokenizer_is_named(tmp_path, tiny_dir, capsys):
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        (no_weights / name).write_bytes((tiny_dir / name).read_bytes())
    empty = tmp_path / "empty"
    empty.mkdir()
    for base, says in ((no_weights, "the directory holds no *.safetensors weights"), (empty, "the directory holds no tokenizer")):
        with pytest.raises(SystemExit):
            run_cli("fit", *demo_args(tmp_path, "--model.base_model", str(base), "--trainer.max_steps", "1"))
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"lima-lightning: error: model.base_model={base}: {says}")


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, tiny_dir) -> Path:
    from lima_lightning.callbacks import save_adapter
    from lima_lightning.module import LIMALoRAModule

    module = LIMALoRAModule(base_model="tiny", quantization="none", lora_r=4, gradient_checkpointing=False)
    module.configure_model()
    return save_adapter(module, tmp_path_factory.mktemp("adapter") / "final")


@pytest.fixture(scope="module")
def narrower_base(tmp_path_factory, tiny_dir) -> Path:
    """Another Llama (hidden size 32, not 64) with the same tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lima_lightning.models.loading import load_tokenizer

    path = tmp_path_factory.mktemp("narrow-llama")
    tokenizer = load_tokenizer(str(tiny_dir))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("subcommand", ["fit", "predict"])
def test_adapter_of_another_base_is_refused(subcommand, tiny_adapter, narrower_base, tmp_path, capsys):
    args = ("--model.base_model", str(narrower_base), "--model.adapter_path", str(tiny_adapter), "--trainer.max_steps", "1")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(subcommand, *demo_args(tmp_path, *args))
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(
        f"lima-lightning: error: model.adapter_path={tiny_adapter}: its weights do not fit model.base_model={narrower_base}"
    )


def test_a_pickled_adapter_is_not_read(tiny_adapter, tmp_path, capsys):
    import shutil

    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled-adapter"
    shutil.copytree(tiny_adapter, pickled)
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()  # PEFT would fall back to the .bin
    with pytest.raises(SystemExit):
        run_cli("predict", *demo_args(tmp_path, "--model.adapter_path", str(pickled)))
    assert "no adapter_model.safetensors there (a pickled adapter_model.bin is not read)" in capsys.readouterr().err
