"""The report's figures as PNG bytes, drawn on a matplotlib `Figure` (the Agg canvas): no pyplot, no GUI backend,
no global state, so a report can be written from any thread or test."""

from __future__ import annotations

import io

from lima_lightning.report.reading import LOSS_TAGS, Run


def plot_loss_curves(runs: list[Run]) -> bytes | None:
    """PNG bytes: train/loss and val/loss against the optimizer step, one line per run (same colour in both); None if no curves."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    with_curves = [run for run in runs if run.curves]
    if not with_curves:
        return None
    figure = Figure(figsize=(11, 4), layout="constrained")
    axes = figure.subplots(1, len(LOSS_TAGS), sharey=True)
    axes[0].set_ylabel("loss (nats per trained token)")
    for ax, tag in zip(axes, LOSS_TAGS, strict=True):
        for color, run in enumerate(runs):
            if tag in run.curves:
                steps, values = zip(*run.curves[tag], strict=True)
                ax.plot(steps, values, color=f"C{color}", marker="o" if tag == "val/loss" else None, markersize=3, label=run.name)
        ax.set(title=tag, xlabel="optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
