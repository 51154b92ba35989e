"""The shared-prefix k-sampler: exact greedy agreement with generate(), sampling, stopping."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from synthtune.data.gsm8k import load_split
from synthtune.formats import stop_strings
from synthtune.generation.base import SamplingParams, generate
from synthtune.generation.sampler import Sample, sample_k
from synthtune.synth.prompts import build_prompt


@pytest.fixture(scope="module")
def pool():
    return load_split("train", "bundled").rows


@pytest.fixture(scope="module")
def lively_llama(tiny_llama):
    """tiny-llama's shape and tokenizer with large random weights.

    The stock tiny model's small init makes greedy decoding repeat one token forever, which would
    let a broken attention pass an exact-match test; large weights give varied continuations that
    depend on the whole context.
    """
    from transformers import LlamaForCausalLM

    cfg = tiny_llama.model.config.__class__.from_dict(tiny_llama.model.config.to_dict())
    cfg.initializer_range = 0.3
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config = tiny_llama.model.generation_config
    return SimpleNamespace(model=model, tokenizer=tiny_llama.tokenizer, is_seq2seq=False, device="cpu")


def _hf_greedy(lm, prompt: str, n: int, add_special_tokens: bool = True) -> list[int]:
    enc = lm.tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens)
    with torch.inference_mode():
        out = lm.model.generate(**enc, max_new_tokens=n, do_sample=False, temperature=None, top_p=None,
                                top_k=None, pad_token_id=lm.tokenizer.pad_token_id)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    eos = lm.model.generation_config.eos_token_id
    if eos in new:  # generate pads after EOS; the sampler stops there
        new = new[:new.index(eos) + 1]
    return new


def _prompts(pool, n: int, strategy: str = "random") -> list[str]:
    # targets from the test split, as in real use: with "fixed" exemplars every prompt then shares
    # the meta-prompt and all 8 exemplars (the shared-prefix case)
    questions = load_split("test", "bundled").rows
    return [build_prompt(questions[i]["question"], pool, k=8, fmt="plain", strategy=strategy).text
            for i in range(n)]


def test_greedy_matches_generate_lively_tiny(lively_llama, pool):
    prompts = _prompts(pool, 2)
    got = sample_k(lively_llama, prompts, SamplingParams(max_new_tokens=24, temperature=0.0, num_samples=3))
    for prompt, samples in zip(prompts, got, strict=True):
        ref = _hf_greedy(lively_llama, prompt, 24)
        assert len(set(ref)) > 3, "the reference should not be a degenerate repetition"
        assert len(samples) == 3
        assert all(s.token_ids == ref for s in samples)


def test_greedy_matches_generate_stock_tiny(tiny_llama, pool):
    prompt = _prompts(pool, 1)[0]
    got = sample_k(tiny_llama, [prompt], SamplingParams(max_new_tokens=16, temperature=0.0, num_samples=2))
    assert got[0][0].token_ids == _hf_greedy(tiny_llama, prompt, 16)


def test_batched_shared_prefix_matches_generate(lively_llama, pool):
    # fixed exemplars: the prompts share meta-prompt + 8 exemplars, prefilled once for the call;
    # batch_size 2 over 3 prompts also exercises a batch of one and ragged remainders
    prompts = _prompts(pool, 3, strategy="fixed")
    got = sample_k(lively_llama, prompts, SamplingParams(max_new_tokens=12, num_samples=2), batch_size=2)
    for prompt, samples in zip(prompts, got, strict=True):
        assert samples[0].token_ids == _hf_greedy(lively_llama, prompt, 12)
    # and prompts with nothing in common (different exemplars) in one batch
    mixed = [prompts[0], _prompts(pool, 5)[4], "Problem: 2+2?\nAnswer:"]
    refs = [_hf_greedy(lively_llama, p, 12) for p in mixed]
    got = sample_k(lively_llama, mixed, SamplingParams(max_new_tokens=12, num_samples=1), batch_size=3)
    assert [g[0].token_ids for g in got] == refs
    # the first prompt's rows end early (a stop string from its 3rd token); the rows still
    # running must be unaffected by the finished rows leaving the batch
    tok = lively_llama.tokenizer
    stop = tok.decode(refs[0][2:3])
    got = sample_k(lively_llama, mixed, SamplingParams(max_new_tokens=12, num_samples=2, stop=(stop,)),
                   batch_size=3)
    assert got[0][0].finish_reason == "stop" and got[0][0].n_tokens <= 3
    for ref, samples in zip(refs[1:], got[1:], strict=True):
        for s in samples:
            assert s.token_ids == ref[:s.n_tokens]
            if s.finish_reason == "length":
                assert s.token_ids == ref


@pytest.mark.integration  # loads the 135M embedded model, ~5 s
def test_greedy_matches_generate_smollm2_8shot(pool):
    from synthtune.models import load_model

    lm = load_model("smollm2-135m-instruct", device="cpu")
    prompt = build_prompt(pool[3]["question"], pool, k=8, fmt="plain")
    assert len(lm.tokenizer(prompt.text)["input_ids"]) > 1000
    got = sample_k(lm, [prompt.text], SamplingParams(max_new_tokens=10, num_samples=2),
                   add_special_tokens=prompt.add_special_tokens)
    ref = _hf_greedy(lm, prompt.text, 10, prompt.add_special_tokens)
    assert got[0][0].token_ids == ref
    assert got[0][0].text == lm.tokenizer.decode(ref, skip_special_tokens=True).strip()
    assert lm.model.config._attn_implementation == "sdpa"  # switched back after the call


def test_sampling_reproducible_and_diverse(lively_llama, pool):
    prompts = _prompts(pool, 2)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95, top_k=50, num_samples=4, seed=7)
    a = sample_k(lively_llama, prompts, params)
    b = sample_k(lively_llama, prompts, params)
    assert [[s.token_ids for s in g] for g in a] == [[s.token_ids for s in g] for g in b]
    c = sample_k(lively_llama, prompts, SamplingParams(**{**params.__dict__, "seed": 8}))
    assert [[s.token_ids for s in g] for g in a] != [[s.token_ids for s in g] for g in c]
    for group in a:
        assert len(group) == 4
        assert len({tuple(s.token_ids) for s in group}) > 1


def test_top_k_one_and_tiny_top_p_are_greedy(lively_llama, pool):
    prompt = _prompts(pool, 1)
    greedy = sample_k(lively_llama, prompt, SamplingParams(max_new_tokens=8))[0][0].token_ids
    for extra in ({"top_k": 1}, {"top_p": 1e-6}):
        got = sample_k(lively_llama, prompt, SamplingParams(max_new_tokens=8, temperature=1.0, num_samples=3,
                                                             **extra))
        assert all(s.token_ids == greedy for s in got[0])


def test_stop_string_eos_and_length(lively_llama, pool):
    lm = lively_llama
    prompt = _prompts(pool, 1)
    full = sample_k(lm, prompt, SamplingParams(max_new_tokens=20))[0][0]
    assert full.finish_reason == "length" and full.n_tokens == 20 and len(full.token_ids) == 20
    # length: text is the decoded tokens, stripped
    assert full.text == lm.tokenizer.decode(full.token_ids, skip_special_tokens=True).strip()

    # stop: a stop string made of the 5th-7th new tokens' text ends the sample at the 7th token
    piece = lm.tokenizer.decode(full.token_ids[4:7])
    text_before = lm.tokenizer.decode(full.token_ids[:7])
    assert piece and piece in text_before
    stopped = sample_k(lm, prompt, SamplingParams(max_new_tokens=20, stop=(piece,), num_samples=2))[0]
    first_hit = next(i for i in range(1, 21) if piece in lm.tokenizer.decode(full.token_ids[:i]))
    for s in stopped:
        assert s.finish_reason == "stop"
        assert s.n_tokens == first_hit
        assert piece not in s.text
        assert s.text == text_before[:text_before.find(piece)].strip()

    # eos: declare the 4th new token an EOS id; the sample ends there, without its text
    eos_tok = full.token_ids[3]
    first = full.token_ids.index(eos_tok)
    gen_cfg = lm.model.generation_config
    old = gen_cfg.eos_token_id
    gen_cfg.eos_token_id = [old, eos_tok]
    try:
        ended = sample_k(lm, prompt, SamplingParams(max_new_tokens=20))[0][0]
        forced = sample_k(lm, prompt, SamplingParams(max_new_tokens=20), ignore_eos=True)[0][0]
    finally:
        gen_cfg.eos_token_id = old
    assert ended.finish_reason == "eos"
    assert ended.n_tokens == first + 1 and ended.token_ids == full.token_ids[:first + 1]
    assert ended.text == lm.tokenizer.decode(full.token_ids[:first], skip_special_tokens=True).strip()
    assert forced.finish_reason == "length" and forced.n_tokens == 20 and eos_tok not in forced.token_ids


def test_finished_rows_drop_out_while_others_continue(lively_llama, pool):
    # at temperature 1 with a common stop string, some samples stop early and others run on;
    # every sample must still be what it would be alone: its stop/length bookkeeping consistent
    prompt = _prompts(pool, 1)
    got = sample_k(lively_llama, prompt, SamplingParams(max_new_tokens=16, temperature=1.0, num_samples=8,
                                                        stop=("e",), seed=3))[0]
    reasons = {s.finish_reason for s in got}
    assert reasons <= {"stop", "length", "eos"}
    for s in got:
        assert s.n_tokens == len(s.token_ids) <= 16
        decoded = lively_llama.tokenizer.decode(s.token_ids, skip_special_tokens=True)
        if s.finish_reason == "stop":
            assert "e" in decoded and "e" not in lively_llama.tokenizer.decode(s.token_ids[:-1])
        else:
            assert "e" not in decoded


def test_seq2seq_falls_back_to_generate(tiny_t5, pool):
    prompt = _prompts(pool, 2)
    got = sample_k(tiny_t5, prompt, SamplingParams(max_new_tokens=6, temperature=1.0, num_samples=3,
                                                   stop=stop_strings("plain")))
    assert len(got) == 2 and all(len(g) == 3 for g in got)
    for g in got:
        for s in g:
            assert isinstance(s, Sample)
            assert s.finish_reason in {"eos", "stop", "length"}
            assert 1 <= s.n_tokens <= 6


def test_empty_and_invalid():
    lm = SimpleNamespace(model=None, tokenizer=None, is_seq2seq=False, device="cpu")
    assert sample_k(lm, [], SamplingParams()) == []
    with pytest.raises(ValueError):
        sample_k(lm, ["x"], SamplingParams(num_samples=0))


# --------------------------------------------------------------------------------------------
# presence/frequency penalties and logit_bias, on every decoding path
# --------------------------------------------------------------------------------------------

_SHORT = ["Question: Tom has 3 apples and buys 4 more. How many?\nAnswer:",
          "Question: 12 eggs, 5 broken. Left?\nAnswer:"]


@pytest.fixture(params=["shared", "fallback"])
def path(request, monkeypatch):
    """Run the test on the shared-prefill path, then again on the generate() fallback, which a
    causal model takes when the hand-written attention can't reproduce its own."""
    import synthtune.generation.sampler as sampler

    if request.param == "fallback":
        monkeypatch.setattr(sampler, "_supports_shared_prefix", lambda model, total: False)
    return request.param


