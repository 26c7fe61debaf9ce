"""`lima-lightning fit|validate|test|predict`: LightningCLI over the module and the data module.

Commands that need no Trainer (`stats`, `report`, `export`, `inspect`) are registered in `TOOL_COMMANDS`; each
module there exposes `main(argv: list[str]) -> None`.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from lima_lightning import failures
from lima_lightning.callbacks import PredictionWriter, SampleGenerations, SaveAdapters, ValidationWriter
from lima_lightning.checkpointing import (
    AtomicCheckpointIO,
    ResumableCheckpoint,
    check_not_finished,
    check_resume_config,
    load_checkpoint_file,
    resolve_resume,
)
from lima_lightning.data.datamodule import LIMADataModule
from lima_lightning.errors import UserError
from lima_lightning.generation import RENAMED_OPTIONS
from lima_lightning.memory import request_budget
from lima_lightning.module import LIMALoRAModule
from lima_lightning.phases import PHASES, PhaseReport
from lima_lightning.progress import GenerationProgress

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# Commands that need no Trainer: name -> module exposing `main(argv)`.
TOOL_COMMANDS: dict[str, str] = {
    "stats": "lima_lightning.commands.stats",
    "report": "lima_lightning.report",
    "export": "lima_lightning.commands.export",
    "inspect": "lima_lightning.commands.inspect",
    "plan": "lima_lightning.commands.plan",
    "chat": "lima_lightning.commands.chat",
}


class OneLineErrorParser(LightningArgumentParser):
    """A bad option is one line on stderr, like every other user mistake, not the 90-line usage first."""

    def error(self, message: str, ex: Exception | None = None):
        # jsonargparse raises instead of exiting while it tries alternatives (exit_on_error off): keep that.
        if not self.exit_on_error or callable(getattr(self, "_error_handler", None)):
            return super().error(message, ex)
        subcommand = self.prog.split()[-1] if self.prog.endswith(("fit", "validate", "test", "predict")) else ""
        fail(
            UserError(
                renamed_option_hint(message)
                or f"{' '.join(message.split())} (`lima-lightning {subcommand} --help` lists the options)".replace("  ", " ")
            )
        )


class LimaCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Configure each value once: the tokenizer is the base model's.
        parser.link_arguments("model.base_model", "data.tokenizer")
        # Always-on callbacks, each configurable under its own key (--adapters.*, --samples.*, --predictions.*).
        parser.add_lightning_class_args(SaveAdapters, "adapters")
        parser.add_lightning_class_args(SampleGenerations, "samples")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(ValidationWriter, "validation_rows")
        parser.add_lightning_class_args(ResumableCheckpoint, "checkpoint")
        parser.add_argument(
            "--gpu_memory_gib",
            type=float | None,
            default=None,
            help="GPU memory this run may use, in GiB (default: the whole device), enforced per process: a run that "
            "needs more fails as it would on a smaller card. Checkpointing, generation chunks and merging plan against it.",
        )

    def instantiate_trainer(self, **kwargs):
        # Lightning's refusals of the Trainer options (no GPU for a GPU config, ...) are one line (failures.py).
        with failures.trainer_config_errors(self._get(self.config, "trainer", {}).get("accelerator")):
            trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(failures.TidyFailedRun())  # a run that fails before training leaves no run dir
        # Atomic checkpoint writes and weights_only reads, unless a plugin chose another CheckpointIO.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        trainer.callbacks.append(PhaseReport())  # the time from the command to its result, per phase
        trainer.callbacks.append(GenerationProgress())  # predict: prompts and tokens, not batches
        return trainer

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        self._resume_in: tuple[int, int] | None = None  # (run dir version, checkpoint step) when continuing a run
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        if not config or not config.get("ckpt_path"):
            return
        # Before LightningCLI reads the checkpoint's model hparams into this config (which would silently replace
        # a different base model or LoRA shape): `last` becomes a file, and the file is checked here, loaded
        # weights-only, so a missing, truncated or code-carrying checkpoint is a one-line error.
        root = config.trainer.get("default_root_dir") or os.getcwd()
        config.ckpt_path, version = resolve_resume(config.ckpt_path, root)
        if config.ckpt_path:
            checkpoint = load_checkpoint_file(config.ckpt_path, mmap=True)
            check_resume_config(checkpoint.get("hyper_parameters", {}), config.model, config.ckpt_path)
            rank_zero_info(f"--ckpt_path: {config.ckpt_path} (epoch {checkpoint['epoch']}, step {checkpoint['global_step']})")
            if subcommand == "fit":
                check_not_finished(checkpoint, config.trainer, config.ckpt_path)  # RunFinished: one line, exit 0
            if version is not None and subcommand == "fit":
                self._resume_in = (version, int(checkpoint["global_step"]))

    def before_instantiate_classes(self) -> None:
        PHASES.mark_startup()
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else self.config
        request_budget(config.get("gpu_memory_gib"))

    def before_fit(self) -> None:
        # Continue the run in its own run dir; TensorBoard drops what the killed process logged after the
        # checkpoint (purge_step), since the resumed run logs those steps again.
        logger = self.trainer.logger
        if self._resume_in is not None and type(logger) is TensorBoardLogger:
            version, step = self._resume_in
            self.trainer.logger = TensorBoardLogger(logger.save_dir, name=logger.name, version=version, purge_step=step)
        self.trainer.lima_resumed_run = self._resume_in is not None  # failures.TidyFailedRun never removes its dir


def renamed_option_hint(message: str) -> str | None:
    """One line naming the new key when `message` is jsonargparse refusing a generation option of before 0.2."""
    import re

    for old, new in RENAMED_OPTIONS.items():
        # `--model.max_new_tokens 5` on the command line, or `model: {max_new_tokens: 5}` in a config file.
        if re.search(rf"(model\.{old}\b|['\"]{old}['\"])", message) and ("model" in message):
            return f"model.{old} is now model.generation.{new} (generation options are grouped); rename it in the config or command line"
    return None


def fail(error: UserError) -> None:
    """A user's mistake: one line on stderr, exit status 2 (1 for `Unavailable`), no traceback."""
    print(f"lima-lightning: error: {error}", file=sys.stderr)
    sys.exit(error.exit_status)


