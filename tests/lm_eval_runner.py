"""Run lm-evaluation-harness's API models on the bundled GSM8K-format task against a served model.

    python tests/lm_eval_runner.py --url http://127.0.0.1:8000/v1 --model tiny-llama \
        --tokenizer "$(synthtune models prepare tiny-llama)" --limit 3 --out results.json

Both of lm-eval's OpenAI-compatible API models run in one process (lm-eval is imported once):
``local-completions`` with its defaults (token-id prompts, tokenized with ``--tokenizer``) and
``local-chat-completions`` with the chat template applied by the server; then a ``canned`` model
(no server) that answers each question in one of :data:`FORMS`, built on its gold, so that lm-eval's
whole gsm8k pipeline (stop sequences, filters, exact_match, mean) scores answers that do hold
numbers, which a random tiny model's rarely do. Run from the repository
root: the task (configs/lm_eval/gsm8k_sample.yaml) names its data relative to it. The key, if the
server has one, comes from ``OPENAI_API_KEY`` as lm-eval reads it. Writes per model the task's
metrics, every response with its gold and what each filter made of it, and (completions) the token
count of every prompt lm-eval sent.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TASK = "gsm8k_sample"
TASKS_DIR = Path(__file__).resolve().parents[1] / "configs" / "lm_eval"


# How models write a final answer; "{g}" is the gold number. lm-eval reads some as right, some not.
FORMS = ("6 * 7 = 42\n#### {g}", "####{g}", "#### ${g}", "#### **{g}**", "#### {g}.00", "The answer is $\\boxed{{{g}}}$.",
         "So the answer is {g}.", "#### {g}\n\nQuestion: Tom has 3 cats and 4 dogs. #### 7", "#### {g}.", "#### {g}</s>9",
         "{g} dollars<|im_end|> 12", "#### 1,{g}", "It costs $ {g}", "{g}/1")


def canned_lm():
    """An lm-eval model that writes each answer from :data:`FORMS` (by doc id) instead of generating."""
    from lm_eval.api.model import LM
    from lm_eval.models.utils import postprocess_generated_text

    class Canned(LM):
        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out = []
            for req in requests:
                gold = req.doc["answer"].rsplit("#### ", 1)[-1].strip()
                text = FORMS[req.doc_id % len(FORMS)].format(g=gold)
                # the task's stop sequences, cut as lm-eval's own HF model cuts its generations
                out.append(postprocess_generated_text(text, stop=req.args[1]["until"], think_end_token=None))
            return out

        def loglikelihood(self, requests):
            raise NotImplementedError("gsm8k only generates")

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError("gsm8k only generates")

    return Canned()


def run(model_type: str, model_args: dict, limit: int, chat: bool) -> dict:
    from lm_eval.api.registry import get_model

    return evaluate(get_model(model_type)(**model_args), limit, chat)


def evaluate(lm, limit: int | None, chat: bool) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=lm, tasks=[TASK], limit=limit, apply_chat_template=chat, log_samples=True,
                          task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))
    samples = [s for s in out["samples"][TASK] if s["filter"] == "strict-match"]  # one entry per doc and filter
    contexts = [s["arguments"][0][0] for s in samples]  # per request: (context, generation kwargs)
    per_filter = {name: sorted((s for s in out["samples"][TASK] if s["filter"] == name), key=lambda s: s["doc_id"])
                  for name in ("strict-match", "flexible-extract")}
    return {
        "metrics": {k: v for k, v in out["results"][TASK].items() if k.startswith("exact_match,")},
        "responses": [s["resps"][0][0] for s in samples],
        # per doc, in doc order: the gold text, and what each filter kept and whether it matched
        "scored": [{"response": s["resps"][0][0], "target": s["target"],
                    **{name: {"filtered": per_filter[name][i]["filtered_resps"][0],
                              "exact_match": per_filter[name][i]["exact_match"]} for name in per_filter}}
                   for i, s in enumerate(sorted(samples, key=lambda s: s["doc_id"]))],
        # what lm-eval sent as token ids: its own tokenization of each prompt
        "prompt_tokens": [len(lm.tok_encode(c)) for c in contexts] if hasattr(lm, "tok_encode") and not chat else [],
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
        "canned": evaluate(canned_lm(), None, chat=False),  # every test question of the sample
    }
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
