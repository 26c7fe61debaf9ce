"""fit, validate, test, predict: LightningCLI over `LIMALoRAModule` and `LIMADataModule`.

Imported only when one of them runs (Lightning takes seconds to import). What it adds to LightningCLI:
- the always-on callbacks under their own keys (`--adapters.*`, `--samples.*`, ...) and the tokenizer linked to
  the base model;
- a short `--help` that starts with the project's own options (`--help=full`: LightningCLI's whole text);
- a bad option is one line naming the nearest valid one;
- resuming into the same run dir (`--ckpt_path last`), atomic checkpoint writes (`last.ckpt`'s behind training);
- a quiet console (`quiet_trainer`, `lima_lightning.console`) and the few lines that end a fit.
"""

from __future__ import annotations

import difflib
import os
import re
import sys

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelSummary, RichModelSummary, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from lima_lightning import console, failures
from lima_lightning.callbacks import PredictionWriter, SampleGenerations, SaveAdapters, ValidationWriter
from lima_lightning.checkpointing import (
    AsyncAtomicCheckpointIO,
    AtomicCheckpointIO,
    ResumableCheckpoint,
    check_not_finished,
    check_resume_config,
    load_checkpoint_file,
    resolve_resume,
)
from lima_lightning.cli import COMMANDS, LIGHTNING, fail, renamed_option_hint
from lima_lightning.data.datamodule import LIMADataModule
from lima_lightning.distributed import is_fsdp
from lima_lightning.errors import UserError
from lima_lightning.memory import request_budget
from lima_lightning.module import LIMALoRAModule
from lima_lightning.phases import PHASES, PhaseReport
from lima_lightning.progress import GenerationProgress, LogLineProgressBar

SUBCOMMANDS = tuple(name for name, (target, _) in COMMANDS.items() if target == LIGHTNING)
# The callbacks that are always on, each configured under its own key.
CALLBACK_GROUPS = {
    "adapters": (SaveAdapters, "which adapters are saved"),
    "samples": (SampleGenerations, "answers to a few validation prompts after each validation, in samples.jsonl"),
    "predictions": (PredictionWriter, "predict's output file"),
    "validation_rows": (ValidationWriter, "validate's and test's per-conversation scores"),
    "checkpoint": (ResumableCheckpoint, "last.ckpt, what --ckpt_path last resumes"),
}
# The Trainer options the shipped configs set, and a few more a user turns: the short help lists these.
TRAINER_OPTIONS = (
    "accelerator",
    "devices",
    "strategy",
    "num_nodes",
    "precision",
    "max_epochs",
    "max_steps",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "val_check_interval",
    "log_every_n_steps",
    "num_sanity_val_steps",
    "default_root_dir",
    "fast_dev_run",
)
EXAMPLES = {
    "fit": ("--config configs/demo.yaml", "--config configs/llama2-7b-qlora.yaml --model.lora_r 16 --trainer.max_epochs 5"),
    "validate": ("--config configs/demo.yaml --model.adapter_path runs/demo/lightning_logs/version_0/adapters/final",),
    "test": ("--config configs/demo.yaml --model.adapter_path runs/demo/lightning_logs/version_0/adapters/final",),
    "predict": ("--config configs/demo.yaml --model.adapter_path runs/demo/lightning_logs/version_0/adapters/final",),
}
FULL_HELP = ("--help=full", "-h=full")
PROJECT_GROUPS = ("model.", "data.", *(f"{key}." for key in CALLBACK_GROUPS))
RUN_HELP = {
    "config": "A YAML file of options; several are applied in order, a later one overriding an earlier one.",
    "print_config": "Print the final configuration (every --config and option applied) and exit, loading nothing.",
    "seed_everything": "Seed of every random generator, set before anything is built (true: a random seed).",
    ("fit", "ckpt_path"): "Resume from this checkpoint, or `last`: the newest last.ckpt under trainer.default_root_dir, "
    "continued in its own run dir.",
}


