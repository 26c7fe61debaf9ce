"""The LIMA paper's recipe: residual dropout per layer, AdamW betas, a linear decay to a tenth, configs/lima-paper.yaml."""

from __future__ import annotations

import pytest
import torch

from lima_lightning.models.residual_dropout import add_residual_dropout, layer_rates
from lima_lightning.optim import lr_factor
from tests.conftest import REPO


def test_rates_rise_linearly_from_zero_at_the_bottom_to_the_top_rate():
    assert layer_rates(5, 0.2) == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    rates = layer_rates(32, 0.3)
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3) and rates[16] == pytest.approx(0.3 * 16 / 31)


@pytest.fixture
def tiny_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir)


def branch_outputs(model, ids) -> dict[str, torch.Tensor]:
    """What each decoder layer's attention and MLP hand back to the residual stream (after any hook)."""
    seen, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        for name in ("self_attn", "mlp"):

            def record(module, inputs, output, key=f"{i}.{name}"):
                seen[key] = (output[0] if isinstance(output, tuple) else output).detach()

            handles.append(getattr(layer, name).register_forward_hook(record))  # after add_residual_dropout's hooks
    model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return seen


def test_each_layer_drops_its_own_rate_in_training_and_nothing_in_eval(tiny_model):
    ids = torch.randint(3, 100, (8, 64))
    tiny_model.eval()
    with torch.no_grad():
        plain = tiny_model(input_ids=ids).logits
    assert add_residual_dropout(tiny_model, 0.5) == [0.0, 0.5]  # 2 layers: nothing at the bottom, 0.5 at the top
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(input_ids=ids).logits, plain, rtol=0, atol=0)  # eval: unchanged
        tiny_model.train()
        torch.manual_seed(0)
        outputs = branch_outputs(tiny_model, ids)
    for key, expected in (("0.self_attn", 0.0), ("0.mlp", 0.0), ("1.self_attn", 0.5), ("1.mlp", 0.5)):
        zeros = (outputs[key] == 0).float().mean().item()
        assert zeros == pytest.approx(expected, abs=0.03), key


def test_a_rate_of_zero_is_todays_loss_exactly(tiny_dir):
    from lima_lightning.module import LIMALoRAModule

    ids = torch.randint(3, 100, (2, 32))
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(32).expand(2, 32)}
    losses = []
    for rate in (0.0, 0.0, 0.4):
        module = LIMALoRAModule(base_model=str(tiny_dir), quantization="none", lora_r=4, lora_dropout=0.0, residual_dropout=rate)
        module.configure_model()
        module.model.train()
        torch.manual_seed(1)
        losses.append(module.masked_nll(batch)[0].item())
    assert losses[0] == losses[1] and losses[2] != losses[0]  # 0 changes nothing; a real rate does


def test_linear_decay_to_a_tenth_without_warmup():
    factors = [lr_factor(step, 100, 0, "linear", 0.1) for step in (0, 50, 100)]
    assert factors == pytest.approx([1.0, 0.55, 0.1])
    assert lr_factor(100, 100, 0, "cosine", 0.1) == pytest.approx(0.1) and lr_factor(100, 100, 0, "linear") == 0.0


def test_the_paper_config_holds_the_papers_values(capsys):
    import yaml

    from tests.test_configs import print_config

    parsed = print_config(capsys, "fit", "--config", str(REPO / "configs/lima-paper.yaml"))
    model, data, trainer = parsed["model"], parsed["data"], parsed["trainer"]
    assert trainer["max_epochs"] == 15 and model["adam_betas"] == [0.9, 0.95] and model["weight_decay"] == 0.1
    assert model["scheduler"] == "linear" and model["min_lr_ratio"] == 0.1 and model["warmup_ratio"] == 0.0
    assert model["residual_dropout"] == 0.2 and data["max_seq_length"] == 2048
    assert data["batch_size"] * trainer["accumulate_grad_batches"] == 64 and data["batching"] == "padded"  # 64 per step
    assert parsed["adapters"]["epochs"] == list(range(4, 10))  # 5th to 10th, counted from 0
    raw = yaml.safe_load((REPO / "configs/lima-paper.yaml").read_text())
    assert raw["samples"]["num_prompts"] == 50  # the paper's 50-example development set


def test_betas_reach_the_optimizer_and_adapters_are_kept_for_the_chosen_epochs(tmp_path):
    from lima_lightning.optim import build_optimizer
    from tests.conftest import demo_args, run_cli

    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(2))], "adamw", 1e-4, 0.1, (0.9, 0.95))
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95) and optimizer.param_groups[0]["weight_decay"] == 0.1
    args = ("--trainer.max_epochs", "3", "--trainer.limit_train_batches", "2", "--adapters.epochs", "[1]", "--samples.num_prompts", "0")
    cli = run_cli("fit", *demo_args(tmp_path, *args, "--model.residual_dropout", "0.2", "--model.adam_betas", "[0.9, 0.95]"))
    saved = sorted(p.name for p in (tmp_path / "lightning_logs/version_0/adapters").iterdir())
    assert saved == ["epoch=1", "final"]
    assert cli.trainer.optimizers[0].param_groups[0]["betas"] == (0.9, 0.95)
