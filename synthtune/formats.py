"""Prompt formats: how a question becomes the text a model reads, at training, evaluation, inference,
serving and synthesis time alike. This module is the one place where a format's text, its stop
strings and the ``auto`` rule are written; everything else imports them from here, so a prompt
cannot differ between training and evaluation.

Formats (zero-shot, the same text at training and evaluation time: use :func:`encode_prompt` to
build evaluation prompts so they match the training prompts token for token):

* ``plain``: ``Question: {q}\\nAnswer:`` then the target `` {answer}`` then EOS. The text is
  ``Question: {q}\\nAnswer: {answer}``; the space belongs to the target because BPE tokenizers
  attach a leading space to the following word (``ĠNatal``): a prompt ending in a space would end in
  a lone ``Ġ`` token that the model rarely saw in pretraining.
* ``chat``: the tokenizer's chat template, the question as the user turn and the answer as the
  assistant turn; everything before the assistant content is masked, the template's end-of-turn
  token(s) are part of the target (SmolLM2's ``<|im_end|>`` is its EOS).
* seq2seq (T5/UL2): the encoder reads the plain prompt, the decoder's labels are ``{answer}`` + EOS.

Few-shot prompts (synthesis, ``synthtune eval --shots 8``) are a meta-prompt, then k exemplars, then
the question, each written exactly as a training example would be: a plain exemplar block is a
whole training text (``Question: {q}\\nAnswer: {a}``) and the last block is the zero-shot prompt;
in chat, the exemplars are earlier user/assistant turns and the meta-prompt is the system turn.

>>> zero_shot_prompt("What is 2 + 2?", None, fmt="plain", is_seq2seq=False)
'Question: What is 2 + 2?\\nAnswer:'
>>> few_shot_prompt("What is 2 + 2?", [{"question": "1 + 1?", "answer": "#### 2"}], fmt="plain", meta_prompt="")
'Question: 1 + 1?\\nAnswer: #### 2\\n\\nQuestion: What is 2 + 2?\\nAnswer:'
>>> stop_strings("plain"), stop_strings("chat")
(('\\nQuestion:', '\\nProblem:'), ())
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from synthtune.errors import ConfigError

FORMATS = ("plain", "chat")
#: Resolved per model by :func:`default_format`.
AUTO = "auto"
PLAIN_PROMPT = "Question: {question}\nAnswer:"
#: Bump when a format's text or its stop strings change, so a resumed synthesis run refuses to mix
#: samples drawn under both. 1: few-shot blocks read "Problem: ...\nAnswer: ..." (until 2026-11-30);
#: 2: every block uses PLAIN_PROMPT's words, the same text training and eval use.
PROMPT_VERSION = 2
#: Between the meta-prompt and the exemplar blocks of a plain few-shot prompt.
PLAIN_BLOCK_SEPARATOR = "\n\n"
DEFAULT_META_PROMPT = (
    "Solve the grade-school math problem step by step. Show each calculation, "
    "then give the final answer on its own line as '#### <number>'."
)
#: STaR rationalization (Zelikman et al. 2022): a question the model could not solve is asked again
#: with its gold final answer as this hint, appended to the question (the last block or user turn,
#: where a small instruct model reads it last). A rationale from such a prompt is stored without
#: the hint; one that mentions it is dropped (see synthtune.synth.prompts.leaks_hint).
#: The answer is said as an instruction that ends on the format's own answer line: SmolLM2-135M
#: followed version 1 ("Hint: the answer is N. Show the steps that lead to it.") in 1 of 15 samples.
RATIONALIZATION_HINT = "The correct answer is {answer}. Write a step-by-step solution that reaches it, ending with #### {answer}"
#: Bump when RATIONALIZATION_HINT's text, or the rules of the rationale route (synth.pipeline:
#: leaks_hint, RATIONALE_STAGES, the round it runs in), change: resuming a rationalizing run refuses
#: to mix both. 3: the ``derived`` stage (the working computes the answer), and rationalization after the last
#: direct round only. 4: each exemplar of a rationalization prompt carries its own answer as a hint.
HINT_VERSION = 4
# Where a plain-format completion has finished its answer and begun inventing the next problem:
# the format's own next block, and "Problem:", the other heading base models ramble into on
# GSM8K-style text (and the one synthtune's few-shot prompts used before they took this format's words).
# A chat turn ends with the template's end-of-turn token instead, so chat has none.
_PLAIN_STOP = ("\nQuestion:", "\nProblem:")


# --------------------------------------------------------------------------------------------
# which format: the auto rule
# --------------------------------------------------------------------------------------------


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def default_format(tokenizer, is_seq2seq: bool, *, server_renders: bool = False) -> str:
    """The ``auto`` rule: ``chat`` for decoder models that ship a chat template, else ``plain``.

    ``server_renders``: the prompt goes to a server that applies its own template (an
    OpenAI-compatible backend) and there is no local tokenizer to look at; such servers hold
    instruct models far more often than base ones, so ``auto`` means ``chat`` there (a template-less
    served model fails with a message naming ``prompt_format=plain``).
    """
    if server_renders:
        return "chat"
    return "chat" if (not is_seq2seq and has_chat_template(tokenizer)) else "plain"


def resolve_format(fmt: str, tokenizer, is_seq2seq: bool, *, server_renders: bool = False) -> str:
    """``plain`` or ``chat`` for ``fmt`` (``auto`` by :func:`default_format`), checked against the model."""
    if fmt == AUTO:
        return default_format(tokenizer, is_seq2seq, server_renders=server_renders)
    _check_format(fmt, allow_auto=True)
    if fmt == "chat":
        if is_seq2seq:
            raise ConfigError("the 'chat' format is for decoder-only models; seq2seq models use 'plain' "
                              "(set the prompt format to plain or auto)")
        if not server_renders and not has_chat_template(tokenizer):
            raise ConfigError("the 'chat' format needs a tokenizer with a chat template; this one has none "
                              "(use 'plain' or 'auto')")
    return fmt


def _check_format(fmt: str, allow_auto: bool = False) -> None:
    if fmt not in FORMATS:
        choices = ", ".join(FORMATS) + (" or auto" if allow_auto else "")
        hint = "" if allow_auto or fmt != AUTO else " (resolve 'auto' first with resolve_format)"
        raise ConfigError(f"unknown prompt format {fmt!r}; use one of {choices}{hint}")


def add_special_tokens(fmt: str) -> bool:
    """Whether the tokenizer adds its special tokens (BOS, T5's EOS) when encoding a prompt of ``fmt``."""
    _check_format(fmt)
    # A rendered chat template already holds its BOS/role tokens; adding them again doubles the BOS.
    return fmt != "chat"


def stop_strings(fmt: str, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """Where a completion of a ``fmt`` prompt ends: ``extra`` (the user's own) first, then the format's.

    The same for causal and seq2seq models, and for every caller (eval, infer, in-training
    accuracy, synthesis), so a model is cut where it would be cut anywhere else.
    """
    _check_format(fmt)
    own = _PLAIN_STOP if fmt == "plain" else ()
    return tuple(dict.fromkeys([*extra, *own]))


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------


def plain_prompt(question: str) -> str:
    """The zero-shot plain prompt: ``Question: {question}\\nAnswer:`` (the question stripped)."""
    return PLAIN_PROMPT.format(question=question.strip())


def plain_example(question: str, answer: str) -> str:
    """A whole plain training text, which is also a few-shot exemplar block."""
    return f"{plain_prompt(question)} {answer.strip()}"


def render_chat(messages: Sequence[Mapping[str, str]], tokenizer) -> str:
    """The generation prompt for a conversation of ``{role, content}`` messages, by the tokenizer's
    chat template (what ``synthtune serve`` does for a ``/v1/chat/completions`` request)."""
    if not has_chat_template(tokenizer):
        raise ConfigError("the 'chat' format needs a tokenizer with a chat template; this one has none "
                          "(use 'plain' for base or seq2seq models)")
    return tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True, tokenize=False)


def chat_messages(question: str, exemplars: Sequence[Mapping[str, str]] = (),
                  meta_prompt: str | None = None) -> list[dict[str, str]]:
    """The conversation of a chat prompt: the meta-prompt as the system turn, each exemplar as a
    user/assistant pair, then the question as the last user turn."""
    turns = [{"role": "system", "content": meta_prompt}] if meta_prompt else []
    for ex in exemplars:
        turns += [{"role": "user", "content": ex["question"].strip()},
                  {"role": "assistant", "content": ex["answer"].strip()}]
    turns.append({"role": "user", "content": question.strip()})
    return turns


def rationalization_hint(answer: str) -> str:
    """The hint line for a gold final answer (``answer`` as extracted: ``72``, not ``#### 72``).

    >>> rationalization_hint("72")
    'The correct answer is 72. Write a step-by-step solution that reaches it, ending with #### 72'
    """
    return RATIONALIZATION_HINT.format(answer=str(answer).strip())


def hinted_question(question: str, hint: str) -> str:
    """``question`` with ``hint`` on a line of its own after it: what a rationalization prompt asks.

    >>> hinted_question("What is 2 + 2? ", rationalization_hint("4"))
    'What is 2 + 2?\\nThe correct answer is 4. Write a step-by-step solution that reaches it, ending with #### 4'
    """
    return f"{question.strip()}\n{hint.strip()}"


def zero_shot_prompt(question: str, tokenizer, *, fmt: str, is_seq2seq: bool) -> str:
    """The prompt text of ``question`` alone: what training masks as the prompt, and what eval,
    infer and in-training accuracy feed the model (``fmt`` may be ``auto``)."""
    question = str(question)  # a JSONL question may hold a number
    fmt = resolve_format(fmt, tokenizer, is_seq2seq)
    if fmt == "plain":
        return plain_prompt(question)
    return render_chat(chat_messages(question), tokenizer)


def few_shot_prompt(question: str, exemplars: Sequence[Mapping[str, str]], *, fmt: str, tokenizer=None,
                    meta_prompt: str | None = DEFAULT_META_PROMPT) -> str:
    """Meta-prompt, exemplars (``{question, answer}`` rows), then the question's zero-shot prompt.

    With no exemplars and no meta-prompt this is :func:`zero_shot_prompt`. ``tokenizer`` is needed
    for ``chat`` (its template); ``fmt`` must be resolved already (``plain`` or ``chat``).
    """
    _check_format(fmt)
    if fmt == "chat":
        return render_chat(chat_messages(question, exemplars, meta_prompt), tokenizer)
    blocks = [meta_prompt.strip()] if meta_prompt else []
    blocks += [plain_example(ex["question"], ex["answer"]) for ex in exemplars]
    blocks.append(plain_prompt(question))
    return PLAIN_BLOCK_SEPARATOR.join(blocks)


def format_example(row: Mapping, tokenizer, *, fmt: str, is_seq2seq: bool,
                   question_field: str = "question", answer_field: str = "answer") -> tuple[str, str]:
    """``(prompt_text, target_text)`` for one training row; EOS is not in the text, the tokenizer
    step (``train.tokenize.tokenize_rows``) adds it."""
    question = str(row[question_field])
    answer = str(row[answer_field]).strip()
    fmt = resolve_format(fmt, tokenizer, is_seq2seq)
    prompt = zero_shot_prompt(question, tokenizer, fmt=fmt, is_seq2seq=is_seq2seq)
    if fmt == "plain":
        # The decoder of a seq2seq model starts fresh, so its target needs no separating space.
        return prompt, answer if is_seq2seq else " " + answer
    full = tokenizer.apply_chat_template([*chat_messages(question), {"role": "assistant", "content": answer}],
                                         tokenize=False)
    if not full.startswith(prompt):
        # Some templates render past turns differently from the generation prompt (e.g. they strip
        # reasoning blocks); then no prefix split is exact and the mask would be wrong.
        raise ConfigError("this chat template does not render the conversation as generation prompt + answer, "
                          "so the prompt cannot be masked exactly; use the 'plain' format")
    # Trailing whitespace after the end-of-turn token (SmolLM2 writes '<|im_end|>\n') would be a label
    # the model never needs to produce: generation stops at the end-of-turn token.
    return prompt, full[len(prompt):].rstrip()


def encode_prompt(question: str, tokenizer, *, fmt: str, is_seq2seq: bool) -> list[int]:
    """Evaluation/inference prompt ids, identical to the prompt part of a training example."""
    fmt = resolve_format(fmt, tokenizer, is_seq2seq)
    prompt = zero_shot_prompt(question, tokenizer, fmt=fmt, is_seq2seq=is_seq2seq)
    return tokenizer(prompt, add_special_tokens=add_special_tokens(fmt))["input_ids"]
