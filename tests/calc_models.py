"""A tiny model that writes GSM8K calculator annotations with WRONG arithmetic, for calculator tests.

Not a test file: tests import it (``from calc_models import ...``; pytest puts ``tests/`` on the path).

``tiny-llama`` is overfit with a plain torch loop until greedy decoding of any of its training
prompts reproduces :data:`WRONG_COMPLETION` exactly (then EOS)::

    Question: <a question>\\nAnswer: Apples: <<3*14=40>>40. Pears: <<2*14=36>>36. #### 76

Both annotations are wrong (42, 28), so every output of this model fails ``check_calculations``
unless a calculator writes the results: a test that asserts right arithmetic cannot pass with the
calculator switched off. The prose holds no equation of its own: the number after ``>>`` stays the
model's (the calculator writes only the annotation), so in ``3*14 = <<...>>40``
``check_calculations`` would read the prose's ``3*14 = 40`` as wrong even with the calculator on. It is trained on the plain and chat prompts of :data:`SHORT_QUESTION` and
of the first few questions of the bundled GSM8K sample's test and train splits, so ``synthtune eval``/``infer``/in-training accuracy (plain or
chat, ``auto`` picks chat for tiny-llama) and the synthesis sampler all see prompts it was trained on.

Training takes a few seconds on 2 CPU cores and happens once per process (:func:`wrong_calc_model`
is cached); :func:`wrong_calc_model_dir` saves it for code that loads a model by path (the CLI,
``synthtune serve``). A test module wraps either in a fixture of its own (as
``tests/test_calc_decoding.py`` does), or takes the ``wrong_calc_llama`` fixture below with
``pytest_plugins = ["calc_models"]`` (importing the fixture by name works too, but ruff reads each use
as a redefinition, F811).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest

#: The completion the model memorizes (after the prompt; the leading space belongs to it, as in
#: the plain format's targets). Both annotations are wrong: 3*14 is 42 and 2*14 is 28.
WRONG_COMPLETION = " Apples: <<3*14=40>>40. Pears: <<2*14=36>>36. #### 76"
#: What the calculator must write into the two annotations.
RIGHT_RESULTS = {"3*14": "42", "2*14": "28"}
#: A short question outside the bundled sample that is also trained on.
SHORT_QUESTION = "q"

_SEED = 0
# The first few questions of each bundled split (eval and in-training accuracy tests use limit <= 4):
# a batch of every bundled question made training take minutes on 2 CPU cores.
_N_TEST = 4
_N_TRAIN = 2
_MAX_STEPS = 400
_LR = 3e-3


def calc_questions() -> list[str]:
    """Every question the model is trained on: :data:`SHORT_QUESTION` and the bundled GSM8K sample's."""
    from synthtune.data.gsm8k import load_split

    rows = [*load_split("test", "bundled").rows[:_N_TEST], *load_split("train", "bundled").rows[:_N_TRAIN]]
    return [SHORT_QUESTION, *(r["question"] for r in rows)]


def plain_prompts(questions: list[str] | None = None) -> list[str]:
    """The plain-format prompts of ``questions`` (default: all trained ones)."""
    from synthtune.formats import plain_prompt

    return [plain_prompt(q) for q in (questions if questions is not None else calc_questions())]