def _params(**kw) -> SamplingParams:
    return SamplingParams(**{"max_new_tokens": 12, **kw})


def _reference(lm, prompt: str, params: SamplingParams) -> list[int]:
    """Greedy decoding with the OpenAI formula applied by hand: a full forward over prompt + new tokens
    each step (no cache, no batching), counts over the new tokens only. The comparison ends at the
    first step whose top two adjusted logits are within 1e-3 (a tie the two implementations' last
    bits may break either way)."""
    from collections import Counter

    ids = lm.tokenizer(prompt)["input_ids"]
    eos = lm.model.generation_config.eos_token_id
    new: list[int] = []
    for _ in range(params.max_new_tokens):
        with torch.inference_mode():
            logits = lm.model(input_ids=torch.tensor([ids + new])).logits[0, -1].float().tolist()
        for tok, count in Counter(new).items():
            logits[tok] -= count * params.frequency_penalty + params.presence_penalty
        for tok, bias in (params.logit_bias or {}).items():
            logits[tok] += bias
        order = sorted(range(len(logits)), key=lambda j: -logits[j])
        if logits[order[0]] - logits[order[1]] < 1e-3:
            break
        new.append(order[0])
        if order[0] == eos:
            break
    return new


def test_penalty_defaults_spelled_out_are_bit_identical(lively_llama, tiny_t5, path):
    # the defaults named explicitly, and a zero bias (which does run the penalty code: counts,
    # bias vector, processor) all give exactly today's samples, sampled and greedy
    base = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, num_samples=3, seed=5)
    for lm in (lively_llama, tiny_t5):
        want = sample_k(lm, _SHORT, SamplingParams(**base), batch_size=2)
        for extra in ({"presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": None},
                      {"logit_bias": {}}, {"logit_bias": {7: 0.0, 100: 0.0}}):
            got = sample_k(lm, _SHORT, SamplingParams(**base, **extra), batch_size=2)
            assert [[s.token_ids for s in g] for g in got] == [[s.token_ids for s in g] for g in want]
    greedy = SamplingParams(max_new_tokens=10)
    want = generate(lively_llama, _SHORT, greedy, batch_size=2, progress=False)
    assert generate(lively_llama, _SHORT, SamplingParams(max_new_tokens=10, logit_bias={7: 0.0}), batch_size=2,
                    progress=False) == want


