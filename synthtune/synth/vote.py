"""Self-consistency: a majority vote over the final answers of sampled completions.

The chain is the one lm-evaluation-harness uses for gsm8k-cot-self-consistency: extract an answer
from each sample, count, and break ties by taking the answer that came first.  Taking the first is
what makes the vote deterministic for a given sample order, so reruns with a fixed seed agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from math import comb

from synthtune.data.answers import extract_answer

__all__ = ["VoteResult", "majority_vote", "pass_at_k", "self_consistency"]


@dataclass
class VoteResult:
    """Outcome of :func:`majority_vote`.

    ``share`` is ``count / n_total`` where ``n_total`` includes samples with no parsable answer: a
    question where 3 of 10 samples agree and 7 are unparsable is not a confident 100% agreement.
    ``counts`` lists answers in order of first appearance.
    """

    answer: str | None
    count: int
    share: float
    n_valid: int
    n_total: int
    counts: dict[str, int] = field(default_factory=dict)


def majority_vote(answers: Sequence[str | None]) -> VoteResult:
    """Most common non-None answer; on a tie the one that appears first wins.

    Answers are compared as given, so pass them normalized (:func:`extract_answer` already does).

    >>> r = majority_vote(["18", None, "20", "20", "18"])
    >>> r.answer, r.count, r.share, r.n_valid, r.counts
    ('18', 2, 0.4, 4, {'18': 2, '20': 2})
    >>> majority_vote([None, None]).answer is None
    True
    """
    counts: dict[str, int] = {}
    for answer in answers:
        if answer is not None:
            counts[answer] = counts.get(answer, 0) + 1
    best: str | None = None
    for answer, count in counts.items():  # insertion order == first appearance
        if best is None or count > counts[best]:
            best = answer
    total = len(answers)
    count = counts[best] if best is not None else 0
    return VoteResult(
        answer=best,
        count=count,
        share=count / total if total else 0.0,
        n_valid=sum(counts.values()),
        n_total=total,
        counts=counts,
    )


def self_consistency(
    completions: Sequence[str], extract: Callable[[str], str | None] = extract_answer
) -> VoteResult:
    """Extract an answer from each completion, then :func:`majority_vote` over them.

    >>> self_consistency(["... #### 72", "The answer is 72.", "So 70."]).answer
    '72'
    """
    return majority_vote([extract(c) for c in completions])


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct.

    ``1 - C(n-c, k) / C(n, k)``, from Chen et al. 2021 ("Evaluating Large Language Models Trained on
    Code"): the chance that at least one of ``k`` samples drawn without replacement is correct.
    Exact integer binomials avoid the float overflow of the naive product for large ``n``.

    >>> pass_at_k(10, 0, 1), pass_at_k(10, 10, 1), pass_at_k(10, 5, 1), pass_at_k(4, 1, 2)
    (0.0, 1.0, 0.5, 0.5)
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)