class OneLineErrorParser(LightningArgumentParser):
    """A bad option is one line on stderr, like every other user mistake, not the 90-line usage first; a
    subcommand's `--help` is short unless `--help=full` was asked for."""

    full_help = False  # set by `run` for `--help=full`
    subcommand: str | None = None  # set on each subcommand's parser by LimaCLI

    def error(self, message: str, ex: Exception | None = None):
        # jsonargparse raises instead of exiting while it tries alternatives (exit_on_error off): keep that.
        if not self.exit_on_error or callable(getattr(self, "_error_handler", None)):
            return super().error(message, ex)
        fail(UserError(option_error(self, message)))

    def format_help(self, *args, **kwargs) -> str:
        if self.subcommand is None or OneLineErrorParser.full_help:
            return super().format_help(*args, **kwargs)
        return short_help(self)


def short_help(parser) -> str:
    """A subcommand's `--help`: the project's options first (model.*, data.*, the callbacks), then the Trainer
    options the configs set, then how to run it; each option one line and its help in full, wrapped."""
    import shutil
    import textwrap

    name = parser.subcommand
    by_dest = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help" and not a.dest.endswith(".help")}
    # `--model CONFIG` (a group from a file) and the tokenizer link are not options a reader types.
    by_dest = {d: a for d, a in by_dest.items() if type(a).__name__ != "_ActionConfigLoad" and "-->" not in a.option_strings[0]}

    def under(prefix: str, exclude: str = "\0") -> list[str]:
        return [d for d in by_dest if d.startswith(prefix) and not d.startswith(exclude)]

    sections = [
        ("model: the LoRA module", under("model.", "model.generation.")),
        ("model.generation: how predict and the samples generate", under("model.generation.")),
        ("data: the conversations and their batches", under("data.")),
        *[(f"{key}: {what}", under(f"{key}.")) for key, (_, what) in CALLBACK_GROUPS.items()],
        ("trainer: Lightning's Trainer, the options the configs set", [f"trainer.{o}" for o in TRAINER_OPTIONS]),
        ("run", ["config", "print_config", "seed_everything", "ckpt_path", "gpu_memory_gib"]),
    ]
    width = min(max(shutil.get_terminal_size((100, 24)).columns, 80), 120)
    out = [f"usage: lima-lightning {name} [--config FILE ...] [--OPTION VALUE ...]", "", COMMANDS[name][1]]
    shown: set[str] = set()
    for title, dests in sections:
        dests = [d for d in dict.fromkeys(dests) if d in by_dest and d not in shown]
        if not dests:
            continue
        out += ["", f"{title}:"]
        for dest in dests:
            shown.add(dest)
            action = by_dest[dest]
            out.append(f"  {option_line(parser, action)}")
            text = RUN_HELP.get((name, dest)) or RUN_HELP.get(dest) or action.help or ""
            text = " ".join(text.replace("%%", "%").split())
            if not dest.startswith(PROJECT_GROUPS):  # Lightning's own: its first sentence (--help=full has it all)
                text = first_sentence(text)
            out += textwrap.wrap(text, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    examples = [f"  lima-lightning {name} {e}" for e in EXAMPLES.get(name, ())]
    out += [
        "",
        "examples:",
        *examples,
        "",
        f"{len(shown)} of {len(by_dest)} options shown: `lima-lightning {name} --help=full` lists them all.",
    ]
    return "\n".join(out) + "\n"


def option_line(parser, action) -> str:
    """`--model.quantization {nf4,none} (default: nf4)`: the option as jsonargparse shows it, and its default."""
    # jsonargparse's formatter knows the choices of a Literal type hint; the first form is enough.
    forms = parser._get_formatter()._format_action_invocation(action).split(", ")
    invocation = ", ".join(forms[:2] if forms[0].startswith("-c") else forms[:1])  # -c, --config CONFIG
    default = action.default
    if default is None or action.dest in ("config", "print_config") or not isinstance(default, str | int | float | bool | list):
        return invocation
    return f"{invocation} (default: {str(default).lower() if isinstance(default, bool) else default})"


def first_sentence(text: str) -> str:
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    return match.group(1) if match else text


def option_names(parser) -> list[str]:
    """Every option the parser (or, for the root parser, each subcommand's parser) accepts, as `model.lora_r`."""
    names = [a.dest for a in parser._actions if a.option_strings and a.dest not in ("help",) and not a.dest.endswith(".help")]
    subcommands = getattr(parser, "_subcommands_action", None)
    for sub in getattr(subcommands, "_name_parser_map", {}).values():
        names += option_names(sub)
    return list(dict.fromkeys(names))


def nearest_option(name: str, known: list[str]) -> str | None:
    """The valid option closest to a mistyped one: `model.lora_rr` -> `model.lora_r`, `data.batchsize` -> `data.batch_size`."""
    found = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return found[0] if found else None


def option_error(parser, message: str) -> str:
    """jsonargparse's error as one line: a renamed option names its new key, an unknown one its nearest valid one."""
    hint = renamed_option_hint(message)
    if hint:
        return hint
    subcommand = parser.subcommand or ""
    unknown = re.findall(r"(?:^|\s)--([\w.]+)", message) if message.startswith("unrecognized arguments") else []
    quoted = re.match(r"Subcommand '(\w+)' does not accept option '([\w.]+)'", message)
    if quoted:
        subcommand, unknown = quoted.group(1), [quoted.group(2)]
        parsers = getattr(getattr(parser, "_subcommands_action", None), "_name_parser_map", {})
        parser = parsers.get(subcommand, parser)
    known = option_names(parser)
    dashes = "" if quoted else "--"  # a key of a config file, or an option of the command line
    nearest = {name: nearest_option(name, known) for name in unknown}
    suggestions = [f"{dashes}{near}" + (f" (for {dashes}{name})" if len(unknown) > 1 else "") for name, near in nearest.items() if near]
    where = f"`lima-lightning {subcommand} --help` lists the options" if subcommand else "`lima-lightning --help` lists the commands"
    text = " ".join(message.split()) + (f"; did you mean {', '.join(suggestions)}?" if suggestions else "")
    return f"{text} ({where})"


class ParameterSummary(ModelSummary):
    """`console.parameter_summary`'s one line at the start of fit, in place of Lightning's table."""

    def on_fit_start(self, trainer, pl_module) -> None:
        # Under FSDP each rank holds a flat shard: its counts would be a fraction of the model's.
        if trainer.is_global_zero and not is_fsdp(trainer.strategy):
            rank_zero_info(console.parameter_summary(pl_module))


class QuietRichProgressBar(RichProgressBar):
    def get_metrics(self, trainer, pl_module):
        return console.without_version(super().get_metrics(trainer, pl_module))


class QuietTQDMProgressBar(TQDMProgressBar):
    def get_metrics(self, trainer, pl_module):
        return console.without_version(super().get_metrics(trainer, pl_module))


QUIET_BARS = {RichProgressBar: QuietRichProgressBar, TQDMProgressBar: QuietTQDMProgressBar}


def quiet_trainer(trainer, keep: list = ()) -> None:
    """Lightning's default model summary becomes `ParameterSummary`, its progress bar loses `v_num`.

    keep: the callbacks the user configured (`--trainer.callbacks`), left as they are.
    """
    for i, callback in enumerate(trainer.callbacks):
        if any(callback is k for k in keep):
            continue
        if type(callback) in (ModelSummary, RichModelSummary):
            trainer.callbacks[i] = ParameterSummary()
        elif type(callback) in QUIET_BARS and not sys.stdout.isatty():
            trainer.callbacks[i] = LogLineProgressBar()  # a log file: plain lines as it goes, not one bar at the end
        elif type(callback) in QUIET_BARS:
            # The default bar with its settings (theme, refresh rate), and `get_metrics` without `v_num`.
            callback.__class__ = QUIET_BARS[type(callback)]


class LimaCLI(LightningCLI):
    def __init__(self, *args, **kwargs) -> None:
        self.argv: list[str] = []  # the command line, for the commands fit suggests next
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # Configure each value once: the tokenizer is the base model's.
        parser.link_arguments("model.base_model", "data.tokenizer")
        # Always-on callbacks, each configurable under its own key (--adapters.*, --samples.*, --predictions.*).
        for key, (callback, _) in CALLBACK_GROUPS.items():
            parser.add_lightning_class_args(callback, key)
        parser.add_argument(
            "--gpu_memory_gib",
            type=float | None,
            default=None,
            help="GPU memory this run may use, in GiB (default: the whole device), enforced per process: a run that "
            "needs more fails as it would on a smaller card. Checkpointing, generation chunks and merging plan against it.",
        )

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        parser.subcommand = subcommand
        return parser

    def instantiate_trainer(self, **kwargs):
        # Lightning's refusals of the Trainer options (no GPU for a GPU config, ...) are one line (failures.py).
        with failures.trainer_config_errors(self._get(self.config, "trainer", {}).get("accelerator")):
            trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(failures.TidyFailedRun())  # a run that fails before training leaves no run dir
        # Atomic checkpoint writes (last.ckpt's in the background) and weights_only reads, unless a plugin chose another.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AsyncAtomicCheckpointIO(AtomicCheckpointIO())
        # Lightning's default progress bar and model summary, quieter; callbacks the user configured are kept.
        user_callbacks = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        quiet_trainer(trainer, keep=user_callbacks if isinstance(user_callbacks, list) else [user_callbacks])
        trainer.callbacks.append(PhaseReport())  # the time from the command to its result, per phase
        trainer.callbacks.append(GenerationProgress())  # predict: prompts and tokens, not batches
        return trainer

    def before_instantiate_classes(self) -> None:
        PHASES.mark_startup()
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else self.config
        request_budget(config.get("gpu_memory_gib"))

    def parse_arguments(self, parser, args) -> None:
        self.argv = list(args) if isinstance(args, list | tuple) else sys.argv[1:]
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

    def before_fit(self) -> None:
        # Continue the run in its own run dir; TensorBoard drops what the killed process logged after the
        # checkpoint (purge_step), since the resumed run logs those steps again.
        logger = self.trainer.logger
        if self._resume_in is not None and type(logger) is TensorBoardLogger:
            version, step = self._resume_in
            self.trainer.logger = TensorBoardLogger(logger.save_dir, name=logger.name, version=version, purge_step=step)
        self.trainer.lima_resumed_run = self._resume_in is not None  # failures.TidyFailedRun never removes its dir

    def after_fit(self) -> None:
        # What was reached, where the adapter is, and the exact commands that use it (rank 0 only).
        if self.trainer.is_global_zero:
            print("\n".join(console.fit_summary(self.trainer, self.argv)), flush=True)


def cli_kwargs() -> dict:
    return {
        "parser_class": OneLineErrorParser,
        "auto_configure_optimizers": False,
        # Each subcommand's help line is the one `lima-lightning --help` shows.
        "parser_kwargs": {"default_env": False, **{name: {"description": COMMANDS[name][1]} for name in SUBCOMMANDS}},
    }


def help_mode(args: list[str]) -> list[str]:
    """`--help=full` / `--help full` asks for LightningCLI's whole help: argparse's `--help` takes no value."""
    OneLineErrorParser.full_help = False
    out = []
    for i, arg in enumerate(args):
        if arg in FULL_HELP or (arg == "full" and i and args[i - 1] in ("-h", "--help")):
            OneLineErrorParser.full_help = True
            if arg != "full":
                out.append("--help")
            continue
        out.append(arg)
    return out


def run(args: list[str]) -> LimaCLI:
    """Run `lima-lightning SUBCOMMAND ARGS` (a UserError for a user's mistake)."""
    return LimaCLI(LIMALoRAModule, LIMADataModule, args=help_mode(args), save_config_kwargs={"overwrite": True}, **cli_kwargs())


class _ConfigOnlyCLI(LimaCLI):
    """Parses fit's arguments (configs, overrides, defaults, links) and instantiates nothing."""

    def instantiate_classes(self) -> None:
        pass

    def after_instantiate_classes(self) -> None:
        pass

    def _set_seed(self) -> None:
        pass  # reading a configuration must not seed this process's RNGs


def parse_fit_config(args: list[str]):
    """See `lima_lightning.cli.parse_fit_config`."""
    import warnings

    with warnings.catch_warnings():  # `args` is what this command was given, on purpose
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return _ConfigOnlyCLI(LIMALoRAModule, LIMADataModule, args=args, run=False, **cli_kwargs()).config
