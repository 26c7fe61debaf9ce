"""What a run prints: nothing that alarms without a reason, and nothing useful hidden.

One place for it, applied when the CLI starts:
- `setup()`: warning and log filters for known-harmless third-party messages, each matched by its message (and
  logger or category), never a blanket filter; called before the libraries that emit them are imported.
- `after_lightning_import()`: Lightning's progress lines go to stdout, so stderr carries warnings and errors.
- `choose_matmul_precision()`: TF32 matmuls on a GPU (training runs under bf16 autocast anyway).
- `parameter_summary()`: one line instead of Lightning's model table (whose FLOPs are zeros and whose size of an
  NF4 model is 4x too large); `without_version()`: no `v_num` among the progress bar's losses (both wired into the
  Trainer by `trainer_cli.quiet_trainer`).
- `fit_summary()`: the lines that end a fit: losses, where the adapter is, the commands that use it.

Nothing here imports Lightning or torch at import time: `lima-lightning report` and `--help` stay fast.

Kept on purpose: the data statistics, `Seed set to N` (a run is reproducible from it), `GPU available: ...,
used: ...` (says whether the GPU is used; Lightning warns separately when one is idle), the checkpointing
decision, every warning of this project, errors.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
import warnings

# (category, message regex at the start of the message, why it is harmless)
IGNORED_WARNINGS = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", "transformers 5 renamed it; PEFT still reads the old name"),
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated", "torch 2.13 deprecation inside Lightning's own _pytree"),
    (UserWarning, r"LightningCLI's args parameter is intended", "`cli_main(args)` passes its arguments on purpose"),
)
# logger name -> message prefixes dropped from that logger (its other records pass)
IGNORED_LOGS = {
    # bitsandbytes looks for an optional hub kernel at import, even with no NF4 in use; its own CPU kernel is used.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    # ...and offline, `kernels` (0.19+) says first that it cannot check that kernel's publisher (then finds no copy).
    "kernels._internals.hf_hub": ("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",),
    # Lightning: an advertisement, a device type this project never uses, and an internal step.
    "lightning.pytorch.utilities.rank_zero": (
        "💡 Tip: For seamless cloud logging",
        "TPU available:",
        "HPU available:",
        "Loading `train_dataloader` to estimate number of stepping batches",
    ),
}
IGNORED_LOGS["lightning.fabric.utilities.rank_zero"] = IGNORED_LOGS["lightning.pytorch.utilities.rank_zero"]


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


_LOG_FILTERS = {name: _DropMessages(prefixes) for name, prefixes in IGNORED_LOGS.items()}


def setup() -> None:
    """Install the filters (idempotent). Loggers are filtered by name, so this works before their modules load."""
    for category, message, _ in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, log_filter in _LOG_FILTERS.items():
        logging.getLogger(name).addFilter(log_filter)
    if not sys.stderr.isatty():
        # In a log file a progress bar ("Loading weights: 24%|...") is one line of carriage returns; on a
        # terminal it stays. Read by huggingface_hub and transformers at import, so set before either loads.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def after_lightning_import() -> None:
    """Lightning's progress messages go to stdout, so stderr carries only warnings and errors."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler and handler.stream is sys.stderr:
                handler.setStream(sys.stdout)


def choose_matmul_precision() -> None:
    """TF32 for fp32 matmuls on a CUDA GPU (what Lightning's Tensor Cores hint asks for), unless already chosen.

    Training computes in bf16 under autocast, so only the few fp32 matmuls outside it change, by TF32's rounding.
    """
    import torch

    if torch.cuda.is_available() and torch.get_float32_matmul_precision() == "highest":
        torch.set_float32_matmul_precision("high")


# ----------------------------------------------------------------------------- summaries
def without_version(metrics: dict) -> dict:
    """A progress bar's metrics without `v_num` (the run dir's version, shown as a float among the losses)."""
    metrics.pop("v_num", None)
    return metrics


def human_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return str(int(n))


