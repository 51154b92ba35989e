"""Prompt formats: how a question becomes the text a model reads, at training, evaluation, inference,
serving and synthesis time alike.

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
"""

from __future__ import annotations

FORMATS = ("plain", "chat")
PLAIN_PROMPT = "Question: {question}\nAnswer:"




def resolve_format(fmt: str, tokenizer, is_seq2seq: bool) -> str:
    """``auto`` -> ``chat`` for decoder models whose tokenizer has a chat template, else ``plain``."""
    if fmt == "auto":
        from synthtune.synth.prompts import default_format

        return default_format(tokenizer, is_seq2seq)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)} or auto")
    if fmt == "chat":
        if is_seq2seq:
            raise ValueError("the 'chat' format is for decoder-only models; seq2seq models use 'plain'")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the 'chat' format needs a tokenizer with a chat template; this one has none "
                             "(use 'plain' or 'auto')")
    return fmt


def _chat_prompt(question: str, tokenizer) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)


def format_example(row: dict, tokenizer, *, fmt: str, is_seq2seq: bool,
                   question_field: str = "question", answer_field: str = "answer") -> tuple[str, str]:
    """``(prompt_text, target_text)`` for one row; EOS is not in the text, :func:`tokenize_rows` adds it."""
    question = str(row[question_field]).strip()
    answer = str(row[answer_field]).strip()
    fmt = resolve_format(fmt, tokenizer, is_seq2seq)
    if fmt == "plain":
        prompt = PLAIN_PROMPT.format(question=question)
        # The decoder of a seq2seq model starts fresh, so its target needs no separating space.
        return prompt, answer if is_seq2seq else " " + answer
    prompt = _chat_prompt(question, tokenizer)
    full = tokenizer.apply_chat_template([{"role": "user", "content": question},
                                          {"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(prompt):
        # Some templates render past turns differently from the generation prompt (e.g. they strip
        # reasoning blocks); then no prefix split is exact and the mask would be wrong.
        raise ValueError("this chat template does not render the conversation as generation prompt + answer, "
                         "so the prompt cannot be masked exactly; use fmt='plain'")
    # Trailing whitespace after the end-of-turn token (SmolLM2 writes '<|im_end|>\n') would be a label
    # the model never needs to produce: generation stops at the end-of-turn token.
    return prompt, full[len(prompt):].rstrip()


def _add_special_tokens(fmt: str) -> bool:
    # A rendered chat template already holds its BOS/role tokens; adding them again doubles the BOS.
    return fmt != "chat"


def encode_prompt(question: str, tokenizer, *, fmt: str, is_seq2seq: bool) -> list[int]:
    """Evaluation/inference prompt ids, identical to the prompt part of a training example."""
    fmt = resolve_format(fmt, tokenizer, is_seq2seq)
    prompt, _ = format_example({"question": question, "answer": ""}, tokenizer, fmt=fmt, is_seq2seq=is_seq2seq)
    return tokenizer(prompt, add_special_tokens=_add_special_tokens(fmt))["input_ids"]
