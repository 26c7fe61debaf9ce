"""GPU correctness on a Llama-2-7B-shaped model: loss, gradient accumulation, adapter round trip, NF4 vs bf16.

The CPU tests (tests/test_correctness_*.py) prove these on the tiny model in fp32; this re-checks items 3, 6
and 7 where they can break differently: bf16 autocast, CUDA kernels, NF4 on the GPU, gradient
checkpointing, a 7B shape. It prints each figure with PASS/FAIL and exits 1 if anything fails.

    python benchmarks/make_random_llama.py --out /tmp/llama2-7b-random --tokenizer ../shared/llama2-tokenizer
    PYTHONPATH=. python benchmarks/gpu_correctness.py --model /tmp/llama2-7b-random --lima ../shared/lima/train.jsonl

Each mode loads the model once: `bf16` (LoRA on a bf16 base, bf16-mixed) and then `nf4` (QLoRA), which
starts from the bf16 mode's adapter so that item 7 compares the same base weights and the same adapter.
About 1.5 minutes on an H200 for the 32-layer random 7B (after make_random_llama.py, ~20 s), 15 GiB peak.
`--model tiny --lima synthetic` runs it all on a CPU, fp32 where it is not NF4 (a smoke test, see tests/).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lima_lightning.data.collate import collate_rows
from lima_lightning.data.sources import load_conversations
from lima_lightning.data.tokenization import IGNORE_INDEX, tokenize_for_training
from lima_lightning.module import LIMALoRAModule

FAILURES: list[str] = []


def plain_padded_batch(examples: list[dict], pad_id: int) -> dict:
    """The product's padded batch (one example per row) plus the attention mask a plain loop passes."""
    batch = collate_rows([[e] for e in examples], pad_id)
    lengths = torch.tensor([len(e["input_ids"]) for e in examples])
    batch["attention_mask"] = (torch.arange(batch["input_ids"].shape[1]) < lengths[:, None]).long()
    return batch


def check(passed: bool, item: str, detail: str) -> None:
    print(f"{'PASS' if passed else 'FAIL'}  {item}: {detail}", flush=True)
    if not passed:
        FAILURES.append(item)


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


