"""ROUGE-L matrices (bit-for-bit parity with rouge-score), select_diverse and below_mean_recall (the 2023 workshop's filter).

Run: pytest tests/test_diversity.py
(the module's doctests run here too, through ``test_doctests``)
"""

from __future__ import annotations

import doctest
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from rouge_score import rouge_scorer

from synthtune.synth import diversity
from synthtune.synth.diversity import (
    below_mean_recall,
    encode_texts,
    rouge_l_lcs_matrix,
    rouge_l_matrix,
    rouge_l_recall_matrix,
    select_diverse,
)

REPO = Path(__file__).resolve().parents[1]

# Texts that stress tokenization and the LCS kernel rather than typical content.
EDGE_CASES = [
    "",
    "   \n\t ",
    "!!! ... ??? --- ***",
    "<<3*14=42>>",
    "42",
    "42",
    "x",
    "Ünïcödé café naïve résumé — 東京 Привет 🙂 ok",
    "cafe naive resume ok",
    "3*14 = <<3*14=42>>42 dollars. 1,234.56 and 0.25 and -7",
    "The THE the tHe",
    "running runs ran runner easily fairly generously",
    "run run ran runner easili fairli generous",
    # Long texts cross rapidfuzz's 64-bit block boundary (one bit per token of the shorter text).
    " ".join(f"w{k % 50}" for k in range(64)),
    " ".join(f"w{k % 50}" for k in range(65)),
    " ".join(f"w{k % 70}" for k in range(200)),
    " ".join(f"w{(k * 7) % 70}" for k in range(300)),
    " ".join(["the"] * 130),
]


def _answers() -> tuple[list[str], str]:
    """GSM8K answer texts: the full train split when this machine has it, else the bundled sample."""
    value = os.environ.get("SYNTHTUNE_GSM8K_DIR")
    full = Path(value) if value else REPO.parent / "shared" / "data" / "gsm8k"
    if (full / "train.jsonl").exists():
        files, source = [full / "train.jsonl"], "full GSM8K train"
    else:
        files, source = sorted((REPO / "data" / "gsm8k_sample").glob("*.jsonl")), "bundled sample"
    texts = []
    for path in files:
        with open(path, encoding="utf-8") as fh:
            texts.extend(json.loads(line)["answer"] for line in fh if line.strip())
    return texts, source


def _perturb(text: str, rng: random.Random) -> str:
    """A near-duplicate: drop one or two words and swap one adjacent pair (whitespace words)."""
    words = text.split()
    for _ in range(rng.randint(1, 2)):
        if len(words) > 2:
            del words[rng.randrange(len(words))]
    if len(words) > 2:
        k = rng.randrange(len(words) - 1)
        words[k], words[k + 1] = words[k + 1], words[k]
    return " ".join(words)


def _corpus(n_real: int, n_perturbed: int, seed: int = 0) -> list[str]:
    texts, _ = _answers()
    rng = random.Random(seed)
    real = rng.sample(texts, min(n_real, len(texts)))
    # With only the 50 bundled problems, perturbed copies make up the rest (and near-duplicates).
    n_perturbed += max(0, n_real - len(real))
    perturbed = [_perturb(real[rng.randrange(len(real))], rng) for _ in range(n_perturbed)]
    return real + perturbed + EDGE_CASES


