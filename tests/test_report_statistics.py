"""`report`'s pure figures by hand: the bootstrap, distinct-n, answer matching, answer NLL and the per-run tables."""

from __future__ import annotations

import json
import math
import random

import pytest

from lima_lightning.report.figures import Bootstrap, answer_nll, generation_figures, reference_figures
from lima_lightning.report.plotting import length_panels
from lima_lightning.report.reading import Run
from lima_lightning.report.statistics import (
    Interval,
    bootstrap_ratio,
    contains_answer,
    distinct_ngrams,
    exact_match,
    normalise,
    word_count,
)
from lima_lightning.report.tables import fmt_interval


def row(response: str, new_tokens: int = 1, finish_reason: str = "eos", reference: str | None = None) -> dict:
    return {"prompt": "p", "response": response, "new_tokens": new_tokens, "finish_reason": finish_reason, "reference": reference}


# ----------------------------------------------------------------------------- bootstrap
def test_bootstrap_is_a_ratio_of_sums_with_the_interval_of_its_resamples():
    # Two conversations: 10 nats over 1 token, 10 nats over 9. Ratio of sums 20/10 = 2.0 (a mean of ratios would be 5.56).
    # A resample is {0,0} -> 10, {1,1} -> 10/9 or {0,1} -> 2, with chances 1/4, 1/4, 1/2: 2.5% and 97.5% quantiles are
    # the extremes.
    interval = bootstrap_ratio([10, 10], [1, 9])
    assert interval.point == pytest.approx(2.0)
    assert (interval.lo, interval.hi) == (pytest.approx(10 / 9), pytest.approx(10.0))


def test_bootstrap_is_seeded_contains_the_point_and_shrinks_with_more_rows():
    rng = random.Random(1)
    values = [rng.random() for _ in range(2000)]
    few, many = bootstrap_ratio(values[:20], [1] * 20), bootstrap_ratio(values, [1] * 2000)
    assert bootstrap_ratio(values[:20], [1] * 20) == few  # same seed, same interval
    assert bootstrap_ratio(values[:20], [1] * 20, seed=1) != few
    for interval in (few, many):
        assert interval.lo < interval.point < interval.hi
    assert (many.hi - many.lo) < (few.hi - few.lo) / 5  # ~1/sqrt(100) as wide
    # The mean of 2000 uniforms has a standard error of 0.289/sqrt(2000) = 0.0065: the interval is about +-1.96 of it.
    assert many.hi - many.lo == pytest.approx(2 * 1.96 * 0.2887 / math.sqrt(2000), rel=0.15)


def test_bootstrap_degenerate_cases_give_no_nan():
    assert bootstrap_ratio([], []) is None  # nothing to estimate
    assert bootstrap_ratio([0, 0], [0, 0]) is None  # no n-grams at all: no rate
    assert bootstrap_ratio([3], [4]) == Interval(0.75, 0.75, 0.75)  # one row: every resample is that row
    # A row without a denominator (a response too short for any 4-gram) only drops the resamples made of it alone.
    interval = bootstrap_ratio([0, 1], [0, 2])
    assert interval == Interval(0.5, 0.5, 0.5)
    assert bootstrap_ratio([1, 2], [1, 1], resamples=1).point == 1.5
    with pytest.raises(ValueError):
        bootstrap_ratio([1, 2], [1])


def test_interval_cells_and_monotone_maps():
    assert fmt_interval(Interval(0.5, 0.25, 0.75), ".1%") == "50.0% [25.0%, 75.0%]"
    assert fmt_interval(None) == "—"
    assert Interval(0.0, -1.0, 1.0).map(math.exp) == Interval(1.0, math.exp(-1), math.e)


# ----------------------------------------------------------------------------- text
def test_distinct_ngrams_by_hand():
    assert distinct_ngrams("a b a b", 2) == (2, 3)  # ab, ba, ab
    assert distinct_ngrams("a b a b", 1) == (2, 4)
    assert distinct_ngrams("the the the", 1) == (1, 3)
    assert distinct_ngrams("one", 2) == (0, 0)
    assert distinct_ngrams("", 1) == (0, 0)


def test_matching_normalises_case_and_whitespace_only():
    assert normalise("  Hello\n\tWORLD  ") == "hello world"
    assert normalise("Straße") == "strasse"  # casefold, not lower
    assert exact_match(" CLOUD\n", "cloud")
    assert exact_match("new  york", "New York")
    assert not exact_match("cloud.", "cloud")  # punctuation is kept
    assert contains_answer("The answer is 42.", "42")
    assert contains_answer("the capital is  ROME", "Rome")
    assert not contains_answer("42", "The answer is 42")  # the reference must be in the response, not the reverse
    assert word_count(" a  b\nc ") == 3


