"""A scripted backend: deterministic completions, so pipeline tests can assert exact outcomes.

It implements the real Backend interface (``sample(prompts, params)``); what it returns for a
question is decided by the question's gold answer, read from the bundled sample by the test.
"""

from __future__ import annotations

import os
import time

from synthtune.data.gsm8k import load_split, rationale_and_answer
from synthtune.generation.sampler import Sample


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


# --------------------------------------------------------------------------------------------
# a real model that writes pathological text
# --------------------------------------------------------------------------------------------

#: What the chain model writes: every character str.splitlines breaks at, a bare CR, NUL, quotes,
#: braces and escapes as text, bidi overrides, an astral character, then a GSM8K answer line.
#: Tokens shared between places (the bytes of U+2028 and U+2029, say) make it branch, so
#: samples differ and depend on the seed. No ':' (the plain prompt's last token) and no digits
#: but the answer's.
PATHOLOGICAL = ("Lines\u2028split\u2029here\x85and\x0bthere\x0c\x1cfile\x1dgroup\x1erecord\r bare "
                "NUL\x00 \"quoted\" {braces} \\u2028 literal \u202eRTL\u202c caf\u00e9 \U0001f9ee "
                "\t tabbed\n#### 42")


def build_chain_model(out_dir, text: str = PATHOLOGICAL, scale: float = 25.0):
    """Save a tiny Llama that writes ``text`` (a random walk over its token bigrams) then EOS.

    Real weights in a real checkpoint, run by the real sampler: the attention and MLP outputs are
    zero, so the last hidden state is the current token's embedding, and the LM head maps each
    token of ``text`` to its successors in ``text`` (equal logits when it has several) and every
    other token (the prompt's) to the first token. Logits that lose are ``scale`` lower.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from synthtune.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("tiny-llama"))
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    assert tok.decode(ids[:-1]) == text
    chain = list(dict.fromkeys(ids[:-1]))
    assert tok.convert_tokens_to_ids(":") not in chain, "the chain must not continue the prompt's last token"
    d = 8 * ((len(chain) + 1) // 8 + 1)  # one direction per chain token plus one for the rest
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=d, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    emb = torch.zeros(len(tok), d)
    emb[:, 0] = 1.0  # every token outside the chain: direction 0
    for i, t in enumerate(chain):
        emb[t] = 0.0
        emb[t, i + 1] = 1.0
    head = torch.zeros(len(tok), d)
    # RMSNorm scales a unit basis vector to length sqrt(d); divide it back out of the logit
    unit = scale / d ** 0.5
    head[ids[0], 0] = unit
    for a, b in set(zip(ids[:-1], ids[1:], strict=True)):
        head[b, chain.index(a) + 1] = unit
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(emb)
        model.lm_head.weight.copy_(head)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def run_until_killed(out_dir: str, settings: dict, die_at_status_append: int) -> None:  # pragma: no cover - child
    """Run synthesis and ``kill -9`` this process while it writes its Nth batch's status lines.

    The batch's kept rows are on disk; its first status line is written up to the middle of its
    first multi-byte character (a process dying mid-write), then SIGKILL: no cleanup runs.
    """
    import signal
    import tempfile
    from pathlib import Path

    from synthtune.config import SynthConfig
    from synthtune.synth import pipeline

    real_append, calls = pipeline.append_jsonl, []

    def append(path, rows):
        if Path(path).name == pipeline.STATUS:
            calls.append(path)
            if len(calls) == die_at_status_append:
                with tempfile.TemporaryDirectory() as tmp:
                    real_append(Path(tmp) / "line.jsonl", rows[:1])
                    line = (Path(tmp) / "line.jsonl").read_bytes()
                cut = next(i for i, b in enumerate(line) if b >= 0x80) + 1  # inside a UTF-8 sequence
                with open(path, "ab") as fh:
                    fh.write(line[:cut])
                    fh.flush()
                    os.fsync(fh.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
        return real_append(path, rows)

    pipeline.append_jsonl = append
    pipeline.run_synthesis(SynthConfig(out=out_dir, **settings), progress=False, log=lambda m: None)
    raise SystemExit("finished without being killed")
