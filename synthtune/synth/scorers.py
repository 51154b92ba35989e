"""Evaluator scorers: each is ``(question, completions, gold | None) -> list[float | None]``.

A score of ``None`` means "this scorer has nothing to say" (no gold answer, no arithmetic to
check, no parsable answer), which the pipeline treats as neither a pass nor a fail of that
scorer. Keeping every scorer to one signature lets the pipeline, the notebook and users'
own scorers mix freely (TRL's reward functions follow the same idea).

A scorer that fails on one completion must not stop a run of thousands: the built-in scorers score
each completion apart, and one that raises gets the scorer's failing value (0.0 for the gold and
calculator checks, None where None already means "no answer") and its reason in the returned list's
``failures`` (:class:`Scores`).  :func:`guarded` gives any scorer the same behaviour.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from synthtune.data.answers import extract_answer, extract_gold, is_correct
from synthtune.data.calculator import check_calculations
from synthtune.models import pick_device, resolve_model
from synthtune.synth.vote import majority_vote


class Scores(list):
    """A scorer's scores, one per completion, with ``failures``: index -> why scoring it failed.

    A plain list to every caller that ignores failures; ``failures`` is empty when nothing failed.
    """

    def __init__(self, values: Iterable[float | None] = (), failures: dict[int, str] | None = None) -> None:
        super().__init__(values)
        self.failures: dict[int, str] = dict(failures or {})


def failure_reason(exc: BaseException) -> str:
    """One line saying what went wrong, short enough for a status record."""
    text = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def score_each(score: Callable[[str], float | None], completions: Sequence[str], failed: float | None) -> Scores:
    """``score`` applied to each completion; one that raises gets ``failed`` and a reason.

    >>> s = score_each(lambda c: 1 / len(c), ["ab", "", "abcd"], failed=0.0)
    >>> list(s), s.failures
    ([0.5, 0.0, 0.25], {1: 'ZeroDivisionError: division by zero'})
    """
    out = Scores()
    for i, completion in enumerate(completions):
        try:
            out.append(score(completion))
        except Exception as exc:  # noqa: BLE001 - any failure costs this completion, never the run
            out.append(failed)
            out.failures[i] = failure_reason(exc)
    return out


Scorer = Callable[[str, Sequence[str], "str | None"], Sequence["float | None"]]


def guarded(scorer: Scorer, failed: float | None = None) -> Callable[..., Scores]:
    """``scorer`` made safe to call on a run: a failure costs the completions it concerns, not the run.

    The scorer is called on all completions at once (it may batch); if that raises, or returns the
    wrong number of scores, it is called on each completion alone, and each that still fails gets
    ``failed`` and its reason in ``failures``.

    >>> def picky(question, completions, gold=None):
    ...     return [float(len(c)) if c else 1 / 0 for c in completions]
    >>> s = guarded(picky)("q", ["ab", "", "abc"])
    >>> list(s), s.failures
    ([2.0, None, 3.0], {1: 'ZeroDivisionError: division by zero'})
    """

    def call(question: str, completions: Sequence[str], gold: str | None = None) -> Scores:
        try:
            got = scorer(question, completions, gold)
            if len(got) == len(completions):
                return got if isinstance(got, Scores) else Scores(got)
            problem = f"returned {len(got)} scores for {len(completions)} completions"
        except Exception as exc:  # noqa: BLE001 - retried one by one below
            problem = failure_reason(exc)
        if len(completions) == 1:
            return Scores([failed], {0: problem})

        def one(completion: str) -> float | None:
            got = scorer(question, [completion], gold)
            if len(got) != 1:
                raise ValueError(f"returned {len(got)} scores for 1 completion")
            return got[0]

        return score_each(one, completions, failed)

    return call


def gold_correctness(question: str, completions: Sequence[str], gold: str | None) -> list[float | None]:
    """1.0 where a completion reaches the gold answer, 0.0 where it does not; None without gold.

    This is rejection sampling (RFT, STaR): only rationales that reach the known answer survive.

    >>> gold_correctness("q", ["so 4 + 4 = 8. #### 8", "The answer is 9.", "no idea"], "#### 8")
    [1.0, 0.0, 0.0]
    >>> gold_correctness("q", ["#### 8"], None)
    [None]
    """
    if gold is None or extract_gold(gold) is None:
        return Scores([None] * len(completions))
    return score_each(lambda c: 1.0 if is_correct(c, gold) else 0.0, completions, failed=0.0)


def calculator_score(question: str, completions: Sequence[str], gold: str | None = None) -> list[float | None]:
    """Fraction of a rationale's calculations (``<<a*b=c>>`` and ``a op b = c``) that are right.

    >>> calculator_score("q", ["3*4 = <<3*4=12>>12 eggs. #### 12", "3*4 = <<3*4=13>>13 #### 13", "#### 12"])
    [1.0, 0.0, None]
    """
    return score_each(lambda c: check_calculations(c).fraction, completions, failed=0.0)


def vote_share(question: str, completions: Sequence[str], gold: str | None = None) -> list[float | None]:
    """Share of all k samples that reached the same final answer as this one (None: no answer).

    >>> vote_share("q", ["#### 8", "The answer is 8.", "#### 9", "hmm"])
    [0.5, 0.5, 0.25, None]
    """
    answers = score_each(extract_answer, completions, failed=None)  # a failure: no answer
    counts = majority_vote(answers).counts
    total = len(completions)
    return Scores([counts[a] / total if a is not None else None for a in answers], answers.failures)


class RewardModelScorer:
    """Score (question, completion) pairs with an HF sequence-classification reward model.

    Any local path or hub id with a classification head works: one logit is used as is; with
    two or more labels the score is the probability of the last label (the "good" class in
    the usual binary setup). ``trust_remote_code`` stays off unless the user asks.
    """

    def __init__(self, name_or_path: str, *, device: str | None = None, batch_size: int = 8,
                 max_length: int = 1024, trust_remote_code: bool = False):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = resolve_model(name_or_path)
        self.name = name_or_path
        self.device = pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, trust_remote_code=trust_remote_code).to(self.device).eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            # Sequence classifiers pick the last non-pad token; they need to know which id is pad.
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.max_length = max_length

    def __call__(self, question: str, completions: Sequence[str], gold: str | None = None) -> Scores:
        """Scores in batches; a batch that fails is redone one by one (a failure scores None)."""
        scores = Scores()
        score_batch = guarded(lambda q, chunk, g: self._score_batch(q, chunk))
        for start in range(0, len(completions), self.batch_size):
            got = score_batch(question, list(completions[start:start + self.batch_size]))
            scores.failures.update({start + i: why for i, why in got.failures.items()})
            scores.extend(got)
        return scores

    def _score_batch(self, question: str, chunk: list[str]) -> list[float]:
        import torch

        enc = self.tokenizer([question] * len(chunk), chunk, return_tensors="pt", padding=True,
                             truncation="only_second", max_length=self.max_length).to(self.device)
        with torch.inference_mode():
            logits = self.model(**enc).logits.float()
        if logits.shape[-1] == 1:
            return logits[:, 0].tolist()
        return logits.softmax(-1)[:, -1].tolist()
