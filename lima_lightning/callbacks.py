"""Callbacks: save adapters in PEFT's format, write sample generations, write predictions."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from lima_lightning import runs
from lima_lightning.checkpointing import finish_checkpoint_write
from lima_lightning.data.collate import pad_for_generation
from lima_lightning.data.sampling import Masked
from lima_lightning.data.tokenization import prompts_for_generation
from lima_lightning.distributed import gather_adapter_state, gather_rows, is_fsdp
from lima_lightning.errors import NonFiniteLossError
from lima_lightning.failures import oom_line
from lima_lightning.io import append_jsonl, write_dir_atomically, write_jsonl_atomically
from lima_lightning.phases import PHASES


def save_adapter(pl_module, target: Path, state_dict: dict | None = None) -> Path:
    """PEFT's own format (adapter_config.json + adapter_model.safetensors) plus the tokenizer, written atomically.

    state_dict: the trainable weights (PeftModel names) when the model's own are sharded (FSDP); None otherwise.
    """

    def write(tmp: Path) -> None:
        if state_dict is None:
            pl_module.model.save_pretrained(tmp, safe_serialization=True)
        else:
            write_gathered_adapter(pl_module.model, state_dict, tmp)
        pl_module.tokenizer.save_pretrained(tmp)

    return write_dir_atomically(target, write)


def write_gathered_adapter(peft_model, state_dict: dict, directory: Path) -> None:
    """Weights gathered from FSDP shards, written in the layout `save_pretrained` writes.

    Not `save_pretrained(state_dict=...)`: peft 0.21 picks the adapter's entries by the names of the model's LoRA
    modules, which FSDP's unit and checkpoint wrappers change (`..._checkpoint_wrapped_module.mlp...`), so it kept
    none of the (clean) gathered names and wrote an empty adapter. What is left to do is what PEFT does for LoRA:
    drop the adapter name from each key, and save the adapter's config as an inference config.
    """
    import copy

    from safetensors.torch import save_file

    adapter = peft_model.active_adapter
    if not any(f".{adapter}." in key for key in state_dict):
        raise ValueError(f"no weights of adapter {adapter!r} among the {len(state_dict)} gathered entries; nothing to save")
    tensors = {key.replace(f".{adapter}.", "."): tensor.detach().contiguous() for key, tensor in state_dict.items()}
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(peft_model.peft_config[adapter])
    config.inference_mode = True
    config.save_pretrained(str(directory))


def save_adapter_once(trainer, pl_module, name: str) -> Path | None:
    """Call on every rank: rank 0 writes `adapters/<name>` (under FSDP after gathering the shards from all ranks)."""
    state_dict = gather_adapter_state(trainer, pl_module)  # a collective under FSDP, None otherwise
    if not trainer.is_global_zero:
        return None
    return save_adapter(pl_module, runs.adapter_dir(runs.run_dir(trainer), name), state_dict)


class SaveAdapters(Callback):
    def __init__(self, every_epoch: bool = True, epochs: list[int] | None = None) -> None:
        """
        Args:
            every_epoch: Also save `adapters/epoch=E` after each epoch (`adapters/final` is always saved).
            epochs: Only after these epochs (counted from 0, as in `adapters/epoch=E`), e.g. [4, 5, 6, 7, 8, 9] for the
                LIMA paper's 5th to 10th; default: every epoch.
        """
        self.every_epoch = every_epoch
        self.epochs = None if epochs is None else set(epochs)
        self._updating: int | None = None

    # Not rank_zero_only: every rank runs these hooks, so that FSDP can gather the sharded adapter; rank 0 writes.
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.every_epoch and not trainer.sanity_checking and (self.epochs is None or trainer.current_epoch in self.epochs):
            with PHASES.timed("adapter saves"):
                save_adapter_once(trainer, pl_module, runs.epoch_adapter_name(trainer.current_epoch))

    def on_train_end(self, trainer, pl_module) -> None:
        with PHASES.timed("final save"):
            save_adapter_once(trainer, pl_module, runs.FINAL_ADAPTER)  # the run summary says where

    # --- failures: the weights' last good state on a NaN loss or a CUDA out-of-memory (failures.py prints the line) ---
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._updating = trainer.global_step  # until the step is counted, the optimizer may have changed some weights

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._updating = None

    @rank_zero_only
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Not under FSDP: rank 0 holds only a shard, and gathering needs every rank, which an exception may have left.
        if pl_module.model is None or is_fsdp(trainer.strategy):
            return
        if isinstance(exception, NonFiniteLossError):
            # The non-finite loss was caught before the optimizer step, so the weights are still the last good ones.
            path = save_adapter(pl_module, runs.adapter_dir(runs.run_dir(trainer), runs.LAST_GOOD_ADAPTER))
            rank_zero_info(f"last good adapter saved to {path}")
            # The CLI prints the error as one line: it should say where to pick up from.
            exception.args = (f"{exception}; the last good adapter is in {path}",)
        elif isinstance(exception, torch.cuda.OutOfMemoryError) and trainer.state.fn == "fit":
            exception.lima_line = oom_line(exception, trainer, pl_module, self._keep_after_oom(trainer, pl_module))

    def _keep_after_oom(self, trainer, pl_module) -> str:
        """Save `adapters/last-good` if the weights are those of the last completed step; say what was kept."""
        finish_checkpoint_write(trainer)  # a last.ckpt still being written is there before the line points at it
        checkpoint = runs.checkpoint_dir(runs.run_dir(trainer)) / runs.LAST_CHECKPOINT
        resume = f"; {checkpoint} resumes" if checkpoint.is_file() else ""
        if getattr(self, "_updating", None) is not None:
            # An OOM inside optimizer.step can leave some tensors updated and others not (8-bit optimizers update one
            # tensor at a time; AdamW's moments are updated before the weights): nothing in memory is trustworthy.
            return f"it ran out inside the optimizer update of step {trainer.global_step + 1}, so no adapter was saved{resume}"
        if trainer.global_step == 0:
            return "nothing was trained yet"
        try:
            path = save_adapter(pl_module, runs.adapter_dir(runs.run_dir(trainer), runs.LAST_GOOD_ADAPTER))
        except Exception as e:
            return f"saving the last good adapter failed too ({type(e).__name__}: {str(e)[:80]}){resume}"
        return f"the last good adapter (after step {trainer.global_step}) is in {path}"

    # --- end failures ---


class SampleGenerations(Callback):
    def __init__(self, num_prompts: int = 4, max_new_tokens: int = 128, prompts: list[str] | None = None) -> None:
        """
        Args:
            num_prompts: How many validation conversations to answer at each validation (when `prompts` is unset).
            max_new_tokens: Generation limit for samples (kept short: this runs every validation).
            prompts: Fixed prompts to answer instead of validation conversations.
        """
        self.num_prompts = num_prompts
        self.max_new_tokens = max_new_tokens
        self.prompts = prompts

    def _conversations(self, trainer):
        from lima_lightning.data.conversations import Conversation

        if self.prompts:
            return [Conversation((p,), where=f"samples.prompts[{i}]") for i, p in enumerate(self.prompts)]
        return list(getattr(trainer.datamodule, "val_conversations", []))[: self.num_prompts]

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        # During fit only: `validate` measures the loss, and its samples would only cost time.
        if trainer.sanity_checking or trainer.global_rank != 0 or trainer.state.fn != "fit":
            return
        if is_fsdp(trainer.strategy):
            # Rank 0 holds a shard of the weights; generating alone would wait forever for the other ranks' shards.
            rank_zero_warn(
                "samples: no sample generations under FSDP; answer prompts afterwards with `lima-lightning predict` "
                "and the saved adapter (one GPU, or --trainer.strategy=ddp)",
                category=UserWarning,
            )
            return
        conversations = self._conversations(trainer)
        if not conversations:
            return
        examples = prompts_for_generation(conversations, pl_module.tokenizer, trainer.datamodule.hparams.template)
        batch = pad_for_generation(examples, pl_module.tokenizer.pad_token_id)
        with PHASES.timed("samples"):  # within validation; the phase line shows what answering them costs
            results = pl_module.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=self.max_new_tokens, do_sample=False)
        rows = [
            {"epoch": trainer.current_epoch, "step": trainer.global_step, "prompt": e["prompt"], **r}
            | ({"reference": e["reference"]} if e["reference"] is not None else {})
            for e, r in zip(examples, results, strict=True)
        ]
        append_jsonl(runs.samples_file(runs.run_dir(trainer)), rows)
        if isinstance(trainer.logger, TensorBoardLogger):
            text = "\n\n".join(
                f"**prompt:** {r['prompt']}\n\n**response** ({r['finish_reason']}, {r['new_tokens']} tokens): {r['response']}" for r in rows
            )
            trainer.logger.experiment.add_text("samples", text, global_step=trainer.global_step)


class PredictionWriter(BasePredictionWriter):
    def __init__(self, filename: str = runs.PREDICTIONS_FILE) -> None:
        """
        Args:
            filename: Written into the run dir, one JSON line per prompt in input order.
        """
        super().__init__(write_interval="epoch")
        self.filename = filename

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        # Every rank answered its share of the prompts (Lightning shards them without repeats): rank 0 gathers
        # them all (a collective: every rank calls this) and writes the one file.
        rows = gather_rows([row for batch in predictions for row in batch], trainer)
        if not trainer.is_global_zero:
            return
        unique = {}
        for row in rows:
            unique.setdefault(row["id"], row)
        if len(unique) < len(rows):
            rank_zero_warn(f"predictions: {len(rows) - len(unique)} prompts were answered twice; each is written once")
        rows = sorted(unique.values(), key=lambda r: r["id"])
        path = write_jsonl_atomically(runs.run_dir(trainer) / self.filename, rows)
        finished = sum(r["finish_reason"] == "eos" for r in rows)
        rank_zero_info(f"{len(rows)} predictions written to {path} ({finished} stopped at EOS)")


class ValidationWriter(Callback):
    def __init__(self, filename: str = runs.VALIDATION_FILE) -> None:
        """
        Args:
            filename: `validate` and `test` write each held-out conversation's answer NLL (summed over its trained
                tokens) and trained-token count into the run dir, one JSON line per conversation, for
                `lima-lightning report`'s intervals.
        """
        self.filename = filename
        self.rows: list[dict] = []

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.rows = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.state.fn not in ("validate", "test") or trainer.sanity_checking:
            return
        datamodule = trainer.datamodule
        example_rows = datamodule.val_batch_rows(batch_idx)
        if isinstance(example_rows, Masked):  # DDP's padding of an uneven split: scores nothing
            return
        where = datamodule.stats["val"].example_where
        for [i], nll, tokens in zip(example_rows, outputs["nll"].tolist(), outputs["tokens"].tolist(), strict=True):
            self.rows.append({"id": i, "where": where[i], "nll": nll, "tokens": int(tokens)})

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.state.fn not in ("validate", "test") or trainer.sanity_checking:
            return
        rows = gather_rows(self.rows, trainer)  # a collective: every rank calls it
        if trainer.is_global_zero and rows:
            path = write_jsonl_atomically(runs.run_dir(trainer) / self.filename, sorted(rows, key=lambda r: r["id"]))
            rank_zero_info(f"{len(rows)} held-out conversations scored, written to {path}")

    on_test_epoch_start = on_validation_epoch_start
    on_test_batch_end = on_validation_batch_end
    on_test_epoch_end = on_validation_epoch_end
