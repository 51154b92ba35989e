"""`synthtune infer`: answer prompts or a JSONL of questions with a model and its LoRA adapter.

Prompts are formatted the way training formatted them (``Question: ...\\nAnswer:`` or the chat
template), so an adapter sees at inference exactly the context it was trained on.
"""

from __future__ import annotations

from pathlib import Path

from synthtune.config import InferConfig
from synthtune.errors import ConfigError
from synthtune.formats import add_special_tokens, resolve_format, stop_strings, zero_shot_prompt


def infer_inputs(lm, rows: list[dict], fmt: str) -> tuple[list[str], bool, tuple[str, ...]]:
    """What the model is fed for ``rows``: the training prompt of each question, whether the
    tokenizer adds its special tokens, and the stop strings."""
    fmt = resolve_format(fmt, lm.tokenizer, lm.is_seq2seq)
    texts = [zero_shot_prompt(r["question"], lm.tokenizer, fmt=fmt, is_seq2seq=lm.is_seq2seq) for r in rows]
    return texts, add_special_tokens(fmt), stop_strings(fmt)


def infer(model: str, *, adapter: str | None = None, prompts: list[str] | None = None,
          input_path: str | None = None, out_path: str | None = None, k: int = 1, temperature: float = 0.7,
          max_new_tokens: int = 256, fmt: str = "plain", batch_size: int = 8, seed: int = 0,
          device: str | None = None, calculator: bool = False, sampler: str = "auto",
          progress: bool = True) -> list[dict]:
    """Rows ``{question, completions, answers}`` (plus the input row's fields), also written as JSONL."""
    from synthtune.data.answers import extract_answer
    from synthtune.data.gsm8k import read_rows
    from synthtune.data.jsonl import write_jsonl
    from synthtune.generation.base import SamplingParams
    from synthtune.generation.sampler import complete
    from synthtune.models import load_with_adapter

    if (prompts is None) == (input_path is None):
        raise ConfigError("give either --prompt TEXT (repeatable) or --input FILE.jsonl, not both or neither")
    if out_path and input_path and Path(out_path).resolve() == Path(input_path).resolve():
        raise ConfigError("--out is the --input file; pick another path so the input is kept")
    rows = [{"question": p} for p in prompts] if prompts is not None else \
        read_rows(input_path, required=("question",)).rows
    lm = load_with_adapter(model, adapter, device=device, seed=seed)
    texts, add_special, stop = infer_inputs(lm, rows, fmt)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature if k > 1 else 0.0,
                            num_samples=k, stop=stop, seed=seed, calculator=calculator)
    outs = complete(lm, texts, params, batch_size=batch_size, add_special_tokens=add_special,
                    progress=progress, desc="infer", sampler=sampler)
    results = [{**r, "completions": c, "answers": [extract_answer(t) for t in c], "model": lm.name}
               for r, c in zip(rows, outs, strict=True)]
    if out_path:
        write_jsonl(out_path, results)
    return results


def run(cfg: InferConfig, *, progress: bool = True) -> list[dict]:
    """`synthtune infer`'s entry point: :func:`infer` with the command's config."""
    return infer(cfg.model, adapter=cfg.adapter, prompts=cfg.prompt or None, input_path=cfg.input, out_path=cfg.out,
                 k=cfg.k, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, fmt=cfg.prompt_format,
                 batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device, calculator=cfg.calculator,
                 sampler=cfg.sampler, progress=progress)
