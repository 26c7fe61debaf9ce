"""`python -m lima_lightning.commands.demo_summary ROOT_DIR`: how the demo's adapter answers held-out prompts.

`make demo` ends with it: a few prompts with the model's answers, and the exact-match rate over all of the newest
predictions under ROOT_DIR (`runs/demo`). The synthetic predict prompts are drawn from another seed than the
training ones, so they are held out, and each has its exact answer (`reference`). Exact match is `report`'s:
case-folded, whitespace-normalised equality.
"""

from __future__ import annotations

import sys

from lima_lightning import runs
from lima_lightning.console import shown_path
from lima_lightning.errors import UserError
from lima_lightning.report.reading import read_predictions, run_model
from lima_lightning.report.statistics import exact_match

SHOWN = 5  # one prompt of each synthetic task family (they alternate)


def latest_predictions(root_dir: str):
    """The predictions file of the newest run dir under ROOT_DIR that has one."""
    for run in reversed(runs.run_dirs(root_dir)):
        path = run / runs.PREDICTIONS_FILE
        if path.is_file():
            return path
    raise UserError(f"{runs.logs_dir(root_dir)}: no run dir holds {runs.PREDICTIONS_FILE}; run `lima-lightning predict` first")


def clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def summary_lines(rows: list[dict], shown: int = SHOWN) -> list[str]:
    scored = [r for r in rows if r.get("reference") is not None]
    if not scored:
        raise UserError("these predictions carry no reference answers (predict with --data.predict_dataset synthetic)")
    right = [exact_match(r["response"], r["reference"]) for r in scored]
    width = max(len(r["prompt"]) for r in scored[:shown])
    lines = []
    for row, ok in zip(scored[:shown], right, strict=False):
        verdict = "right" if ok else f"wrong, expected {clip(row['reference'], 40)!r}"
        lines.append(f"  {row['prompt']:<{width}}  -> {clip(row['response'], 40)!r}  ({verdict})")
    stopped = sum(r["finish_reason"] == "eos" for r in scored)
    lines.append(
        f"exact match: {sum(right)}/{len(scored)} held-out prompts ({100 * sum(right) / len(scored):.0f}%); {stopped} stopped at EOS"
    )
    return lines


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python -m lima_lightning.commands.demo_summary ROOT_DIR  (e.g. runs/demo)")
    try:
        path = latest_predictions(argv[0])
        rows = list(read_predictions(path).values())
        base, adapter = run_model(path.parent) or (None, None)
        model = f"{base} + {shown_path(adapter)}" if adapter else f"{base or 'the base model'} alone, no adapter"
        print(f"predict: {model}, answers in {path}:")
        print("\n".join(summary_lines(rows)))
    except UserError as e:
        print(f"demo_summary: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
