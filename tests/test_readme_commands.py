"""Docs that match the product: every `lima-lightning` command in the ```bash blocks of README.md and docs/*.md
runs as written.

Works on whatever the docs hold (the commands are read from them, not listed here):
- fit / validate / test / predict are run with `--print_config` (configs and options are parsed and resolved,
  nothing loads: a 7B fit would need a GPU and the hub), as litgpt tests its configs;
- the commands that need no Trainer (stats, inspect, report, export, ...) are run for real in a scratch copy of
  the repository layout, with `../shared` beside it; one whose input only a GPU run makes (a 7B adapter) must fail
  on that missing file alone, never on an option;
- every run dir a command names, `runs/X/lightning_logs/version_N`, lies under the `trainer.default_root_dir` of a
  documented Trainer command's configuration: a path the documented commands never write is caught;
- `make`, `export`, `tensorboard` lines are skipped; `torchrun ... -m lima_lightning ARGS` is checked as ARGS.
"""

from __future__ import annotations

import re
import shlex

import pytest
import yaml

from tests.conftest import REPO, SHARED

README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
SKIPPED_PROGRAMS = ("make", "export", "tensorboard", "pip", "git", "cd", "source", "bash")
RUN_DIR = re.compile(r"(?<![\w/.])(runs/[^/\s=]+)/lightning_logs/version_\d+")


def readme_commands(text: str) -> list[tuple[int, list[str]]]:
    """(line number, argv after `lima-lightning`) of every lima-lightning command in a ```bash block of `text`."""
    commands = []
    for block in re.finditer(r"^```bash\n(.*?)^```", text, re.S | re.M):
        start = text[: block.start()].count("\n") + 2  # the block's first line, 1-based
        pending, first = "", None
        for i, raw in enumerate(block.group(1).split("\n")):
            first = start + i if first is None else first
            if raw.endswith("\\"):  # a continuation line
                pending += raw[:-1] + " "
                continue
            argv, number, pending, first = shlex.split(pending + raw, comments=True), first, "", None
            if not argv or argv[0] in SKIPPED_PROGRAMS:
                continue
            if argv[0] == "torchrun" and "-m" in argv:  # the launcher's own options, then the module's
                module = argv.index("-m") + 1
                argv = ["lima-lightning", *argv[module + 1 :]] if argv[module] == "lima_lightning" else []
            elif argv[:3] in (["python", "-m", "lima_lightning"], ["python3", "-m", "lima_lightning"]):
                argv = ["lima-lightning", *argv[3:]]
            if argv and argv[0] == "lima-lightning" and len(argv) > 1:
                commands.append((number, argv[1:]))
    return commands


# (file:line, argv) of every documented command
COMMANDS = [(f"{doc.relative_to(REPO)}:{line}", argv) for doc in DOCS for line, argv in readme_commands(doc.read_text(encoding="utf-8"))]
TRAINER = [c for c in COMMANDS if c[1][0] in TRAINER_COMMANDS]
TOOLS = [c for c in COMMANDS if c[1][0] not in TRAINER_COMMANDS]


def line_id(value) -> str | None:
    return value if isinstance(value, str) and value.endswith(tuple("0123456789")) else None


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A scratch directory laid out like the repository (configs, benchmarks) with `../shared` beside it, so
    that commands write their outputs there and read what the README says they read."""
    root = tmp_path_factory.mktemp("readme")
    repo = root / "repo"
    repo.mkdir()
    for name in ("configs", "benchmarks", "tests"):
        (repo / name).symlink_to(REPO / name)
    if SHARED.is_dir():
        (root / "shared").symlink_to(SHARED)
    return repo


def print_config(argv: list[str], capsys) -> dict:
    from lima_lightning.cli import cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main([*argv, "--print_config"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err
    return yaml.safe_load(captured.out)


def test_the_readme_has_commands():
    subcommands = {argv[0] for where, argv in COMMANDS if where.startswith("README.md:")}
    assert {"fit", "predict"} <= subcommands, subcommands
    # validate and test are explained with a command each (what `test` scores is said beside it).
    assert {"validate", "test"} <= subcommands, "README shows no `lima-lightning validate` / `test` command"


@pytest.mark.parametrize("line, argv", TRAINER, ids=line_id)
def test_trainer_command_parses_as_written(line, argv, sandbox, monkeypatch, capsys):
    monkeypatch.chdir(sandbox)
    if any(a.startswith("../shared") for a in argv) and not SHARED.is_dir():
        pytest.skip("../shared is absent (a fresh clone)")
    config = print_config(argv, capsys)
    assert config["trainer"]["default_root_dir"], f"{line}: no trainer.default_root_dir"


def documented_root_dirs(capsys) -> set[str]:
    roots = set()
    for _, argv in COMMANDS:
        if argv[0] in TRAINER_COMMANDS:
            roots.add(print_config(argv, capsys)["trainer"]["default_root_dir"].rstrip("/"))
    return roots


def test_every_run_dir_named_is_one_a_documented_command_writes(sandbox, monkeypatch, capsys):
    monkeypatch.chdir(sandbox)
    roots = documented_root_dirs(capsys)
    wrong = [
        f"{line}: {match.group(0)} (documented run dirs lie under {sorted(roots)})"
        for line, argv in COMMANDS
        for match in RUN_DIR.finditer(" ".join(argv))
        if match.group(1) not in roots
    ]
    assert not wrong, "\n".join(wrong)


USAGE_ERRORS = ("usage:", "unrecognized arguments", "invalid choice", "the following arguments are required", "expected one argument")


@pytest.mark.slow
@pytest.mark.parametrize("line, argv", TOOLS, ids=line_id)
def test_tool_command_runs_as_written(line, argv, sandbox, monkeypatch, capsys):
    from lima_lightning.cli import main

    monkeypatch.chdir(sandbox)
    if any(a.startswith("../shared") or "=../shared" in a for a in argv) and not SHARED.is_dir():
        pytest.skip("../shared is absent (a fresh clone)")
    try:
        main(argv)
        return
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err.strip()
    assert status == 2 and not any(u in err for u in USAGE_ERRORS), f"{line}: {err}"
    # The one acceptable failure: an input that only a GPU run of a documented command makes, named as missing.
    missing = [a for a in re.split(r"[\s=]", " ".join(argv)) if a.startswith("runs/") and not (sandbox / a).exists()]
    assert missing and any(m in err for m in missing), f"{line}: {err}"


def test_readme_states_the_python_version():
    requires = re.search(r'^requires-python = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)  # ">=3.10"
    version = requires.removeprefix(">=")
    assert re.search(rf"Python {re.escape(version)}\b", README.read_text()), f"README.md never says Python {version} ({requires})"
