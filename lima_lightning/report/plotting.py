"""The report's figures as PNG bytes, drawn on a matplotlib `Figure` (the Agg canvas): no pyplot, no GUI backend,
no global state, so a report can be written from any thread or test. The i-th run given is drawn in colour Ci."""

from __future__ import annotations

import io
from dataclasses import dataclass

from lima_lightning.report.figures import has_reference
from lima_lightning.report.reading import LOSS_TAGS, Run
from lima_lightning.report.statistics import word_count

MAX_BINS = 40
PANELS_PER_ROW = 4


def png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def plot_loss_curves(runs: list[Run], epoch_ends: dict[int, int] | None = None) -> bytes | None:
    """PNG bytes: train/loss and val/loss against the optimizer step, one line per run (same colour in both); None if no curves.

    `epoch_ends` (epoch -> its last step) draws a dotted line at the end of each epoch (`--epochs`).
    """
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
        for k, step in enumerate(sorted((epoch_ends or {}).values())):
            ax.axvline(step, color="0.6", linestyle=":", linewidth=1, label="end of an epoch" if k == 0 else None)
        ax.set(title=tag, xlabel="optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    return png(figure)


def length_bins(lengths: list[int]):
    """Shared bin edges for every panel, so the histograms compare: at most MAX_BINS, at least one."""
    import numpy as np

    return np.histogram_bin_edges(lengths, bins=max(1, min(MAX_BINS, len(set(lengths)))))


@dataclass(frozen=True)
class LengthPanel:
    color: int  # Ci: the run's place among the runs given
    name: str
    responses: list[int]  # words per response, in id order
    references: list[int]  # words per non-empty reference, in id order


def length_panels(runs: list[Run]) -> list[LengthPanel]:
    """The histogram's data: per run with responses, response and reference lengths in words.

    Words (whitespace-separated) for both: the references have no token count, and new_tokens against words would
    compare two units.
    """
    panels = []
    for color, run in enumerate(runs):
        rows = [run.predictions[i] for i in sorted(run.predictions)]
        if rows:
            references = [word_count(row["reference"]) for row in rows if has_reference(row)]
            panels.append(LengthPanel(color, run.name, [word_count(row["response"]) for row in rows], references))
    return panels


def plot_length_histograms(runs: list[Run]) -> bytes | None:
    """PNG bytes: one panel per run with responses, a histogram of their lengths in words, with the reference answers'
    lengths outlined in black where rows carry references; None if no run has responses."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = length_panels(runs)
    if not panels:
        return None
    bins = length_bins([n for panel in panels for n in (*panel.responses, *panel.references)])
    columns = min(len(panels), PANELS_PER_ROW)
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(1 + 3.2 * columns, 0.6 + 2.6 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, sharex=True, sharey=True, squeeze=False).ravel()
    for ax, panel in zip(axes, panels, strict=False):
        ax.hist(panel.responses, bins, color=f"C{panel.color}", alpha=0.7, label="responses")
        if panel.references:
            ax.hist(panel.references, bins, histtype="step", color="black", linewidth=1.2, label="references")
        ax.set_title(panel.name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    figure.supxlabel("length (words, whitespace-separated)")
    figure.supylabel("prompts")
    return png(figure)
