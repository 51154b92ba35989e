"""lm-evaluation-harness against `synthtune serve` (issue #16): its API models, on a tiny model and
the bundled GSM8K-format task (configs/lm_eval/gsm8k_sample.yaml).

``local-completions`` runs with its defaults, so its prompts are token ids tokenized with the tiny
model's saved tokenizer (serve answered those 400 before); ``local-chat-completions`` has the
server apply the chat template. Both run in one subprocess (tests/lm_eval_runner.py): lm-eval is
imported once, and its global seeding and logging stay out of the test process. Skips cleanly when
lm-eval is not installed.

    PYTHONPATH=$PWD python -m pytest tests/test_serve_lm_eval.py -q
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections import Counter
from importlib.util import find_spec
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from server_helpers import KEY_ENV, start_servers  # noqa: E402

from synthtune.synth.scoring import score_rows  # noqa: E402

# find_spec, not importorskip: importing lm-eval here would cost seconds the subprocess pays anyway
pytestmark = [pytest.mark.integration,  # spawns a server and an lm-eval process
              pytest.mark.skipif(find_spec("lm_eval") is None, reason="lm-eval is not installed")]

HERE = Path(__file__).resolve().parent
KEY = "sk-lm-eval-test-51d0"
LIMIT, MAX_GEN_TOKS = 3, 16
METRICS = ("exact_match,strict-match", "exact_match,flexible-extract")


def test_lm_eval_api_models_run_against_serve(tmp_path):
    from synthtune.models import resolve_model

    (server,) = start_servers([(tmp_path / "serve.log", ["--api-key-env", KEY_ENV])],
                              env={**os.environ, KEY_ENV: KEY})
    try:
        out = tmp_path / "results.json"
        env = {**os.environ, "OPENAI_API_KEY": KEY, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, str(HERE / "lm_eval_runner.py"), "--url", server.url, "--model", "tiny-llama",
               "--tokenizer", resolve_model("tiny-llama"), "--limit", str(LIMIT), "--max-gen-toks", str(MAX_GEN_TOKS),
               "--out", str(out)]
        proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        server.stop()
    results = json.loads(out.read_text())
    for name in ("local-completions", "local-chat-completions"):
        run = results[name]
        assert set(run["metrics"]) >= set(METRICS), run["metrics"]
        for key in METRICS:
            value = run["metrics"][key]
            assert isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0, (name, key, value)
        assert len(run["responses"]) == LIMIT and all(isinstance(r, str) for r in run["responses"])
    # lm-eval's own figures are ours, re-derived, on the same completions: per answer (what each filter
    # kept, whether exact_match took it) and summed up as `synthtune score` and `eval` report them. The
    # tiny model's answers hold no numbers; the canned model's 14 answer forms (lm_eval_runner.FORMS) do.
    canned = results["canned"]["scored"]
    assert len(canned) == 14
    for filt in ("strict-match", "flexible-extract"):  # both filters find right and wrong answers there
        assert {d[filt]["exact_match"] for d in canned} == {0.0, 1.0}, filt
    for name in ("local-completions", "local-chat-completions", "canned"):
        run = results[name]
        rows = [{"question": "q", "answer": d["target"], "completion": d["response"]} for d in run["scored"]]
        out_rows, summary = score_rows(rows)
        for row, doc in zip(out_rows, run["scored"], strict=True):
            for filt in ("strict-match", "flexible-extract"):
                assert row["lm_eval_filtered"][filt] == [doc[filt]["filtered"]], (name, filt, doc)
                assert row["lm_eval_correct"][filt] == [doc[filt]["exact_match"] == 1.0], (name, filt, doc)
        assert summary["lm_eval_strict_match"] == pytest.approx(run["metrics"]["exact_match,strict-match"], abs=1e-12)
        assert summary["lm_eval_flexible_extract"] == pytest.approx(run["metrics"]["exact_match,flexible-extract"],
                                                                    abs=1e-12)
    # and on those forms our by-value reading and lm-eval's string match differ, as documented
    assert summary["accuracy"] > summary["lm_eval_flexible_extract"] > summary["lm_eval_strict_match"] > 0
    # every request lm-eval sent was answered, and nothing was refused
    lines = server.logged(r'"POST /v1/', n=2 * LIMIT)
    assert len([x for x in lines if '"POST /v1/completions" 200' in x]) == LIMIT, lines
    assert len([x for x in lines if '"POST /v1/chat/completions" 200' in x]) == LIMIT, lines
    assert all('" 200 ' in x for x in lines), lines
    # local-completions sent token ids, used as they came: the server's prompt tokens are lm-eval's own
    logged = [re.search(r"tokens=(\d+)\+(\d+)", x) for x in lines if '"POST /v1/completions"' in x]
    assert Counter(int(m[1]) for m in logged) == Counter(results["local-completions"]["prompt_tokens"])
    assert all(int(m[2]) <= MAX_GEN_TOKS for m in logged)
