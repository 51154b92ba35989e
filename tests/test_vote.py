"""Self-consistency voting and pass@k.

Run: pytest tests/test_vote.py --doctest-modules synthtune/synth/vote.py
"""

from __future__ import annotations

from itertools import combinations

import pytest

from synthtune.synth.vote import majority_vote, pass_at_k, self_consistency


def test_majority_wins():
    r = majority_vote(["18", "20", "18", "18", None])
    assert (r.answer, r.count, r.n_valid, r.n_total) == ("18", 3, 4, 5)
    assert r.share == pytest.approx(3 / 5)
    assert r.counts == {"18": 3, "20": 1}


def test_tie_goes_to_the_answer_seen_first():
    assert majority_vote(["20", "18", "18", "20"]).answer == "20"
    assert majority_vote(["18", "20", "20", "18"]).answer == "18"
    assert majority_vote([None, "7", "5", "5", "7"]).answer == "7"
    # Not alphabetical, not by value: purely by first appearance.
    assert majority_vote(["9", "10"]).answer == "9"
    assert majority_vote(["10", "9"]).answer == "10"


def test_unparsed_answers_are_ignored_but_lower_the_share():
    r = majority_vote([None, None, None, "5"])
    assert (r.answer, r.count, r.n_valid, r.share) == ("5", 1, 1, 0.25)


@pytest.mark.parametrize("answers", [[], [None], [None, None, None]])
def test_nothing_to_vote_on(answers):
    r = majority_vote(answers)
    assert (r.answer, r.count, r.share, r.n_valid, r.counts) == (None, 0, 0.0, 0, {})
    assert r.n_total == len(answers)


def test_counts_keep_first_appearance_order():
    assert list(majority_vote(["3", "1", "2", "1"]).counts) == ["3", "1", "2"]


def test_vote_is_deterministic_for_a_given_order():
    answers = ["4", "5", None, "5", "4", "6"]
    assert {majority_vote(answers).answer for _ in range(20)} == {"4"}


def test_self_consistency_extracts_then_votes():
    completions = [
        "16 - 3 - 4 = 9, 9 * 2 = 18. The answer is 18.",
        "She makes $18.00 a day.\n#### 18",
        "The answer is 20.",
        "I am not sure.",
    ]
    r = self_consistency(completions)
    assert (r.answer, r.count, r.n_valid, r.n_total) == ("18", 2, 3, 4)


def test_self_consistency_accepts_another_extractor():
    from synthtune.data.answers import extract_strict

    r = self_consistency(["The answer is 18.", "#### 20"], extract=extract_strict)
    assert (r.answer, r.n_valid) == ("20", 1)


def _pass_at_k_by_enumeration(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    draws = list(combinations(range(n), k))
    return sum(any(samples[i] for i in draw) for draw in draws) / len(draws)


@pytest.mark.parametrize(("n", "c", "k"), [(5, 0, 1), (5, 1, 1), (5, 2, 3), (6, 3, 2), (6, 6, 4), (7, 2, 7)])
def test_pass_at_k_matches_enumeration(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_by_enumeration(n, c, k))


def test_pass_at_k_large_n_does_not_overflow():
    assert 0.0 < pass_at_k(2000, 1, 100) < 1.0
    assert pass_at_k(2000, 1, 100) == pytest.approx(100 / 2000)


@pytest.mark.parametrize(("n", "c", "k"), [(5, 6, 1), (5, -1, 1), (5, 1, 0), (5, 1, 6)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)
