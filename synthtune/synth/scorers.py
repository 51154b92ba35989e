"""Evaluator scorers: each is ``(question, completions, gold | None) -> list[float | None]``.

A score of ``None`` means "this scorer has nothing to say" (no gold answer, no arithmetic to
check, no parsable answer), which the pipeline treats as neither a pass nor a fail of that
scorer. Keeping every scorer to one signature lets the pipeline, the notebook and users'
own scorers mix freely (TRL's reward functions follow the same idea).
"""

from __future__ import annotations

from collections.abc import Sequence

from synthtune.data.answers import extract_answer, extract_gold, is_correct
from synthtune.data.calculator import check_calculations
from synthtune.synth.vote import majority_vote


def gold_correctness(question: str, completions: Sequence[str], gold: str | None) -> list[float | None]:
    """1.0 where a completion reaches the gold answer, 0.0 where it does not; None without gold.

    This is rejection sampling (RFT, STaR): only rationales that reach the known answer survive.

    >>> gold_correctness("q", ["so 4 + 4 = 8. #### 8", "The answer is 9.", "no idea"], "#### 8")
    [1.0, 0.0, 0.0]
    >>> gold_correctness("q", ["#### 8"], None)
    [None]
    """
    if gold is None or extract_gold(gold) is None:
        return [None] * len(completions)
    return [1.0 if is_correct(c, gold) else 0.0 for c in completions]


def calculator_score(question: str, completions: Sequence[str], gold: str | None = None) -> list[float | None]:
    """Fraction of a rationale's calculations (``<<a*b=c>>`` and ``a op b = c``) that are right.

    >>> calculator_score("q", ["3*4 = <<3*4=12>>12 eggs. #### 12", "3*4 = <<3*4=13>>13 #### 13", "#### 12"])
    [1.0, 0.0, None]
    """
    return [check_calculations(c).fraction for c in completions]


def vote_share(question: str, completions: Sequence[str], gold: str | None = None) -> list[float | None]:
    """Share of all k samples that reached the same final answer as this one (None: no answer).

    >>> vote_share("q", ["#### 8", "The answer is 8.", "#### 9", "hmm"])
    [0.5, 0.5, 0.25, None]
    """
    answers = [extract_answer(c) for c in completions]
    counts = majority_vote(answers).counts
    total = len(completions)
    return [counts[a] / total if a is not None else None for a in answers]


class RewardModelScorer:
    """Score (question, completion) pairs with an HF sequence-classification reward model.

    Any local path or hub id with a classification head works: one logit is used as is; with
    two or more labels the score is the probability of the last label (the "good" class in
    the usual binary setup). ``trust_remote_code`` stays off unless the user asks.
    """

    def __init__(self, name_or_path: str, *, device: str | None = None, batch_size: int = 8,
                 max_length: int = 1024, trust_remote_code: bool = False):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from synthtune.models import pick_device, resolve_model

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

    def __call__(self, question: str, completions: Sequence[str], gold: str | None = None) -> list[float | None]:
        import torch

        scores: list[float | None] = []
        for start in range(0, len(completions), self.batch_size):
            chunk = list(completions[start:start + self.batch_size])
            enc = self.tokenizer([question] * len(chunk), chunk, return_tensors="pt", padding=True,
                                 truncation="only_second", max_length=self.max_length).to(self.device)
            with torch.inference_mode():
                logits = self.model(**enc).logits.float()
            if logits.shape[-1] == 1:
                scores.extend(logits[:, 0].tolist())
            else:
                scores.extend(logits.softmax(-1)[:, -1].tolist())
        return scores
