"""Tests for bugs that once survived the suite (each planted, seen to fail here, then removed; see docs/guarantees.md):
decoding that never stops at EOS, and a checkpoint written straight to its final name (also behind training)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lima_lightning.generation import GenerationSettings, generate
from tests.conftest import REPO


def test_decoding_ends_at_eos_a_batch_whose_rows_all_emit_eos_first_takes_one_forward(tiny_dir, tiny_tokenizer):
    """Outputs are cut at EOS afterwards, so passing the wrong id as `eos_token_id` (e.g. the pad id) changes no
    output: only the number of model forwards shows it (here 1 instead of max_new_tokens)."""
    from lima_lightning.models.loading import add_lora, load_base_model

    base = load_base_model(str(tiny_dir), "none", torch.device("cpu"))
    model = add_lora(base, 4, 8, 0.0, ["q_proj", "v_proj"]).eval()
    eos = tiny_tokenizer.eos_token_id
    forwards = []

    def every_next_token_is_eos(module, args, kwargs, output):
        forwards.append(output.logits.shape[1])
        output.logits[...] = -1e4
        output.logits[..., eos] = 1e4

    base.register_forward_hook(every_next_token_is_eos, with_kwargs=True)
    input_ids = torch.tensor([[0, 0, 1, 40, 41, 42], [1, 43, 44, 45, 46, 47], [0, 0, 0, 1, 48, 49]])  # left-padded
    attention_mask = (input_ids != 0).long()
    for do_sample in (False, True):
        forwards.clear()
        settings = GenerationSettings(max_new_tokens=16, do_sample=do_sample, temperature=1.0, top_p=1.0)
        results = generate(model, tiny_tokenizer, input_ids, attention_mask, settings)
        assert [r["finish_reason"] for r in results] == ["eos"] * 3 and {r["new_tokens"] for r in results} == {1}
        assert len(forwards) == 1, f"{len(forwards)} forwards: decoding went on after every row had emitted EOS"


# A process that checkpoints step 1, then is SIGKILLed half-way through writing step 2's checkpoint (with "behind":
# in the background thread, while the main thread goes on).
TORN_WRITER = """
import contextlib, io, sys, time
from pathlib import Path
import torch
from lima_lightning.checkpointing import AsyncAtomicCheckpointIO, AtomicCheckpointIO

target, marker, behind = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "behind"
checkpoints = AsyncAtomicCheckpointIO() if behind else AtomicCheckpointIO()
checkpoints.save_checkpoint({"global_step": 1, "w": torch.zeros(50_000)}, target)
real_save = torch.save

def half_then_hang(obj, f, *args, **kwargs):
    buffer = io.BytesIO()
    real_save(obj, buffer)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()
    marker.write_text("half written")
    time.sleep(600)  # killed here

torch.save = half_then_hang
with checkpoints.writing_behind() if behind else contextlib.nullcontext():
    checkpoints.save_checkpoint({"global_step": 2, "w": torch.ones(50_000)}, target)
time.sleep(600)  # training goes on
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["synchronous", "behind"])
def test_sigkill_half_way_through_a_checkpoint_write_leaves_the_previous_checkpoint(tmp_path, how):
    """Fails for a checkpoint written straight to its final name: the kill leaves half of it there."""
    from lima_lightning.checkpointing import AtomicCheckpointIO

    target, marker = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "marker"
    command = [sys.executable, "-c", TORN_WRITER, str(target), str(marker), how]
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    try:
        while not marker.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate()
    assert AtomicCheckpointIO().load_checkpoint(target)["global_step"] == 1
    others = [p.name for p in target.parent.iterdir() if p != target]
    assert others and all(name.startswith(".last.ckpt.tmp-") for name in others)  # the torn half, dot-prefixed
    assert Path(target.parent / others[0]).stat().st_size < target.stat().st_size