def _reference_upper(texts: list[str], use_stemmer: bool, field: str = "fmeasure") -> np.ndarray:
    """rouge-score on every unordered pair (target = row), mirrored; see test_rouge_score_is_symmetric."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    n = len(texts)
    ref = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        for j in range(i, n):
            ref[i, j] = ref[j, i] = getattr(
                scorer.score(target=texts[i], prediction=texts[j])["rougeL"], field
            )
    return ref


def test_doctests():
    result = doctest.testmod(diversity, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 6 and result.failed == 0


def test_rouge_score_is_symmetric():
    # rouge-score's F = 2*P*R/(P+R) swaps P and R when target and prediction swap; 2*x is exact and
    # both products/sums commute, so F should be symmetric bit for bit. Check it on ordered pairs,
    # which is what lets the parity tests below score only one triangle with rouge-score.
    texts = _corpus(25, 15) + EDGE_CASES[:4]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for i, a in enumerate(texts):
        for b in texts[i + 1 :]:
            ab = scorer.score(target=a, prediction=b)["rougeL"]
            ba = scorer.score(target=b, prediction=a)["rougeL"]
            assert ab.fmeasure == ba.fmeasure
            assert (ab.precision, ab.recall) == (ba.recall, ba.precision)


@pytest.mark.integration  # rouge-score over GSM8K pairs, ~8 s
def test_parity_with_rouge_score_on_gsm8k():
    # 100 real answers + 35 near-duplicates + edge cases = 153 texts, 11,628 unordered pairs: 80
    # scores in (0.7, 1) and 18,268 in (0, 0.7) (218 texts took 17 s, twice as long, for the same ranges).
    texts = _corpus(100, 35)
    assert len(texts) >= 150
    fast = rouge_l_matrix(texts)
    ref = _reference_upper(texts, use_stemmer=False)
    assert fast.dtype == np.float64 and fast.shape == (len(texts), len(texts))
    assert np.array_equal(fast, ref)
    assert np.array_equal(fast, fast.T)
    # Sanity: the data exercise the interesting range, not just zeros and ones.
    off = fast[~np.eye(len(texts), dtype=bool)]
    assert ((off > 0.7) & (off < 1.0)).sum() > 20 and ((off > 0.0) & (off < 0.7)).sum() > 1000


@pytest.mark.integration  # rouge-score with stemming, ~2 s
def test_parity_with_rouge_score_stemmer():
    texts = _corpus(40, 15, seed=1)
    assert np.array_equal(rouge_l_matrix(texts, use_stemmer=True), _reference_upper(texts, use_stemmer=True))
    # Stemming changes the scores on these texts, so the flag really reaches the tokenizer.
    assert not np.array_equal(rouge_l_matrix(texts, use_stemmer=True), rouge_l_matrix(texts))


def test_recall_matrix_parity_with_target_as_row():
    texts = _corpus(30, 10, seed=2)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    ref = np.array(
        [[scorer.score(target=t, prediction=p)["rougeL"].recall for p in texts] for t in texts],
        dtype=np.float64,
    )
    assert np.array_equal(rouge_l_recall_matrix(texts), ref)


def test_edge_cases_exact():
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    m = rouge_l_matrix(EDGE_CASES)
    for i, a in enumerate(EDGE_CASES):
        for j, b in enumerate(EDGE_CASES):
            assert m[i, j] == scorer.score(target=a, prediction=b)["rougeL"].fmeasure, (a, b)
    # Token-less texts score 0 even against themselves; identical texts with tokens score 1.
    assert m[0, 0] == m[1, 1] == m[2, 2] == m[0, 2] == 0.0
    assert m[4, 5] == 1.0 and m[3, 4] == 1.0 / 3 * 2 * 3 / 4  # "3 14 42" vs "42": P=1, R=1/3


def test_lcs_matrix_long_and_repetitive():
    a = " ".join(f"t{k}" for k in range(500))
    b = " ".join(f"t{k}" for k in range(0, 500, 3))
    c = " ".join(f"t{k}" for k in reversed(range(500)))
    lcs = rouge_l_lcs_matrix([a, b, c, ""])
    assert lcs.dtype == np.int32
    assert lcs.tolist() == [[500, 167, 1, 0], [167, 167, 1, 0], [1, 1, 500, 0], [0, 0, 0, 0]]


def test_vocabulary_beyond_the_surrogate_range():
    # More distinct tokens than code points below U+D800: ids must skip the surrogates and still
    # map distinct tokens to distinct characters.
    n = 60_000
    a = " ".join(f"v{k}" for k in range(n))
    b = " ".join(f"v{k}" for k in range(0, n, 2))
    enc, lens = encode_texts([a, b])
    assert lens.tolist() == [n, n // 2]
    assert len(set(enc[0])) == n
    assert not any(0xD800 <= ord(ch) < 0xE000 for ch in enc[0])
    assert rouge_l_lcs_matrix([a, b]).tolist() == [[n, n // 2], [n // 2, n // 2]]


def test_empty_input():
    assert rouge_l_matrix([]).shape == (0, 0)
    assert select_diverse([]) == []
    assert below_mean_recall([]) == []


# --- select_diverse -------------------------------------------------------------------------


def test_threshold_is_strict():
    # "a b" vs "a c": LCS 1, P = R = 0.5, F = 0.5 exactly.
    pair = ["a b", "a c"]
    assert rouge_l_matrix(pair)[0, 1] == 0.5
    assert select_diverse(pair, threshold=0.5) == [0]
    assert select_diverse(pair, threshold=float(np.nextafter(0.5, 1.0))) == [0, 1]
    # Same at the default 0.7 with a pair whose F is not a round number.
    texts = _corpus(60, 0, seed=3)
    m = rouge_l_matrix(texts)
    i, j = np.unravel_index(np.argmax(np.triu(m, 1) * (m < 1.0)), m.shape)
    f = float(m[i, j])
    assert select_diverse([texts[i], texts[j]], threshold=f) == [0]
    assert select_diverse([texts[i], texts[j]], threshold=float(np.nextafter(f, 2.0))) == [0, 1]


def test_default_threshold_is_self_instruct():
    assert diversity.DEFAULT_THRESHOLD == 0.7
    # "a b c d e f g" vs "a b c d e f g h i j": LCS 7, P = 0.7, R = 1 -> F ~ 0.82, dropped;
    # vs 3 shared tokens of 7 and 7 -> F = 3/7, kept.
    assert select_diverse(["a b c d e f g", "a b c d e f g h i j", "a b c x y z w"]) == [0, 2]


def test_priority_order_and_ties():
    paths = ["the cat sat on the mat", "the cat sat on a mat", "a dog ran in the park", "a dog ran in a park"]
    assert select_diverse(paths) == [0, 2]
    assert select_diverse(paths, priority=[0.1, 0.9, 0.2, 0.8]) == [1, 3]
    # Ties keep the original order (stable), the returned order is the visiting order.
    assert select_diverse(paths, priority=[0.5, 0.5, 0.9, 0.9]) == [2, 0]
    assert select_diverse(paths, priority=np.array([1, 1, 1, 1])) == [0, 2]
    with pytest.raises(ValueError, match="priority"):
        select_diverse(paths, priority=[1.0])


def test_max_keep():
    texts = ["alpha beta", "gamma delta", "epsilon zeta", "eta theta"]
    assert select_diverse(texts) == [0, 1, 2, 3]
    assert select_diverse(texts, max_keep=2) == [0, 1]
    assert select_diverse(texts, max_keep=2, priority=[0, 0, 1, 2]) == [3, 2]
    assert select_diverse(texts, max_keep=0) == []
    assert select_diverse(texts, max_keep=10) == [0, 1, 2, 3]


def test_duplicates_always_dropped():
    texts = ["Total: 3*4 = 12.", "total 3 4 12", "!!!", "", "Something else entirely."]
    # Same token sequence = duplicate even at a threshold above 1, token-less ones included.
    for threshold in (0.7, 1.0, 1.5):
        assert select_diverse(texts, threshold=threshold) == [0, 2, 4]
    assert select_diverse(texts, priority=[0, 1, 0, 2, 0]) == [3, 1, 4]


def test_select_diverse_on_real_group():
    texts = _corpus(80, 40, seed=4)[:120]
    n_real = min(80, len(_answers()[0]))  # 50 with the bundled sample, the rest are perturbed copies
    kept = select_diverse(texts)
    m = rouge_l_matrix(texts)
    sub = m[np.ix_(kept, kept)]
    assert (sub[~np.eye(len(kept), dtype=bool)] < 0.7).all()
    # Every dropped path has a kept path it is too close to (greedy is maximal), or duplicates one.
    enc, _ = encode_texts(texts)
    for d in set(range(len(texts))) - set(kept):
        assert (m[d, kept] >= 0.7).any() or enc[d] in {enc[k] for k in kept}
    assert 0.9 * n_real <= len(kept) < len(texts)  # most perturbed copies go, the unrelated answers stay


# --- below_mean_recall --------------------------------------------------------------------------


def _workshop_reference(texts: list[str]) -> list[int]:
    """The rule written directly on rouge-score, as the workshop did."""
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    means = [
        sum(scorer.score(p, q)["rougeL"].recall for j, q in enumerate(texts) if j != i) / (len(texts) - 1)
        for i, p in enumerate(texts)
    ]
    avg = sum(means) / len(means)
    return [i for i, m in enumerate(means) if m < avg]


def test_below_mean_recall_matches_reference():
    texts = _corpus(12, 6, seed=5)[:18]
    assert below_mean_recall(texts) == _workshop_reference(texts)


def test_below_mean_recall_drops_half_of_very_different_paths():
    # Six answers to six different problems: nothing is near-duplicate (max F well below 0.7),
    # select_diverse keeps all six, yet the workshop rule drops about half of them.
    texts, _ = _answers()
    group = random.Random(6).sample(texts, 6)
    m = rouge_l_matrix(group)
    assert m[~np.eye(6, dtype=bool)].max() < 0.5
    assert select_diverse(group) == list(range(6))
    kept = below_mean_recall(group)
    assert 2 <= len(kept) <= 4
    # Over many such groups it keeps about half on average, not "all that are different".
    rng = random.Random(7)
    share = np.mean([len(below_mean_recall(rng.sample(texts, 6))) / 6 for _ in range(50)])
    assert 0.3 < share < 0.7


def test_below_mean_recall_degenerate_cases():
    # No shared token at all: every mean is 0, none is strictly below the mean, all dropped.
    assert (
        below_mean_recall(["alpha beta", "gamma delta", "epsilon zeta", "eta theta", "iota kappa", "mu nu"]) == []
    )
    # A group of near-copies keeps some copies together (F >= 0.7) where select_diverse keeps one.
    base = "She buys 4 pens at 2 dollars each so she pays 4*2 = 8 dollars in total"
    copies = [
        base,
        base + " today",
        base.replace("She", "He"),
        base + " now",
        base.replace("pens", "pencils"),
    ]
    kept = below_mean_recall(copies)
    assert len(kept) >= 2 and rouge_l_matrix([copies[k] for k in kept]).min() >= 0.7
    assert len(select_diverse(copies)) == 1
    assert below_mean_recall(["only one"]) == [0]
