"""Print what a run dir's TensorBoard events hold: first/last/max of each scalar, and its output files.

python benchmarks/summarize_run.py runs/demo/lightning_logs/version_0
"""

from __future__ import annotations

import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def summarize(run_dir: Path) -> None:
    events = EventAccumulator(str(run_dir)).Reload()
    print(f"== {run_dir}")
    for tag in sorted(events.Tags()["scalars"]):
        values = [e.value for e in events.Scalars(tag)]
        print(f"  {tag:34s} n={len(values):3d} first={values[0]:.4g} last={values[-1]:.4g} max={max(values):.4g}")
    for path in sorted(run_dir.rglob("*")):
        if path.is_file() and "events" not in path.name:
            print(f"  {path.relative_to(run_dir)}  {path.stat().st_size} bytes")


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        summarize(Path(arg))
