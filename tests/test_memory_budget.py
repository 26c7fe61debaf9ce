"""--gpu_memory_gib: enforced per process, and every memory plan (checkpointing, generation chunks, merging) uses it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lima_lightning import memory
from lima_lightning.memory import GIB
from tests.conftest import REPO, run_cli

CUDA = torch.device("cuda", 0)


@pytest.fixture
def h200(monkeypatch):
    """A 141 GiB CUDA device with 3.6 GiB allocated (an NF4 7B base), on CPU: records the fraction set."""
    fractions = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(total_memory=141 * GIB))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda fraction, device=None: fractions.append((fraction, device)))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: int(3.6 * GIB))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (130 * GIB, 141 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 4 * GIB)
    yield fractions
    memory.request_budget(None)


def llama2_7b_on_meta():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def test_the_budget_caps_the_process_and_every_plan(h200):
    from lima_lightning.generation import generation_memory_budget
    from lima_lightning.models.merging import merged_copy_fits

    assert memory.budget_bytes(CUDA) == 141 * GIB and memory.available_bytes(CUDA) == 134 * GIB  # no budget: the device
    memory.apply_budget(CUDA)
    assert h200 == []  # nothing is capped without --gpu_memory_gib
    memory.request_budget(24)
    memory.apply_budget(CUDA)
    assert h200 == [(pytest.approx(24 / 141), CUDA)]
    assert memory.budget_bytes(CUDA) == memory.available_bytes(CUDA) == 24 * GIB
    assert generation_memory_budget(CUDA) == int(0.9 * 24 * GIB) - int(3.6 * GIB)
    model = llama2_7b_on_meta()
    assert merged_copy_fits(model, CUDA)[0] is True  # 3.6 + 12.6 GiB <= 18 GiB (3/4 of 24)
    memory.request_budget(16)
    assert merged_copy_fits(model, CUDA)[0] is False  # > 12 GiB: generate from NF4 instead
    memory.request_budget(200)
    assert memory.budget_bytes(CUDA) == 141 * GIB  # never more than the device has
    memory.apply_budget(torch.device("cpu"))  # host memory is not capped
    assert len(h200) == 1


def test_the_probe_plans_against_the_budget_not_what_the_device_reports_free(h200):
    memory.request_budget(24)
    estimate = memory.MemoryEstimate(12 * GIB, 2**20, 2**18, 32, GIB, 8192, memory.available_bytes(CUDA))
    assert estimate.budget_bytes == 24 * GIB  # 134 GiB are free on the device
    assert estimate.checkpointed_layers == 6 and estimate.fits  # (21 - 0.1875 k) x 1.15 + 1 <= 24


def test_the_option_is_parsed_requested_and_checked(tmp_path, capsys):
    import yaml

    with pytest.raises(SystemExit):
        run_cli("fit", "--config", str(REPO / "configs/demo.yaml"), "--gpu_memory_gib", "24", "--print_config")
    assert yaml.safe_load(capsys.readouterr().out)["gpu_memory_gib"] == 24.0
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", str(REPO / "configs/demo.yaml"), "--gpu_memory_gib", "0", "--trainer.default_root_dir", str(tmp_path))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "lima-lightning: error: --gpu_memory_gib=0.0: must be a positive number of GiB, e.g. 24 for a 24 GB card"
    )
    memory.request_budget(None)
