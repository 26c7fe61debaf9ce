"""LIMALoRAModule: a frozen Llama base (NF4 or bf16) with trainable LoRA adapters and the masked NLL."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lima_lightning.data.batching import count_tokens, model_inputs
from lima_lightning.distributed import clean_param_name, fsdp_quant_storage, global_grad_norm, is_fsdp, prepare_fsdp
from lima_lightning.errors import UserError
from lima_lightning.generation import GenerationSettings, generate
from lima_lightning.loss import head_nll_sum, masked_nll_sum
from lima_lightning.models.loading import LLAMA_PROJECTIONS

# Models whose logits are exactly lm_head(last hidden state): no soft-capping or logit scaling in between.
HEAD_ONLY_MODEL_TYPES = ("llama", "mistral")

OptimizerName = Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"]


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite; the run stops before the optimizer applies it."""


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
        attn_implementation: Literal["sdpa", "flex_attention", "eager"] = "sdpa",
        compile: bool = False,
        lora_dtype: Literal["float32", "bfloat16"] = "float32",
        loss_chunk_size: int = 0,
        optimizer: OptimizerName = "adamw",
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        scheduler: Literal["cosine", "linear", "constant"] = "cosine",
        adapter_path: str | None = None,
        max_new_tokens: int = 500,
        do_sample: bool = True,
        temperature: float = 0.8,
        top_p: float = 0.9,
        seed: int = 0,
        merge_for_generation: bool | Literal["auto"] = False,
        generation_cache: Literal["dynamic", "static"] = "static",
        compile_generation: bool = False,
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
                (GPU): measure this model's activation memory with two short probe steps and checkpoint only
                if the data module's largest micro-batch would not fit without it; off on CPU.
            attn_implementation: Training attention kernel. `sdpa`: PyTorch's fused kernels (causal flash for
                unpacked rows). `flex_attention` (CUDA only, compiles a kernel at the first step): skips the
                blocks a packed row masks out. `eager`: plain matmuls, for debugging.
            compile: torch.compile each decoder layer (the layers share their graphs; the first step compiles, ~1-2 min
                for 7B); generation runs the layers uncompiled.
            lora_dtype: Adapter weight dtype. `bfloat16` halves adapter, gradient and AdamW-state memory (the
                low-memory recipe) at the cost of update precision; `float32` otherwise.
            loss_chunk_size: Trained tokens sent through the LM head at once, each chunk recomputed in backward:
                bounds the logits' memory to chunk x vocab (0: all at once, fastest).
            optimizer: `adamw` (torch) or a bitsandbytes 8-bit / paged AdamW (less optimizer memory).
            learning_rate: Peak learning rate after warmup.
            weight_decay: AdamW weight decay on the LoRA weights.
            warmup_ratio: Share of the optimizer steps spent warming the learning rate up from 0.
            scheduler: Learning-rate decay after warmup.
            adapter_path: A saved adapter directory to start from (fit) or generate with (predict);
                without it, fit starts fresh adapters and predict uses the base model alone.
            max_new_tokens: Generation limit per prompt.
            do_sample: Sample (true) or decode greedily (false).
            temperature: Sampling temperature.
            top_p: Nucleus sampling threshold.
            seed: Seed for sampling, so the same run gives the same generations.
            merge_for_generation: predict only: merge the adapter into the base (bf16 on GPU, fp32 on CPU; an
                NF4 base is dequantized first, as `lima-lightning export` does) and generate with that. Much
                faster with an NF4 base, whose 4-bit matmuls are slow to generate with; needs the bf16 base's
                memory (~13 GB for 7B). Logits match the unmerged model to bf16 rounding, so samples can differ.
                `auto`: merge when the merged copy, made while the base is still loaded, takes at most 3/4 of the
                GPU (a 7B model: on 24 GB GPUs and up), leaving the rest for generation's KV caches.
            generation_cache: KV cache for generation. `static`: allocated once per chunk of prompts (prompt +
                max_new_tokens per row), no copying while decoding; `dynamic`: grows (and is copied) every step.
                Either way a predict batch is generated in as few chunks as fit the GPU's memory.
            compile_generation: torch.compile the decoding step with CUDA graphs (static cache; CUDA only, a bf16
                base or merge_for_generation: an NF4 base decodes uncompiled). The first batch compiles (about a
                minute for 7B); worth it for large prompt sets, and best with one large predict batch.
            trust_remote_code: Run model code shipped in the base model's repository. Off: only
                turn it on for repositories you trust.
        """
        super().__init__()
        self.save_hyperparameters()
        problems = []
        if lora_r <= 0:
            problems.append(f"model.lora_r={lora_r}: must be a positive integer, e.g. 8, 16 or 64")
        if lora_alpha <= 0:
            problems.append(f"model.lora_alpha={lora_alpha}: must be positive")
        if not 0.0 <= lora_dropout < 1.0:
            problems.append(f"model.lora_dropout={lora_dropout}: must be in [0, 1)")
        if learning_rate <= 0:
            problems.append(f"model.learning_rate={learning_rate}: must be positive, e.g. 2e-4")
        if not 0.0 <= warmup_ratio < 1.0:
            problems.append(f"model.warmup_ratio={warmup_ratio}: must be in [0, 1)")
        if max_new_tokens < 1:
            problems.append(f"model.max_new_tokens={max_new_tokens}: must be >= 1")
        if loss_chunk_size < 0:
            problems.append(f"model.loss_chunk_size={loss_chunk_size}: must be >= 0 (0: no chunking), e.g. 1024")
        if problems:
            raise UserError("; ".join(problems))
        self.generation = GenerationSettings(max_new_tokens, do_sample, temperature, top_p, generation_cache, compile_generation)
        self.model = None
        self.tokenizer = None
        # Checkpoints hold only the adapter (see on_save_checkpoint); the frozen base is reloaded.
        self.strict_loading = False
        self.compile_backend = "inductor"  # tests and the CPU benchmark smoke run use "aot_eager"
        self.speed_settings: dict = {}
        self._reset_step_window()

    # ----------------------------------------------------------------------------- model
    def configure_model(self) -> None:
        if self.model is None:
            self._load_model()
        if self._trainer is not None and self.trainer.state.fn == "fit":
            # Attention kernel, adapter dtype, gradient checkpointing (auto: measured), compile; idempotent.
            from lima_lightning.models.speed import configure_for_training

            datamodule = getattr(self.trainer, "datamodule", None)
            max_tokens = getattr(datamodule, "max_batch_tokens", None)
            self.speed_settings = configure_for_training(self, self.trainer.strategy.root_device, max_tokens, self.compile_backend)
        if self._trainer is not None:
            # FSDP only (a no-op otherwise): wrap policy, no dtype casts, FSDP's activation checkpointing.
            prepare_fsdp(self.trainer.strategy, self.model)
        self.trainable_parameter_names()  # recorded now, before a strategy wraps the modules

    def _load_model(self) -> None:
        from lima_lightning.models.loading import add_lora, load_adapter, load_base_model, load_tokenizer

        hp = self.hparams
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        self.tokenizer = load_tokenizer(hp.base_model, hp.trust_remote_code)
        # Every rank loads the whole base onto its own device (DDP: `device` is this rank's GPU); FSDP shards it
        # after configure_model, and needs the NF4 bytes stored as bf16 to do so.
        quant_storage = fsdp_quant_storage(self.trainer.strategy) if self._trainer is not None else None
        base = load_base_model(hp.base_model, hp.quantization, device, hp.trust_remote_code, quant_storage=quant_storage)
        training = self._trainer is None or self.trainer.training or self.trainer.state.fn == "fit"
        merge = not training and self.trainer.state.fn == "predict" and hp.merge_for_generation
        if merge == "auto":
            from lima_lightning.export import merged_copy_fits

            merge, reason = merged_copy_fits(base, device)
            rank_zero_info(f"model.merge_for_generation=auto: {'merging' if merge else 'not merging'} ({reason})")
        if merge:
            from lima_lightning.export import merge_into_base

            self.model = merge_into_base(base, hp.adapter_path, hp.base_model, torch.bfloat16 if device.type == "cuda" else torch.float32)
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
    def masked_nll(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of NLL over trained tokens, their count): the only place a loss is computed."""
        # No attention mask: batches are right-padded or packed (see data/batching.py), and use_cache=False,
        # without which transformers would not read packed rows' position restarts.
        inputs = model_inputs(batch)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if base.config.model_type not in HEAD_ONLY_MODEL_TYPES:
            return masked_nll_sum(self.model(**inputs, use_cache=False).logits, batch["labels"])
        # Logits are a plain linear map of the last hidden state here, so the head runs at trained positions only.
        hidden = base.get_decoder()(**inputs, use_cache=False).last_hidden_state
        return head_nll_sum(hidden, base.get_output_embeddings(), batch["labels"], self.hparams.loss_chunk_size)

    def _reset_step_window(self) -> None:
        self._step_nll = torch.zeros(())
        self._step_tokens = torch.zeros((), dtype=torch.long)
        self._step_seen_tokens = 0
        self._step_started = time.perf_counter()

    def on_train_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.logger is not None and datamodule is not None:
            for split, stats in getattr(datamodule, "stats", {}).items():
                self.logger.log_metrics({f"data/{split}_{k}": v for k, v in stats.as_dict().items()}, step=0)
        self._reset_step_window()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        nll, n_trained = self.masked_nll(batch)
        self._step_nll = self._step_nll.to(nll.device) + nll.detach()
        self._step_tokens = self._step_tokens.to(nll.device) + n_trained
        self._step_seen_tokens += count_tokens(batch)
        # Backward runs on the *sum*; on_before_optimizer_step divides the accumulated gradient by the
        # number of trained tokens in the whole optimizer step (all micro-batches, all devices), so every
        # token weighs the same: a token-weighted mean, not a mean of per-batch means.
        return nll

    def on_before_optimizer_step(self, optimizer) -> None:
        strategy = self.trainer.strategy
        tokens = strategy.reduce(self._step_tokens.float(), reduce_op="sum")
        nll = strategy.reduce(self._step_nll, reduce_op="sum")
        loss = nll / tokens.clamp(min=1)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"train loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}); "
                "the update was not applied; lower model.learning_rate or check the data"
            )
        # Lightning divided each micro-batch loss by accumulate_grad_batches and DDP averaged over devices.
        scale = self.trainer.accumulate_grad_batches * strategy.world_size / tokens.clamp(min=1)
        params = [p for p in self.trainable_parameters() if p.grad is not None]
        if params:  # a few multi-tensor kernels, not one per adapter weight
            torch._foreach_mul_([p.grad for p in params], scale)
        elapsed = time.perf_counter() - self._step_started
        metrics = {
            "train/loss": loss,
            "train/perplexity": torch.exp(loss),
            "train/grad_norm": global_grad_norm([p.grad for p in params], strategy),
            "train/lr": optimizer.param_groups[0]["lr"],
            "train/trained_tokens_per_sec": tokens / max(elapsed, 1e-9),
            # Tokens (padding excluded) all devices processed in this step; rank 0's times the world size would
            # be off by how unevenly lengths fall on the devices.
            "train/tokens_per_sec": strategy.reduce(tokens.new_tensor(float(self._step_seen_tokens)), reduce_op="sum") / max(elapsed, 1e-9),
        }
        if self.device.type == "cuda":
            metrics["train/peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, rank_zero_only=True)
        self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=False, logger=False, rank_zero_only=True)
        self._reset_step_window()

    def on_validation_epoch_start(self) -> None:
        self._val_nll = torch.zeros((), device=self.device)
        self._val_tokens = torch.zeros((), device=self.device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        nll, n_trained = self.masked_nll(batch)
        self._val_nll += nll
        self._val_tokens += n_trained

    def on_validation_epoch_end(self) -> None:
        self._log_eval_loss("val")

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_eval_loss("test")

    def _log_eval_loss(self, split: str) -> None:
        nll = self.trainer.strategy.reduce(self._val_nll, reduce_op="sum")
        tokens = self.trainer.strategy.reduce(self._val_tokens, reduce_op="sum")
        loss = nll / tokens.clamp(min=1)
        self.log_dict({f"{split}/loss": loss, f"{split}/perplexity": torch.exp(loss)}, prog_bar=True, rank_zero_only=True)

    # ----------------------------------------------------------------------------- optimizer
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if gradient_clip_val and is_fsdp(self.trainer.strategy) and gradient_clip_algorithm in (None, "norm"):
            # Each rank holds a shard of the gradient: only the root FSDP module can clip by the total norm
            # (Lightning's own norm clipping refuses FSDP). A collective, like every hook here under FSDP.
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm)

    def configure_optimizers(self):
        from transformers import get_scheduler

        hp = self.hparams
        params = self.trainable_parameters()
        if hp.optimizer == "adamw":
            # foreach (the CUDA default), not fused: Lightning refuses gradient clipping with a fused AdamW under AMP.
            optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        else:
            import bitsandbytes as bnb

            optimizer_class = {
                "adamw_8bit": bnb.optim.AdamW8bit,
                "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
                "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
            }
            optimizer = optimizer_class[hp.optimizer](params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        name = {"constant": "constant_with_warmup"}.get(hp.scheduler, hp.scheduler)
        scheduler = get_scheduler(
            name, optimizer, num_warmup_steps=math.ceil(hp.warmup_ratio * total_steps), num_training_steps=total_steps
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------------------- generation
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **overrides) -> list[dict]:
        settings = GenerationSettings(**{**vars(self.generation), **overrides})
        # model.compile compiles the layers for training batches; decoding with a KV cache would recompile them
        # (compile_generation compiles the whole decoding step instead).
        layers_eager = self.hparams.compile and not settings.compile
        eager = torch.compiler.set_stance("force_eager") if layers_eager else contextlib.nullcontext()
        with eager:
            return generate(self.model, self.tokenizer, input_ids.to(self.device), attention_mask.to(self.device), settings)

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        # Seeded per batch, so a batch's samples do not depend on what ran before it.
        torch.manual_seed(self.hparams.seed + batch_idx)
        results = self.generate(batch["input_ids"], batch["attention_mask"])
        return [
            {"id": i, "prompt": prompt, **result, **({"reference": ref} if ref is not None else {})}
            for i, prompt, ref, result in zip(batch["id"], batch["prompt"], batch["reference"], results, strict=True)
        ]
