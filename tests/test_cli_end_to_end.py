"""fit and predict through the CLI on CPU: run dir contents, falling loss, adapters, predictions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import demo_args, run_cli


def scalars(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir)).Reload()
    return [event.value for event in events.Scalars(tag)]


@pytest.fixture(scope="module")
def demo_fit(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return run_cli("fit", *demo_args(root, "--trainer.max_epochs", "2")), root


@pytest.fixture(scope="module")
def demo_run(demo_fit):
    cli, root = demo_fit
    return Path(cli.trainer.log_dir), root


@pytest.mark.slow
def test_fit_writes_a_complete_run_dir(demo_run):
    run_dir, _ = demo_run
    for name in (
        "config.yaml",
        "samples.jsonl",
        "adapters/final/adapter_config.json",
        "adapters/final/adapter_model.safetensors",
        "adapters/final/tokenizer_config.json",
        "adapters/epoch=0/adapter_model.safetensors",
        "adapters/epoch=1",
    ):
        assert (run_dir / name).exists(), name
    assert list(run_dir.glob("events.out.tfevents.*"))
    losses = scalars(run_dir, "train/loss")
    assert len(losses) >= 10 and sum(losses[-3:]) / 3 < 0.6 * losses[0], losses
    for tag in ("val/loss", "val/perplexity", "train/lr", "train/grad_norm", "train/trained_tokens_per_sec", "data/train_truncated"):
        assert scalars(run_dir, tag), tag
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert {s["epoch"] for s in samples} == {0, 1} and all(s["finish_reason"] in ("eos", "length") for s in samples)


@pytest.mark.slow
def test_checkpoint_holds_only_trainable_weights(demo_run):
    run_dir, _ = demo_run
    checkpoint = torch.load(next((run_dir / "checkpoints").glob("*.ckpt")), weights_only=True)
    assert checkpoint["state_dict"] and all("lora_" in k for k in checkpoint["state_dict"])


@pytest.mark.slow
def test_predict_writes_predictions_in_input_order(demo_run, tmp_path):
    run_dir, root = demo_run
    cli = run_cli("predict", *demo_args(root, "--model.adapter_path", str(run_dir / "adapters/final"), "--data.predict_batch_size", "7"))
    rows = [json.loads(line) for line in (Path(cli.trainer.log_dir) / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(20))
    for row in rows:
        assert set(row) >= {"id", "prompt", "response", "finish_reason", "new_tokens"}
        assert row["finish_reason"] in ("eos", "length") and 1 <= row["new_tokens"] <= 48
        assert row["finish_reason"] == "eos" or row["new_tokens"] == 48


@pytest.mark.slow
def test_adapter_reloads_in_plain_peft_with_equal_logits(demo_fit, tiny_dir):
    """The saved adapter against the weights fit trained, still in memory (not against itself reloaded by validate):
    tensor for tensor, then logits through plain PEFT."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cli, _ = demo_fit
    adapter = Path(cli.trainer.log_dir) / "adapters/final"
    trained = cli.model.eval()
    in_memory = {n.removeprefix("model.").replace(".default", ""): p for n, p in trained.named_parameters() if p.requires_grad}
    saved = load_file(adapter / "adapter_model.safetensors")
    assert saved.keys() == in_memory.keys()
    assert all(torch.equal(saved[name], in_memory[name].detach()) for name in saved)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), adapter).eval()
    input_ids = torch.randint(3, 300, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(trained.model(input_ids=input_ids).logits, plain(input_ids=input_ids).logits)


@pytest.mark.slow
def test_qlora_nf4_fits_and_predicts_on_cpu(tmp_path):
    cli = run_cli("fit", *demo_args(tmp_path, "--model.quantization", "nf4", "--trainer.max_steps", "4", "--trainer.max_epochs", "1"))
    import bitsandbytes as bnb

    layer = cli.model.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    quant_state = layer.weight.quant_state
    assert isinstance(layer, bnb.nn.Linear4bit) and quant_state.quant_type == "nf4"
    # bitsandbytes' CPU kernels repack (and un-nest) the state at first use; `original_nested` keeps the truth.
    assert getattr(quant_state, "original_nested", quant_state.nested)  # double quantization
    assert layer.compute_dtype == torch.bfloat16
    run_dir = Path(cli.trainer.log_dir)
    assert (run_dir / "adapters/final/adapter_model.safetensors").exists()
    assert all(torch.isfinite(torch.tensor(v)) for v in scalars(run_dir, "train/loss"))
    cli = run_cli("predict", *demo_args(tmp_path, "--model.quantization", "nf4", "--model.adapter_path", str(run_dir / "adapters/final")))
    assert (Path(cli.trainer.log_dir) / "predictions.jsonl").read_text().count("\n") == 20


def test_user_error_is_one_line_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", *demo_args(tmp_path, "--data.dataset", str(tmp_path / "missing.jsonl")))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lima-lightning: error: ") and "missing.jsonl: no such file" in err[-1]
    assert not any("Traceback" in line for line in err)


@pytest.mark.slow
def test_validate_writes_each_held_out_conversations_answer_nll(demo_run, tmp_path):
    """`validate` scores the held-out split once per conversation (validation.jsonl, report's intervals); the
    rows add up to the logged val/loss, and the tuned adapter scores lower than the base model."""
    run_dir, _ = demo_run

    def validate(root: Path, *extra: str) -> tuple[list[dict], float]:
        cli = run_cli("validate", *demo_args(root, "--data.batch_size", "3", *extra))
        validate_dir = Path(cli.trainer.log_dir)
        rows = [json.loads(line) for line in (validate_dir / "validation.jsonl").read_text().splitlines()]
        assert not (validate_dir / "samples.jsonl").exists()  # samples are fit's, not validate's
        return rows, scalars(validate_dir, "val/loss")[-1]

    base_rows, base_loss = validate(tmp_path / "base")
    tuned_rows, tuned_loss = validate(tmp_path / "tuned", "--model.adapter_path", str(run_dir / "adapters/final"))
    assert [r["id"] for r in base_rows] == list(range(len(base_rows))) == [r["id"] for r in tuned_rows]  # each once, in order
    assert len(base_rows) == 10  # 5% of the 200 synthetic conversations
    assert [r["where"] for r in base_rows] == [r["where"] for r in tuned_rows] and base_rows[0]["where"].startswith("synthetic/train:")
    for rows, loss in ((base_rows, base_loss), (tuned_rows, tuned_loss)):
        assert all(r["tokens"] > 0 for r in rows)
        assert sum(r["nll"] for r in rows) / sum(r["tokens"] for r in rows) == pytest.approx(loss, rel=1e-5)
    assert tuned_loss < 0.5 * base_loss
