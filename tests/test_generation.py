from synthtune.generation.base import SamplingParams, generate, truncate_at_stop


def test_truncate_at_first_stop():
    assert truncate_at_stop("a\n\nProblem: b\nProblem: c", ["\nProblem:", "\n\nProblem:"]) == "a"
    assert truncate_at_stop("no stop", ["X"]) == "no stop"


def test_generate_shapes_causal_and_seq2seq(tiny_llama, tiny_t5):
    prompts = ["Problem: 1+1?\nAnswer:", "Problem: a much longer question about apples and pears?\nAnswer:"]
    for lm in (tiny_llama, tiny_t5):
        greedy = generate(lm, prompts, SamplingParams(max_new_tokens=6), batch_size=2, progress=False)
        assert len(greedy) == 2 and all(len(c) == 1 for c in greedy)
        # greedy is deterministic and batching does not change a prompt's answer
        alone = generate(lm, prompts[:1], SamplingParams(max_new_tokens=6), batch_size=1, progress=False)
        assert alone[0] == greedy[0]
        sampled = generate(lm, prompts, SamplingParams(max_new_tokens=6, temperature=1.0, num_samples=3, seed=1),
                           progress=False)
        assert [len(c) for c in sampled] == [3, 3]
        again = generate(lm, prompts, SamplingParams(max_new_tokens=6, temperature=1.0, num_samples=3, seed=1),
                         progress=False)
        assert again == sampled
