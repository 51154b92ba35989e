"""The shared-prefix k-sampler: exact greedy agreement with generate(), sampling, stopping."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from synthtune.data.gsm8k import load_split
from synthtune.formats import stop_strings
from synthtune.generation.base import SamplingParams
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
