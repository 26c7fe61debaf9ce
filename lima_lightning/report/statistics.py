"""Pure statistics of responses and answer NLL: no files, no plotting, unit-tested by hand.

Every rate is a ratio of sums over prompts (or held-out conversations), so one bootstrap, `bootstrap_ratio`,
gives every figure its interval: resample the rows, recompute the ratio.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

NGRAM = 4
RESAMPLES = 1000
SEED = 0
LEVEL = 0.95


@dataclass(frozen=True)
class Summary:
    prompts: int
    mean_new_tokens: float
    eos_share: float
    length_share: float
    repeated_ngram_rate: float


def ngram_repeats(text: str, n: int = NGRAM) -> tuple[int, int]:
    """(repeats, n-grams) over whitespace-separated words: a repeat is an n-gram that already occurred earlier in `text`.

    `a b c d a b c d` has 5 word 4-grams, 4 distinct: (1, 5). Under n words: (0, 0).
    """
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(grams) - len(set(grams)), len(grams)


def repeated_ngram_rate(texts: list[str], n: int = NGRAM) -> float:
    """Share of all word n-grams, pooled over `texts`, that repeat an earlier n-gram of the same text (0 if none)."""
    counts = [ngram_repeats(text, n) for text in texts]
    total = sum(grams for _, grams in counts)
    return sum(repeats for repeats, _ in counts) / total if total else 0.0


def summarize(rows: list[dict]) -> Summary:
    """Per-run statistics of predictions.jsonl rows (`new_tokens`, `finish_reason`, `response`)."""
    n = len(rows)
    return Summary(
        prompts=n,
        mean_new_tokens=sum(r["new_tokens"] for r in rows) / n if n else 0.0,
        eos_share=sum(r["finish_reason"] == "eos" for r in rows) / n if n else 0.0,
        length_share=sum(r["finish_reason"] == "length" for r in rows) / n if n else 0.0,
        repeated_ngram_rate=repeated_ngram_rate([r["response"] for r in rows]),
    )


def last_value(points: list[tuple[int, float]] | None) -> float | None:
    """The value of the last (step, value) point of a curve, None for no curve."""
    return points[-1][1] if points else None


def distinct_ngrams(text: str, n: int) -> tuple[int, int]:
    """(distinct, all) word n-grams of one text: distinct-n of that text is their ratio.

    Within one response, not across a run's responses: pooled over prompts it is a ratio of sums, so it neither
    shrinks with the number of prompts nor breaks the bootstrap (a resample repeats prompts, which would lower a
    corpus-wide distinct count by construction). `a b a b` has 2-grams ab, ba, ab: (2, 3).
    """
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)), len(grams)


def normalise(text: str) -> str:
    """Case-folded, every whitespace run one space, no leading or trailing space; punctuation is kept."""
    return " ".join(text.casefold().split())


def exact_match(response: str, reference: str) -> bool:
    return normalise(response) == normalise(reference)


def contains_answer(response: str, reference: str) -> bool:
    """The normalised reference occurs in the normalised response (as a substring: `12` contains `1`)."""
    return normalise(reference) in normalise(response)


def word_count(text: str) -> int:
    return len(text.split())


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap interval [lo, hi]."""

    point: float
    lo: float
    hi: float

    def map(self, f) -> Interval:
        """The interval of f(figure) for an increasing f: a percentile interval maps through it exactly."""
        return Interval(f(self.point), f(self.lo), f(self.hi))


def bootstrap_ratio(
    numerators: Sequence[float], denominators: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> Interval | None:
    """sum(numerators) / sum(denominators) with a seeded percentile bootstrap interval over rows.

    Each resample draws len(rows) rows with replacement and recomputes the ratio of sums (a mean is the ratio
    with denominators 1). The same seed gives the same interval, and the same resampled row indices for every
    figure with as many rows, so runs scored on the same prompts (in id order) are resampled alike. Resamples
    whose denominator is 0 carry no ratio and are dropped. No rows, or a zero total denominator: None (nothing
    to estimate). One row: the degenerate interval [x, x]. Percentile intervals are too narrow for few rows
    (under ~20): a resample cannot show what the sample lacks.
    """
    import numpy as np

    num, den = np.asarray(numerators, dtype=float), np.asarray(denominators, dtype=float)
    if num.shape != den.shape or num.ndim != 1:
        raise ValueError(f"numerators {num.shape} and denominators {den.shape} must be two equal-length sequences")
    if len(num) == 0 or den.sum() == 0:
        return None
    rng = np.random.default_rng(seed)
    chunk = max(1, 1_000_000 // len(num))  # bounds the (resamples, rows) index array's memory
    ratios = []
    for start in range(0, resamples, chunk):
        rows = rng.integers(0, len(num), size=(min(chunk, resamples - start), len(num)))
        sums, counts = num[rows].sum(axis=1), den[rows].sum(axis=1)
        ratios.append(sums[counts != 0] / counts[counts != 0])
    ratios = np.concatenate(ratios)
    point = float(num.sum() / den.sum())
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2]) if len(ratios) else (point, point)
    return Interval(point, float(lo), float(hi))
