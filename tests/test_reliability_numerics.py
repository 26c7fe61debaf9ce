"""Numerics: nothing to train never makes NaN; a NaN/inf loss stops the run, names the step, keeps the last good adapter."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lima_lightning.data.tokenization import IGNORE_INDEX
from lima_lightning.loss import head_nll_sum, masked_nll_sum
from tests.conftest import demo_args, run_cli
from tests.reliability_helpers import scalars

SHORT = ("--data.synthetic_size", "64", "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1", "--samples.num_prompts", "0")


def test_zero_trained_tokens_give_a_zero_sum_and_finite_gradients():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.full((2, 5), IGNORE_INDEX)
    nll, count = masked_nll_sum(logits, labels)
    nll.backward()
    assert count == 0 and nll.item() == 0.0 and torch.isfinite(logits.grad).all()

    hidden = torch.randn(2, 5, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11)
    for chunk_size in (0, 2):
        nll, count = head_nll_sum(hidden, head, labels, chunk_size=chunk_size)
        assert count == 0 and nll.item() == 0.0 and torch.isfinite(nll)


@pytest.mark.slow
def test_a_step_with_no_trained_token_logs_zero_not_nan(tmp_path):
    """Every other micro-batch (here: every other optimizer step) has every label masked: nothing to train."""
    zero = ("--trainer.callbacks+=tests.reliability_helpers.ZeroTokenBatches", "--trainer.callbacks.every", "2")
    cli = run_cli("fit", *demo_args(tmp_path, *SHORT, "--data.batch_size", "4", *zero))
    run_dir = Path(cli.trainer.log_dir)
    losses = [value for _, value in scalars(run_dir, "train/loss")]
    assert losses and all(math.isfinite(v) for v in losses) and 0.0 in losses, losses
    assert all(torch.isfinite(p).all() for p in cli.model.trainable_parameters())
    assert all(math.isfinite(v) for _, v in scalars(run_dir, "train/grad_norm"))


@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.slow
def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_adapter(poison, tmp_path, capsys, monkeypatch, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lima_lightning.module import LIMALoRAModule

    last_good: dict[str, torch.Tensor] = {}
    real_masked_nll = LIMALoRAModule.masked_nll

    def poisoned_at_step_3(self, batch):
        nll, n_trained = real_masked_nll(self, batch)
        if self.trainer.training and self.global_step == 3:
            # What the weights are now is what must survive: the poisoned step must not be applied.
            last_good.update({n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad})
            nll = nll * poison
        return nll, n_trained

    monkeypatch.setattr(LIMALoRAModule, "masked_nll", poisoned_at_step_3)
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", *demo_args(tmp_path, *SHORT))
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    adapter = tmp_path / "lightning_logs" / "version_0" / "adapters" / "last-good"
    assert line.startswith(f"lima-lightning: error: train loss is {poison} at step 3 (epoch 0); the update was not applied")
    assert line.endswith(f"; the last good adapter is in {adapter}")

    saved = load_file(adapter / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())
    # PEFT's names drop the module's "model." prefix and the adapter name: compare tensor by tensor.
    assert saved.keys() == {n.removeprefix("model.").replace(".default", "") for n in last_good}
    for name, value in last_good.items():
        assert torch.equal(saved[name.removeprefix("model.").replace(".default", "")], value), name
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), adapter)
    assert torch.isfinite(reloaded(input_ids=torch.tensor([[1, 50, 60, 70]])).logits).all()