@pytest.mark.parametrize("model", ["lively", "t5"])
def test_logit_bias_bans_and_forces_a_token(lively_llama, tiny_t5, path, model):
    lm = lively_llama if model == "lively" else tiny_t5
    eos = set(lm.model.generation_config.eos_token_id if isinstance(lm.model.generation_config.eos_token_id, list)
              else [lm.model.generation_config.eos_token_id])
    plain = sample_k(lm, _SHORT, _params(), batch_size=2)
    for g in plain:
        # the token greedy decoding picks first: -100 keeps it out of every sample, at every step
        first = g[0].token_ids[0]
        banned = sample_k(lm, _SHORT, _params(logit_bias={first: -100}, num_samples=2), batch_size=2)
        assert all(first not in s.token_ids for s in banned[_index(plain, g)])
    # +100 on a token greedy never picks (not EOS): every new token is that token
    forced_tok = next(t for t in range(5, 1000) if t not in eos and all(t not in g[0].token_ids for g in plain))
    for temperature in (0.0, 1.0):
        forced = sample_k(lm, _SHORT, _params(logit_bias={forced_tok: 100}, temperature=temperature, num_samples=2),
                          batch_size=2)
        for g in forced:
            for s in g:
                assert s.token_ids == [forced_tok] * 12 and s.finish_reason == "length"
    # and the plain batched generate (infer, eval) honours it too
    texts = generate(lm, _SHORT[:1], _params(logit_bias={forced_tok: 100}), progress=False)
    assert texts[0][0] == lm.tokenizer.decode([forced_tok] * 12, skip_special_tokens=True).strip()


