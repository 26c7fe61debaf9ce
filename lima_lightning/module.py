"""LIMALoRAModule: a frozen Llama base (NF4 or bf16) with trainable LoRA adapters and the masked NLL.

The Lightning hooks live here; what they call lives in the modules named for it: `loss` (the NLL and the
token-weighted gradient scaling), `metrics` (per-step bookkeeping), `optim` (optimizer, schedule),
`models.loading` / `models.merging` / `models.speed` (the model), `generation`, `distributed` (FSDP).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from typing import Literal

import lightning as L
import torch

from lima_lightning.distributed import clean_param_name, clip_gradients, fsdp_quant_storage, is_fsdp, prepare_fsdp
from lima_lightning.errors import UserError
from lima_lightning.generation import GenerationSettings, generate
from lima_lightning.loss import head_nll_sum, masked_nll_sum, scale_grads
from lima_lightning.memory import apply_budget
from lima_lightning.metrics import StepTally, check_finite, train_metrics
from lima_lightning.models.loading import LLAMA_PROJECTIONS
from lima_lightning.models.speed import configure_for_training, packed_rows_mask
from lima_lightning.optim import OptimizerName, SchedulerName, build_optimizer, build_scheduler
from lima_lightning.phases import PHASES

# Models whose logits are exactly lm_head(last hidden state): no soft-capping or logit scaling in between.
HEAD_ONLY_MODEL_TYPES = ("llama", "mistral")


class LIMALoRAModule(L.LightningModule):
    def __init__(
        self,
        base_model: str = "meta-llama/Llama-2-7b-hf",
        quantization: Literal["nf4", "none"] = "nf4",
        lora_r: int = 64,
        lora_alpha: int = 16,
        lora_dropout: float = 0.05,
        target_modules: list[str] = LLAMA_PROJECTIONS,
        gradient_checkpointing: bool | Literal["auto"] = True,
        offload_checkpoints: bool = False,
        attn_implementation: Literal["sdpa", "flex_attention", "eager"] = "sdpa",
        compile: bool = False,
        lora_dtype: Literal["float32", "bfloat16"] = "float32",
        loss_chunk_size: int = 0,
        optimizer: OptimizerName = "adamw",
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.03,
        scheduler: SchedulerName = "cosine",
        min_lr_ratio: float = 0.0,
        residual_dropout: float = 0.0,
        adapter_path: str | None = None,
        generation: GenerationSettings = GenerationSettings(),
        trust_remote_code: bool = False,
    ) -> None:
        """
        Args:
            base_model: Hub id (gated Llama-2 needs HF_TOKEN in the environment), a local model
                directory, or `tiny` (a seeded tiny Llama built in code; nothing is downloaded).
            quantization: `nf4`: 4-bit NormalFloat base with double quantization and bf16 compute
                (QLoRA); `none`: bf16 base on GPU, fp32 on CPU (LoRA).
            lora_r: LoRA rank; higher = more capacity and memory.
            lora_alpha: LoRA scaling numerator; the update is scaled by lora_alpha / lora_r.
            lora_dropout: Dropout on the LoRA branch input.
            target_modules: Linear layers that get adapters (default: every attention and MLP projection).
            gradient_checkpointing: Recompute activations in backward: much less memory, ~30% slower. `auto`
                (GPU): measure this model's activation memory with short probe steps and checkpoint the fewest
                decoder layers that let the largest micro-batch fit `--gpu_memory_gib` (`lima-lightning plan`
                predicts the choice); off on CPU.
            offload_checkpoints: Checkpointed decoder layers keep their input in pinned host memory until backward
                instead of on the GPU: 2 bytes x hidden per token per layer, 0.5 GiB for a 2048-token row of
                Llama-2-7B, for one queued copy each way per layer. Its speed cost on an H200 is not settled
                (benchmarks/RESULTS.md "Memory mode": 2-7 ms of a 36-44 ms step on 4 layers alone, more in the
                full model's bench row). `auto` plans with it. CUDA only (off on CPU); the same loss and gradients.
            attn_implementation: Training attention kernel. `sdpa`: PyTorch's fused kernels (causal flash for
                unpacked rows). `flex_attention` (CUDA only, compiles a kernel at the first step): skips the
                blocks a packed row masks out. `eager`: plain matmuls, for debugging.
            compile: torch.compile each decoder layer (the layers share their graphs; the first steps compile,
                ~1-2 min for 7B); generation runs the layers uncompiled. Pays off over long runs.
            lora_dtype: Adapter weight dtype. `bfloat16` halves adapter, gradient and AdamW-state memory (the
                low-memory recipe) at the cost of update precision; `float32` otherwise.
            loss_chunk_size: Trained tokens sent through the LM head at once, each chunk recomputed in backward:
                bounds the logits' memory to chunk x vocab (0: all at once, fastest).
            optimizer: `adamw` (torch) or a bitsandbytes 8-bit / paged AdamW (less optimizer memory).
            learning_rate: Peak learning rate after warmup.
            weight_decay: AdamW weight decay on the LoRA weights.
            adam_betas: AdamW's (beta1, beta2); the LIMA paper trains with (0.9, 0.95).
            warmup_ratio: Share of the optimizer steps spent warming the learning rate up from 0.
            scheduler: Learning-rate decay after warmup.
            min_lr_ratio: Where the decay ends, as a share of the peak rate (the LIMA paper: 0.1); 0: down to 0.
            residual_dropout: Dropout on each decoder layer's attention and MLP outputs before they join the residual
                stream, rising linearly from 0 at the bottom layer to this rate at the top one, as the LIMA paper
                trains (0.2 for 7B and 13B, 0.3 for 65B); training only; 0: off.
            adapter_path: A saved adapter directory to start from (fit) or generate with (predict);
                without it, fit starts fresh adapters and predict uses the base model alone.
            generation: How predict, chat and the samples callback generate (`--model.generation.*`).
            trust_remote_code: Run model code shipped in the base model's repository. Off: only
                turn it on for repositories you trust.
        """
        super().__init__()
        self.generation = GenerationSettings(**generation) if isinstance(generation, dict) else generation
        self.save_hyperparameters()
        self.hparams.generation = asdict(self.generation)  # plain values: checkpoints load with weights_only
        check_options(self.hparams, self.generation)
        self.model = None
        self.tokenizer = None
        # Checkpoints hold only the adapter (see on_save_checkpoint); the frozen base is reloaded.
        self.strict_loading = False
        self.compile_backend = "inductor"  # tests and the CPU benchmark smoke run use "aot_eager"
        self.speed_settings: dict = {}
        self.step_tally = StepTally()
        self.generation_progress = None  # set by progress.GenerationProgress while predicting

    @classmethod
    def around(cls, model, tokenizer, **options) -> LIMALoRAModule:
        """A module around an already-loaded PEFT model and tokenizer (benchmarks, tests): nothing is loaded again.

        `options` are the constructor's; they must describe `model` (base_model, quantization, LoRA shape).
        """
        module = cls(**options)
        module.model, module.tokenizer = model, tokenizer
        return module

    # ----------------------------------------------------------------------------- model
    def configure_model(self) -> None:
        if self.model is None:
            with PHASES.timed("load"):
                self._load_model()
        if self.hparams.residual_dropout:
            from lima_lightning.models.residual_dropout import add_residual_dropout

            add_residual_dropout(self.model, self.hparams.residual_dropout)
        if self._trainer is not None and self.trainer.state.fn == "fit":
            # Attention kernel, adapter dtype, gradient checkpointing (auto: measured), compile; idempotent.
            datamodule = getattr(self.trainer, "datamodule", None)
            max_tokens = getattr(datamodule, "max_batch_tokens", None)
            self.speed_settings = configure_for_training(self, self.trainer.strategy.root_device, max_tokens, self.compile_backend)
        if self._trainer is not None:
            # FSDP only (a no-op otherwise): wrap policy, no dtype casts, FSDP's activation checkpointing.
            prepare_fsdp(self.trainer.strategy, self.model)
        self.trainable_parameter_names()  # recorded now, before a strategy wraps the modules

    def _load_model(self) -> None:
        from lima_lightning.models.loading import add_lora, load_adapter, load_base_model, load_tokenizer
        from lima_lightning.models.merging import decide_merge, merge_into_base

        hp = self.hparams
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        self.tokenizer = load_tokenizer(hp.base_model, hp.trust_remote_code)
        # Every rank loads the whole base onto its own device (DDP: `device` is this rank's GPU); FSDP shards it
        # after configure_model, and needs the NF4 bytes stored as bf16 to do so.
        quant_storage = fsdp_quant_storage(self.trainer.strategy) if self._trainer is not None else None
        base = load_base_model(hp.base_model, hp.quantization, device, hp.trust_remote_code, quant_storage=quant_storage)
        training = self._trainer is None or self.trainer.training or self.trainer.state.fn == "fit"
        predicting = not training and self.trainer.state.fn == "predict"
        if predicting and decide_merge(self.generation.merge, base, device):
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            with PHASES.timed("merge"):
                self.model = merge_into_base(base, hp.adapter_path, hp.base_model, dtype)
        elif hp.adapter_path:
            self.model = load_adapter(base, hp.adapter_path, hp.base_model, trainable=training)
        else:
            self.model = add_lora(base, hp.lora_r, hp.lora_alpha, hp.lora_dropout, list(hp.target_modules))
        # from_pretrained returns the base in eval mode and Lightning keeps submodule modes as it finds them;
        # in eval mode transformers skips gradient checkpointing (and LoRA dropout), so set train mode here.
        self.model.train(training)

    def setup(self, stage: str) -> None:
        precision = str(self.trainer.precision)
        if precision.startswith("16"):
            raise UserError(
                f"trainer.precision={precision}: fp16 is not supported (Llama-2 activations overflow it, "
                "and NF4 computes in bf16); use bf16-mixed on GPU or 32-true on CPU"
            )
        if stage == "predict" and is_fsdp(self.trainer.strategy):
            raise UserError(
                "trainer.strategy=fsdp: predict generates token by token with whole weights on each device; "
                "use --trainer.strategy=ddp (each GPU answers its share of the prompts) or one device"
            )
        # Before anything is loaded onto this rank's device: --gpu_memory_gib caps what this process may allocate.
        apply_budget(self.trainer.strategy.root_device)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_parameter_names(self) -> set[str]:
        """State-dict names of the trainable (LoRA) weights, recorded before FSDP or DDP wrap the modules."""
        if getattr(self, "_trainable_names", None) is None:
            self._trainable_names = {clean_param_name(n) for n, p in self.named_parameters() if p.requires_grad}
        return self._trainable_names

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = self.trainable_parameter_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # strict_loading=False would skip missing or extra LoRA keys silently; demand an exact match instead.
        from lima_lightning.checkpointing import check_adapter_fits

        check_adapter_fits(self, checkpoint, self.trainer.ckpt_path if self._trainer is not None else None)

    # ----------------------------------------------------------------------------- loss
    def masked_nll(self, batch: dict, per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of NLL over trained tokens, their count), per row with `per_row`: the only place a loss is computed."""
        # No padding mask: rows are right-padded or packed, and transformers builds the causal mask from the position
        # restarts (see data/collate.py), which it reads only with use_cache=False.
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        mask = packed_rows_mask(base, batch)  # None but for packed rows under compiled layers: one graph, not two
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "attention_mask": mask, "use_cache": False}
        if base.config.model_type not in HEAD_ONLY_MODEL_TYPES:
            return masked_nll_sum(self.model(**inputs).logits, batch["labels"], per_row)
        # Logits are a plain linear map of the last hidden state here, so the head runs at trained positions only.
        hidden = base.get_decoder()(**inputs).last_hidden_state
        return head_nll_sum(hidden, base.get_output_embeddings(), batch["labels"], self.hparams.loss_chunk_size, per_row)

    def on_train_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.logger is not None and datamodule is not None:
            for split, stats in getattr(datamodule, "stats", {}).items():
                self.logger.log_metrics({f"data/{split}_{k}": v for k, v in stats.as_dict().items()}, step=0)
        self.step_tally.reset()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        nll, trained = self.masked_nll(batch)
        self.step_tally.add(nll, trained, batch["num_tokens"])
        return nll  # a sum: on_before_optimizer_step divides by the step's trained tokens

    def on_before_optimizer_step(self, optimizer) -> None:
        strategy = self.trainer.strategy
        step = self.step_tally.totals(strategy)
        check_finite(step.loss, self.global_step, self.current_epoch)
        # Lightning divided each micro-batch loss by accumulate_grad_batches and DDP averaged over devices.
        params = self.trainable_parameters()
        scale_grads(params, self.trainer.accumulate_grad_batches * strategy.world_size / step.trained_tokens.clamp(min=1))
        metrics = train_metrics(step, params, strategy, optimizer.param_groups[0]["lr"], self.device)
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, rank_zero_only=True)
        self.log("loss", step.loss, prog_bar=True, on_step=True, on_epoch=False, logger=False, rank_zero_only=True)
        self.step_tally.reset()

    def on_validation_epoch_start(self) -> None:
        self._eval_tally = StepTally()

    def validation_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        with self._layers_eager():  # compiled for training: a no-grad forward would compile its own graphs
            nll, trained = self.masked_nll(batch, per_row=True)
        self._eval_tally.add(nll.sum(), trained.sum(), batch["num_tokens"])
        return {"nll": nll.detach(), "tokens": trained}  # per row: what ValidationWriter writes

    def on_validation_epoch_end(self) -> None:
        self._log_eval_loss("val")

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        return self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_eval_loss("test")

    def _log_eval_loss(self, split: str) -> None:
        loss = self._eval_tally.totals(self.trainer.strategy).loss
        self.log_dict({f"{split}/loss": loss, f"{split}/perplexity": torch.exp(loss)}, prog_bar=True, rank_zero_only=True)

    # ----------------------------------------------------------------------------- optimizer
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = build_optimizer(self.trainable_parameters(), hp.optimizer, hp.learning_rate, hp.weight_decay, hp.adam_betas)
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = build_scheduler(optimizer, hp.scheduler, total_steps, hp.warmup_ratio, hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------------------- generation
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **overrides) -> list[dict]:
        settings = GenerationSettings(**{**asdict(self.generation), **overrides})
        # generation.compile compiles the whole decoding step instead of the layers.
        with self._layers_eager() if not settings.compile else contextlib.nullcontext():
            ids, mask = input_ids.to(self.device), attention_mask.to(self.device)
            return generate(self.model, self.tokenizer, ids, mask, settings, progress=self.generation_progress)

    def _layers_eager(self):
        """model.compile compiles the layers for training steps; validation (no grad) and decoding (KV cache) run
        them uncompiled rather than compiling graphs of their own (each a minute or more for 7B)."""
        return torch.compiler.set_stance("force_eager") if self.hparams.compile else contextlib.nullcontext()

    def on_predict_end(self) -> None:
        # Lightning's teardown, next, moves the module to host memory: for a merged 7B copy (13.5 GB) that took
        # 12-14 s of a 24 GiB predict's 191 s, after the predictions were written. The model is set aside (not a
        # submodule, so the move skips it) and put back in `teardown`, where it generated.
        object.__setattr__(self, "_model_set_aside", self.model)
        self.model = None

    def teardown(self, stage: str) -> None:
        model = self.__dict__.pop("_model_set_aside", None)
        if model is not None:
            self.model = model

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        # Seeded per batch, so a batch's samples do not depend on what ran before it.
        torch.manual_seed(self.generation.seed + batch_idx)
        results = self.generate(batch["input_ids"], batch["attention_mask"])
        return [
            {"id": i, "prompt": prompt, **result, **({"reference": ref} if ref is not None else {})}
            for i, prompt, ref, result in zip(batch["id"], batch["prompt"], batch["reference"], results, strict=True)
        ]


