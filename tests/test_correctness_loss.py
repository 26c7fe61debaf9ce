"""Item 3: the loss is the token-weighted mean NLL over assistant tokens, also across gradient accumulation.

The reference everywhere is a plain `F.cross_entropy(..., ignore_index=-100)` on shifted logits: written
independently of `masked_nll_sum`, and what every causal-LM trainer computes for one batch.
The micro-batches hold very different numbers of trained tokens (one long answer vs. three short ones), so
a mean of per-batch means, the classic accumulation bug, weighs the short answers ~15x too much and fails.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lima_lightning.data.conversations import Conversation
from lima_lightning.data.tokenization import IGNORE_INDEX, encode_conversation
from lima_lightning.module import LIMALoRAModule
from tests.conftest import padded_batch, quiet_cpu_trainer, randomize_lora_b

CONVERSATIONS = [
    Conversation(("Tell me a story about a tiger.", "Once upon a time a tiger lived by a river and ate bread with a horse. " * 2)),
    Conversation(("What is 2 + 2?", "4")),
    Conversation(("Reverse the word 'ab'.", "ba")),
    Conversation(("Write 'hi' in capital letters, please, and nothing else at all.", "HI")),
]


class GradCapture(LIMALoRAModule):
    """Keeps the trainable gradients as the optimizer will see them: after the module's own scaling."""

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        self.captured = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.requires_grad}


def make_module(cls=LIMALoRAModule) -> LIMALoRAModule:
    """The tiny base with LoRA whose B matrices are non-zero, so that every adapter weight gets a gradient."""
    module = cls(
        base_model="tiny", quantization="none", lora_r=4, lora_alpha=8, lora_dropout=0.0, gradient_checkpointing=False, warmup_ratio=0.0
    )
    torch.manual_seed(0)
    module.configure_model()
    randomize_lora_b(module, std=0.05)
    return module


@pytest.fixture(scope="module")
def examples(tiny_dir):
    from lima_lightning.models.loading import load_tokenizer

    tok = load_tokenizer("tiny")
    return [encode_conversation(c, tok) for c in CONVERSATIONS], tok.pad_token_id


def reference_loss(model, batch: dict) -> torch.Tensor:
    """Mean NLL over every trained token of the batch: the textbook shifted cross-entropy."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


def test_item3_loss_equals_independent_cross_entropy_with_padding_and_mixed_lengths(examples):
    examples, pad_id = examples
    module = make_module().eval()
    batch = padded_batch(examples, pad_id)
    assert (batch["attention_mask"] == 0).any()  # the batch is padded
    with torch.no_grad():
        nll, n_trained = module.masked_nll(batch)
        assert n_trained == sum(sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in examples)
        torch.testing.assert_close(nll / n_trained, reference_loss(module.model, batch), rtol=1e-6, atol=1e-6)
        # Padding adds nothing: each example alone, unpadded, gives the same sum.
        alone = sum(module.masked_nll(padded_batch([e], pad_id))[0] for e in examples)
        torch.testing.assert_close(nll, alone, rtol=1e-5, atol=1e-5)


def fit_one_step(module: LIMALoRAModule, batches: list[dict], accumulate: int, root) -> L.Trainer:
    """One optimizer step through a real Trainer over `batches` (as micro-batches, in order)."""
    trainer = quiet_cpu_trainer(
        max_steps=1,
        accumulate_grad_batches=accumulate,
        logger=L.pytorch.loggers.CSVLogger(root),
        log_every_n_steps=1,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, shuffle=False))
    return trainer


def test_item3_grad_accumulation_equals_one_big_batch_token_weighted(examples, tmp_path):
    examples, pad_id = examples
    long_one, short_ones = [examples[0]], examples[1:]
    micro = [padded_batch(long_one, pad_id), padded_batch(short_ones, pad_id)]
    whole = padded_batch(examples, pad_id)
    counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro]
    assert counts[0] > 10 * counts[1], counts  # a mean of means would be far off

    # Independent reference: autograd of the textbook loss over all four examples at once.
    reference = make_module()
    loss = reference_loss(reference.model, whole)
    loss.backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    # The bug this guards against: mean over micro-batches of each one's mean loss.
    mean_of_means = make_module()
    (sum(reference_loss(mean_of_means.model, b) for b in micro) / len(micro)).backward()
    wrong = {n: p.grad for n, p in mean_of_means.named_parameters() if p.requires_grad}

    accumulated = make_module(GradCapture)
    trainer = fit_one_step(accumulated, micro, accumulate=2, root=tmp_path / "accumulated")
    one_batch = make_module(GradCapture)
    fit_one_step(one_batch, [whole], accumulate=1, root=tmp_path / "one")

    assert expected.keys() == accumulated.captured.keys() == one_batch.captured.keys() and len(expected) == 2 * 7 * 2  # A, B x 7 x 2 layers
    for name, grad in expected.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(accumulated.captured[name], grad, rtol=1e-4, atol=1e-7, msg=name)
        torch.testing.assert_close(one_batch.captured[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    # The check above can tell the two apart: mean-of-means gradients differ from the right ones by far more than the tolerance.
    flat = torch.cat([g.flatten() for g in expected.values()])
    flat_wrong = torch.cat([g.flatten() for g in wrong.values()])
    assert (flat_wrong - flat).norm() > 0.2 * flat.norm()

    # The logged loss is the same token-weighted mean, not the mean of the two micro-batch losses.
    logged = trainer.logged_metrics["train/loss"]
    torch.testing.assert_close(logged, loss.detach(), rtol=1e-5, atol=1e-6)
    assert abs(logged - sum(reference_loss(make_module().model, b).detach() for b in micro) / 2) > 0.05


def test_item3_validation_loss_is_token_weighted_over_batches(examples):
    examples, pad_id = examples
    module = make_module()
    batches = [padded_batch(examples[:1], pad_id), padded_batch(examples[1:], pad_id)]
    trainer = quiet_cpu_trainer()
    (metrics,) = trainer.validate(module, dataloaders=DataLoader(batches, batch_size=None), verbose=False)
    with torch.no_grad():
        expected = reference_loss(module.model, padded_batch(examples, pad_id))
    torch.testing.assert_close(torch.tensor(metrics["val/loss"]), expected, rtol=1e-5, atol=1e-6)