def human_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def parameter_summary(model) -> str:
    """One line in place of Lightning's model table: parameters, trainable ones, and the weights' real size.

    An NF4 weight is stored packed, two values per byte (bitsandbytes' `Params4bit`, whose `quant_state.shape` is
    the unpacked shape): counted as the parameters it holds, sized as the bytes it takes.
    """
    total = trainable = size = 0
    nf4 = False
    dtypes: dict[str, int] = {}
    for p in model.parameters():
        quant_state = getattr(p, "quant_state", None)
        count = _numel(quant_state.shape) if quant_state is not None else p.numel()
        nf4 |= quant_state is not None
        total += count
        size += p.numel() * p.element_size()
        if p.requires_grad:
            trainable += count
        elif quant_state is None:
            dtypes[str(p.dtype).removeprefix("torch.")] = dtypes.get(str(p.dtype).removeprefix("torch."), 0) + count
    base = "NF4" if nf4 else max(dtypes, key=dtypes.get, default="")
    share = f"{100 * trainable / total:.2g}%" if total else "0%"
    return (
        f"model: {human_count(total)} parameters, {human_count(trainable)} trainable ({share}, the LoRA adapter); "
        f"weights {human_bytes(size)}{f' ({base} base)' if base else ''}"
    )


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


# Options of fit that mean nothing to predict or chat: left out of the commands fit suggests.
FIT_ONLY = re.compile(
    r"--(ckpt_path|model\.adapter_path|seed_everything|trainer\.(max_epochs|min_epochs|max_steps|min_steps|max_time|"
    r"accumulate_grad_batches|gradient_clip_val|gradient_clip_algorithm|log_every_n_steps|val_check_interval|"
    r"check_val_every_n_epoch|num_sanity_val_steps|limit_train_batches|limit_val_batches|fast_dev_run)|"
    r"checkpoint\.[\w.]+|samples\.[\w.]+|adapters\.[\w.]+)(=.*)?"
)


def next_command_args(argv: list[str]) -> list[str]:
    """fit's arguments (without the subcommand) that predict and chat should get too: configs and overrides."""
    args = argv[1:] if argv and not argv[0].startswith("-") else list(argv)
    kept, i = [], 0
    while i < len(args):
        arg = args[i]
        takes_value = arg.startswith("-") and "=" not in arg and i + 1 < len(args) and not args[i + 1].startswith("--")
        item = args[i : i + 2] if takes_value else [arg]
        if not FIT_ONLY.fullmatch(arg):
            kept += item
        i += len(item)
    return kept


def shown_path(path) -> str:
    """A path as the user would type it: relative to the working directory when it lies under it."""
    path = os.path.abspath(path)
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else path


def fit_summary(trainer, argv: list[str], commands=("predict", "chat")) -> list[str]:
    """The lines that end a fit: the losses reached, where the final adapter is, and the exact commands for it.

    commands: the subcommands to suggest, those that exist (`chat` once it is registered in `cli.COMMANDS`).
    """
    from lima_lightning import runs
    from lima_lightning.cli import COMMANDS

    metrics = trainer.callback_metrics
    losses = [
        f"{name} {float(metrics[name]):.3f} ({when})"
        for name, when in (("train/loss", "last step"), ("val/loss", "last validation"))
        if name in metrics
    ]
    epochs = trainer.fit_loop.epoch_progress.current.completed
    lines = [f"fit: {', '.join(losses) or 'no loss logged'}; {epochs} epoch{'s' * (epochs != 1)}, {trainer.global_step} steps"]
    adapter = runs.adapter_dir(runs.run_dir(trainer), runs.FINAL_ADAPTER)
    if not (adapter / "adapter_config.json").is_file():
        return lines + ["adapter: none saved"]
    lines.append(f"adapter: {shown_path(adapter)}")
    args = next_command_args(argv)
    for command in commands:
        if command in COMMANDS:
            lines.append("next: " + shlex.join(["lima-lightning", command, *args, "--model.adapter_path", shown_path(adapter)]))
    return lines