def cli_main(args: list[str] | None = None) -> LimaCLI:
    """Run a Lightning subcommand; tests call it with `args` and inspect the returned CLI (its trainer, model)."""
    try:
        return LimaCLI(
            LIMALoRAModule,
            LIMADataModule,
            args=args,
            parser_class=OneLineErrorParser,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"default_env": False},
        )
    except BaseException as e:
        failures.exit_for(e, failures.cli_argv(args))  # one line and exit, for anything a user can cause or meet
        raise  # a bug: its traceback


class _ConfigOnlyCLI(LimaCLI):
    """Parses fit's arguments (configs, overrides, defaults, links) and instantiates nothing."""

    def instantiate_classes(self) -> None:
        pass

    def _set_seed(self) -> None:
        pass  # reading a configuration must not seed this process's RNGs

    def after_instantiate_classes(self) -> None:
        pass


def parse_fit_config(args: list[str]):
    """The configuration `lima-lightning fit ARGS` would run with, without building a model, data or Trainer.

    For commands that take fit's arguments but load no weights (e.g. `inspect`, `plan`): `config.model`,
    `config.data` and `config.trainer` are namespaces of plain values; `LIMADataModule(**config.data)` is cheap.
    """
    import warnings

    try:
        with warnings.catch_warnings():  # `args` is what this command was given, on purpose
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            return _ConfigOnlyCLI(
                LIMALoRAModule,
                LIMADataModule,
                args=args,
                run=False,
                parser_class=OneLineErrorParser,
                auto_configure_optimizers=False,
                parser_kwargs={"default_env": False},
            ).config
    except UserError as e:
        fail(e)


def info_to_stdout() -> None:
    """Lightning's progress messages go to stdout, so stderr carries only warnings and errors."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler and handler.stream is sys.stderr:
                handler.setStream(sys.stdout)


def main(argv: list[str] | None = None) -> None:
    """Console script `lima-lightning` (returns None, so the exit status is 0 on success)."""
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    # --- failures: an unknown subcommand, and what the tool commands meet (failures.py) ---
    known = [*LIGHTNING_COMMANDS, *TOOL_COMMANDS]
    if argv and not argv[0].startswith("-") and argv[0] not in known:
        print(failures.unknown_command_line(argv[0], known), file=sys.stderr)
        sys.exit(2)
    if argv and argv[0] in TOOL_COMMANDS:
        try:
            importlib.import_module(TOOL_COMMANDS[argv[0]]).main(argv[1:])
        except BaseException as e:
            failures.exit_for(e, argv)  # UserError, CheckFailed, a full disk, ...: one line
            raise
        return
    # --- end failures ---
    info_to_stdout()
    # args=None lets LightningCLI read sys.argv itself (passing both makes it warn).
    cli_main(None if from_command_line else argv)
