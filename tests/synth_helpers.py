"""A scripted backend: deterministic completions, so pipeline tests can assert exact outcomes.

It implements the real Backend interface (``sample(prompts, params)``); what it returns for a
question is decided by the question's gold answer, read from the bundled sample by the test.
"""

from __future__ import annotations

import os
import time

from synthtune.data.gsm8k import load_split, rationale_and_answer
from synthtune.synth.sampler import Sample


class ScriptedBackend:
    name = "scripted"
    model_name = "scripted"
    tokenizer = None  # plain prompts
    is_seq2seq = False

    def __init__(self, mode: str = "mixed", delay_s: float = 0.0):
        self.mode = mode
        self.delay_s = delay_s
        self.gold = {r["question"]: r["answer"] for s in ("train", "test") for r in load_split(s, "bundled")}
        self.calls = 0

    def completions(self, question: str, k: int) -> list[Sample]:
        rationale, answer = rationale_and_answer(self.gold[question])
        body = rationale
        variants = [
            f"{body}\n#### {answer}",  # the reference path
            f"{body}\n#### {answer}",  # an exact duplicate: diversity must drop it
            f"Let me think. First, read the problem. Then compute carefully.\n{body.splitlines()[-1]}\n"
            f"The answer is {answer}.",  # a different wording of a correct path
            f"{body}\n#### {int(answer) + 1}",  # wrong final answer
            "I do not know how to solve this.",  # no answer
        ]
        if self.mode == "wrong":
            variants = [f"It is {int(answer) + 2}.", f"#### {int(answer) + 3}"]
        return [Sample(text=variants[i % len(variants)], n_tokens=10 + i, finish_reason="eos") for i in range(k)]

    def sample(self, prompts, params):
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        return [self.completions(p.question, params.num_samples) for p in prompts]


def run_in_subprocess(out_dir: str, delay_s: float) -> None:  # pragma: no cover - run by a child process
    from synthtune.config import SynthConfig
    from synthtune.synth.pipeline import run_synthesis

    cfg = SynthConfig(questions="bundled:train", out=out_dir, k=5, rounds=1, batch_size=2, shots=2,
                      exemplar_pool_size=12, prompt_format="plain")
    run_synthesis(cfg, backend=ScriptedBackend(delay_s=delay_s), progress=False, log=lambda m: None)
    print("finished", os.getpid(), flush=True)
