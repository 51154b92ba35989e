"""Run lm-evaluation-harness's API models on the bundled GSM8K-format task against a served model.

    python tests/lm_eval_runner.py --url http://127.0.0.1:8000/v1 --model tiny-llama \
        --tokenizer "$(synthtune models prepare tiny-llama)" --limit 3 --out results.json

Both of lm-eval's OpenAI-compatible API models run in one process (lm-eval is imported once):
``local-completions`` with its defaults (token-id prompts, tokenized with ``--tokenizer``) and
``local-chat-completions`` with the chat template applied by the server. Run from the repository
root: the task (configs/lm_eval/gsm8k_sample.yaml) names its data relative to it. The key, if the
server has one, comes from ``OPENAI_API_KEY`` as lm-eval reads it. Writes per model the task's
metrics, every response, and (completions) the token count of every prompt lm-eval sent.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TASK = "gsm8k_sample"
TASKS_DIR = Path(__file__).resolve().parents[1] / "configs" / "lm_eval"


def run(model_type: str, model_args: dict, limit: int, chat: bool) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    lm = get_model(model_type)(**model_args)
    out = simple_evaluate(model=lm, tasks=[TASK], limit=limit, apply_chat_template=chat, log_samples=True,
                          task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))
    samples = [s for s in out["samples"][TASK] if s["filter"] == "strict-match"]  # one entry per doc and filter
    contexts = [s["arguments"][0][0] for s in samples]  # per request: (context, generation kwargs)
    return {
        "metrics": {k: v for k, v in out["results"][TASK].items() if k.startswith("exact_match,")},
        "responses": [s["resps"][0][0] for s in samples],
        # what lm-eval sent as token ids: its own tokenization of each prompt
        "prompt_tokens": [] if chat else [len(lm.tok_encode(c)) for c in contexts],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="the server's /v1 base URL")
    ap.add_argument("--model", required=True, help="the served model's name")
    ap.add_argument("--tokenizer", required=True, help="tokenizer dir or id for local-completions' token ids")
    ap.add_argument("--limit", type=int, default=3)
    ap.add_argument("--max-gen-toks", type=int, default=16)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    common = {"model": args.model, "max_gen_toks": args.max_gen_toks, "max_retries": 1}
    results = {
        "local-completions": run("local-completions", {**common, "base_url": f"{args.url}/completions",
                                                       "tokenizer": args.tokenizer}, args.limit, chat=False),
        "local-chat-completions": run("local-chat-completions", {**common, "base_url": f"{args.url}/chat/completions"},
                                      args.limit, chat=True),
    }
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