def _index(groups, group) -> int:
    return next(i for i, g in enumerate(groups) if g is group)


@pytest.mark.parametrize("penalty", ["frequency_penalty", "presence_penalty"])
def test_a_penalty_of_two_stops_greedy_repetition(tiny_llama, path, penalty):
    # the stock tiny model's logits span less than 2, so a penalty of 2 (OpenAI's maximum) puts every
    # token already generated below every fresh one: greedy then never repeats within 24 tokens,
    # where unpenalized greedy decoding repeats at once
    plain = sample_k(tiny_llama, _SHORT, SamplingParams(max_new_tokens=24), batch_size=2)
    assert all(len(set(g[0].token_ids)) < len(g[0].token_ids) for g in plain)
    got = sample_k(tiny_llama, _SHORT, SamplingParams(max_new_tokens=24, **{penalty: 2.0}), batch_size=2)
    for g in got:
        assert g[0].n_tokens == 24 and len(set(g[0].token_ids)) == 24
    # a negative penalty rewards repetition: the first token then repeats throughout
    again = sample_k(tiny_llama, _SHORT, SamplingParams(max_new_tokens=24, **{penalty: -2.0}), batch_size=2)
    for g in again:
        assert set(g[0].token_ids) == {g[0].token_ids[0]}


# lively_llama's greedy text repeats nothing in 12 tokens, so a negative presence penalty (inviting
# repeats) is what changes it, and a frequency penalty then decides how often a token comes back
@pytest.mark.parametrize("knobs", [
    {"presence_penalty": -3.0},
    {"presence_penalty": -3.0, "frequency_penalty": 1.5},
    {"presence_penalty": 3.0, "frequency_penalty": -1.0, "logit_bias": {13: 3.0}},
], ids=["negative-presence", "presence-and-frequency", "with-bias"])
def test_greedy_with_penalties_matches_a_hand_computed_reference(lively_llama, path, knobs):
    params = _params(**knobs)
    got = sample_k(lively_llama, _SHORT, params, batch_size=2)
    changed = False
    for prompt, g in zip(_SHORT, got, strict=True):
        ref = _reference(lively_llama, prompt, params)
        assert len(ref) >= 6, "the reference hit a near-tie early; pick other settings"
        assert g[0].token_ids[:len(ref)] == ref
        changed |= ref != sample_k(lively_llama, [prompt], _params())[0][0].token_ids[:len(ref)]
    assert changed, "these settings should change what greedy decoding picks"


