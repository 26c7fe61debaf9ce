"""Item 9: benchmarks/gpu_correctness.py (run on an H200 by hand) runs end to end on the CPU with the tiny model."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))  # its helpers (correctness_probe, measure) import by name


@pytest.mark.slow
def test_item9_gpu_correctness_script_passes_on_cpu_with_the_tiny_model(capsys):
    spec = importlib.util.spec_from_file_location("gpu_correctness", REPO / "benchmarks" / "gpu_correctness.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    status = script.main(["--model", "tiny", "--lima", "synthetic", "--max_seq_length", "128"])
    out = capsys.readouterr().out
    assert status == 0, out
    lines = [line for line in out.splitlines() if line.startswith(("PASS", "FAIL"))]
    # 3 checks of item 3 and one of item 6 per mode, item 7 once: all printed, all passing.
    assert len(lines) == 9 and all(line.startswith("PASS") for line in lines), out
    for item in ("item 3 loss", "item 3 gradient", "item 3 logged", "item 6 adapter", "item 7 NF4"):
        assert any(item in line for line in lines), item
    assert out.rstrip().splitlines()[-1].startswith("ALL PASS")
