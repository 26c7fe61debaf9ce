"""`lima-lightning fit|validate|test|predict`: LightningCLI over the module and the data module.

Commands that need no Trainer (`stats`, `report`, `export`) are plain functions registered in
`TOOL_COMMANDS`; each module there exposes `main(argv: list[str]) -> None`.
"""

from __future__ import annotations

import importlib
import sys

from lightning.pytorch.cli import LightningCLI

from lima_lightning.callbacks import PredictionWriter, SampleGenerations, SaveAdapters
from lima_lightning.data.datamodule import LIMADataModule
from lima_lightning.errors import UserError
from lima_lightning.module import LIMALoRAModule

TOOL_COMMANDS: dict[str, str] = {}


class LimaCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Configure each value once: the tokenizer is the base model's.
        parser.link_arguments("model.base_model", "data.tokenizer")
        # Always-on callbacks, each configurable under its own key (--adapters.*, --samples.*, --predictions.*).
        parser.add_lightning_class_args(SaveAdapters, "adapters")
        parser.add_lightning_class_args(SampleGenerations, "samples")
        parser.add_lightning_class_args(PredictionWriter, "predictions")


def fail(error: UserError) -> None:
    """A user's mistake: one line on stderr, exit status 2, no traceback."""
    print(f"lima-lightning: error: {error}", file=sys.stderr)
    sys.exit(2)


def cli_main(args: list[str] | None = None) -> LimaCLI:
    """Run a Lightning subcommand; tests call it with `args` and inspect the returned CLI (its trainer, model)."""
    try:
        return LimaCLI(
            LIMALoRAModule,
            LIMADataModule,
            args=args,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"default_env": False},
        )
    except UserError as e:
        fail(e)


def main(argv: list[str] | None = None) -> None:
    """Console script `lima-lightning` (returns None, so the exit status is 0 on success)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TOOL_COMMANDS:
        try:
            importlib.import_module(TOOL_COMMANDS[argv[0]]).main(argv[1:])
        except UserError as e:
            fail(e)
        return
    cli_main(argv)
