"""Every shipped config parses for the subcommands it serves, without loading anything heavy."""

from __future__ import annotations

import sys
import time

import pytest
import yaml

from tests.conftest import REPO, run_cli

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def print_config(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*args, "--print_config")
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.name != "predict.yaml"], ids=lambda p: p.name)
@pytest.mark.parametrize("subcommand", ["fit", "predict"])
def test_config_parses(config, subcommand, capsys):
    started = time.perf_counter()
    parsed = print_config(capsys, subcommand, "--config", str(config))
    assert parsed["model"]["base_model"]
    assert "tokenizer" not in parsed["data"]  # linked to model.base_model, never typed twice
    assert "transformers.models.llama.modeling_llama" not in sys.modules or time.perf_counter() - started < 30


def test_predict_config_layers_over_a_model_config(capsys):
    parsed = print_config(
        capsys, "predict", "--config", str(REPO / "configs/llama2-7b-qlora.yaml"), "--config", str(REPO / "configs/predict.yaml")
    )
    assert parsed["model"]["generation"]["merge"] == "auto" and parsed["model"]["quantization"] == "nf4"
    assert parsed["model"]["generation"]["max_new_tokens"] == 500  # the default, written once


def test_each_config_opens_with_the_command_that_runs_it():
    for config in CONFIGS:
        assert config.read_text().startswith("# lima-lightning "), config.name


def test_bad_choice_fails_at_parse_time_with_the_valid_values(capsys):
    with pytest.raises(SystemExit):
        run_cli("fit", "--config", str(REPO / "configs/demo.yaml"), "--model.quantization", "int3", "--print_config")
    err = capsys.readouterr().err
    assert "int3" in err and "nf4" in err and "none" in err


def test_a_generation_option_of_before_the_group_names_its_new_key(capsys, tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  merge_for_generation: auto\n")
    for args in (["--model.max_new_tokens", "5"], ["--config", str(old)]):
        with pytest.raises(SystemExit) as exit_info:
            run_cli("predict", "--config", str(REPO / "configs/demo.yaml"), *args, "--print_config")
        assert exit_info.value.code == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        new = "model.generation.max_new_tokens" if "5" in args else "model.generation.merge"
        assert line.startswith("lima-lightning: error: model.") and f"is now {new}" in line, line
