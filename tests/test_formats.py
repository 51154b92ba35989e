"""Prompt formats have one owner (synthtune/formats.py): training, eval, infer, in-training accuracy,
serve and synthesis feed a model the same prompt, and stop it at the same strings, for the same
question and format."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from synthtune import formats
from synthtune.config import EvalConfig, SynthConfig
from synthtune.data.gsm8k import load_split
from synthtune.generation.base import truncate_at_stop
from synthtune.jobs.eval import eval_inputs
from synthtune.jobs.infer import infer_inputs
from synthtune.synth.backends import HFBackend
from synthtune.synth.pipeline import prompt_setup
from synthtune.synth.prompts import build_prompt
from synthtune.train.metrics import accuracy_inputs
from synthtune.train.tokenize import IGNORE_INDEX, tokenize_rows

PACKAGE = Path(__file__).resolve().parents[1] / "synthtune"
# (model fixture, requested format): "auto" resolves to chat for tiny-llama and to plain for tiny-t5
CASES = [("tiny_llama", "plain"), ("tiny_llama", "chat"), ("tiny_llama", "auto"), ("tiny_t5", "plain"),
         ("tiny_t5", "auto")]


@pytest.fixture(scope="module")
def rows():
    return load_split("test", "bundled").rows[:3]


@pytest.fixture(scope="module")
def pool():
    return load_split("train", "bundled").rows


@pytest.fixture(scope="module")
def engines():
    """``synthtune serve``'s engine per tiny model, built on first use."""
    from synthtune.jobs.serve import Engine

    built = {}

    def get(name: str):
        if name not in built:
            built[name] = Engine(name, device="cpu")
        return built[name]

    return get


def _training_prompt_ids(lm, rows, fmt, cache_dir) -> list[list[int]]:
    """The prompt part of each tokenized training example: the positions training masks (-100)
    for a causal model, the encoder input for a seq2seq one."""
    data = tokenize_rows(rows, lm.tokenizer, is_seq2seq=lm.is_seq2seq, fmt=fmt, max_length=2048, cache_dir=cache_dir)
    assert len(data.dataset) == len(rows)
    out = []
    for ex in data.dataset:
        if lm.is_seq2seq:
            out.append(ex["input_ids"])
            continue
        n = next(i for i, label in enumerate(ex["labels"]) if label != IGNORE_INDEX)
        out.append(ex["input_ids"][:n])
    return out


def _ids(tok, texts, add_special: bool) -> list[list[int]]:
    return [tok(t, add_special_tokens=add_special)["input_ids"] for t in texts]


@pytest.mark.parametrize(("model", "fmt"), CASES)
def test_every_path_feeds_the_training_prompt(request, model, fmt, rows, pool, engines, tmp_path):
    lm = request.getfixturevalue(model)
    tok, seq2seq = lm.tokenizer, lm.is_seq2seq
    resolved = formats.resolve_format(fmt, tok, seq2seq)
    assert resolved == ("chat" if fmt == "chat" or (fmt == "auto" and not seq2seq) else "plain")
    train = _training_prompt_ids(lm, rows, fmt, tmp_path)
    texts = [formats.zero_shot_prompt(r["question"], tok, fmt=fmt, is_seq2seq=seq2seq) for r in rows]
    add_special = formats.add_special_tokens(resolved)
    assert _ids(tok, texts, add_special) == train
    assert [formats.encode_prompt(r["question"], tok, fmt=fmt, is_seq2seq=seq2seq) for r in rows] == train

    # synthtune eval (zero-shot), synthtune infer, in-training accuracy: same texts, same ids
    for got_texts, got_special, _ in (eval_inputs(EvalConfig(prompt_format=fmt, shots=0), lm, rows, []),
                                      infer_inputs(lm, rows, fmt),
                                      accuracy_inputs(rows, tok, fmt, seq2seq)):
        assert got_texts == texts and got_special == add_special
        assert _ids(tok, got_texts, got_special) == train

    # synthesis: no exemplars and no meta-prompt is the zero-shot prompt itself
    for r, ids in zip(rows, train, strict=True):
        p = build_prompt(r["question"], pool, k=0, fmt=resolved, tokenizer=tok, meta_prompt="")
        assert p.text == formats.zero_shot_prompt(r["question"], tok, fmt=resolved, is_seq2seq=seq2seq)
        assert tok(p.text, add_special_tokens=p.add_special_tokens)["input_ids"] == ids

    # serve: a completions prompt is used verbatim; a chat request with one user message is the chat format
    engine = engines(model.replace("_", "-"))
    from synthtune.jobs.serve import parse_body

    for r, text, ids in zip(rows, texts, train, strict=True):
        if resolved == "plain":
            body = {"model": engine.base_name, "prompt": text, "max_tokens": 4}
        else:
            body = {"model": engine.base_name, "messages": [{"role": "user", "content": r["question"]}], "max_tokens": 4}
        req = parse_body(json.dumps(body).encode(), chat=resolved == "chat", models=engine.names)
        engine.prepare(req, max_request_tokens=1 << 20)
        assert req.ids == [ids]
    if seq2seq:
        with pytest.raises(ValueError, match="decoder-only"):
            formats.resolve_format("chat", tok, seq2seq)


