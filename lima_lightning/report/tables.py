"""What the report's tables say: header, one row of cells per run, and the definitions printed under them.

Markdown and HTML render the same `Table`s, so a figure is formatted, and defined, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lima_lightning.report.figures import Bootstrap, RunFigures
from lima_lightning.report.reading import Run
from lima_lightning.report.statistics import NGRAM, Interval, last_value, summarize


@dataclass(frozen=True)
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    definitions: str  # markdown emphasis with *...*; HTML drops the stars


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def fmt_interval(interval: Interval | None, spec: str = ".3f") -> str:
    """`point [lo, hi]`, or — when there is nothing to estimate."""
    if interval is None:
        return "—"
    return f"{format(interval.point, spec)} [{format(interval.lo, spec)}, {format(interval.hi, spec)}]"


# ----------------------------------------------------------------------------- summary (point values, as before intervals)
def summary_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    header = [
        "run",
        "prompts",
        "mean new tokens",
        "stopped at EOS",
        "hit the limit",
        f"repeated {NGRAM}-grams",
        "last train/loss",
        "last val/loss",
    ]
    rows = []
    for run in runs:
        s = summarize(list(run.predictions.values())) if run.predictions else None
        generation = (
            [
                str(s.prompts),
                fmt(s.mean_new_tokens, ".1f"),
                fmt(s.eos_share, ".1%"),
                fmt(s.length_share, ".1%"),
                fmt(s.repeated_ngram_rate, ".1%"),
            ]
            if s
            else ["—"] * 5
        )
        losses = [fmt(last_value(run.curves.get("train/loss"))), fmt(last_value(run.curves.get("val/loss")))]
        rows.append([run.name, *generation, *losses])
    return header, rows


DEFINITIONS = (
    f"*mean new tokens*: generated tokens per prompt, EOS included. *stopped at EOS* / *hit the limit*: share of prompts "
    f"whose generation ended with EOS / at max_new_tokens. *repeated {NGRAM}-grams*: share of all word {NGRAM}-grams "
    f"(whitespace-separated words), pooled over a run's responses, that repeat an earlier {NGRAM}-gram of the same response; "
    "high values mean loops. *last train/loss, val/loss*: the last logged values (masked NLL per trained token)."
)


def summary_table(runs: list[Run]) -> Table:
    header, rows = summary_rows(runs)
    return Table("Summary", header, rows, DEFINITIONS)


# ----------------------------------------------------------------------------- figures with intervals
def intervals_note(boot: Bootstrap) -> str:
    return (
        f"*[lo, hi]*: 95% percentile bootstrap interval over prompts (held-out conversations for answer NLL): {boot.resamples} "
        "resamples of as many rows drawn with replacement, the figure (a ratio of sums) recomputed on each; seed "
        f"{boot.seed}, so the same inputs give the same numbers, and runs on the same rows are resampled alike. "
        "Below ~20 rows the interval is too narrow."
    )


NLL_DEFINITIONS = (
    "*answer NLL*: the NLL of the trained (assistant) tokens of the held-out conversations, summed over them all and divided "
    "by their number of trained tokens (nats per token: the token-weighted mean val/loss is), from each run's validation.jsonl "
    "(`lima-lightning validate` on the validation split; LIMA's test prompts have no answers). *perplexity*: exp(answer NLL). "
    "Every run is scored on the same conversations (checked by id and file:line). Lower is not better answers: LIMA "
    "(appendix B) found perplexity anti-correlated with quality, so read the responses too."
)
GENERATION_DEFINITIONS = (
    "*distinct-1 / distinct-2*: distinct word unigrams / bigrams within each response over all of its unigrams / bigrams, "
    f"pooled over prompts (within responses, not across them: 1 − distinct-n is the share of repeated n-grams, as the "
    f"repeated {NGRAM}-grams column counts them; low values mean loops). Other columns as in the summary."
)
REFERENCE_DEFINITIONS = (
    "Over the prompts whose row has a non-empty reference answer. Both texts are normalised: case-folded (Unicode casefold), "
    "every run of whitespace made one space, leading and trailing whitespace removed; punctuation is kept. *exact match*: "
    "the normalised response equals the normalised reference. *contains the answer*: the normalised reference occurs in "
    "the normalised response, as a substring (`12` contains `1`: an upper bound for short answers). *words, response / "
    "reference*: all words (whitespace-separated) of the responses over all words of their references (1.0: as long)."
)


def nll_table(runs: list[Run], figures: dict[str, RunFigures]) -> Table:
    rows = []
    for run in runs:
        f = figures[run.name].answer_nll
        counts = [str(f.conversations), str(f.tokens)] if f else ["—", "—"]
        rows.append([run.name, *counts, fmt_interval(f and f.nll), fmt_interval(f and f.perplexity, ".2f")])
    header = ["run", "held-out conversations", "trained tokens", "answer NLL", "perplexity"]
    return Table("Answer NLL on the held-out conversations", header, rows, NLL_DEFINITIONS)


def generation_table(runs: list[Run], figures: dict[str, RunFigures]) -> Table:
    rows = []
    for run in runs:
        f = figures[run.name].generation
        cells = (
            [fmt_interval(f.mean_new_tokens, ".1f")]
            + [fmt_interval(v, ".1%") for v in (f.eos_share, f.repeated_ngrams)]
            + [fmt_interval(v) for v in (f.distinct_1, f.distinct_2)]
            if f
            else ["—"] * 5
        )
        rows.append([run.name, str(f.prompts) if f else "—", *cells])
    header = ["run", "prompts", "mean new tokens", "stopped at EOS", f"repeated {NGRAM}-grams", "distinct-1", "distinct-2"]
    return Table("Responses, with 95% intervals", header, rows, GENERATION_DEFINITIONS)


def reference_table(runs: list[Run], figures: dict[str, RunFigures]) -> Table:
    rows = []
    for run in runs:
        f = figures[run.name].reference
        cells = (
            [fmt_interval(f.exact_match, ".1%"), fmt_interval(f.contains, ".1%"), fmt_interval(f.length_ratio, ".2f")] if f else ["—"] * 3
        )
        rows.append([run.name, str(f.prompts) if f else "—", *cells])
    header = ["run", "prompts with a reference", "exact match", "contains the answer", "words, response / reference"]
    return Table("Against the reference answers", header, rows, REFERENCE_DEFINITIONS)


def figure_tables(runs: list[Run], figures: dict[str, RunFigures], boot: Bootstrap) -> list[Table]:
    """The tables that have something to show: answer NLL if a run was validated, the rest if a run has responses.
    The first one defines the intervals."""
    tables = []
    if any(f.answer_nll for f in figures.values()):
        tables.append(nll_table(runs, figures))
    if any(f.generation for f in figures.values()):
        tables.append(generation_table(runs, figures))
    if any(f.reference for f in figures.values()):
        tables.append(reference_table(runs, figures))
    if tables:
        tables[0] = replace(tables[0], definitions=f"{tables[0].definitions} {intervals_note(boot)}")
    return tables