def run_mode(mode: str, args, device: torch.device, examples: list[dict], pad_id: int, shared: dict) -> None:
    """All checks of one mode with one load of the model. `shared` carries the adapter and logits from bf16 to nf4."""
    started = time.perf_counter()
    fp32 = device.type != "cuda"
    # Only a plain fp32 run is exact across batch shapes; bf16 (autocast, or NF4's bf16 compute) rounds differently
    # when the padding, and so the kernels' blocking, changes.
    tolerance = 1e-4 if fp32 and mode == "bf16" else 2e-2
    whole = plain_padded_batch(examples, pad_id)
    # The same batch with 64 more padding columns: the same sums in exact arithmetic, other kernel shapes in practice.
    pad_values = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    wider = {k: F.pad(whole[k], (0, 64), value=v) for k, v in pad_values.items()}
    wider["position_ids"] = torch.arange(wider["input_ids"].shape[1]).expand_as(wider["input_ids"])  # rows of one example
    wider["num_tokens"] = whole["num_tokens"]
    micro = [plain_padded_batch(examples[:1], pad_id), plain_padded_batch(examples[1:], pad_id)]
    counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro]

    module = Probe(
        base_model=args.model,
        quantization="nf4" if mode == "nf4" else "none",
        lora_r=args.lora_r,
        lora_alpha=16,
        lora_dropout=0.0,
        gradient_checkpointing=not fp32,
        learning_rate=1e-4,
        warmup_ratio=0.0,
        scheduler="constant",
        adapter_path=shared.get("adapter"),
    )
    measured: dict = {}

    def at_start(m: Probe) -> None:
        """Runs inside the first fit, after the model is loaded and before any step."""
        if mode == "bf16":
            # A fresh LoRA has B = 0: no effect on logits and no gradient for A. Random B makes every check bite.
            generator = torch.Generator(device=m.device).manual_seed(0)
            with torch.no_grad():
                for name, p in m.trainable().items():
                    if "lora_B" in name:
                        p.copy_(torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) * args.lora_b_std)
            shared["adapter"] = str(Path(shared["tmp"]) / "start-adapter")
            m.model.save_pretrained(shared["adapter"])
        batch = {k: v.to(m.device) if isinstance(v, torch.Tensor) else v for k, v in whole.items()}
        m.train()  # see logits_of
        with torch.no_grad(), m.trainer.precision_plugin.forward_context():
            nll, n_trained = m.masked_nll(batch)
            logits = m.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            vocab = logits.shape[-1]
            reference = F.cross_entropy(
                logits[:, :-1].reshape(-1, vocab).float(), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
            )
        measured["loss"], measured["ce"] = (nll / n_trained).item(), reference.item()
        measured["logits"] = logits.float()[batch["attention_mask"].bool()].cpu()
        measured["start"] = {name: p.detach().clone() for name, p in m.trainable().items()}

    module.setup_probe(at_start)
    trainer = one_step(module, micro, accumulate=2, device=device)
    load_s = time.perf_counter() - started
    accumulated, partial = module.captured, module.after_backward
    logged_accumulated = trainer.callback_metrics["train/loss"].item()

    def restore(m: Probe) -> None:  # undo the optimizer step, so that each run starts from the same adapter
        with torch.no_grad():
            for name, p in m.trainable().items():
                p.copy_(measured["start"][name].to(p.device))

    restore(module)
    one_step(module, [wider], accumulate=1, device=device)
    padded = module.captured
    restore(module)
    trainer = one_step(module, [whole], accumulate=1, device=device)
    one_batch, logged_one = module.captured, trainer.callback_metrics["train/loss"].item()
    module.to(device)  # Lightning's teardown moved the module to the CPU at the end of fit

    header = f"{mode}: {'QLoRA, NF4' if mode == 'nf4' else 'LoRA, ' + ('fp32' if fp32 else 'bf16')} base on {device}"
    print(f"== {header} ({len(examples)} examples, {whole['input_ids'].shape[1]} tokens max, loaded and stepped in {load_s:.0f} s)")
    diff = abs(measured["loss"] - measured["ce"])
    check(
        diff / measured["ce"] < tolerance,
        "item 3 loss == independent F.cross_entropy",
        f"{measured['loss']:.6f} vs {measured['ce']:.6f}, abs diff {diff:.2e}, "
        f"rel diff {diff / measured['ce']:.2e} (limit {tolerance:.0e})",
    )
    acc_error, acc_worst = grads_relative(accumulated, one_batch)
    # What a mean of per-micro-batch means would have given: G_i = k * (cumulative_i - cumulative_{i-1}).
    g1 = {n: 2 * g for n, g in partial[0].items()}
    g2 = {n: 2 * (partial[1][n] - partial[0][n]) for n in g1}
    mean_of_means = {n: (g1[n] / counts[0] + g2[n] / counts[1]) / 2 for n in g1}
    bug_error, _ = grads_relative(mean_of_means, one_batch)
    # bf16 rounding differs with the batch shape, and a random model amplifies it (its logits move by ~100% under
    # NF4's rounding, see item 7). So the limit is also measured: 3x the difference that mere extra padding makes.
    noise, _ = grads_relative(padded, one_batch)
    limit = max(tolerance, 3 * noise)
    check(
        acc_error < limit and bug_error > 10 * acc_error,
        f"item 3 gradient, 2 micro-batches ({counts[0]} + {counts[1]} trained tokens) == 1 batch",
        f"rel diff {acc_error:.2e} (worst of {len(one_batch)} LoRA tensors {acc_worst:.2e}); limit {limit:.1e} = max({tolerance:.0e}, "
        f"3 x {noise:.1e}, what 64 more padding columns change); a mean of means would be off by {bug_error:.2f}",
    )
    logged_error = abs(logged_accumulated - logged_one) / logged_one
    check(
        logged_error < tolerance,
        "item 3 logged train/loss, accumulated == 1 batch",
        f"{logged_accumulated:.6f} vs {logged_one:.6f} (rel diff {logged_error:.2e})",
    )

    if mode == "nf4":
        import bitsandbytes as bnb

        layers = [m for m in module.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        states = [layer.weight.quant_state for layer in layers]
        configured = bool(layers) and all(
            s.quant_type == "nf4" and getattr(s, "original_nested", s.nested) and layer.compute_dtype == torch.bfloat16
            for layer, s in zip(layers, states, strict=True)
        )
        error = relative(measured["logits"], shared["logits"])
        rounding = relative(measured["logits"], shared["rounded_logits"])
        check(
            configured and rounding < 2e-2,
            f"item 7 NF4 vs {'fp32' if fp32 else 'bf16'} logits, same base weights and adapter",
            f"relative error {error:.4f}; vs the {'fp32' if fp32 else 'bf16'} model with NF4-rounded weights {rounding:.2e} "
            f"(limit 2e-02); {len(layers)} Linear4bit layers, NF4 + double quant + bf16 compute: {configured}",
        )
    else:
        shared["logits"] = measured["logits"]

    # Item 6: save the adapter, put the bare base back, load the adapter with plain PEFT onto it.
    from peft import PeftModel

    adapter = Path(shared["tmp"]) / f"{mode}-adapter"
    module.model.save_pretrained(adapter)
    ours = logits_of(module.model, whole, trainer)
    base = module.model.unload()  # the same base weights, LoRA layers removed (not merged)
    effect = relative(logits_of(base, whole, trainer), ours)
    plain = PeftModel.from_pretrained(base, adapter)
    theirs = logits_of(plain, whole, trainer)
    max_abs = (theirs - ours).abs().max().item()
    check(
        relative(theirs, ours) < 1e-3 and effect > 0.01,
        "item 6 adapter round trip through PeftModel.from_pretrained",
        f"max abs logit diff {max_abs:.2e} (logits up to {ours.abs().max().item():.1f}); "
        f"the adapter moves the logits by {effect:.3f} relative, so it is really in play",
    )
    if mode == "bf16":
        shared["rounded_logits"] = nf4_rounded_logits(plain, shared["adapter"], whole, trainer)
    del module, trainer, plain, base
    gc.collect()
    if device.type == "cuda":
        print(f"   peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Directory of a Llama model (benchmarks/make_random_llama.py), or `tiny`.")
    parser.add_argument("--lima", required=True, help="LIMA train.jsonl (or any LIMA/chat-format file, or `synthetic`).")
    parser.add_argument("--examples", type=int, default=4, help="Examples: one with a long answer, the rest with the shortest.")
    parser.add_argument("--max_seq_length", type=int, default=512, help="Truncate examples to this many tokens.")
    parser.add_argument("--lora_r", type=int, default=16, help="LoRA rank.")
    parser.add_argument("--lora_b_std", type=float, default=0.02, help="Std of the random LoRA B matrices (fresh LoRA has B = 0).")
    parser.add_argument("--modes", nargs="+", default=["bf16", "nf4"], choices=["bf16", "nf4"], help="nf4 needs bf16 first (its adapter).")
    args = parser.parse_args(argv)
    FAILURES.clear()
    if args.modes[0] != "bf16":
        parser.error("--modes must start with bf16: nf4 is compared with it")

    import peft
    import transformers

    from lima_lightning.models.loading import load_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, lightning {L.__version__}")
    tokenizer = load_tokenizer(args.model)
    examples = select_examples(args.lima, tokenizer, args.examples, args.max_seq_length)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        shared = {"tmp": tmp}
        for mode in args.modes:
            L.seed_everything(0, verbose=False)
            run_mode(mode, args, device, examples, tokenizer.pad_token_id, shared)
    print(f"{'ALL PASS' if not FAILURES else 'FAILED: ' + '; '.join(FAILURES)} in {time.perf_counter() - started:.0f} s")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