@pytest.mark.parametrize(("model", "fmt"), [("tiny_llama", "plain"), ("tiny_llama", "chat"), ("tiny_t5", "plain")])
def test_few_shot_prompts_end_with_the_training_prompt(request, model, fmt, rows, pool):
    """Synthesis and `eval --shots`: exemplars are whole training examples, in the training words,
    and the question's own block is the zero-shot prompt."""
    lm = request.getfixturevalue(model)
    tok, seq2seq = lm.tokenizer, lm.is_seq2seq
    shots = eval_inputs(EvalConfig(prompt_format=fmt, shots=3), lm, rows, pool)
    for r, text in zip(rows, shots[0], strict=True):
        zero = formats.zero_shot_prompt(r["question"], tok, fmt=fmt, is_seq2seq=seq2seq)
        p = build_prompt(r["question"], pool, k=3, fmt=fmt, tokenizer=tok, seed=0)
        assert text == p.text and len(p.exemplar_ids) == 3
        assert p.text.endswith(zero) and len(p.text) > len(zero)
        exemplars = [pool[i] for i in p.exemplar_ids]
        if fmt == "plain":
            blocks = p.text.split(formats.PLAIN_BLOCK_SEPARATOR)
            assert blocks[0] == formats.DEFAULT_META_PROMPT and blocks[-1] == zero
            for ex, block in zip(exemplars, blocks[1:-1], strict=True):
                # an exemplar block is the causal training text: prompt + target, word for word
                assert block == "".join(formats.format_example(ex, tok, fmt="plain", is_seq2seq=False))
                assert "Problem:" not in block
        else:
            assert p.messages[0] == ("system", formats.DEFAULT_META_PROMPT)
            assert p.messages[-1] == ("user", r["question"].strip())
            assert [m for _, m in p.messages[1:-1]] == [s for ex in exemplars for s in (ex["question"].strip(),
                                                                                          ex["answer"].strip())]
            # what an OpenAI-compatible server is sent renders, by that template, to the local text
            remote = build_prompt(r["question"], pool, k=3, fmt=fmt, seed=0, render_chat=False)
            assert remote.messages == p.messages
            assert formats.render_chat(json.loads(remote.text), tok) == p.text
    assert shots[1] == formats.add_special_tokens(fmt) and shots[2] == formats.stop_strings(fmt)


@pytest.mark.parametrize(("model", "fmt"), CASES)
def test_eval_infer_accuracy_and_synthesis_stop_at_the_same_strings(request, model, fmt, rows):
    lm = request.getfixturevalue(model)
    resolved = formats.resolve_format(fmt, lm.tokenizer, lm.is_seq2seq)
    expected = formats.stop_strings(resolved)
    got = {"eval": eval_inputs(EvalConfig(prompt_format=fmt), lm, rows, [])[2],
           "infer": infer_inputs(lm, rows, fmt)[2],
           "accuracy": accuracy_inputs(rows, lm.tokenizer, fmt, lm.is_seq2seq)[2],
           "synth": prompt_setup(SynthConfig(prompt_format=fmt), HFBackend(lm))}
    assert got["synth"][0] == resolved
    got["synth"] = got["synth"][1]
    assert got == dict.fromkeys(got, expected)
    # synthesis adds the user's own stop strings in front, and keeps the format's
    _, with_extra = prompt_setup(SynthConfig(prompt_format=fmt, stop=["END", "\nQuestion:"]), HFBackend(lm))
    assert with_extra == formats.stop_strings(resolved, ["END", "\nQuestion:"])
    assert with_extra[0] == "END" and set(expected) <= set(with_extra) and len(set(with_extra)) == len(with_extra)


def test_plain_stop_strings_cut_where_the_format_starts_its_next_block():
    stop = formats.stop_strings("plain")
    answer = "3 + 4 = 7\n#### 7"
    for follow in ("\n" + formats.plain_prompt("Tom has 2 cats. How many?"),
                   formats.PLAIN_BLOCK_SEPARATOR + formats.plain_example("Tom has 2 cats?", "#### 2"),
                   "\nProblem: Tom has 2 cats."):
        assert truncate_at_stop(answer + follow, stop).strip() == answer
    assert truncate_at_stop(answer, stop) == answer
    assert formats.stop_strings("chat") == ()  # a chat turn ends with its end-of-turn token
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        formats.stop_strings("auto")


def test_the_auto_rule(tiny_llama, tiny_t5):
    from synthtune.synth.openai_backend import OpenAIBackend

    assert formats.default_format(tiny_llama.tokenizer, False) == "chat"
    assert formats.default_format(tiny_t5.tokenizer, True) == "plain"
    assert formats.default_format(None, False) == "plain"  # no tokenizer, no template
    # a server renders its own template; there is no local tokenizer to look at
    backend = OpenAIBackend(["http://127.0.0.1:9/v1"], "served", check=False)
    try:
        assert prompt_setup(SynthConfig(prompt_format="auto", backend="openai"), backend) == ("chat", ())
        assert prompt_setup(SynthConfig(prompt_format="plain", backend="openai"), backend) == \
            ("plain", formats.stop_strings("plain"))
    finally:
        backend.close()
    with pytest.raises(ValueError, match="unknown prompt format 'alpaca'"):
        formats.resolve_format("alpaca", tiny_llama.tokenizer, False)
    with pytest.deprecated_call():
        from synthtune.synth.prompts import default_format

        assert default_format(tiny_llama.tokenizer, False) == "chat"


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def test_only_formats_writes_prompt_text_and_renders_chat_templates():
    """No other module spells out a format's text or stop strings, or applies a chat template
    itself (docstrings may describe them)."""
    markers = (*formats.stop_strings("plain"), "\nAnswer:")
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "formats.py" and path.parent == PACKAGE:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docs = _docstrings(tree)
        where = path.relative_to(PACKAGE.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                hits = [m for m in markers if m in node.value]
                if hits:
                    offenders.append(f"{where}:{node.lineno}: writes {hits[0]!r}")
            if isinstance(node, ast.Attribute) and node.attr == "apply_chat_template":
                offenders.append(f"{where}:{node.lineno}: calls apply_chat_template (use formats.render_chat)")
    assert not offenders, "prompt text outside synthtune/formats.py:\n" + "\n".join(offenders)
