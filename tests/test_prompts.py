import pytest

from synthtune.data.gsm8k import load_split
from synthtune.formats import default_format
from synthtune.synth.prompts import build_prompt, select_exemplars


@pytest.fixture(scope="module")
def pool():
    return load_split("train", "bundled").rows


def test_eight_shot_plain_prompt_structure(pool):
    p = build_prompt("Ann has 3 apples and buys 4 more. How many?", pool, k=8, fmt="plain", seed=1)
    assert p.text.count("Question:") == 9 and p.text.count("Answer:") == 9
    assert p.text.endswith("Question: Ann has 3 apples and buys 4 more. How many?\nAnswer:")
    assert len(set(p.exemplar_ids)) == 8
    for i in p.exemplar_ids:
        assert pool[i]["question"] in p.text


def test_target_is_never_its_own_exemplar(pool):
    for row in pool:
        for strategy in ("random", "fixed"):
            ids = select_exemplars(pool, len(pool) - 1, question=row["question"], strategy=strategy, seed=3)
            assert all(pool[i]["question"] != row["question"] for i in ids)


def test_seeded_and_reproducible(pool):
    q = pool[0]["question"]
    a = build_prompt(q, pool, k=4, seed=7)
    assert a == build_prompt(q, pool, k=4, seed=7)
    assert any(build_prompt(q, pool, k=4, seed=s).exemplar_ids != a.exemplar_ids for s in range(8, 12))
    # "fixed" gives every target the same shots (a shared prefix)
    f1 = build_prompt(pool[5]["question"], pool, k=4, strategy="fixed")
    f2 = build_prompt(pool[6]["question"], pool, k=4, strategy="fixed")
    assert f1.exemplar_ids == f2.exemplar_ids


def test_chat_format_uses_template(pool, tiny_llama, tiny_t5):
    p = build_prompt("How many?", pool, k=2, fmt="chat", tokenizer=tiny_llama.tokenizer)
    assert p.text.count("<|user|>") == 3 and p.text.count("<|assistant|>") == 3
    assert p.text.endswith("<|assistant|>\n") and not p.add_special_tokens
    assert default_format(tiny_llama.tokenizer, False) == "chat"
    assert default_format(tiny_t5.tokenizer, True) == "plain"
    with pytest.raises(ValueError, match="chat template"):
        build_prompt("q", pool, k=1, fmt="chat", tokenizer=None)


def test_too_many_shots_is_an_error(pool):
    with pytest.raises(ValueError, match="eligible"):
        select_exemplars(pool, len(pool) + 1, question="x")


def test_similar_strategy_picks_lexical_neighbours(pool):
    target = pool[3]["question"]
    # a near-copy of pool[3] (one word changed) must be the nearest exemplar; pool[3] itself is excluded
    twin = {"question": target.replace(" ", "  ", 1).replace("How", "how"), "answer": "x #### 1"}
    near = {"question": target + " Round to the nearest whole number.", "answer": "y #### 2"}
    ext = [*pool, near]
    ids = select_exemplars(ext, 3, question=twin["question"], strategy="similar")
    assert ids[-1] == len(ext) - 1  # most similar last, right before the target
    assert 3 not in ids  # pool[3] is the target itself (same normalized text)
    assert ids == select_exemplars(ext, 3, question=twin["question"], strategy="similar")