def test_each_sample_counts_its_own_tokens(lively_llama, path):
    # top_k=1 makes sampling deterministic while still decoding k separate rows: with per-sample
    # counts every row equals the greedy result; counts shared across rows would penalize each
    # row for the others' tokens and make them differ
    knobs = {"presence_penalty": -3.0, "frequency_penalty": 1.5}
    greedy = sample_k(lively_llama, _SHORT, _params(**knobs), batch_size=2)
    rows = sample_k(lively_llama, _SHORT, _params(**knobs, temperature=1.0, top_k=1, num_samples=4), batch_size=2)
    for g, r in zip(greedy, rows, strict=True):
        assert [s.token_ids for s in r] == [g[0].token_ids] * 4


def test_the_two_paths_agree_token_for_token(lively_llama, monkeypatch):
    import synthtune.generation.sampler as sampler

    params = _params(presence_penalty=0.7, frequency_penalty=0.4, logit_bias={13: -5.0, 29: 2.5}, num_samples=2)
    shared = sample_k(lively_llama, _SHORT, params, batch_size=2)
    monkeypatch.setattr(sampler, "_supports_shared_prefix", lambda model, total: False)
    fallback = sample_k(lively_llama, _SHORT, params, batch_size=2)
    assert [[s.token_ids for s in g] for g in shared] == [[s.token_ids for s in g] for g in fallback]


def test_the_sampler_option_picks_the_path(lively_llama, monkeypatch):
    """``sampler=generate`` runs HF's batched generate (the shared-prefill path never runs) and, greedy,
    returns what ``shared_prefix`` returns; ``auto`` on CPU is the shared-prefill path."""
    import synthtune.generation.sampler as sampler

    params = _params(presence_penalty=0.3, num_samples=2)
    shared = sample_k(lively_llama, _SHORT, params, batch_size=2, sampler="shared_prefix")
    assert sample_k(lively_llama, _SHORT, params, batch_size=2) == shared  # auto, on CPU

    def refuse(*args, **kwargs):
        raise AssertionError("the shared-prefill path ran")

    monkeypatch.setattr(sampler, "_sample_batch_shared", refuse)
    generated = sample_k(lively_llama, _SHORT, params, batch_size=2, sampler="generate")
    assert [[s.token_ids for s in g] for g in generated] == [[s.token_ids for s in g] for g in shared]
    with pytest.raises(AssertionError, match="shared-prefill path ran"):
        sample_k(lively_llama, _SHORT, params, batch_size=2, sampler="auto")


