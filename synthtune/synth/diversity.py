"""ROUGE-L diversity filtering for synthesized reasoning paths.

The evaluator keeps only reasoning paths that differ enough from each other. Scoring every pair
with ``rouge_score`` is pure Python (an O(len_a * len_b) DP table per pair), which is far too slow
for a group of hundreds of paths. Here each text is tokenized once with rouge-score's own
tokenizer (so lowercasing, the ``[a-z0-9]+`` token rule and Porter stemming match by
construction), every distinct token becomes one Unicode code point, and rapidfuzz's bit-parallel
C++ LCS computes all pairwise LCS lengths. Precision, recall and F are then computed in numpy with
the same float64 operations, in the same order, as ``rouge_score``, so the matrices equal
``RougeScorer(["rougeL"]).score(...)`` bit for bit (the tests assert ``np.array_equal``).

Index convention for every matrix here: row ``i`` is the **target** (reference), column ``j`` the
**prediction**, i.e. ``M[i, j]`` corresponds to ``scorer.score(target=texts[i],
prediction=texts[j])``. F is exactly symmetric anyway (see ``_f_from_lcs``); recall is not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq
from rouge_score import tokenizers

__all__ = [
    "encode_texts",
    "rouge_l_lcs_matrix",
    "rouge_l_matrix",
    "rouge_l_recall_matrix",
    "below_mean_recall",
    "select_diverse",
]

# Self-Instruct (Wang et al. 2022, "Self-Instruct: Aligning Language Models with Self-Generated
# Instructions", section 2.3) and Stanford Alpaca add a generated instruction to the pool only
# when its ROUGE-L with every existing instruction is below 0.7; we reuse that cut-off.
DEFAULT_THRESHOLD = 0.7

# Surrogate code points are valid in a Python str but are not characters; skipping them keeps the
# encoded strings well-formed for any consumer (rapidfuzz itself would not mind).
_SURROGATES = range(0xD800, 0xE000)
_MAX_CODE_POINT = 0x10FFFF


def _code_point(token_id: int) -> int:
    cp = token_id if token_id < _SURROGATES.start else token_id + len(_SURROGATES)
    if cp > _MAX_CODE_POINT:
        raise ValueError("more distinct tokens than Unicode code points (about 1.1 million)")
    return cp


def encode_texts(texts: Sequence[str], use_stemmer: bool = False) -> tuple[list[str], np.ndarray]:
    """Tokenize each text once, as rouge-score does, and encode it as one code point per token.

    Returns the encoded strings and the token counts (int64). Two tokens get the same code point
    exactly when they are the same string, so the LCS of two encoded strings is the token LCS.

    >>> enc, lens = encode_texts(["The cat sat.", "the CAT!", "..."])
    >>> [len(e) for e in enc], lens.tolist()
    ([3, 2, 0], [3, 2, 0])
    >>> enc[0][:2] == enc[1]
    True
    """
    # rouge-score's own tokenizer object: identical token lists, and the Porter stemmer is built
    # once here instead of once per pair.
    tokenizer = tokenizers.DefaultTokenizer(use_stemmer)
    vocab: dict[str, str] = {}
    encoded: list[str] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for k, text in enumerate(texts):
        chars = []
        for token in tokenizer.tokenize(text):
            ch = vocab.get(token)
            if ch is None:
                ch = vocab[token] = chr(_code_point(len(vocab)))
            chars.append(ch)
        encoded.append("".join(chars))
        lengths[k] = len(chars)
    return encoded, lengths


def _lcs_from_encoded(encoded: list[str], workers: int) -> np.ndarray:
    # Passing the same list object as queries and choices lets rapidfuzz compute only one triangle
    # (LCS is symmetric); int32 cannot overflow since an LCS is at most a text's token count.
    return process.cdist(encoded, encoded, scorer=LCSseq.similarity, dtype=np.int32, workers=workers)


def rouge_l_lcs_matrix(texts: Sequence[str], use_stemmer: bool = False, workers: int = -1) -> np.ndarray:
    """Token-level LCS length of every pair (n x n int32, symmetric), tokens as in rouge-score.

    ``workers`` is passed to ``rapidfuzz.process.cdist`` (-1 = all cores).

    >>> rouge_l_lcs_matrix(["a b c d", "a c d e", ""]).tolist()
    [[4, 3, 0], [3, 4, 0], [0, 0, 0]]
    """
    encoded, _ = encode_texts(texts, use_stemmer)
    return _lcs_from_encoded(encoded, workers)


def _precision_recall(lcs: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P, R and the "both texts have tokens" mask, with row = target and column = prediction."""
    lcs_f = lcs.astype(np.float64)
    len_f = lengths.astype(np.float64)
    valid = (lengths[:, None] > 0) & (lengths[None, :] > 0)
    # rouge-score computes lcs / len(prediction_tokens) on Python ints; both are exact in float64,
    # and IEEE division is correctly rounded, so numpy's float64 division gives the same double.
    # Where a text is token-less rouge-score returns 0 without dividing; the 0/0 NaNs computed
    # here are overwritten below.
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = lcs_f / len_f[None, :]
        recall = lcs_f / len_f[:, None]
    precision[~valid] = 0.0
    recall[~valid] = 0.0
    return precision, recall, valid


