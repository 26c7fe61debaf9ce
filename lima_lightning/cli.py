"""`lima-lightning COMMAND`: the front door. Every command is a row of `COMMANDS`.

A row is either `LIGHTNING` (fit, validate, test, predict: LightningCLI over the module and the data module, in
`lima_lightning.trainer_cli`) or a module exposing `main(argv: list[str]) -> None` (a command that needs no
Trainer). `lima-lightning --help` is printed from this table before anything heavy is imported, so it is instant;
add a command by adding a row.
"""

from __future__ import annotations

import importlib
import sys

from lima_lightning.errors import UserError

LIGHTNING = "lightning"  # the target of a Trainer subcommand

# name -> (LIGHTNING or the module whose `main(argv)` runs it, one line for `lima-lightning --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": (LIGHTNING, "train a LoRA adapter (QLoRA: on an NF4 base) and save it in the run dir"),
    "validate": (LIGHTNING, "score a model on the held-out validation split: val/loss, validation.jsonl"),
    "test": (LIGHTNING, "the same held-out validation split as validate, logged as test/loss"),
    "predict": (LIGHTNING, "answer prompts (LIMA's 300 test prompts by default) into predictions.jsonl"),
    "report": ("lima_lightning.report", "compare runs: answer lengths, EOS, loops, losses, every answer side by side"),
    "export": ("lima_lightning.commands.export", "merge an adapter into its base, checked: a transformers model or a GGUF file"),
    "stats": ("lima_lightning.commands.stats", "count truncated, dropped and trained tokens of a dataset (tokenizer only)"),
    "inspect": ("lima_lightning.commands.inspect", "show rows as fit trains them, trained tokens highlighted (tokenizer only)"),
    "chat": ("lima_lightning.commands.chat", "talk to the base model or an adapter in the terminal, as predict prompts it"),
    "plan": ("lima_lightning.commands.plan", "predict a fit's peak GPU memory, checkpointing and speed from its config alone"),
}
# Commands that need no Trainer: name -> module exposing `main(argv)`.
TOOL_COMMANDS: dict[str, str] = {name: target for name, (target, _) in COMMANDS.items() if target != LIGHTNING}
HELP_FLAGS = ("-h", "--help")


def render_help() -> str:
    """`lima-lightning --help`: the product, every command in one line, where to start."""
    from lima_lightning import __version__

    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {line}" for name, (_, line) in COMMANDS.items())
    return f"""\
lima-lightning {__version__}: instruction-tune Llama-2 on LIMA with QLoRA or LoRA (PyTorch Lightning)

usage: lima-lightning COMMAND [--config FILE ...] [--OPTION VALUE ...]
       lima-lightning COMMAND --help      the options of COMMAND

commands:
{rows}

Start on a CPU, with nothing downloaded: lima-lightning fit --config configs/demo.yaml
Options come from YAML files (--config, several layer in order) and the command line (--model.lora_r 16);
`fit --print_config` shows the final configuration without loading anything."""


def renamed_option_hint(message: str) -> str | None:
    """One line naming the new key when `message` is jsonargparse refusing a generation option of before 0.2."""
    import re

    from lima_lightning.generation import RENAMED_OPTIONS

    for old, new in RENAMED_OPTIONS.items():
        # `--model.max_new_tokens 5` on the command line, or `model: {max_new_tokens: 5}` in a config file.
        if re.search(rf"(model\.{old}\b|['\"]{old}['\"])", message) and ("model" in message):
            return f"model.{old} is now model.generation.{new} (generation options are grouped); rename it in the config or command line"
    return None


def fail(error: UserError) -> None:
    """A user's mistake: one line on stderr, exit status 2 (1 for `Unavailable`), no traceback."""
    print(f"lima-lightning: error: {error}", file=sys.stderr)
    sys.exit(error.exit_status)


def cli_main(args: list[str] | None = None):
    """Run a Lightning subcommand; tests call it with `args` and inspect the returned CLI (its trainer, model).

    `--help` is the short help (the project's options first); `--help=full` (or `--help full`) is LightningCLI's.
    """
    from lima_lightning import console

    args = sys.argv[1:] if args is None else list(args)
    console.setup()
    from lima_lightning import trainer_cli

    console.after_lightning_import()
    console.choose_matmul_precision()
    from lima_lightning import failures

    try:
        return trainer_cli.run(args)
    except BaseException as e:
        failures.exit_for(e, failures.cli_argv(args))  # one line and exit, for anything a user can cause or meet
        raise  # a bug: its traceback


def parse_fit_config(args: list[str]):
    """The configuration `lima-lightning fit ARGS` would run with, without building a model, data or Trainer.

    For commands that take fit's arguments but load no weights (e.g. `inspect`, `plan`): `config.model`,
    `config.data` and `config.trainer` are namespaces of plain values; `LIMADataModule(**config.data)` is cheap.
    """
    from lima_lightning import trainer_cli

    try:
        return trainer_cli.parse_fit_config(args)
    except UserError as e:
        fail(e)


def __getattr__(name: str):
    # The LightningCLI classes live in trainer_cli (importing Lightning takes seconds); `from lima_lightning.cli
    # import LimaCLI` still works, and imports it only then.
    if name in ("LimaCLI", "OneLineErrorParser"):
        from lima_lightning import trainer_cli

        return getattr(trainer_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> None:
    """Console script `lima-lightning` (returns None, so the exit status is 0 on success)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in HELP_FLAGS:
        print(render_help())
        return
    if argv[0] in ("-V", "--version"):
        from lima_lightning import __version__

        print(f"lima-lightning {__version__}")
        return
    if not argv[0].startswith("-") and argv[0] not in COMMANDS:
        from lima_lightning import failures

        print(failures.unknown_command_line(argv[0], list(COMMANDS)), file=sys.stderr)
        sys.exit(2)
    target = COMMANDS.get(argv[0], (LIGHTNING, ""))[0]
    from lima_lightning.memory import prefer_expandable_segments

    prefer_expandable_segments()
    if target == LIGHTNING:
        cli_main(argv)
        return
    from lima_lightning import console

    console.setup()
    try:
        importlib.import_module(target).main(argv[1:])
    except BaseException as e:
        from lima_lightning import failures

        failures.exit_for(e, argv)  # UserError, CheckFailed, a full disk, ...: one line
        raise