def check_options(hp, generation: GenerationSettings) -> None:
    """Every out-of-range option at once, in one line."""
    problems = []
    if hp.lora_r <= 0:
        problems.append(f"model.lora_r={hp.lora_r}: must be a positive integer, e.g. 8, 16 or 64")
    if hp.lora_alpha <= 0:
        problems.append(f"model.lora_alpha={hp.lora_alpha}: must be positive")
    if not 0.0 <= hp.lora_dropout < 1.0:
        problems.append(f"model.lora_dropout={hp.lora_dropout}: must be in [0, 1)")
    if hp.learning_rate <= 0:
        problems.append(f"model.learning_rate={hp.learning_rate}: must be positive, e.g. 2e-4")
    if not 0.0 <= hp.warmup_ratio < 1.0:
        problems.append(f"model.warmup_ratio={hp.warmup_ratio}: must be in [0, 1)")
    if not 0.0 <= hp.min_lr_ratio <= 1.0:
        problems.append(f"model.min_lr_ratio={hp.min_lr_ratio}: must be in [0, 1], e.g. 0.1 to end at a tenth of the peak")
    if not 0.0 <= hp.residual_dropout < 1.0:
        problems.append(f"model.residual_dropout={hp.residual_dropout}: must be in [0, 1), e.g. 0.2")
    if not all(0.0 <= b < 1.0 for b in hp.adam_betas):
        problems.append(f"model.adam_betas={list(hp.adam_betas)}: each must be in [0, 1), e.g. [0.9, 0.95]")
    if hp.loss_chunk_size < 0:
        problems.append(f"model.loss_chunk_size={hp.loss_chunk_size}: must be >= 0 (0: no chunking), e.g. 1024")
    problems += generation.problems()
    if problems:
        raise UserError("; ".join(problems))
