"""Calculator-assisted decoding: the trigger and result format, token ids on real tokenizers, and every
decoding path (shared-prefill sampler, generate fallback, generate/complete, eval, in-training accuracy)
on a tiny model that writes wrong arithmetic (``calc_models``)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from fractions import Fraction

import pytest
from calc_models import (
    RIGHT_RESULTS,
    WRONG_COMPLETION,
    plain_prompts,
    wrong_calc_model,
    wrong_calc_model_dir,
    wrong_calc_t5,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from no_hang import budget

from synthtune.data.calculator import check_calculations, exact_value
from synthtune.data.gsm8k import load_split
from synthtune.generation.base import SamplingParams, generate
from synthtune.generation.calc_decoding import TAIL_CHARS, Injector, format_result, injection, injection_ids
from synthtune.generation.sampler import complete, sample_k


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Tiny models' steps are microseconds of math: with two threads on a shared 2-core machine,
    # OpenMP's hand-offs made this module's generation tests ~100x slower than one thread.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def wrong_calc_llama():
    """tiny-llama overfit to wrong annotations (trained once per process, ~10 s)."""
    return wrong_calc_model()


@pytest.fixture(scope="module")
def wrong_calc_seq2seq():
    """tiny-t5 overfit to the same wrong annotations (trained once per process, ~10 s)."""
    return wrong_calc_t5()

# --------------------------------------------------------------------------------------------
# injection(): the trigger and the result
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("She has 3*14 = <<3*14=", "42>>"),
    ("<<48/2=", "24>>"),
    ("<<5-8=", "-3>>"),
    ("<<5/2=", "2.5>>"),
    ("<<1/8=", "0.125>>"),
    ("<<1/16=", "0.0625>>"),
    ("<<1/32=", "0.03>>"),  # five decimals: rounded to two
    ("<<10/3=", "3.33>>"),
    ("<<2/3=", "0.67>>"),
    ("<<-2/3=", "-0.67>>"),
    ("<<1/200=", "0.005>>"),
    ("<<1/300=", "0.0>>"),  # rounded to zero: still says it was rounded
    ("<<(1/2)*14 + 2**3=", "15>>"),
    ("<< 3 * 14 =", "42>>"),
    ("<<1.5*4=", "6>>"),
    ("<<7%3=", "1>>"),  # Python's modulo, as GSM8K's annotations use it
    ("<<12=", "12>>"),
    ("first <<1+1=2>>2, then <<2+3=", "5>>"),  # earlier annotations are closed
    ("a = b and then <<4*4=", "16>>"),  # '=' before the annotation is prose
])
def test_injection_writes_the_exact_result(text, expected):
    assert injection(text) == expected


@pytest.mark.parametrize("text", [
    "",
    "3*14 =",  # no annotation
    "<<3*14=42>>",  # closed
    "<<3*14=42>> so 5 + 5 =",  # '=' after a closed annotation
    "<<3*14",  # no '=' yet
    "<<3*14=4",  # the model is writing the result itself
    "<<=",  # empty expression
    "<< =",
    "<<4=3=",  # the first '=' after '<<' is the one that triggers: this is past it
    "<<5 apples=",  # a unit: the calculator refuses it, the model goes on
    "<<x*3=",
    "<<20%=",  # in an annotation % is modulo: a missing operand
    "<<3/0=",
    "<<(10**64)**64=",  # too large
    "<<3*<4=",
    "<<3>2=",
    "<<" + "(" * 60 + "1" + ")" * 60 + "=",  # too deep for the calculator
    "<<" + "1+" * 120 + "1=",  # the '<<' is further back than the tail read
])
def test_injection_leaves_the_rest_to_the_model(text):
    assert injection(text) is None


def test_nested_annotation_opens_at_the_last_open():
    assert injection("<<2+<<3*4=") == "12>>"
    assert injection("<<3*4=12>> and <<5*5=") == "25>>"


def test_format_result_follows_gsm8k():
    assert [format_result(Fraction(v)) for v in ("42", "-3", "0", "2.5", "0.125", "-0.0625", "1000000")] == \
        ["42", "-3", "0", "2.5", "0.125", "-0.0625", "1000000"]
    # rounded half up (away from zero) to two decimals, trailing zeros dropped down to one
    assert [format_result(Fraction(n, d)) for n, d in [(1, 3), (5, 6), (-5, 6), (1, 40000), (10005, 100000),
                                                       (2, 7), (299999, 100000)]] == \
        ["0.33", "0.83", "-0.83", "0.0", "0.1", "0.29", "3.0"]
    assert format_result(Fraction(100049, 100000)) == "1.0"  # 1.00049: would be "1", an exactness claim


@settings(max_examples=300, deadline=None)
@given(st.recursive(
    st.one_of(st.integers(0, 10**6).map(str), st.decimals(0, 1000, places=2, allow_nan=False).map(str)),
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["+", "-", "*", "/", " * ", " / "]), inner).map("".join),
        inner.map(lambda e: f"({e})")),
    max_leaves=6))
def test_every_injected_result_passes_the_check(expr):
    """Whatever the calculator writes, check_calculations agrees with it (and, where the value is
    exact in 4 decimals, it is the value itself)."""
    got = injection(f"Total: <<{expr}=")
    try:
        value = exact_value(expr)
    except Exception:  # noqa: BLE001 - CalcError: then nothing may be injected
        assert got is None
        return
    assert got is not None and got.endswith(">>")
    report = check_calculations(f"Total: <<{expr}={got}")
    assert report.n_checked == 1 and report.errors == [], report.errors
    if (value * 10**4).denominator == 1:
        assert Fraction(got[:-2]) == value


# --------------------------------------------------------------------------------------------
# bounded time on hostile text (the style of tests/test_fuzz_text.py)
# --------------------------------------------------------------------------------------------




@pytest.mark.parametrize(("text", "expected"), [
    ("<<" * 200_000 + "1=", "1>>"),
    ("<<" + "1+" * 500_000 + "1=", None),
    ("(" * 1_000_000 + "<<1+1=", "2>>"),
    ("=" * 1_000_000, None),
    ("<<" + "9" * 1_000_000 + "=", None),
    ("<<1+1=2>>" * 100_000 + "<<3*4=", "12>>"),
    ("<<1+1=" * 100_000, "2>>"),  # the last '<<' is open
])
def test_hostile_text_is_read_in_bounded_time(text, expected):
    with budget():
        for _ in range(100):
            assert injection(text) == expected


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="<>=0123456789+-*/(). x", max_size=400), st.text(alphabet="<>=0123456789+-*/(). x",
                                                                         min_size=TAIL_CHARS, max_size=TAIL_CHARS + 50))
def test_only_the_tail_decides(prefix, tail):
    assert injection(prefix + tail) == injection(tail)


# --------------------------------------------------------------------------------------------
# injection_ids(): real tokenizers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from synthtune.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def metaspace_tokenizer():
    """A sentencepiece-style (Unigram, ``▁`` for spaces, prepended to every text) tokenizer trained on
    the bundled sample: what T5/UL2 vocabularies do at a text's start. (tiny-t5 shares tiny-llama's
    byte-level BPE, so it shows nothing new here.)"""
    from tokenizers import SentencePieceUnigramTokenizer
    from transformers import PreTrainedTokenizerFast

    from synthtune.data.gsm8k import bundled_texts

    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(bundled_texts(), vocab_size=600, special_tokens=["<pad>", "</s>", "<unk>"],
                           unk_token="<unk>", show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=sp._tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


_CONTEXTS = ["She bought 3*14 = <<3*14=", "Half of it: 48/2 = <<48/2=", "<<10/3=", "x\n<<1/8=",
             "It costs $1.50 * 4 = $<<1.50*4=", "Then <<(12+4)*3/2="]


@pytest.mark.parametrize("context", _CONTEXTS)
def test_injection_ids_on_smollm2(smollm2_tokenizer, context):
    tok = smollm2_tokenizer
    inject = injection(context)
    ids = injection_ids(tok, context, inject)
    assert ids, f"{context!r}: no ids"
    assert tok.decode(ids) == inject
    # appended to the context's own tokens, they read as context + inject
    context_ids = tok(context, add_special_tokens=False)["input_ids"]
    assert tok.decode(context_ids + ids) == context + inject
    # and are the tokens the tokenizer itself uses for that text
    assert tok(context + inject, add_special_tokens=False)["input_ids"][-len(ids):] == ids


def test_injection_ids_skip_a_merge_at_the_boundary(smollm2_tokenizer):
    """SmolLM2 has '=-' as one token: '<<5-8=' + '-3>>' is not the context's tokens plus more. From the
    text alone (the '=' might still merge with what follows) nothing is forced."""
    tok = smollm2_tokenizer
    assert injection("<<5-8=") == "-3>>"
    assert "=-" in tok.convert_ids_to_tokens(tok("<<5-8=-3>>", add_special_tokens=False)["input_ids"])
    assert injection_ids(tok, "<<5-8=", "-3>>") is None


def test_a_negative_result_after_a_generated_equals_token_is_forced(smollm2_tokenizer):
    """Once the model has generated '=' as a token of its own, '=-' is out of reach (generated tokens
    never merge): the result is forced as its own tokens, '-', '3', '>>'."""
    tok = smollm2_tokenizer
    context = tok("She has <<5-8=", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(context[-1:]) == ["="]
    ids = injection_ids(tok, "She has <<5-8=", "-3>>", at_token_boundary=True)
    assert ids and tok.convert_ids_to_tokens(ids) == ["-", "3", ">>"]
    assert tok.decode(context + ids) == "She has <<5-8=-3>>"
    # the sampler's path: the Injector, fed the row's generated tokens, queues exactly those ids
    injector = Injector(tok)
    injector.after(0, context)
    queued = []
    while (token := injector.pop(0)) is not None:
        queued.append(token)
    assert queued == ids and tok.decode(context + queued).endswith("<<5-8=-3>>")
    # a result that does not merge is forced the same way with or without the boundary
    assert injection_ids(tok, "<<48/2=", "24>>", at_token_boundary=True) == injection_ids(tok, "<<48/2=", "24>>")


def test_injection_ids_sentencepiece_leading_space(metaspace_tokenizer):
    tok = metaspace_tokenizer
    context = "So each one is <<1/8="
    # tokenized alone, the local context gets the leading '▁' every text gets; the ids after it do not
    assert tok.convert_ids_to_tokens(tok("<<1/8=", add_special_tokens=False)["input_ids"])[0].startswith("▁")
    ids = injection_ids(tok, context, "0.125>>")
    assert ids and tok.decode(ids) == "0.125>>"
    assert not any(t.startswith("▁") for t in tok.convert_ids_to_tokens(ids))
    context_ids = tok(context, add_special_tokens=False)["input_ids"]
    assert tok.decode(context_ids + ids) == context + "0.125>>"
    # this vocabulary merges '=' with the digit after it ('=4'): skipped, not split unnaturally
    assert injection_ids(tok, "<<3*14=", "42>>") is None
    # even after a generated '=': "42>>" alone is spelled '▁4' '2>>', which reads "= 42>>" in context
    assert tok.decode(tok("42>>", add_special_tokens=False)["input_ids"]) == "42>>"
    assert injection_ids(tok, "<<3*14=", "42>>", at_token_boundary=True) is None


# --------------------------------------------------------------------------------------------
# decoding paths, on the wrong-arithmetic model
# --------------------------------------------------------------------------------------------

_RIGHT_FIRST = "<<3*14=42>>"
_PROMPTS = plain_prompts()[:3]


def _all_right(text: str) -> bool:
    report = check_calculations(text)
    annotations = re.findall(r"<<[^<>]*>>", text)
    return bool(annotations) and report.errors == [] and report.n_checked >= len(annotations)


def _params(**kw) -> SamplingParams:
    return SamplingParams(**{"max_new_tokens": 48, **kw})


@pytest.fixture(params=["shared", "fallback"])
def path(request, monkeypatch):
    import synthtune.generation.sampler as sampler

    if request.param == "fallback":
        monkeypatch.setattr(sampler, "_supports_shared_prefix", lambda model, total: False)
    return request.param


@pytest.mark.integration  # trains the wrong-arithmetic model (~10 s, once per process)
def test_the_model_gets_its_arithmetic_wrong_without_the_calculator(wrong_calc_llama):
    # the guard for every test below: off, the annotations are wrong
    out = generate(wrong_calc_llama, _PROMPTS, _params(), progress=False)
    assert all(c == [WRONG_COMPLETION.strip()] for c in out)
    assert all(not _all_right(c[0]) for c in out)


@pytest.mark.integration
def test_sampler_greedy_writes_right_results(wrong_calc_llama, path):
    off = sample_k(wrong_calc_llama, _PROMPTS, _params(num_samples=2), batch_size=2)
    on = sample_k(wrong_calc_llama, _PROMPTS, _params(num_samples=2, calculator=True), batch_size=2)
    for group_off, group_on in zip(off, on, strict=True):
        assert all(not _all_right(s.text) for s in group_off)
        for s in group_on:
            assert _all_right(s.text), s.text
            assert _RIGHT_FIRST in s.text and f"<<2*14={RIGHT_RESULTS['2*14']}>>" in s.text
            assert s.n_tokens == len(s.token_ids)  # forced tokens are counted
    # batched and one prompt at a time: the same text
    single = sample_k(wrong_calc_llama, _PROMPTS, _params(num_samples=2, calculator=True), batch_size=1)
    assert [[s.text for s in g] for g in single] == [[s.text for s in g] for g in on]


# Prompts whose rows reach an annotation's "=" at different steps: the first two already hold part of
# the completion, so they reach "<<2*14=" at steps 8 and 11 (after " P" and after "...40"), while
# the plain prompt reaches "<<3*14=" at step 8 and "<<2*14=" at step 22. Forced queues are then
# pending in some rows and not others, and start and end at different steps.
_STAGGERED = [_PROMPTS[0] + " Apples: <<3*14=40>>40. P", _PROMPTS[1] + " Apples: <<3*14=40>>40", _PROMPTS[2]]


def _trigger_steps(tokenizer, ids: list[int]) -> list[int]:
    """The steps (1-based) after which a row's generated ``ids`` end an annotation's ``<<expr=``."""
    return [i for i in range(1, len(ids) + 1) if injection(tokenizer.decode(ids[:i])) is not None]


@pytest.mark.integration
def test_sampler_greedy_rows_triggering_at_different_steps(wrong_calc_llama, path):
    tok = wrong_calc_llama.tokenizer
    params = _params(num_samples=2)
    off = sample_k(wrong_calc_llama, _STAGGERED, params, batch_size=3)
    # the guard: each row opens its annotations at steps of its own
    steps = [_trigger_steps(tok, g[0].token_ids) for g in off]
    assert steps == [[8], [11], [8, 22]], steps
    assert all(s.text.count("<<") == n and not _all_right(s.text) for g, n in zip(off, (1, 1, 2), strict=True)
               for s in g)
    on = sample_k(wrong_calc_llama, _STAGGERED, replace(params, calculator=True), batch_size=3)
    right_second = f"<<2*14={RIGHT_RESULTS['2*14']}>>"
    for i, group in enumerate(on):
        for s in group:
            assert _all_right(s.text), (i, s.text)
            assert right_second in s.text and (i < 2) is (_RIGHT_FIRST not in s.text), (i, s.text)
            assert s.n_tokens == len(s.token_ids)
    # batched and one prompt at a time: the same tokens
    single = sample_k(wrong_calc_llama, _STAGGERED, replace(params, calculator=True), batch_size=1)
    assert [[s.token_ids for s in g] for g in single] == [[s.token_ids for s in g] for g in on]
    # generate() (the processor) agrees, batched or not
    generated = generate(wrong_calc_llama, _STAGGERED, replace(params, calculator=True, num_samples=1), batch_size=3,
                         progress=False)
    assert generated == [[g[0].text] for g in on]
    assert generate(wrong_calc_llama, _STAGGERED, replace(params, calculator=True, num_samples=1), batch_size=1,
                    progress=False) == generated


@pytest.mark.integration
def test_sampler_sampled_writes_right_results_and_is_reproducible(wrong_calc_llama, path):
    params = _params(num_samples=3, temperature=1.0, seed=5, calculator=True)
    first = sample_k(wrong_calc_llama, _PROMPTS, params, batch_size=2)
    again = sample_k(wrong_calc_llama, _PROMPTS, params, batch_size=2)
    assert [[s.token_ids for s in g] for g in first] == [[s.token_ids for s in g] for g in again]
    texts = [s.text for g in first for s in g]
    with_annotations = [t for t in texts if "<<" in t]
    assert len(with_annotations) >= len(texts) - 1
    for t in with_annotations:
        assert check_calculations(t).errors == [], t
    off = sample_k(wrong_calc_llama, _PROMPTS, replace(params, calculator=False), batch_size=2)
    assert any(check_calculations(s.text).errors for g in off for s in g)


@pytest.mark.integration
def test_generate_and_complete_write_right_results(wrong_calc_llama):
    params = _params(calculator=True)
    batched = generate(wrong_calc_llama, _PROMPTS, params, batch_size=4, progress=False)
    single = generate(wrong_calc_llama, _PROMPTS, params, batch_size=1, progress=False)
    assert batched == single
    assert all(_all_right(c[0]) and _RIGHT_FIRST in c[0] for c in batched)
    # complete(): generate for one sample, the shared-prefill sampler for several
    assert complete(wrong_calc_llama, _PROMPTS, params, batch_size=4, progress=False) == batched
    several = complete(wrong_calc_llama, _PROMPTS, replace(params, num_samples=2), progress=False)
    assert several == [[c[0], c[0]] for c in batched]


@pytest.mark.integration  # trains the seq2seq wrong-arithmetic model (~10 s, once per process)
def test_seq2seq_writes_right_results(wrong_calc_seq2seq):
    """The seq2seq paths (``generate()``; ``sample_k``, which always falls back to it for seq2seq) force
    the results from the decoder's position 1: off, the model's wrong annotations; on, every one right.
    A processor reading from the prompt's width (as for a causal model) would miss the first annotation,
    which the decoder writes before that width (the prompts are 12 to 67 tokens wide)."""
    lm = wrong_calc_seq2seq
    for calculator in (False, True):
        params = _params(calculator=calculator)
        generated = generate(lm, _PROMPTS, params, batch_size=3, progress=False)
        sampled = sample_k(lm, _PROMPTS, replace(params, num_samples=2, temperature=1.0, seed=2), batch_size=2)
        texts = [c for g in generated for c in g] + [s.text for g in sampled for s in g]
        assert len(texts) == 9
        for text in texts:
            if calculator:
                assert _all_right(text), text
                assert _RIGHT_FIRST in text and f"<<2*14={RIGHT_RESULTS['2*14']}>>" in text
            else:
                assert text == WRONG_COMPLETION.strip() and not _all_right(text)


def test_seq2seq_generate_takes_the_processor(tiny_t5):
    """tiny-t5 writes no annotations: the calculator path runs (processor at position 1) and changes nothing
    (that it writes results is :func:`test_seq2seq_writes_right_results`)."""
    for fn in (lambda p: generate(tiny_t5, _PROMPTS[:2], p, progress=False),
               lambda p: [[s.text for s in g] for g in sample_k(tiny_t5, _PROMPTS[:2], replace(p, num_samples=2,
                                                                                              temperature=1.0))]):
        assert fn(_params(max_new_tokens=12, calculator=True)) == fn(_params(max_new_tokens=12))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_model_that_writes_no_annotations_is_unchanged(tiny_llama, path, temperature):
    params = _params(max_new_tokens=16, num_samples=2, temperature=temperature, seed=3)
    off = sample_k(tiny_llama, _PROMPTS, params, batch_size=2)
    on = sample_k(tiny_llama, _PROMPTS, replace(params, calculator=True), batch_size=2)
    assert [[s.token_ids for s in g] for g in on] == [[s.token_ids for s in g] for g in off]
    assert generate(tiny_llama, _PROMPTS, replace(params, num_samples=1, temperature=0.0, calculator=True),
                    progress=False) == generate(tiny_llama, _PROMPTS, replace(params, num_samples=1, temperature=0.0),
                                                progress=False)


@pytest.mark.integration
def test_eval_with_the_calculator(wrong_calc_llama):
    from synthtune.config import EvalConfig
    from synthtune.jobs.eval import evaluate_model

    rows = load_split("test", "bundled").rows[:2]
    cfg = EvalConfig(model="unused", limit=2, max_new_tokens=48, batch_size=2, prompt_format="plain")
    for calculator in (False, True):
        scored, summary = evaluate_model(replace(cfg, calculator=calculator), wrong_calc_llama, rows, [],
                                         progress=False)
        assert summary["calculator"] is calculator
        completions = [c for r in scored for c in r["completions"]]
        assert len(completions) == 2
        assert all(_all_right(c) is calculator for c in completions), completions
        # the summary says how the arithmetic fared: two annotations per completion, all wrong off, all
        # right on (the totals are check_calculations' over the completions)
        reports = [check_calculations(c) for c in completions]
        assert summary["calc_checked"] == sum(r.n_checked for r in reports) >= 4
        assert summary["calc_correct"] == sum(r.n_correct for r in reports)
        assert summary["calc_accuracy"] == (1.0 if calculator else 0.0), summary


@pytest.mark.integration
def test_in_training_accuracy_with_the_calculator(wrong_calc_llama):
    """eval_accuracy's greedy generate takes the calculator: cut right after the second annotation, the
    answer read is that annotation's result (28 with the calculator, the model's 36 without)."""
    from accelerate import Accelerator

    from synthtune.config import TrainConfig
    from synthtune.train.metrics import eval_accuracy

    tok = wrong_calc_llama.tokenizer
    wrong_part = WRONG_COMPLETION[:WRONG_COMPLETION.index("36>>") + 4]
    right_part = wrong_part.replace("=40>>", "=42>>").replace("=36>>", "=28>>")
    n = len(tok(wrong_part, add_special_tokens=False)["input_ids"])
    assert n == len(tok(right_part, add_special_tokens=False)["input_ids"])
    questions = [{"question": r["question"], "answer": "#### 28"} for r in load_split("test", "bundled").rows[:2]]
    cfg = TrainConfig(prompt_format="plain", eval_max_new_tokens=n, per_device_batch_size=2)
    acc = Accelerator(cpu=True)
    off = eval_accuracy(acc, wrong_calc_llama.model, tok, questions, cfg, False)
    on = eval_accuracy(acc, wrong_calc_llama.model, tok, questions, replace(cfg, eval_calculator=True), False)
    assert (off["eval/accuracy"], on["eval/accuracy"]) == (0.0, 1.0)
    assert on["eval/n_questions"] == 2


# --------------------------------------------------------------------------------------------
# infer, synthesis and the command line
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_infer_with_the_calculator(tmp_path, wrong_calc_llama):
    from synthtune.config import InferConfig
    from synthtune.jobs.infer import run

    model_dir = str(wrong_calc_model_dir())
    cfg = InferConfig(model=model_dir, prompt=["q"], max_new_tokens=48, prompt_format="plain",
                      out=str(tmp_path / "out.jsonl"), device="cpu")
    off, on = run(cfg, progress=False), run(replace(cfg, calculator=True), progress=False)
    assert not _all_right(off[0]["completions"][0])
    assert _all_right(on[0]["completions"][0]) and _RIGHT_FIRST in on[0]["completions"][0]


def test_the_command_line_takes_the_calculator_switches():
    from typer.main import get_command

    from synthtune.cli import app
    from synthtune.cli_options import parse_argv

    group = get_command(app)
    for argv, field in [(["eval"], "calculator"), (["infer", "--model", "M", "--prompt", "q"], "calculator"),
                        (["synth"], "calculator"), (["train"], "eval_calculator")]:
        flag = "--" + field.replace("_", "-")
        assert getattr(parse_argv(group, argv)[0], field) is False
        assert getattr(parse_argv(group, [*argv, flag])[0], field) is True
        assert getattr(parse_argv(group, [*argv, f"{field}=true"])[0], field) is True


def _synth_cfg(tmp_path, **kw):
    from synthtune.config import SynthConfig

    base = dict(model="tiny-llama-wrong-calc", questions="bundled:test", limit=2, shots=0, prompt_format="plain",
                k=2, rounds=1, temperature=0.0, max_new_tokens=48, batch_size=2, use_gold=False,
                min_calc=1.0, out=str(tmp_path / "run"))
    base.update(kw)
    return SynthConfig(**base)


@pytest.mark.integration  # two synthesis runs on the tiny model
def test_synthesis_keeps_rationales_once_the_calculator_writes_the_results(tmp_path, wrong_calc_llama):
    """min_calc=1 drops every sample of the wrong-arithmetic model; with the calculator they pass
    (self-consistency, no gold: the model's final answer is its own)."""
    from synthtune.synth.backends import HFBackend
    from synthtune.synth.pipeline import KEPT, run_synthesis

    backend = HFBackend(wrong_calc_llama, batch_size=2)
    off = run_synthesis(_synth_cfg(tmp_path, out=str(tmp_path / "off")), backend, progress=False, log=lambda m: None)
    on = run_synthesis(_synth_cfg(tmp_path, out=str(tmp_path / "on"), calculator=True), backend, progress=False,
                       log=lambda m: None)
    assert off["kept_examples"] == 0 and on["kept_examples"] >= 2, (off, on)
    kept = [json.loads(line) for line in (tmp_path / "on" / KEPT).read_text().splitlines()]
    assert all(_all_right(r["answer"]) for r in kept)
    fp = json.loads((tmp_path / "on" / "fingerprint.json").read_text())
    assert fp["calculator"] is True


def test_synthesis_resume_counts_the_calculator_as_a_setting(tmp_path):
    """A run from before the setting sampled without a calculator: resuming it with one is a change."""
    from synth_helpers import ScriptedBackend

    from synthtune.errors import ConfigError
    from synthtune.synth.pipeline import run_synthesis

    cfg = _synth_cfg(tmp_path, model="scripted", questions="bundled:train", limit=2, k=2, exemplar_pool_size=12)
    run_synthesis(cfg, ScriptedBackend(), progress=False, log=lambda m: None)
    out = tmp_path / "run"
    fp = json.loads((out / "fingerprint.json").read_text())
    assert fp["calculator"] is False
    (out / "fingerprint.json").write_text(json.dumps({k: v for k, v in fp.items() if k != "calculator"}))
    (out / "config.yaml").unlink()
    with pytest.raises(ConfigError, match="calculator: False -> True"):
        run_synthesis(replace(cfg, calculator=True), ScriptedBackend(), progress=False, log=lambda m: None)
    logs = []
    run_synthesis(cfg, ScriptedBackend(), progress=False, log=logs.append)
    assert not [m for m in logs if "does not record" in m], logs


def test_synthesis_with_a_server_backend_refuses_the_calculator_before_writing(tmp_path):
    from synthtune.errors import ConfigError
    from synthtune.synth.pipeline import run_synthesis

    # with plain prompts the openai backend runs it (tests/test_calc_openai.py); chat ones it cannot continue
    cfg = _synth_cfg(tmp_path, backend="openai", endpoints=["http://127.0.0.1:9/v1"], calculator=True,
                     prompt_format="chat")
    with pytest.raises(ConfigError, match="calculator: true with backend: openai needs plain prompts"):
        run_synthesis(cfg, progress=False, log=lambda m: None)
    assert not (tmp_path / "run").exists()
