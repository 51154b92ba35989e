import json
import subprocess
from pathlib import Path

import pytest
import torch

from synthtune.config import TrainConfig, load_config
from synthtune.data.lmeval_gsm8k import lm_eval_score
from synthtune.errors import MergeMismatch
from synthtune.jobs.merge import merge_adapter
from synthtune.train.loop import train


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter")
    smoke = Path(__file__).resolve().parents[1] / "configs" / "train" / "smoke.yaml"
    cfg = load_config(TrainConfig, smoke,
                      [f"output_dir={out}", "max_steps=4", "save_steps=0", "eval_steps=0", "eval_data=null",
                       "trace_memory=false", "log_with=none", "learning_rate=0.02"])
    train(cfg, progress=False)
    return out / "final"


@pytest.mark.integration  # trains an adapter (module fixture), runs the CLI
def test_eval_compare_through_cli(synthtune_bin, adapter, tmp_path):
    out = tmp_path / "eval"
    proc = subprocess.run([synthtune_bin, "eval", "--model", "tiny-llama", "--adapter", str(adapter), "--compare",
                           "--limit", "3", "--out", str(out), "--json", "max_new_tokens=8"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["n_questions"] == 3 and set(report) >= {"base", "adapter"}
    for label in ("base", "adapter"):
        s = report[label]
        assert s["n_questions"] == 3 and 0 <= s["strict_accuracy"] <= s["flexible_accuracy"] + 1e-9
        rows = [json.loads(line) for line in (out / f"{label}_outputs.jsonl").read_text().splitlines()]
        assert len(rows) == 3 and all({"extracted", "correct", "majority_correct"} <= set(r) for r in rows)
        # lm-eval's figures on the same completions, beside ours, and the per-answer filter results
        lm = [lm_eval_score(c, r["answer"]) for r in rows for c in r["completions"]]
        assert [x for r in rows for x in r["lm_eval_filtered"]["strict-match"]] == [x.strict for x in lm]
        assert s["lm_eval_strict_match"] == sum(x.strict_correct for x in lm) / len(lm)
        assert s["lm_eval_flexible_extract"] == sum(x.flexible_correct for x in lm) / len(lm)
    assert report["adapter"]["model"].endswith("+final")
    assert json.loads((out / "eval_summary.json").read_text())["n_questions"] == 3


def test_comparison_table_names_ours_and_lm_evals_figures():
    from rich.console import Console

    from synthtune.jobs.eval import comparison_table

    side = {"model": "m", "strict_accuracy": 0.75, "flexible_accuracy": 1.0, "lm_eval_strict_match": 0.25,
            "lm_eval_flexible_extract": 0.5}
    console = Console(record=True, width=200)
    console.print(comparison_table({"split": "test", "n_questions": 4, "base": side}))
    lines = console.export_text().splitlines()
    for name, value in [("strict_accuracy", "0.750"), ("lm_eval_strict_match", "0.250"),
                        ("lm_eval_flexible_extract", "0.500")]:
        assert any(name in line and value in line for line in lines), (name, lines)


@pytest.mark.integration  # trains an adapter (module fixture)
def test_compare_on_one_base_copy_equals_separate_runs(adapter, tmp_path):
    # --compare evaluates the base, then wraps the same weights with the adapter: each side's answers
    # must be exactly those of a run that loads only that side
    from synthtune.config import EvalConfig
    from synthtune.jobs.eval import run_eval

    common = dict(model="tiny-llama", limit=3, max_new_tokens=8)
    run_eval(EvalConfig(**common, adapter=str(adapter), compare=True, out=str(tmp_path / "both")), progress=False)
    run_eval(EvalConfig(**common, out=str(tmp_path / "base")), progress=False)
    run_eval(EvalConfig(**common, adapter=str(adapter), out=str(tmp_path / "tuned")), progress=False)

    def answers(path):
        return [json.loads(line)["completions"] for line in path.read_text().splitlines()]

    assert answers(tmp_path / "both" / "base_outputs.jsonl") == answers(tmp_path / "base" / "base_outputs.jsonl")
    tuned = answers(tmp_path / "tuned" / "adapter_outputs.jsonl")
    assert answers(tmp_path / "both" / "adapter_outputs.jsonl") == tuned
    assert tuned != answers(tmp_path / "base" / "base_outputs.jsonl"), "the adapter must change the answers"


def test_eval_few_shot_and_sampling(tmp_path):
    from synthtune.config import EvalConfig
    from synthtune.jobs.eval import run_eval

    rep = run_eval(EvalConfig(model="tiny-llama", limit=2, shots=8, k=3, max_new_tokens=6, out=str(tmp_path)),
                   progress=False)
    s = rep["base"]
    assert s["k"] == 3 and s["n_completions"] == 6 and "maj_at_k" in s and "pass_at_k" in s


def test_eval_and_infer_take_the_sampler_option(tmp_path, monkeypatch):
    # greedy k=2: HF's batched generate (auto's pick on a GPU) answers what the shared-prefill sampler does,
    # and sampler=generate really reaches sample_k (its shared-prefill path is made to fail)
    import synthtune.generation.sampler as sampler_module
    from synthtune.config import EvalConfig
    from synthtune.jobs.eval import run_eval
    from synthtune.jobs.infer import infer

    def run(sampler: str):
        run_eval(EvalConfig(model="tiny-llama", limit=2, k=2, temperature=0.0, max_new_tokens=6, sampler=sampler,
                            out=str(tmp_path / sampler)), progress=False)
        rows = [json.loads(line) for line in (tmp_path / sampler / "base_outputs.jsonl").read_text().splitlines()]
        return ([r["completions"] for r in rows],
                [r["completions"] for r in infer("tiny-llama", prompts=["2+2?", "3+3?"], k=2, temperature=0.0,
                                                 max_new_tokens=6, sampler=sampler, progress=False)])

    shared = run("shared_prefix")

    def refuse(*args, **kwargs):
        raise AssertionError("the shared-prefill path ran")

    monkeypatch.setattr(sampler_module, "_sample_batch_shared", refuse)
    assert run("generate") == shared
    assert all(len(outs) == 2 and all(len(c) == 2 for c in outs) for outs in shared)
    with pytest.raises(AssertionError, match="shared-prefill path ran"):
        run("shared_prefix")
    with pytest.raises(ValueError, match="sampler must be one of"):
        infer("tiny-llama", prompts=["2+2?"], sampler="fastest", progress=False)


def test_eval_compare_needs_adapter():
    from synthtune.config import EvalConfig
    from synthtune.errors import ConfigError
    from synthtune.jobs.eval import run_eval

    with pytest.raises(ConfigError, match="compare"):
        run_eval(EvalConfig(model="tiny-llama", compare=True))


@pytest.mark.integration  # trains an adapter (module fixture)
def test_merge_matches_adapter_and_reloads(adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from synthtune.models import resolve_model

    rep = merge_adapter("tiny-llama", str(adapter), tmp_path / "merged")
    assert rep["max_abs_diff_merged"] <= 1e-4 and rep["max_abs_diff_reloaded"] <= 1e-4
    assert "model.safetensors" in rep["files"] and "tokenizer.json" in rep["files"]
    # built in a private temp dir, published with the umask's mode: other accounts (a vLLM server) can read it
    from synthtune.files import current_umask

    assert (tmp_path / "merged").stat().st_mode & 0o777 == 0o777 & ~current_umask()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama")),
                                             str(adapter)).eval()
    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama")).eval()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, with_adapter(ids).logits, atol=1e-5)
        assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-5)


@pytest.mark.integration  # trains an adapter (module fixture)
def test_merge_fails_loudly_and_saves_nothing(adapter, tmp_path):
    from synthtune.errors import ConfigError

    with pytest.raises(MergeMismatch, match="nothing saved"):
        merge_adapter("tiny-llama", str(adapter), tmp_path / "strict", atol=0.0, rtol=0.0)
    assert not (tmp_path / "strict").exists() and not (tmp_path / "strict.tmp").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        merge_adapter("tiny-llama", str(adapter), tmp_path / "full")
    with pytest.raises(ConfigError, match="adapter_config.json"):
        merge_adapter("tiny-llama", str(tmp_path), tmp_path / "x")


@pytest.mark.integration  # trains an adapter (module fixture)
def test_the_default_tolerance_still_refuses_a_real_mismatch(adapter, tmp_path):
    # fp32 rounding passes (the test above); a bf16 merge, whose saved weights reload 1e-3 to 1e-2 off
    # (relative), does not: the relative part of the tolerance is 1e-5
    with pytest.raises(MergeMismatch, match="nothing saved"):
        merge_adapter("tiny-llama", str(adapter), tmp_path / "bf16", dtype="bf16")
    assert not (tmp_path / "bf16").exists()


@pytest.mark.integration  # trains an adapter (module fixture), runs the CLI
def test_infer_cli_jsonl_in_and_out(synthtune_bin, adapter, tmp_path):
    src = tmp_path / "q.jsonl"
    src.write_text(json.dumps({"question": "What is 2+2?", "id": 7}) + "\n" + json.dumps({"question": "3+3?"}) + "\n")
    out = tmp_path / "answers.jsonl"
    proc = subprocess.run([synthtune_bin, "infer", "--model", "tiny-llama", "--adapter", str(adapter), "--input",
                           str(src), "--out", str(out), "--k", "2", "--max-new-tokens", "5", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    printed = [json.loads(line) for line in proc.stdout.splitlines()]
    saved = [json.loads(line) for line in out.read_text().splitlines()]
    assert printed == saved and len(saved) == 2 and saved[0]["id"] == 7
    assert all(len(r["completions"]) == 2 and len(r["answers"]) == 2 for r in saved)
    bad = subprocess.run([synthtune_bin, "infer", "--model", "tiny-llama", "--input", str(src), "--out", str(src)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "input" in bad.stderr and len(src.read_text().splitlines()) == 2