def test_auto_takes_generate_on_an_accelerator_and_bad_choices_are_refused(lively_llama, tiny_t5, tmp_path):
    from synthtune.config import SAMPLER
    from synthtune.generation.sampler import SAMPLERS, complete, pick_sampler, resolve_sampler

    assert tuple(SAMPLER["choices"]) == SAMPLERS  # the commands' option offers exactly these
    assert [pick_sampler("auto", d) for d in ("cpu", "cuda", "cuda:3", "mps")] == \
        ["shared_prefix", "generate", "generate", "generate"]
    assert [pick_sampler(c, "cuda") for c in SAMPLERS[1:]] == ["shared_prefix", "generate"]
    # what runs: a seq2seq model has no shared-prefill path, whatever is asked for
    assert resolve_sampler(lively_llama) == "shared_prefix"
    assert resolve_sampler(tiny_t5, "shared_prefix") == "generate"
    # synthesis's hf backend takes the config's choice, and its run log says what runs
    from synthtune.config import SynthConfig
    from synthtune.synth.backends import backend_for
    from synthtune.synth.pipeline import run_synthesis

    logs: list[str] = []
    cfg = SynthConfig(model="tiny-llama", device="cpu", sampler="generate", questions="bundled:test", limit=1, k=2,
                      rounds=1, shots=1, max_new_tokens=4, out=str(tmp_path / "synth"))
    assert backend_for(replace(cfg, sampler="auto")).sampler == "shared_prefix"
    run_synthesis(cfg, progress=False, log=logs.append)
    assert any("hf backend (tiny-llama, sampler generate)" in line for line in logs), logs
    for call in (lambda: sample_k(lively_llama, [], _params(), sampler="fast"),
                 lambda: complete(lively_llama, _SHORT, _params(), sampler="fast", progress=False)):
        with pytest.raises(ValueError, match="sampler must be one of auto, shared_prefix, generate; got 'fast'"):
            call()


def test_bad_penalty_values_are_refused_by_name(lively_llama):
    for params, named in [(SamplingParams(presence_penalty=float("nan")), "presence_penalty"),
                          (SamplingParams(frequency_penalty=float("inf")), "frequency_penalty"),
                          (SamplingParams(logit_bias={-1: 1.0}), "logit_bias key -1"),
                          (SamplingParams(logit_bias={"5": 1.0}), "logit_bias key '5'"),
                          (SamplingParams(logit_bias={5: float("nan")}), r"logit_bias\[5\]"),
                          (SamplingParams(logit_bias={1024: 1.0}), r"logit_bias key 1024 .*0 to 1023")]:
        with pytest.raises(ValueError, match=named):
            sample_k(lively_llama, _SHORT[:1], params)


def test_seq2seq_greedy_with_several_samples(tiny_t5):
    # regression: generate() refuses num_return_sequences > 1 without sampling, so T5 (always on
    # the fallback) failed greedy requests for n > 1; greedy rows are identical, so one is decoded
    got = sample_k(tiny_t5, _SHORT, SamplingParams(max_new_tokens=6, num_samples=3), batch_size=2)
    for prompt, g in zip(_SHORT, got, strict=True):
        alone = sample_k(tiny_t5, [prompt], SamplingParams(max_new_tokens=6))[0][0]
        assert [s.token_ids for s in g] == [alone.token_ids] * 3
        assert len({id(s) for s in g}) == 3  # distinct objects: callers may edit one


@given(counts=st.lists(st.lists(st.integers(0, 3), min_size=6, max_size=6), min_size=1, max_size=3),
       presence=st.floats(-2, 2), frequency=st.floats(-2, 2),
       bias=st.dictionaries(st.integers(0, 5), st.floats(-100, 100), max_size=3))
@settings(max_examples=60, deadline=None)
def test_penalty_arithmetic_matches_the_openai_formula(counts, presence, frequency, bias):
    # the formula as OpenAI documents it, per row and token, in float64 by hand, against the fp32
    # tensor code both decoding paths share
    from synthtune.generation import penalties

    params = SamplingParams(presence_penalty=presence, frequency_penalty=frequency, logit_bias=bias)
    logits = torch.linspace(-3, 3, 6).repeat(len(counts), 1)
    want = [[float(logits[r, j]) + bias.get(j, 0.0) - c * frequency - (c > 0) * presence for j, c in enumerate(row)]
            for r, row in enumerate(counts)]
    got = penalties.adjust(logits.clone(), torch.tensor(counts, dtype=torch.float32), params,
                           penalties.bias_vector(params, 6, "cpu"))
    assert [x for row in got.tolist() for x in row] == pytest.approx([x for row in want for x in row], abs=1e-3)