# ----------------------------------------------------------------------------- per-run figures
def test_answer_nll_is_token_weighted_and_perplexity_its_exp():
    validation = {0: {"where": "v.jsonl:1", "nll": 30.0, "tokens": 10}, 1: {"where": "v.jsonl:2", "nll": 2.0, "tokens": 2}}
    f = answer_nll(validation, Bootstrap())
    assert (f.conversations, f.tokens) == (2, 12)
    assert f.nll.point == pytest.approx(32 / 12)  # not (3.0 + 1.0) / 2
    assert f.perplexity == f.nll.map(math.exp)
    # Resamples: {0,0} -> 3.0, {1,1} -> 1.0, {0,1} -> 32/12: the interval spans them.
    assert (f.nll.lo, f.nll.hi) == (pytest.approx(1.0), pytest.approx(3.0))
    assert answer_nll({}, Bootstrap()) is None
    huge = answer_nll({0: {"where": "v:1", "nll": 1e6, "tokens": 1}}, Bootstrap())
    assert huge.perplexity.point == math.inf  # a diverged model's perplexity, not an OverflowError


def test_generation_figures_by_hand():
    predictions = {
        0: row("a b c d a b c d", new_tokens=10, finish_reason="eos"),  # 4-grams 1 repeat of 5; unigrams 4 of 8; bigrams 4 of 7
        1: row("the cat sat", new_tokens=20, finish_reason="length"),  # no 4-gram; unigrams 3 of 3; bigrams 2 of 2
    }
    f = generation_figures(predictions, Bootstrap())
    assert f.prompts == 2
    assert f.mean_new_tokens.point == pytest.approx(15.0)
    assert f.eos_share.point == pytest.approx(0.5) and (f.eos_share.lo, f.eos_share.hi) == (0.0, 1.0)
    assert f.repeated_ngrams.point == pytest.approx(1 / 5)
    assert f.distinct_1.point == pytest.approx((4 + 3) / (8 + 3))  # pooled over prompts
    assert f.distinct_2.point == pytest.approx((4 + 2) / (7 + 2))
    assert generation_figures({}, Bootstrap()) is None


def test_reference_figures_by_hand():
    predictions = {
        0: row(" CLOUD", reference="cloud"),  # exact (and contained)
        1: row("It is Rome, of course", reference="rome"),  # contained, 5 words against 1
        2: row("naeco", reference="ocean"),  # neither
        3: row("no reference here"),  # left out
        4: row("empty reference", reference="  "),  # left out: anything would contain it
    }
    f = reference_figures(predictions, Bootstrap())
    assert f.prompts == 3
    assert f.exact_match.point == pytest.approx(1 / 3)
    assert f.contains.point == pytest.approx(2 / 3)
    assert f.length_ratio.point == pytest.approx((1 + 5 + 1) / (1 + 1 + 1))
    assert reference_figures({0: row("x")}, Bootstrap()) is None


def test_length_histogram_data_is_words_of_responses_and_references_per_run():
    runs = [
        Run("base", {1: row("one two three", new_tokens=9, reference="uno"), 0: row("a", new_tokens=7)}),
        Run("fit-only"),  # no responses: no panel, but it keeps its colour index
        Run("qlora", {0: row("b c", new_tokens=5), 1: row("x", new_tokens=2, reference="uno")}),
    ]
    panels = length_panels(runs)
    assert [(p.color, p.name) for p in panels] == [(0, "base"), (2, "qlora")]
    assert panels[0].responses == [1, 3] and panels[0].references == [1]  # words in id order, not new_tokens
    assert panels[1].responses == [2, 1] and panels[1].references == [1]


def test_rows_with_unicode_line_separators_in_their_text_read_as_one_line_each(tmp_path):
    """json.dumps(ensure_ascii=False) keeps U+2028 and U+0085 as they are; only "\\n" ends a JSONL line."""
    from lima_lightning.report.reading import read_predictions

    path = tmp_path / "predictions.jsonl"
    rows = [{"id": i, "prompt": "p", "response": f"a\u2028b\x85c{i}", "finish_reason": "length", "new_tokens": 3} for i in range(2)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert [r["response"] for r in read_predictions(path).values()] == ["a\u2028b\x85c0", "a\u2028b\x85c1"]
