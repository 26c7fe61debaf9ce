"""Item 8: the same config and seed give the same run: losses step by step and adapter tensors bit for bit.

A run that cannot be repeated cannot be debugged (was it the change, or the dice?). Dropout is switched on
so that the seeded randomness of training itself is covered, not only the LoRA init and the data order.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import demo_args, run_cli

STEPS = 6


def fit(root: Path, seed: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """A short demo fit through the CLI; returns (train/loss at each step, adapter tensors)."""
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli = run_cli(
        "fit",
        *demo_args(root, "--seed_everything", str(seed), "--trainer.max_steps", str(STEPS), "--trainer.log_every_n_steps", "1"),
        "--model.lora_dropout",
        "0.1",
    )
    run_dir = Path(cli.trainer.log_dir)
    losses = [event.value for event in EventAccumulator(str(run_dir)).Reload().Scalars("train/loss")]
    return losses, load_file(run_dir / "adapters" / "final" / "adapter_model.safetensors")


@pytest.mark.slow
def test_item8_same_seed_gives_identical_losses_and_adapters(tmp_path):
    losses_a, adapter_a = fit(tmp_path / "a", seed=7)
    losses_b, adapter_b = fit(tmp_path / "b", seed=7)
    assert len(losses_a) == STEPS and losses_a == losses_b
    assert adapter_a.keys() == adapter_b.keys() and len(adapter_a) == 2 * 7 * 2
    for name in adapter_a:
        assert torch.equal(adapter_a[name], adapter_b[name]), name

    # Another seed gives another run, so the equalities above are not vacuous.
    losses_c, adapter_c = fit(tmp_path / "c", seed=8)
    assert losses_c != losses_a
    assert not any(torch.equal(adapter_a[name], adapter_c[name]) for name in adapter_a)
