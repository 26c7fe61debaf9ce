"""What benchmarks/gpu_correctness.py measures its claims on: the real module with recording hooks, one-step
fits through a real Trainer, logits at the unpadded positions, the NF4 round trip of a bf16 model's weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lima_lightning.data.collate import collate_rows
from lima_lightning.data.sources import load_conversations
from lima_lightning.data.tokenization import IGNORE_INDEX, tokenize_for_training
from lima_lightning.module import LIMALoRAModule


def collated_with_mask(examples: list[dict], pad_id: int) -> dict:
    """The product's padded batch (one example per row) plus the attention mask a plain loop passes."""
    batch = collate_rows([[e] for e in examples], pad_id)
    lengths = torch.tensor([len(e["input_ids"]) for e in examples])
    batch["attention_mask"] = (torch.arange(batch["input_ids"].shape[1]) < lengths[:, None]).long()
    return batch


def relative(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x.float() - reference.float()).norm() / reference.float().norm()).item()


def grads_relative(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(relative difference of all LoRA gradients as one vector, worst relative difference of a single tensor)."""
    names = sorted(expected)
    whole = relative(torch.cat([got[n].flatten() for n in names]), torch.cat([expected[n].flatten() for n in names]))
    return whole, max(relative(got[n], expected[n]) for n in names)


class Probe(LIMALoRAModule):
    """The real module; the extra hooks only record what the checks need and change nothing in training."""

    def setup_probe(self, on_first_fit_start) -> None:
        self.on_first_fit_start = on_first_fit_start
        self.after_backward: list[dict[str, torch.Tensor]] = []
        self.captured: dict[str, torch.Tensor] = {}

    def trainable(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def on_fit_start(self) -> None:
        if self.on_first_fit_start is not None:
            self.on_first_fit_start(self)
            self.on_first_fit_start = None

    def on_after_backward(self) -> None:
        # Cumulative gradient after each micro-batch, before the module's token scaling: lets us rebuild the
        # per-micro-batch gradients and so what a mean-of-means bug would have produced.
        self.after_backward.append({name: p.grad.detach().clone() for name, p in self.trainable().items()})

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        self.captured = {name: p.grad.detach().clone() for name, p in self.trainable().items()}


def one_step(module: Probe, batches: list[dict], accumulate: int, device: torch.device) -> L.Trainer:
    """One optimizer step through a real Trainer, `batches` as its micro-batches."""
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if device.type == "cuda" else "32-true",
        max_steps=1,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    module.after_backward = []
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, shuffle=False))
    return trainer


def logits_of(model, batch: dict, trainer: L.Trainer) -> torch.Tensor:
    """(N, V) fp32 logits at the unpadded positions, under the same autocast as training; kept on the CPU.

    In train mode, which changes nothing here (dropout is 0) except on a CPU: there bitsandbytes repacks NF4
    weights at the first eval-mode forward, and `state_dict()` (called by PEFT's save and load) unpacks them
    with a bf16 absmax, so an eval forward before a save perturbs the base a little (bitsandbytes 0.50.2).
    """
    device = next(model.parameters()).device
    model.train()
    with torch.no_grad(), trainer.precision_plugin.forward_context():
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    return out.float()[batch["attention_mask"].to(device).bool()].cpu()


def nf4_rounded_logits(model, start_adapter: str, batch: dict, trainer: L.Trainer) -> torch.Tensor:
    """Logits with the start adapter and every projection's weight replaced by its NF4 round trip (in place).

    What the QLoRA model must compute: bitsandbytes dequantizes the 4-bit weight and multiplies in bf16, so
    NF4 logits should match these up to rounding. NF4 vs the exact weights is no such check on a random
    model: its weights have no structure, and NF4's ~10% per-weight error compounds over the layers
    (relative logit error 0.39 for an 8-layer, 1024-wide random Llama on CPU; 0.70 and 1.03 for the random
    7B shape with 8 and 32 layers on an H200, where these rounded-weight logits matched NF4's exactly).
    """
    import bitsandbytes.functional as bnbf

    model.load_adapter(start_adapter, adapter_name="start")
    model.set_adapter("start")
    with torch.no_grad():
        for name, layer in model.get_base_model().named_modules():
            if isinstance(layer, torch.nn.Linear) and "lora_" not in name and name != "lm_head":  # what load_in_4bit quantizes
                device = layer.weight.device
                weight = layer.weight.to("cuda" if torch.cuda.is_available() else device)
                packed, state = bnbf.quantize_4bit(weight.to(torch.bfloat16), blocksize=64, compress_statistics=True, quant_type="nf4")
                layer.weight.copy_(bnbf.dequantize_4bit(packed, state).to(device, layer.weight.dtype))
    return logits_of(model, batch, trainer)


def select_examples(spec: str, tokenizer, count: int, max_seq_length: int) -> list[dict]:
    """The example with the most trained tokens and the `count - 1` with the fewest: micro-batches of very unequal weight."""
    conversations = load_conversations(spec, "train", "--lima", synthetic_size=200)
    examples, _ = tokenize_for_training(conversations, tokenizer, "llama2-chat", max_seq_length)
    by_trained = sorted(examples, key=lambda e: sum(label != IGNORE_INDEX for label in e["labels"]))
    return [by_trained[-1], *by_trained[: count - 1]]


@dataclass
class Batches:
    whole: dict  # every example, one per row
    wider: dict  # the same with 64 more padding columns: the same sums exactly, other kernel shapes in bf16
    micro: list[dict]  # the long example alone, then the short ones: micro-batches of very unequal weight
    counts: list[int]  # trained tokens of each micro-batch


def make_batches(examples: list[dict], pad_id: int) -> Batches:
    whole = collated_with_mask(examples, pad_id)
    pad_values = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    wider = {k: F.pad(whole[k], (0, 64), value=v) for k, v in pad_values.items()}
    wider["position_ids"] = torch.arange(wider["input_ids"].shape[1]).expand_as(wider["input_ids"])  # rows of one example
    wider["num_tokens"] = whole["num_tokens"]
    micro = [collated_with_mask(examples[:1], pad_id), collated_with_mask(examples[1:], pad_id)]
    return Batches(whole, wider, micro, [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro])


@dataclass
class Measured:
    """One mode's figures: the loss before any step, and the gradients and logged losses of three steps
    from the same start (2 accumulated micro-batches, the wider batch, the whole batch)."""

    loss: float = 0.0  # the module's masked NLL per trained token
    ce: float = 0.0  # F.cross_entropy on the same logits
    logits: torch.Tensor | None = None  # (N, V) at the unpadded positions
    start: dict = field(default_factory=dict)  # the adapter weights before the first step
    accumulated: dict = field(default_factory=dict)  # gradients at the optimizer step of each run
    partial: list = field(default_factory=list)  # cumulative gradient after each accumulated micro-batch
    padded: dict = field(default_factory=dict)
    one_batch: dict = field(default_factory=dict)
    logged_accumulated: float = 0.0  # train/loss as logged
    logged_one: float = 0.0


def measure_start(m: Probe, mode: str, batches: Batches, args, shared: dict, measured: Measured) -> None:
    """Inside the first fit, after the model is loaded and before any step: the loss two ways, and the logits."""
    if mode == "bf16":
        # A fresh LoRA has B = 0: no effect on logits and no gradient for A. Random B makes every check bite.
        generator = torch.Generator(device=m.device).manual_seed(0)
        with torch.no_grad():
            for name, p in m.trainable().items():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) * args.lora_b_std)
        shared["adapter"] = str(Path(shared["tmp"]) / "start-adapter")
        m.model.save_pretrained(shared["adapter"])
    batch = {k: v.to(m.device) if isinstance(v, torch.Tensor) else v for k, v in batches.whole.items()}
    m.train()  # see logits_of
    with torch.no_grad(), m.trainer.precision_plugin.forward_context():
        nll, n_trained = m.masked_nll(batch)
        logits = m.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        vocab = logits.shape[-1]
        targets = batch["labels"][:, 1:].reshape(-1)
        reference = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), targets, ignore_index=IGNORE_INDEX)
    measured.loss, measured.ce = (nll / n_trained).item(), reference.item()
    measured.logits = logits.float()[batch["attention_mask"].bool()].cpu()
    measured.start = {name: p.detach().clone() for name, p in m.trainable().items()}


def run_steps(module: Probe, batches: Batches, device: torch.device, measured: Measured) -> L.Trainer:
    """The three one-step runs, each from the adapter `measured.start` recorded; returns the last Trainer."""

    def restore() -> None:  # undo the optimizer step, so that each run starts from the same adapter
        with torch.no_grad():
            for name, p in module.trainable().items():
                p.copy_(measured.start[name].to(p.device))

    trainer = one_step(module, batches.micro, accumulate=2, device=device)
    measured.accumulated, measured.partial = module.captured, module.after_backward
    measured.logged_accumulated = trainer.callback_metrics["train/loss"].item()
    restore()
    one_step(module, [batches.wider], accumulate=1, device=device)
    measured.padded = module.captured
    restore()
    trainer = one_step(module, [batches.whole], accumulate=1, device=device)
    measured.one_batch, measured.logged_one = module.captured, trainer.callback_metrics["train/loss"].item()
    module.to(device)  # Lightning's teardown moved the module to the CPU at the end of fit
    return trainer
