"""Help that helps: `lima-lightning --help` names every command in one line, instantly; a subcommand's `--help`
starts with the project's options (`--help=full`: everything); a mistyped option names the nearest valid one."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from lima_lightning.cli import COMMANDS, LIGHTNING, TOOL_COMMANDS, main
from tests.conftest import REPO, demo_args, run_cli

CORE_COMMANDS = ("fit", "validate", "test", "predict", "report", "export", "stats", "inspect")


def test_top_level_help_names_the_product_and_every_command_in_one_line_each(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("lima-lightning ") and "Llama-2" in out and "LIMA" in out
    assert "Lightning Trainer command line tool" not in out
    lines = out.splitlines()
    for name in (*CORE_COMMANDS, *COMMANDS):
        (row,) = [line for line in lines if line.split()[:1] == [name]]
        description = COMMANDS[name][1]
        assert row.endswith(description), (row, description)  # the whole description, on its one line
        assert len(row) <= 100 and not description.endswith((",", ";", ":", " and", " or")), row
    main([])  # no command: the same help
    assert capsys.readouterr().out == out


def test_top_level_help_imports_nothing_heavy_and_takes_under_3_seconds():
    # The table is printed before torch or Lightning load (importing them takes 8+ s on 2 busy cores).
    code = (
        "import sys, time; t = time.perf_counter(); from lima_lightning.cli import main; main(['--help']); "
        "heavy = [m for m in ('torch', 'lightning', 'transformers', 'jsonargparse') if m in sys.modules]; "
        "print('HEAVY', heavy, time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert "HEAVY [] " in out, out.splitlines()[-1]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lima_lightning", "--help"], capture_output=True, check=True, cwd=REPO)
    assert time.perf_counter() - start < 3.0


def test_every_tool_command_runs_its_module():
    import importlib

    assert set(CORE_COMMANDS) <= set(COMMANDS)
    assert [n for n, (t, _) in COMMANDS.items() if t == LIGHTNING] == ["fit", "validate", "test", "predict"]
    for name, module in TOOL_COMMANDS.items():
        assert callable(importlib.import_module(module).main), name


def help_text(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*args)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def option_lines(text: str) -> list[str]:
    return [line.split()[0] for line in text.splitlines() if line.startswith("  --")]


def test_fit_help_starts_with_the_project_options_and_is_short(capsys):
    text = help_text(capsys, "fit", "--help")
    options = option_lines(text)
    assert options[0] == "--model.base_model", options[:3]
    first_trainer = next(i for i, o in enumerate(options) if o.startswith("--trainer."))
    project = [o for o in options if o.startswith(("--model.", "--data."))]
    assert all(options.index(o) < first_trainer for o in project)
    for expected in ("--model.lora_r", "--model.generation.max_new_tokens", "--data.batch_size", "--samples.num_prompts"):
        assert expected in options
    for callback_group in ("adapters", "samples", "predictions", "validation_rows", "checkpoint"):
        assert f"\n{callback_group}: " in text
    assert "--trainer.max_epochs" in options and "--trainer.enable_autolog_hparams" not in options
    assert len(text.splitlines()) < 300 and "--help=full" in text and "train a LoRA adapter" in text
    # The project's own help is whole; Lightning's is cut at a sentence end, never mid-sentence.
    assert "(a seeded tiny Llama built in code; nothing is downloaded)." in " ".join(text.split())


@pytest.mark.parametrize("full", [["--help=full"], ["--help", "full"]])
def test_fit_help_full_is_lightnings_whole_text(capsys, full):
    text = help_text(capsys, "fit", *full)
    assert "--trainer.enable_autolog_hparams" in text and "--model.lora_r" in text and len(text.splitlines()) > 500


@pytest.mark.parametrize("full", [[], ["--help=full"]])
def test_subcommand_help_uses_the_commands_table_line(capsys, full):
    text = help_text(capsys, "test", *(full or ["--help"]))
    assert COMMANDS["test"][1] in text and "validation split" in COMMANDS["test"][1]


def test_print_config_still_works(capsys):
    text = help_text(capsys, "fit", "--config", str(REPO / "configs/demo.yaml"), "--print_config")
    assert "base_model: tiny" in text and "dataset: synthetic" in text


def one_error_line(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lima-lightning: error: "), err
    return err[0]


@pytest.mark.parametrize(
    "typo, nearest",
    [
        ("--model.lora_rr", "--model.lora_r"),
        ("--data.batchsize", "--data.batch_size"),
        ("--model.generation.max_new_tokenz", "--model.generation.max_new_tokens"),
        ("--modell.lora_r", "--model.lora_r"),
        ("--trainer.max_epoks", "--trainer.max_epochs"),
    ],
)
def test_a_mistyped_option_names_the_nearest_valid_one(capsys, tmp_path, typo, nearest):
    line = one_error_line(capsys, "fit", *demo_args(tmp_path, typo, "3"))
    assert f"did you mean {nearest}?" in line and typo in line and "`lima-lightning fit --help`" in line


def test_a_mistyped_key_in_a_config_file_names_the_nearest_valid_one(capsys, tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("data:\n  batchsize: 3\nmodel:\n  generation:\n    max_new_tokenz: 5\n")
    line = one_error_line(capsys, "fit", *demo_args(tmp_path, "--config", str(config)))
    assert "did you mean data.batch_size?" in line or "did you mean model.generation.max_new_tokens?" in line, line


def test_renamed_options_still_name_their_new_key(capsys, tmp_path):
    line = one_error_line(capsys, "predict", *demo_args(tmp_path, "--model.max_new_tokens", "5"))
    assert "model.max_new_tokens is now model.generation.max_new_tokens" in line


@pytest.mark.slow
def test_test_scores_the_validation_split_as_documented(tmp_path):
    # `test` has no split of its own (LIMA's test prompts carry no answers): it scores what `validate` scores.
    args = demo_args(tmp_path, "--data.synthetic_size", "60", "--trainer.logger", "false")
    validate = run_cli("validate", *args).trainer.callback_metrics
    test = run_cli("test", *args).trainer.callback_metrics
    assert float(test["test/loss"]) == pytest.approx(float(validate["val/loss"]), rel=1e-6)
