"""LIMADataModule: conversations -> tokenized, label-masked examples -> micro-batches (sampling.py, collate.py)."""

from __future__ import annotations

from functools import partial

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from lima_lightning.data.collate import collate_rows, pad_for_generation
from lima_lightning.data.conversations import Conversation
from lima_lightning.data.sampling import Batch, BatchingName, ExampleRows, Masked, MicroBatchSampler, check_position, train_position
from lima_lightning.data.sources import LIMA_HUB_ID, load_conversations
from lima_lightning.data.templates import TemplateName
from lima_lightning.data.tokenization import TokenizationStats, prompts_for_generation, tokenize_for_training
from lima_lightning.errors import UserError
from lima_lightning.phases import PHASES


class LIMADataModule(L.LightningDataModule):
    def __init__(
        self,
        dataset: str = LIMA_HUB_ID,
        tokenizer: str = "meta-llama/Llama-2-7b-hf",
        template: TemplateName = "llama2-chat",
        max_seq_length: int = 2048,
        batch_size: int = 4,
        batching: BatchingName = "padded",
        max_tokens_per_batch: int = 8192,
        val_fraction: float = 0.05,
        seed: int = 42,
        predict_dataset: str = LIMA_HUB_ID,
        predict_batch_size: int = 32,
        num_workers: int = 0,
        synthetic_size: int = 512,
    ) -> None:
        """
        Args:
            dataset: Training conversations: `GAIR/lima` (hub, gated: set HF_TOKEN), another hub dataset
                holding `train.jsonl`, a local `.jsonl`/`.json`/`.parquet` file, or `synthetic` (built-in tasks
                with exact answers; no download). Rows in LIMA (`conversations`: strings), chat (`messages`),
                Alpaca (`instruction`, `input`, `output`) or ShareGPT (`conversations`: `from`/`value`) format,
                one format per file (docs/data.md).
            tokenizer: Tokenizer to use; linked to `model.base_model`, so it is never set by hand.
            template: Chat template. `llama2-chat`: Meta's `<s>[INST] user [/INST] answer</s>` per exchange.
                `lima`: the LIMA paper's plain style, `<s> user</s> answer</s> ...` (no role markers, `</s>` ends
                every utterance). `tokenizer`: the base tokenizer's own chat_template. Each trains every answer and
                one EOS after it, nothing else (`lima-lightning inspect` shows it).
            max_seq_length: Longer conversations are truncated (and counted); LIMA at 2048 keeps ~93% whole.
            batch_size: Conversations per training micro-batch (per device) with `batching: padded`.
            batching: How training micro-batches are formed (see `data/sampling.py`). `padded`: `batch_size`
                conversations in shuffled order, padded to the longest (LIMA: ~45% padding). `length_grouped`:
                conversations of similar length up to `max_tokens_per_batch` (~2% padding). `packed`: several
                conversations per row of `max_seq_length` tokens, none attending to another (~0.2% padding).
                All three give the same loss and gradients per conversation.
            max_tokens_per_batch: Token budget of a `length_grouped` or `packed` micro-batch (rows x width);
                at least `max_seq_length`. Memory follows it, not the number of conversations.
            val_fraction: Share of `dataset` held out for validation, drawn with `seed`; 0 disables validation.
            seed: Seed of the train/validation split.
            predict_dataset: Prompts for `predict`: `GAIR/lima` (its 300 test prompts), `synthetic`, or a file
                in either format; each row's prompt is the conversation up to its last user turn.
            predict_batch_size: Prompts generated together; larger is faster until memory runs out.
            num_workers: DataLoader worker processes (batches are cheap to build; 0 is usually fine).
            synthetic_size: Number of conversations in the `synthetic` set.
        """
        super().__init__()
        # Not merged into the logger's hparams: `seed` here (the split) and `model.seed` (sampling) differ,
        # and the run dir's config.yaml records both anyway.
        self.save_hyperparameters(logger=False)
        problems = []
        if max_seq_length < 16:
            problems.append(f"data.max_seq_length={max_seq_length}: must be at least 16")
        if batch_size < 1 or predict_batch_size < 1:
            problems.append(f"data.batch_size={batch_size}, data.predict_batch_size={predict_batch_size}: must be >= 1")
        if batching != "padded" and max_tokens_per_batch < max_seq_length:
            problems.append(
                f"data.max_tokens_per_batch={max_tokens_per_batch}: must be at least data.max_seq_length={max_seq_length} "
                f"with data.batching={batching}, so that the longest conversation fits"
            )
        if not 0.0 <= val_fraction < 1.0:
            problems.append(f"data.val_fraction={val_fraction}: must be in [0, 1), e.g. 0.05")
        if problems:
            raise UserError("; ".join(problems))
        self.tokenizer = None
        self.train_dataset: list[dict] | None = None
        self.val_dataset: list[dict] | None = None
        self.predict_dataset: list[dict] | None = None
        self.val_conversations: list[Conversation] = []
        self.stats: dict[str, TokenizationStats] = {}
        self._resume_position: dict[str, int] | None = None  # from a checkpoint, see load_state_dict

    @classmethod
    def from_examples(cls, train: list[dict], val: list[dict] | None = None, *, loaded_tokenizer, **options) -> LIMADataModule:
        """A data module over already-tokenized examples (benchmarks, tests): `setup` reads and tokenizes nothing.

        `train`/`val` are what `tokenize_for_training` returns with `loaded_tokenizer`; `options` are the
        constructor's (batching, batch_size, ...).
        """
        datamodule = cls(**{"tokenizer": loaded_tokenizer.name_or_path, **options})
        datamodule.tokenizer, datamodule.train_dataset, datamodule.val_dataset = loaded_tokenizer, train, list(val or [])
        return datamodule

    def setup(self, stage: str) -> None:
        from lima_lightning.models.loading import load_tokenizer

        with PHASES.timed("data"):
            if self.tokenizer is None:
                self.tokenizer = load_tokenizer(self.hparams.tokenizer)
            if stage in ("fit", "validate", "test") and self.train_dataset is None:
                self._setup_training()
            if stage == "predict" and self.predict_dataset is None:
                self._setup_predict()

    def _setup_training(self) -> None:
        hp = self.hparams
        conversations = load_conversations(hp.dataset, "train", "data.dataset", hp.synthetic_size)
        train, val = split_conversations(conversations, hp.val_fraction, hp.seed)
        self.val_conversations = val
        self.train_dataset, self.stats["train"] = tokenize_for_training(train, self.tokenizer, hp.template, hp.max_seq_length)
        self.val_dataset, self.stats["val"] = tokenize_for_training(val, self.tokenizer, hp.template, hp.max_seq_length)
        if not self.train_dataset:
            raise UserError(
                f"data.dataset={hp.dataset}: every one of {len(train)} training conversations was dropped "
                f"(no assistant token left within data.max_seq_length={hp.max_seq_length}); raise max_seq_length"
            )
        for split, stats in self.stats.items():
            rank_zero_info(
                f"{split}: {stats.examples} examples from {stats.conversations} conversations, "
                f"{stats.truncated} truncated to {hp.max_seq_length} tokens, {stats.dropped_no_target} dropped "
                f"(no assistant token left), {stats.trailing_user_turns} trailing user turns dropped, "
                f"{stats.trained_tokens}/{stats.tokens} tokens trained"
            )

    def _setup_predict(self) -> None:
        hp = self.hparams
        conversations = load_conversations(hp.predict_dataset, "test", "data.predict_dataset", hp.synthetic_size)
        self.predict_dataset = prompts_for_generation(conversations, self.tokenizer, hp.template)
        too_long = sum(len(p["input_ids"]) > hp.max_seq_length for p in self.predict_dataset)
        if too_long:
            rank_zero_warn(f"{too_long} prompts are longer than data.max_seq_length={hp.max_seq_length}; they are kept whole")

    def train_dataloader(self) -> DataLoader:
        # Exact resume: epoch e's order depends on (seed, e) alone, and a resumed run skips what it already trained.
        position, self._resume_position = self._resume_position, None
        sampler = self._train_sampler()
        if position:
            check_position(position, len(sampler))
            sampler.resume_at(position["epoch"], position["batches"])
        return self._loader(self.train_dataset, sampler)

    def _train_sampler(self) -> MicroBatchSampler:
        hp = self.hparams
        trainer = self.trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        return MicroBatchSampler(
            [len(e["input_ids"]) for e in self.train_dataset],
            hp.batching,
            hp.batch_size,
            hp.max_tokens_per_batch,
            hp.max_seq_length,
            hp.seed,
            step_group=world_size * accumulate,
            num_replicas=world_size,
            rank=rank,
        )

    def _loader(self, examples: list[dict], sampler: MicroBatchSampler) -> DataLoader:
        """The sampler yields whole batches of index rows; batch_size=None hands each to the collator as is."""
        return TrainLoader(
            ExampleRows(examples),
            sampler=sampler,
            batch_size=None,
            collate_fn=partial(collate_rows, pad_id=self.tokenizer.pad_token_id, packed=sampler.batching == "packed"),
            num_workers=self.hparams.num_workers,
        )

    @property
    def max_batch_tokens(self) -> int | None:
        """Largest rows x width of any training micro-batch; `model.gradient_checkpointing=auto` sizes memory by it."""
        return self._train_sampler().max_batch_tokens if self.train_dataset else None

    def state_dict(self) -> dict:
        """Saved in every checkpoint: where training stands, so a resumed run continues with the very next batch."""
        if self.trainer is None or self.trainer.state.fn != "fit" or self.trainer.train_dataloader is None:
            return {}
        return {"train_position": train_position(self.trainer)}

    def load_state_dict(self, state_dict: dict) -> None:
        # One device and DDP restore this before the train loader exists; FSDP and DeepSpeed after it does.
        position = state_dict.get("train_position")
        loader = self.trainer.train_dataloader if self.trainer is not None else None
        if position and isinstance(loader, TrainLoader):
            check_position(position, len(loader))
            loader.sampler.resume_at(position["epoch"], position["batches"])
        else:
            self._resume_position = position

    def val_dataloader(self):
        if not self.val_dataset:
            return []
        return self._loader(self.val_dataset, self._val_sampler())

    def _val_sampler(self) -> MicroBatchSampler:
        """The validation conversations, one per row (each scored on its own), in the same order every time; under
        DDP each once (Masked padding). Token-budget training batches: length-grouped here too (little padding)."""
        hp, trainer = self.hparams, self.trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        batching = "padded" if hp.batching == "padded" else "length_grouped"
        lengths = [len(e["input_ids"]) for e in self.val_dataset]
        budget = {"max_tokens": hp.max_tokens_per_batch, "row_tokens": hp.max_seq_length}
        return MicroBatchSampler(lengths, batching, hp.batch_size, **budget, shuffle=False, num_replicas=world_size, rank=rank)

    def val_batch_rows(self, batch_idx: int) -> Batch | Masked:
        """The validation example indices of this rank's batch `batch_idx` (rows of one example)."""
        return self._val_sampler().rank_batches(0)[batch_idx]

    def test_dataloader(self):
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        # Longest prompts first: each batch pads little, and an out-of-memory shows in the first batch.
        longest_first = sorted(range(len(self.predict_dataset)), key=lambda i: -len(self.predict_dataset[i]["input_ids"]))
        return DataLoader(
            self.predict_dataset,
            sampler=longest_first,
            batch_size=self.hparams.predict_batch_size,
            collate_fn=partial(pad_for_generation, pad_id=self.tokenizer.pad_token_id),
            num_workers=self.hparams.num_workers,
        )


class TrainLoader(DataLoader):
    """A DataLoader over `MicroBatchSampler` batches that never draws from the global RNG.

    Its own generator: creating an iterator (which draws a worker base seed) must not consume the global RNG that
    LoRA dropout draws from, or a resumed run's dropout masks would differ from the original's.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        super().__init__(*args, **kwargs)

    # The position is saved by LIMADataModule.state_dict, which Lightning restores before this loader exists.
    # Lightning's own loader-state hook restores too late when configure_optimizers has already built the
    # loader (estimated_stepping_batches; Lightning-AI/pytorch-lightning#20550), so these only tell it that
    # this loader resumes mid-epoch, which keeps its "dataloader is not resumable" warning away.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def split_conversations(conversations: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded hold-out: the same `seed` gives the same split on every machine."""
    if val_fraction == 0 or len(conversations) < 2:
        return list(conversations), []
    order = torch.randperm(len(conversations), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(len(conversations) * val_fraction))
    return [conversations[i] for i in order[n_val:]], [conversations[i] for i in order[:n_val]]
