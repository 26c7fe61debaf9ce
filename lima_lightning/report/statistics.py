"""Pure statistics of generated responses: no files, no plotting, unit-tested by hand."""

from __future__ import annotations

from dataclasses import dataclass

NGRAM = 4


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
