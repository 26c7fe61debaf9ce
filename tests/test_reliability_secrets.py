"""Secrets and trust: HF_TOKEN stays in the environment; no remote code, no pickles, unless asked."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from tests.conftest import demo_args, run_cli

CANARY = "hf_CANARYcanary0123456789abcdefSECRET"


@pytest.mark.slow
def test_hf_token_never_reaches_a_file_of_the_run_and_nothing_trusts_remote_code(tmp_path, monkeypatch, capfd):
    import transformers

    monkeypatch.setenv("HF_TOKEN", CANARY)
    calls = []
    for auto in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        real = auto.from_pretrained.__func__

        def recording(cls, *args, _real=real, **kwargs):
            calls.append((cls.__name__, kwargs))
            return _real(cls, *args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", classmethod(recording))

    short = ("--data.synthetic_size", "64", "--trainer.max_epochs", "1", "--checkpoint.every_n_train_steps", "2")
    fit = run_cli("fit", *demo_args(tmp_path, *short))
    adapter = Path(fit.trainer.log_dir) / "adapters" / "final"
    run_cli("predict", *demo_args(tmp_path, *short, "--model.adapter_path", str(adapter), "--model.generation.max_new_tokens", "4"))

    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"config.yaml", "hparams.yaml", "last.ckpt", "adapter_model.safetensors", "predictions.jsonl"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    leaks = [str(p) for p in files if CANARY.encode() in p.read_bytes()]
    assert not leaks
    out, err = capfd.readouterr()
    assert CANARY not in out + err

    # The token did reach the loaders (so the check above means something), and nothing ran remote code.
    assert calls and all(kwargs.get("token") == CANARY for _, kwargs in calls)
    assert all(kwargs.get("trust_remote_code") is False for _, kwargs in calls)
    assert all(kwargs.get("use_safetensors") is True for name, kwargs in calls if name == "AutoModelForCausalLM")
    assert fit.model.hparams.trust_remote_code is False


class Payload:
    """Unpickling this creates a file: evidence that a checkpoint ran code."""

    def __init__(self, evidence: Path) -> None:
        self.evidence = evidence

    def __reduce__(self):
        return (open, (str(self.evidence), "w"))


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_a_checkpoint_with_a_pickled_object_is_refused_without_running_it(subcommand, tmp_path, capsys, monkeypatch):
    # Even where torch is told to unpickle by default, the CLI insists on weights_only.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    evidence = tmp_path / "code-ran"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "global_step": 0, "hyper_parameters": {"x": Payload(evidence)}}, ckpt)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(subcommand, *demo_args(tmp_path), "--ckpt_path", str(ckpt))
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (
        f"lima-lightning: error: --ckpt_path={ckpt}: refused: the file holds a pickled Python object (io.open), "
        "not only tensors and plain values; checkpoints are loaded with weights_only=True, so no code in them runs"
    )
    assert not evidence.exists()


def test_a_truncated_checkpoint_is_one_line(tmp_path, capsys):
    ckpt = tmp_path / "torn.ckpt"
    torch.save({"global_step": 3, "state_dict": {"w": torch.zeros(1000)}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:500])
    with pytest.raises(SystemExit):
        run_cli("fit", *demo_args(tmp_path), "--ckpt_path", str(ckpt))
    assert f"--ckpt_path={ckpt}: not a readable checkpoint (RuntimeError: " in capsys.readouterr().err


def test_pickle_payload_is_real():
    """The payload above does run when unpickled: the refusal test is not vacuous."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        evidence = Path(d) / "ran"
        pickle.loads(pickle.dumps(Payload(evidence)))
        assert evidence.exists()