def _f_from_lcs(lcs: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    precision, recall, valid = _precision_recall(lcs, lengths)
    denom = precision + recall
    # rouge_score.scoring.fmeasure is `2 * precision * recall / (precision + recall)`, evaluated
    # left to right: ((2 * P) * R) / (P + R). Same order here. It is exactly symmetric under
    # swapping P and R: the sum is commutative, 2 * x only changes the exponent (exact), and
    # (2P)R = 2(PR) = 2(RP) = (2R)P. So F[i, j] == F[j, i] bit for bit, which the tests check.
    with np.errstate(divide="ignore", invalid="ignore"):
        f = 2 * precision * recall / denom
    # fmeasure returns 0.0 when P + R == 0 (LCS of 0), and _score_lcs returns 0 for empty texts.
    f[(denom <= 0) | ~valid] = 0.0
    return f


def rouge_l_matrix(texts: Sequence[str], use_stemmer: bool = False, workers: int = -1) -> np.ndarray:
    """Pairwise ROUGE-L F-measure (n x n float64), equal to rouge-score bit for bit.

    ``M[i, j] == RougeScorer(["rougeL"], use_stemmer=use_stemmer).score(target=texts[i],
    prediction=texts[j])["rougeL"].fmeasure`` exactly; the matrix is exactly symmetric. Texts
    without any ``[a-z0-9]`` token score 0 against everything, themselves included, as in
    rouge-score. ``workers`` is passed to ``rapidfuzz.process.cdist`` (-1 = all cores).

    >>> m = rouge_l_matrix(["the cat sat on the mat", "the cat sat", "!!!"])
    >>> m.round(4).tolist()
    [[1.0, 0.6667, 0.0], [0.6667, 1.0, 0.0], [0.0, 0.0, 0.0]]
    >>> from rouge_score import rouge_scorer
    >>> s = rouge_scorer.RougeScorer(["rougeL"]).score("the cat sat on the mat", "the cat sat")
    >>> bool(m[0, 1] == s["rougeL"].fmeasure)
    True
    """
    encoded, lengths = encode_texts(texts, use_stemmer)
    return _f_from_lcs(_lcs_from_encoded(encoded, workers), lengths)


def rouge_l_recall_matrix(texts: Sequence[str], use_stemmer: bool = False, workers: int = -1) -> np.ndarray:
    """Pairwise ROUGE-L recall (n x n float64): ``R[i, j] = LCS(i, j) / len(tokens of texts[i])``.

    Row ``i`` is the target, so ``R[i, j] == score(target=texts[i], prediction=texts[j]).recall``
    bit for bit. Not symmetric: a short text inside a long one has recall 1 as the target.

    >>> rouge_l_recall_matrix(["the cat sat on the mat", "the cat sat"]).tolist()
    [[1.0, 0.5], [1.0, 1.0]]
    """
    encoded, lengths = encode_texts(texts, use_stemmer)
    _, recall, _ = _precision_recall(_lcs_from_encoded(encoded, workers), lengths)
    return recall


def select_diverse(
    texts: Sequence[str],
    max_keep: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    priority: Sequence[float] | None = None,
    use_stemmer: bool = False,
) -> list[int]:
    """Greedily keep paths whose ROUGE-L F with every already-kept path is below ``threshold``.

    Candidates are visited by ``priority`` (higher first, e.g. a reward-model score; ties and the
    default keep the original order). A candidate is kept when ``F < threshold`` against all kept
    paths, so a pair at exactly ``F == threshold`` is never kept together. Exact duplicates (the
    same rouge-score token sequence, so F = 1) are always dropped, even for a threshold above 1.
    Stops once ``max_keep`` paths are kept. Returns the kept indices in the order they were kept
    (by priority).

    Token-less texts (no ``[a-z0-9]``) score 0 against everything in rouge-score, so the first
    one is kept and later ones are dropped only as duplicates of it; filter empty paths before
    calling if they should never be kept.

    >>> paths = ["the cat sat on the mat", "the cat sat on a mat", "a dog ran in the park"]
    >>> select_diverse(paths)
    [0, 2]
    >>> select_diverse(paths, priority=[0.1, 0.9, 0.5])
    [1, 2]
    >>> select_diverse(paths, max_keep=1)
    [0]
    """
    n = len(texts)
    if priority is not None and len(priority) != n:
        raise ValueError(f"priority has {len(priority)} entries for {n} texts")
    if max_keep is not None and max_keep < 0:
        raise ValueError("max_keep must be >= 0")
    limit = n if max_keep is None else min(max_keep, n)
    if n == 0 or limit == 0:
        return []
    encoded, lengths = encode_texts(texts, use_stemmer)
    f = _f_from_lcs(_lcs_from_encoded(encoded, -1), lengths)
    if priority is None:
        order = np.arange(n)
    else:
        # A stable sort on the negated priority: higher first, ties in the original order.
        order = np.argsort(-np.asarray(priority, dtype=np.float64), kind="stable")
    kept: list[int] = []
    # Identical token sequences are duplicates whatever the threshold (F = 1 would already fail
    # any threshold <= 1); checking the encoded strings also catches token-less texts, whose F is
    # 0 even against themselves in rouge-score.
    kept_sequences: set[str] = set()
    for idx in order.tolist():
        if encoded[idx] in kept_sequences:
            continue
        if not kept or bool(np.all(f[idx, kept] < threshold)):
            kept.append(idx)
            kept_sequences.add(encoded[idx])
            if len(kept) >= limit:
                break
    return kept


def below_mean_recall(texts: Sequence[str], use_stemmer: bool = False) -> list[int]:
    """The 2023 workshop's filter, kept for comparison: below-average mean ROUGE-L recall survives.

    For each path ``i`` take the mean over ``j != i`` of ``score(target=texts[i],
    prediction=texts[j]).recall`` (the natural positional call ``scorer.score(path, other)``),
    then keep the paths whose mean is strictly below the mean of those means. Returns kept
    indices in ascending order.

    Flaw: the cut-off is relative to the group itself, so about half of every group is dropped
    however different the paths already are (six unrelated rationales still lose about three),
    and a group of near-duplicates keeps about half of its copies. When all means are equal, for
    example paths with no token in common (all recalls 0), *nothing* is strictly below the mean
    and the whole group is dropped. :func:`select_diverse` uses an absolute threshold instead.

    >>> below_mean_recall(["the cat sat on the mat", "the cat sat on a mat", "a dog ran in the park"])
    [2]
    >>> below_mean_recall(["alpha beta", "gamma delta", "epsilon zeta"])  # disjoint: all dropped
    []
    """
    n = len(texts)
    if n < 2:
        # No other path to compare with; the rule is undefined, keep what there is.
        return list(range(n))
    recall = rouge_l_recall_matrix(texts, use_stemmer=use_stemmer)
    off_diagonal = ~np.eye(n, dtype=bool)
    means = (recall * off_diagonal).sum(axis=1) / (n - 1)
    return np.flatnonzero(means < means.mean()).tolist()