def _examples(tokenizer) -> list[tuple[list[int], int]]:
    """``(ids, prompt_len)`` per training sequence: plain (with BOS, as eval encodes it) and chat."""
    from synthtune.formats import zero_shot_prompt

    target = tokenizer(WRONG_COMPLETION, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    out = []
    for q in calc_questions():
        for fmt, special in (("plain", True), ("chat", False)):
            prompt = tokenizer(zero_shot_prompt(q, tokenizer, fmt=fmt, is_seq2seq=False),
                               add_special_tokens=special)["input_ids"]
            out.append((prompt + target, len(prompt)))
    return out


def _greedy_reproduces(model, tokenizer, examples, target_len: int) -> bool:
    """Whether greedy decoding of every training prompt gives the memorized completion and EOS."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        prompts = [ids[:n] for ids, n in examples]
        width = max(len(p) for p in prompts)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=target_len + 2,
                                 do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad)
    finally:
        tokenizer.padding_side = side
    for row, (full, n) in zip(out[:, width:].tolist(), examples, strict=True):
        if row[:target_len] != full[n:]:
            return False
    return True


@functools.cache
def wrong_calc_model():
    """tiny-llama overfit to :data:`WRONG_COMPLETION` (a ``LoadedModel``, eval mode, CPU).

    Cached per process: every caller shares one model; do not train it further.
    """
    import torch

    from synthtune.models import load_model

    lm = load_model("tiny-llama", device="cpu", seed=_SEED)
    tok, model = lm.tokenizer, lm.model
    examples = _examples(tok)
    target_len = len(examples[0][0]) - examples[0][1]
    width = max(len(seq) for seq, _ in examples)
    pad = tok.pad_token_id
    ids = torch.tensor([seq + [pad] * (width - len(seq)) for seq, _ in examples])
    mask = torch.tensor([[1] * len(seq) + [0] * (width - len(seq)) for seq, _ in examples])
    labels = ids.clone()
    for i, (seq, n) in enumerate(examples):
        labels[i, :n] = -100  # learn only the completion: the prompts vary, the answer does not
        labels[i, len(seq):] = -100
    return _overfit(lm, "tiny-llama-wrong-calc", ids, mask, labels,
                    lambda: _greedy_reproduces(model, tok, examples, target_len))


def _overfit(lm, name: str, ids, mask, labels, reproduces):
    """Train ``lm`` on one batch until ``reproduces()`` (greedy decoding gives the wrong completion);
    then eval mode, frozen, renamed ``name``. Raises when it has not memorized it in _MAX_STEPS."""
    import torch

    model = lm.model
    torch.manual_seed(_SEED)
    # One thread: on a shared 2-core machine under load, the default two threads made each step of this
    # 64-wide model take ~3.5 s instead of ~0.07 s (they wait on each other for tiny matmuls).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=_LR, weight_decay=0.0)
        model.train()
        for step in range(1, _MAX_STEPS + 1):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 25 == 0 and loss.item() < 0.01:
                model.eval()
                if reproduces():
                    break
                model.train()
        else:
            model.eval()
            if not reproduces():
                raise AssertionError(f"{lm.name} did not memorize the wrong-arithmetic completion in {_MAX_STEPS} steps")
    finally:
        torch.set_num_threads(threads)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    lm.name = name
    return lm


@functools.cache
def wrong_calc_model_dir() -> Path:
    """:func:`wrong_calc_model` saved (weights, tokenizer, generation config) in a temporary directory
    that lives as long as the process: for the CLI, ``load_model(path)`` and servers."""
    from synthtune.models import save_tokenizer

    lm = wrong_calc_model()
    out = Path(tempfile.mkdtemp(prefix="synthtune-wrong-calc-")) / "model"
    lm.model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(lm.tokenizer, out)
    return out


@functools.cache
def wrong_calc_t5():
    """tiny-t5 overfit to :data:`WRONG_COMPLETION` (a ``LoadedModel``, eval mode, CPU): the seq2seq
    counterpart of :func:`wrong_calc_model`, for the ``generate()`` paths that force results from the
    decoder's position 1 (after the decoder start token).

    Trained on the plain prompts of :func:`calc_questions` (the only format a seq2seq model takes),
    encoded with special tokens as ``generate``/``sample_k`` encode them. Cached per process.
    """
    import torch

    from synthtune.models import load_model

    lm = load_model("tiny-t5", device="cpu", seed=_SEED)
    tok, model = lm.tokenizer, lm.model
    prompts = [tok(p)["input_ids"] for p in plain_prompts()]
    target = tok(WRONG_COMPLETION, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    width = max(len(p) for p in prompts)
    pad = tok.pad_token_id
    ids = torch.tensor([p + [pad] * (width - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    labels = torch.tensor([target] * len(prompts))  # one target, no padding: every position is learned

    def reproduces() -> bool:
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=len(target) + 2,
                                 do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad)
        return all(row[1:len(target) + 1] == target for row in out.tolist())  # after the decoder start

    return _overfit(lm, "tiny-t5-wrong-calc", ids, mask, labels, reproduces)


@pytest.fixture(scope="session")
def wrong_calc_llama():
    """The wrong-arithmetic tiny-llama (see :func:`wrong_calc_model`)."""
    return wrong_calc_model()
