"""The real console script, run as a user runs it."""

import json
import os
import subprocess

import pytest
import typer.main

from synthtune import __version__
from synthtune.cli import app

pytestmark = pytest.mark.integration  # every test runs the installed synthtune CLI in a subprocess


def run(bin_, *args, check=True, **kw):
    proc = subprocess.run([bin_, *args], capture_output=True, text=True, timeout=600, **kw)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _command_paths(cmd, prefix=()):
    yield prefix
    if hasattr(cmd, "commands"):  # a group (typer may vendor its own click)
        for name, sub in cmd.commands.items():
            yield from _command_paths(sub, (*prefix, name))


def test_version(synthtune_bin):
    assert run(synthtune_bin, "--version").stdout.strip() == f"synthtune {__version__}"


@pytest.mark.parametrize("path", list(_command_paths(typer.main.get_command(app))), ids=" ".join)
def test_every_command_has_help(synthtune_bin, path):
    out = run(synthtune_bin, *path, "--help").stdout
    assert "Usage:" in out and len(out.splitlines()) > 3


def test_score_end_to_end(synthtune_bin, tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [
        {"question": "q1", "answer": "3*4=<<3*4=12>>12\n#### 12",
         "completions": ["3*4 = 12. The answer is 12.", "#### 13", "**Answer:** 12"]},
        {"question": "q2", "answer": 1500, "completion": "She pays $1,500.00 in total."},
        {"question": "q3", "answer": "#### 7", "completions": ["I cannot tell.", "It is 8", "8 apples."]},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    proc = run(synthtune_bin, "score", str(src), "--out", str(out), "--json")
    summary = json.loads(proc.stdout)
    assert summary["n_questions"] == 3 and summary["n_completions"] == 7
    assert summary["parse_rate"] == pytest.approx(6 / 7)
    assert summary["accuracy"] == pytest.approx(3 / 7)
    assert summary["maj_at_k"] == pytest.approx(2 / 3) and summary["pass_at_k"] == pytest.approx(2 / 3)
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert scored[0]["extracted"] == ["12", "13", "12"] and scored[0]["correct"] == [True, False, True]
    assert scored[0]["majority"] == "12" and scored[0]["majority_correct"] is True
    assert scored[1]["majority_correct"] is True
    assert scored[2]["extracted"] == [None, "8", "8"] and scored[2]["majority_correct"] is False


def test_score_bad_input_names_file_line_field(synthtune_bin, tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"question": "q", "answer": "1", "completions": ["1"]}) + "\n"
                   + json.dumps({"question": "q", "completions": ["1"]}) + "\n")
    out = tmp_path / "out.jsonl"
    out.write_text("keep me\n")
    proc = run(synthtune_bin, "score", str(src), "--out", str(out), check=False)
    assert proc.returncode == 2
    assert f"{src}:2" in proc.stderr and "answer" in proc.stderr and "Traceback" not in proc.stderr
    assert out.read_text() == "keep me\n", "a failed run must not touch existing output"
    lenient = json.loads(run(synthtune_bin, "score", str(src), "--out", str(out), "--lenient", "--json").stdout)
    assert lenient["n_questions"] == 1 and lenient["n_skipped"] == 1
    same = run(synthtune_bin, "score", str(src), "--out", str(src), check=False)
    assert same.returncode != 0 and len(src.read_text().splitlines()) == 2


def test_data_check(synthtune_bin, tmp_path):
    from synthtune import paths

    ok = json.loads(run(synthtune_bin, "data", "check", str(paths.BUNDLED_GSM8K_DIR / "train.jsonl"),
                        "--json").stdout)
    assert ok["n_rows"] >= 30 and ok["calc_fraction"] == 1.0 and ok["n_problems"] == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "2*3 = <<2*3=7>>7 eggs\n#### 7"}) + "\n"
                   + json.dumps({"question": "q2", "answer": "no final line"}) + "\n")
    proc = run(synthtune_bin, "data", "check", str(bad))
    rep = json.loads(proc.stdout)
    assert rep["calc_checked"] >= 1 and rep["calc_correct"] == 0 and rep["n_without_final_answer"] == 1
    assert f"{bad}:1" in proc.stderr and f"{bad}:2" in proc.stderr


def test_models_info_and_prepare(synthtune_bin, tmp_path):
    # A fresh cache: the model is built (and saved) inside the command, and whatever the
    # libraries print while saving (DeepSpeed logs to stdout) must not corrupt the JSON.
    env = {**os.environ, "SYNTHTUNE_CACHE_DIR": str(tmp_path)}
    info = json.loads(run(synthtune_bin, "models", "info", "tiny-llama", env=env).stdout)
    assert info["kind"] == "causal" and info["params"] > 0
    path = run(synthtune_bin, "models", "prepare", "tiny-t5", env=env).stdout.strip()
    assert path == str(tmp_path / "models" / "tiny-t5-seed0-v1")
    missing = run(synthtune_bin, "models", "info", "./no/such/dir", check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_demo_cli_runs_every_stage_on_tiny_model(synthtune_bin, tmp_path):
    out = tmp_path / "demo"
    proc = run(synthtune_bin, "demo", "model=tiny-llama", "synth_questions=2", "k=2", "synth_max_new_tokens=8",
               "train_steps=3", "eval_questions=3", "eval_max_new_tokens=8", "--output-dir", str(out))
    summary = json.loads(proc.stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    assert list(summary["seconds"]) == ["synthesize", "sft set", "preprocess", "fine-tune", "evaluate"]
    # stage 1 sampled k per question; stage 2 holds every bundled train gold rationale plus what was kept
    status = [json.loads(line) for line in (out / "synth" / "status.jsonl").read_text().splitlines()]
    assert len(status) == 2 and all(r["k"] == 2 for r in status)
    sft = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    assert summary["sft"]["gold"] == 36 and len(sft) == summary["sft"]["n"] == 36 + summary["sft"]["synthesized"]
    assert summary["prep"]["n"] == len(sft) and (out / "prep" / "length_hist.png").exists()
    train = json.loads((out / "train" / "summary.json").read_text())
    assert train["steps"] == 3 and train["memory"]["png"] and (out / "train" / "loss.png").exists()
    assert (out / "train" / "final" / "adapter_model.safetensors").exists()
    for label in ("base", "adapter"):
        rows = (out / "eval" / f"{label}_outputs.jsonl").read_text().splitlines()
        assert len(rows) == 3
    report = (out / "report.md").read_text()
    for heading in ("## 5. Base vs tuned", "## 1. Synthesize", "## 3. Preprocess", "## 4. Fine-tune", "## Repeat it"):
        assert heading in report
    for image in ("prep/length_hist.png", "train/memory_trace.png", "train/loss.png", "eval/base_vs_tuned.png"):
        assert f"]({image})" in report and (out / image).exists()
    assert "synthtune train --config configs/train/smollm2_lora_cpu.yaml model=tiny-llama" in report
    bad = run(synthtune_bin, "demo", "train_stepz=2", check=False)
    assert bad.returncode == 2 and "Did you mean 'train_steps'" in bad.stderr


def test_demo_with_nothing_to_train_on_says_which_key(synthtune_bin, tmp_path):
    proc = run(synthtune_bin, "demo", "model=tiny-llama", "synth_questions=1", "k=1", "synth_max_new_tokens=4",
               "gold_rationales=false", "--output-dir", str(tmp_path / "d"), check=False)
    assert proc.returncode == 2 and "gold_rationales" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "d" / "synth" / "status.jsonl").exists()  # what ran before the error is kept
