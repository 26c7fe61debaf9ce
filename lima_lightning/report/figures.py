"""Each run's figures with 95% bootstrap intervals, computed once per report (the markdown and HTML show the same).

- answer NLL and perplexity, from a validate run's validation.jsonl (one row per held-out conversation);
- generation: mean new tokens, share stopped at EOS, repeated 4-grams, distinct-1/2, over the responses;
- against the references, where rows carry one: exact match, contains the answer, length in words.

Rows are taken in id order, so runs scored on the same prompts draw the same bootstrap resamples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lima_lightning.report.reading import Run
from lima_lightning.report.statistics import (
    RESAMPLES,
    SEED,
    Interval,
    bootstrap_ratio,
    contains_answer,
    distinct_ngrams,
    exact_match,
    ngram_repeats,
    word_count,
)


@dataclass(frozen=True)
class Bootstrap:
    resamples: int = RESAMPLES
    seed: int = SEED

    def ratio(self, numerators: list[float], denominators: list[float]) -> Interval | None:
        return bootstrap_ratio(numerators, denominators, self.resamples, self.seed)

    def mean(self, values: list[float]) -> Interval | None:
        return self.ratio(values, [1] * len(values))


@dataclass(frozen=True)
class AnswerNLL:
    conversations: int
    tokens: int
    nll: Interval | None  # nats per trained token, token-weighted over conversations
    perplexity: Interval | None


@dataclass(frozen=True)
class GenerationFigures:
    prompts: int
    mean_new_tokens: Interval | None
    eos_share: Interval | None
    repeated_ngrams: Interval | None
    distinct_1: Interval | None
    distinct_2: Interval | None


@dataclass(frozen=True)
class ReferenceFigures:
    prompts: int  # prompts whose row has a non-empty reference
    exact_match: Interval | None
    contains: Interval | None
    length_ratio: Interval | None  # response words / reference words, pooled


@dataclass(frozen=True)
class RunFigures:
    answer_nll: AnswerNLL | None
    generation: GenerationFigures | None
    reference: ReferenceFigures | None


def safe_exp(x: float) -> float:
    """exp that reports an overflowing perplexity as inf instead of raising (a diverged model's NLL)."""
    return math.exp(x) if x < 700 else math.inf


def answer_nll(validation: dict[int, dict], boot: Bootstrap) -> AnswerNLL | None:
    """sum(nll) / sum(tokens) over conversations, the same token-weighted mean as val/loss; perplexity = exp of it."""
    if not validation:
        return None
    rows = [validation[i] for i in sorted(validation)]
    tokens = [row["tokens"] for row in rows]
    nll = boot.ratio([row["nll"] for row in rows], tokens)
    return AnswerNLL(len(rows), sum(tokens), nll, nll.map(safe_exp) if nll else None)


def generation_figures(predictions: dict[int, dict], boot: Bootstrap) -> GenerationFigures | None:
    if not predictions:
        return None
    responses = [predictions[i]["response"] for i in sorted(predictions)]
    repeats = [ngram_repeats(text) for text in responses]
    distinct = {n: [distinct_ngrams(text, n) for text in responses] for n in (1, 2)}
    return GenerationFigures(
        prompts=len(responses),
        mean_new_tokens=boot.mean([predictions[i]["new_tokens"] for i in sorted(predictions)]),
        eos_share=boot.mean([predictions[i]["finish_reason"] == "eos" for i in sorted(predictions)]),
        repeated_ngrams=boot.ratio([r for r, _ in repeats], [g for _, g in repeats]),
        distinct_1=boot.ratio([d for d, _ in distinct[1]], [g for _, g in distinct[1]]),
        distinct_2=boot.ratio([d for d, _ in distinct[2]], [g for _, g in distinct[2]]),
    )


def has_reference(row: dict) -> bool:
    """A reference that can be matched: a string with something in it (an empty one would be 'contained' by anything)."""
    return isinstance(row.get("reference"), str) and row["reference"].strip() != ""


def reference_figures(predictions: dict[int, dict], boot: Bootstrap) -> ReferenceFigures | None:
    rows = [predictions[i] for i in sorted(predictions) if has_reference(predictions[i])]
    if not rows:
        return None
    return ReferenceFigures(
        prompts=len(rows),
        exact_match=boot.mean([exact_match(r["response"], r["reference"]) for r in rows]),
        contains=boot.mean([contains_answer(r["response"], r["reference"]) for r in rows]),
        length_ratio=boot.ratio([word_count(r["response"]) for r in rows], [word_count(r["reference"]) for r in rows]),
    )


def run_figures(run: Run, boot: Bootstrap) -> RunFigures:
    return RunFigures(answer_nll(run.validation, boot), generation_figures(run.predictions, boot), reference_figures(run.predictions, boot))
