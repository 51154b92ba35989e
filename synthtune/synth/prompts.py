"""The prompt generator: a meta-prompt, k exemplars, then the target question.

This module picks the exemplars (:func:`select_exemplars`) and records what was sent
(:class:`Prompt`); the text itself is rendered by :mod:`synthtune.formats`, in the words training
and evaluation use:

* ``plain``: ``Question: ...`` / ``Answer: ...`` blocks, for base and seq2seq models;
* ``chat``: the model's chat template, exemplars as earlier user/assistant turns, for
  instruct models.

Exemplars are never the target itself, and callers draw them from a split other than the one
being answered (the 2023 code drew both from GSM8K test, then evaluated on it).
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from synthtune import formats
from synthtune.data.answers import extract_gold
from synthtune.formats import DEFAULT_META_PROMPT, FORMATS  # noqa: F401 (re-exported for callers of this module)

STRATEGIES = ("random", "fixed", "similar")


@dataclass(frozen=True)
class Prompt:
    text: str
    question: str
    exemplar_ids: tuple[int, ...]
    format: str
    # chat format: the conversation as (role, content) pairs. A server-side backend sends these
    # and lets the server apply its own template; tuples keep the dataclass hashable.
    messages: tuple[tuple[str, str], ...] = ()

    def chat_messages(self) -> list[dict[str, str]]:
        """The conversation in the OpenAI ``messages`` shape."""
        return [{"role": role, "content": content} for role, content in self.messages]

    @property
    def sha(self) -> str:
        """A short content hash, recorded as provenance with every generated sample."""
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    @property
    def add_special_tokens(self) -> bool:
        return formats.add_special_tokens(self.format)


def select_exemplars(pool: Sequence[dict], k: int, *, question: str, strategy: str = "random",
                     seed: int = 0) -> list[int]:
    """Indices of k exemplars from ``pool``, never one whose question is the target's.

    ``random`` draws a fresh seeded sample per target (the seed is mixed with the question so
    each target gets its own, reproducible set); ``fixed`` always takes the first k eligible
    rows, which makes every prompt share one prefix; ``similar`` takes the k most similar
    questions by word-set Jaccard similarity (cheap, lexical: shared names and nouns tend to
    mean a similar problem type), most similar last so it sits next to the target.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown exemplar strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    target = _norm(question)
    eligible = [i for i, row in enumerate(pool) if _norm(row["question"]) != target]
    if k > len(eligible):
        raise ValueError(f"asked for {k} exemplars but the pool has only {len(eligible)} eligible rows")
    if strategy == "fixed":
        return eligible[:k]
    if strategy == "similar":
        words = _words(question)
        ranked = sorted(eligible, key=lambda i: (-_jaccard(words, _words(pool[i]["question"])), i))
        return ranked[:k][::-1]
    digest = hashlib.sha256(f"{seed}\0{target}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    return rng.sample(eligible, k)


def build_prompt(question: str, pool: Sequence[dict], *, k: int = 8, fmt: str = "plain",
                 tokenizer=None, strategy: str = "random", seed: int = 0,
                 meta_prompt: str = DEFAULT_META_PROMPT, render_chat: bool = True, hint: str | None = None) -> Prompt:
    """One few-shot prompt (:func:`synthtune.formats.few_shot_prompt`) with exemplars drawn from
    ``pool``. ``tokenizer`` is needed for ``chat`` (its template).

    ``render_chat=False`` is for backends whose server applies the chat template: no tokenizer is
    needed, and ``text`` is the conversation as canonical JSON, so ``sha`` still pins the exact
    content sent.

    ``hint`` (a rationalization hint, :func:`synthtune.formats.rationalization_hint`) is appended to
    the question in the text the model reads, and ``question`` stays the unhinted one. The
    exemplars are the ones the unhinted prompt draws, each with its own gold answer as a hint too:
    STaR's rationalization prompts are few-shot prompts whose exemplars carry the hint (Zelikman et
    al. 2022), so the model reads worked solutions that reach a given answer without citing it.
    SmolLM2-135M, given the hint on the question alone, answered in a chat voice ("Sure! Here's a
    step-by-step solution...") instead of the exemplars' one: 25 of 32 rationales finished, against
    31 of 32 with hinted exemplars (the demo's 8 questions, k=4).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; use one of {', '.join(FORMATS)}")
    ids = select_exemplars(pool, k, question=question, strategy=strategy, seed=seed) if k else []
    shots = [pool[i] for i in ids]
    asked = question
    if hint:
        asked = formats.hinted_question(question, hint)
        shots = [_hinted_exemplar(row) for row in shots]
    messages: tuple[tuple[str, str], ...] = ()
    if fmt == "chat":
        messages = tuple((m["role"], m["content"]) for m in formats.chat_messages(asked, shots, meta_prompt))
    if fmt == "chat" and not render_chat:
        text = json.dumps([{"role": r, "content": c} for r, c in messages], ensure_ascii=False, separators=(",", ":"))
    else:
        text = formats.few_shot_prompt(asked, shots, fmt=fmt, tokenizer=tokenizer, meta_prompt=meta_prompt)
    return Prompt(text=text, question=question, exemplar_ids=tuple(ids), format=fmt, messages=messages)


def _hinted_exemplar(row: dict) -> dict:
    """An exemplar of a rationalization prompt: its question with its own gold answer as the hint
    (one whose answer cannot be read stays as it is)."""
    answer = extract_gold(row["answer"])
    if answer is None:
        return row
    return {**row, "question": formats.hinted_question(row["question"], formats.rationalization_hint(answer))}


#: A rationale that says this word talks about the prompt it was given, not the problem.
_HINT_WORD = re.compile(r"\bhints?\b", re.IGNORECASE)


def leaks_hint(text: str, hint: str) -> bool:
    """Whether a rationale sampled with ``hint`` gives away that it was given the answer.

    It leaks when it says "hint" (any case: "as the hint says") or copies any sentence of the hint
    (whitespace, case and end punctuation aside): "The correct answer is 72" is the hint talking,
    and a 135M model copies it in place of a derivation. Stating the answer otherwise is no leak:
    every correct rationale ends with it. Linear time: one regex without backtracking and a
    substring search per hint sentence.

    >>> hint = "The correct answer is 72. Write a step-by-step solution that reaches it, ending with #### 72"
    >>> leaks_hint("48 / 2 = <<48/2=24>>24, 48 + 24 = <<48+24=72>>72\\n#### 72", hint)
    False
    >>> leaks_hint("The HINT says 72, so #### 72", hint), leaks_hint("So the correct  answer is 72!\\n#### 72", hint)
    (True, True)
    >>> leaks_hint("So the answer is 72.\\n#### 72", hint)
    False
    """
    if _HINT_WORD.search(text):
        return True
    said = " ".join(text.split()).lower()
    sentences = (" ".join(part.split()).lower().rstrip(".!?: ") for part in re.split(r"(?<=[.!?])\s", hint))
    return any(s and s in said for s in sentences)


def default_format(tokenizer, is_seq2seq: bool) -> str:
    """Deprecated: use :func:`synthtune.formats.default_format` (the one ``auto`` rule)."""
    warnings.warn("synthtune.synth.prompts.default_format moved to synthtune.formats.default_format",
                  DeprecationWarning, stacklevel=2)
    return formats.default_format(tokenizer, is_seq2seq)


@functools.lru_cache(maxsize=1 << 16)
def _words(text: str) -> frozenset[str]:
    # cached: the `similar` strategy compares every target with every pool question, and a pool of
    # GSM8K train (7,473 rows) would otherwise be re-tokenized once per target
    return frozenset(re.findall(r"[a-z0-9]+", text.lower()))


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()
