"""The real console script, run as a user runs it."""

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import typer.main
import typer.rich_utils
from typer.testing import CliRunner

from synthtune import __version__, config
from synthtune.cli import app, main
from synthtune.cli_options import CONFIG, JSON, OVERRIDES, parse_argv
from synthtune.config import (
    CheckVllmConfig,
    DataCheckConfig,
    DemoConfig,
    EnvConfig,
    EvalConfig,
    InferConfig,
    MemoryConfig,
    MergeConfig,
    ModelsInfoConfig,
    ModelsPrepareConfig,
    PrepConfig,
    ScoreConfig,
    ServeConfig,
    SynthConfig,
    TrainConfig,
    field_help,
    flag_of,
)
from synthtune.errors import ConfigError

GROUP = typer.main.get_command(app)

# Tests that run the installed console script (the synthtune_bin fixture) are integration tests:
# conftest marks them. The option-building and parsing tests below run in-process, in test-fast.


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
    # rationalization is on in the demo: a random model solves nothing, so both questions were asked
    # again with their answer as a hint, k each; the funnel reports both routes
    assert all(r["rationalization"]["stages"]["sampled"] == 2 for r in status)
    assert set(summary["synth"]["kept_by_route"]) == {"direct", "rationalized"}
    report = (out / "report.md").read_text()
    assert "| stage | direct samples | rationales (answer as hint) | meaning |" in report
    # and the tuned model once more with calculator-assisted decoding, as `synthtune eval calculator=true`
    assert "| metric | base | tuned | tuned + calculator |" in report and "adapter_calculator" in summary["eval"]
    assert len((out / "eval_calculator" / "adapter_outputs.jsonl").read_text().splitlines()) == 3
    assert json.loads((out / "eval_calculator" / "eval_summary.json").read_text())["adapter"]["calculator"] is True
    for heading in ("## 5. Base vs tuned", "## 1. Synthesize", "## 3. Preprocess", "## 4. Fine-tune", "## Repeat it"):
        assert heading in report
    for image in ("prep/length_hist.png", "train/memory_trace.png", "train/loss.png", "eval/base_vs_tuned.png"):
        assert f"]({image})" in report and (out / image).exists()
    assert "synthtune train --config configs/train/smollm2_lora_cpu.yaml model=tiny-llama" in report
    # ours and lm-eval's figures side by side, each under its own name
    assert "| lm-eval's gsm8k strict-match (its string match) |" in report
    assert {"strict_accuracy", "lm_eval_strict_match", "lm_eval_flexible_extract"} <= set(summary["eval"]["adapter"])
    bad = run(synthtune_bin, "demo", "train_stepz=2", check=False)
    assert bad.returncode == 2 and "Did you mean 'train_steps'" in bad.stderr


def test_demo_with_nothing_to_train_on_says_which_key(synthtune_bin, tmp_path):
    proc = run(synthtune_bin, "demo", "model=tiny-llama", "synth_questions=1", "k=1", "synth_max_new_tokens=4",
               "gold_rationales=false", "--output-dir", str(tmp_path / "d"), check=False)
    assert proc.returncode == 2 and "gold_rationales" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "d" / "synth" / "status.jsonl").exists()  # what ran before the error is kept


# ------------------------------------------------------------------ options come from the config dataclasses


def _leaf_commands(cmd=GROUP, prefix=()):
    if hasattr(cmd, "commands"):
        for name, sub in cmd.commands.items():
            yield from _leaf_commands(sub, (*prefix, name))
    else:
        yield prefix, cmd


LEAVES = dict(_leaf_commands())


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_every_command_has_a_config_class():
    assert {path: cmd.callback.config_class for path, cmd in LEAVES.items()} == {
        ("demo",): DemoConfig, ("synth",): SynthConfig, ("serve",): ServeConfig, ("train",): TrainConfig,
        ("prep",): PrepConfig, ("memory",): MemoryConfig, ("infer",): InferConfig, ("eval",): EvalConfig,
        ("merge",): MergeConfig, ("check-vllm",): CheckVllmConfig, ("score",): ScoreConfig,
        ("data", "check"): DataCheckConfig,
        ("models", "prepare"): ModelsPrepareConfig, ("models", "info"): ModelsInfoConfig,
        ("env",): EnvConfig}


@pytest.mark.parametrize("path", sorted(LEAVES), ids=" ".join)
def test_help_shows_every_field_once_with_exactly_its_dataclass_help(path, monkeypatch):
    """One source for the help text: each field's ``opt(help=...)``, and no option that is not a field."""
    cmd = LEAVES[path]
    cls = cmd.callback.config_class
    # the other parameters are the generic ones every command shares
    assert {p.name for p in cmd.params} - {f.name for f in fields(cls)} <= {CONFIG, OVERRIDES, JSON}
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 4000)  # one row per option: no wrapping
    out = CliRunner().invoke(app, [*path, "--help"]).output
    rows = [line.strip("│ ").split() for line in out.splitlines() if line.startswith("│")]
    for f in fields(cls):
        flag = flag_of(f)
        mine = [" ".join(r) for r in rows if r and r[0] == flag]
        assert len(mine) == 1, f"{flag} ({f.name}) is listed {len(mine)} times in {' '.join(path)} --help"
        assert field_help(cls)[f.name] and _flat(field_help(cls)[f.name]) in _flat(mine[0]), (f.name, mine[0])


@pytest.mark.parametrize("cls", sorted({c.callback.config_class for c in LEAVES.values()}, key=lambda c: c.__name__),
                         ids=lambda c: c.__name__)
def test_no_field_takes_a_name_the_command_line_or_load_config_uses(cls):
    assert not {f.name for f in fields(cls)} & {CONFIG, OVERRIDES, JSON, "ctx", "option_names"}


def test_memory_config_mirrors_the_estimators_setup():
    from synthtune.memory.estimate import ATTNS, METHODS, OFFLOADS, OPTIMIZERS, PRECISIONS, Setup

    mine = {f.name: f for f in fields(MemoryConfig)}
    assert {f.name for f in fields(Setup)} <= set(mine)
    for name, allowed in (("method", METHODS), ("precision", PRECISIONS), ("optimizer", OPTIMIZERS),
                          ("offload", OFFLOADS), ("attn", ATTNS)):
        assert mine[name].metadata["choices"] == allowed
    same_default = {f.name for f in fields(Setup)} - {"batch_size"}  # the command's micro-batch is 8
    assert all(getattr(MemoryConfig(), n) == getattr(Setup(), n) for n in same_default)


# ------------------------------------------------------------------ precedence


def test_precedence_defaults_yaml_overrides_options(tmp_path):
    p = tmp_path / "synth.yaml"
    p.write_text("k: 3\nrounds: 5\nshots: 1\nendpoints: [http://a/v1]\n")
    assert parse_argv(GROUP, ["synth"])[0].k == SynthConfig().k == 8
    from_file = parse_argv(GROUP, ["synth", "--config", str(p)])[0]
    assert (from_file.k, from_file.rounds, from_file.endpoints) == (3, 5, ["http://a/v1"])
    cfg = parse_argv(GROUP, ["synth", "--config", str(p), "k=4", "rounds=6"])[0]
    assert (cfg.k, cfg.rounds, cfg.shots) == (4, 6, 1)
    # an option given on the command line wins over both, wherever it stands
    cfg = parse_argv(GROUP, ["synth", "--k", "5", "--config", str(p), "k=4", "--endpoint", "http://b/v1"])[0]
    assert (cfg.k, cfg.rounds, cfg.shots, cfg.endpoints) == (5, 5, 1, ["http://b/v1"])
    # a flag left out keeps what the file says, also for booleans (no default overrides the file)
    p.write_text("use_gold: false\n")
    assert parse_argv(GROUP, ["synth", "--config", str(p)])[0].use_gold is False
    assert parse_argv(GROUP, ["synth", "--config", str(p), "--use-gold"])[0].use_gold is True
    assert parse_argv(GROUP, ["synth", "use_gold=true", "--no-use-gold"])[0].use_gold is False


def test_every_command_takes_config_and_overrides(tmp_path):
    p = tmp_path / "score.yaml"
    p.write_text("out: from_file.jsonl\nlenient: true\n")
    assert parse_argv(GROUP, ["score", "in.jsonl", "--config", str(p)])[0] == \
        ScoreConfig(input="in.jsonl", out="from_file.jsonl", lenient=True)
    assert parse_argv(GROUP, ["score", "--config", str(p), "input=x.jsonl", "lenient=false"])[0] == \
        ScoreConfig(input="x.jsonl", out="from_file.jsonl", lenient=False)
    p.write_text("model: tiny-llama\nport: 0\nmax_request_tokens: 5000\nadapters: [math=run/final]\n")
    assert parse_argv(GROUP, ["serve", "--config", str(p), "--port", "9000"])[0] == ServeConfig(
        model="tiny-llama", port=9000, max_request_tokens=5000, adapters=["math=run/final"])


# ------------------------------------------------------------------ errors: one line naming the field, exit 2


def _main_error(monkeypatch, capsys, *argv) -> str:
    monkeypatch.setattr(sys, "argv", ["synthtune", *argv])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.mark.parametrize("argv, expected", [
    (("synth", "--k", "0"), "error: option --k: k=0 is out of range: k must be an integer >= 1"),
    (("synth", "k=0"), "error: override 'k=0': k=0 is out of range: k must be an integer >= 1"),
    (("serve", "--port", "70000"), "option --port: port=70000 is out of range: port must be an integer in [0, 65535]"),
    (("memory", "--headroom", "1"), "option --headroom: headroom=1.0 is out of range: headroom must be a finite "
                                    "number in [0, 1)"),
    (("memory", "--zero-stage", "4"), "zero_stage must be an integer in [0, 3]"),
    (("infer", "--model", "m", "--format", "html"), "option --format: prompt_format must be one of plain, chat, "
                                                    "auto, got 'html'"),
    (("prep", "--model", "m", "--data", "d", "--max-length", "01"), "option --max-length: max_length: got '01': a "
                                                                   "leading zero is ambiguous"),
    (("eval", "--limit", "x"), "option --limit: limit: expected an integer"),
    (("data", "check"), "file is required (JSONL with question and answer fields (GSM8K format)): give FILE.jsonl"),
    (("merge", "--model", "m"), "adapter is required"),
    (("models", "info", "tiny-llama", "trust_remote_codes=true"), "Did you mean 'trust_remote_code'?"),
])
def test_a_bad_value_names_the_field_and_what_is_allowed(monkeypatch, capsys, argv, expected):
    assert expected in _main_error(monkeypatch, capsys, *argv)


def test_missing_config_file_is_one_line(monkeypatch, capsys, tmp_path):
    assert f"config file {tmp_path / 'no.yaml'} does not exist" in _main_error(
        monkeypatch, capsys, "score", "in.jsonl", "--out", "o", "--config", str(tmp_path / "no.yaml"))


# ------------------------------------------------------------------ the documented spellings still parse


SPELLINGS = [
    (["synth", "--model", "M", "--questions", "SRC", "--exemplars", "EX", "--k", "8", "--rounds", "2", "--out", "DIR",
      "--backend", "openai", "--endpoint", "http://h1:8000/v1", "--endpoint", "http://h2:8000/v1", "--served-model",
      "NAME", "--api-key-env", "VAR", "--concurrency", "16", "--limit", "10", "--allow-changed-settings", "--json"],
     SynthConfig(model="M", questions="SRC", exemplars="EX", k=8, rounds=2, out="DIR", backend="openai",
                 endpoints=["http://h1:8000/v1", "http://h2:8000/v1"], served_model="NAME", api_key_env="VAR",
                 concurrency=16, limit=10, allow_changed_settings=True), True),
    (["synth", "--model", "tiny-llama", "--questions", "bundled:test", "--k", "2", "--rounds", "1", "--limit", "3",
      "--out", "o", "--json", "max_new_tokens=12", "shots=2"],
     SynthConfig(model="tiny-llama", questions="bundled:test", k=2, rounds=1, limit=3, out="o", max_new_tokens=12,
                 shots=2), True),
    (["prep", "--model", "M", "--data", "SRC", "--format", "auto", "--max-length", "400", "--out", "DIR"],
     PrepConfig(model="M", data="SRC", prompt_format="auto", max_length=400, out="DIR"), False),
    (["prep", "--model", "M", "--data", "SRC", "--format", "chat", "--max-target-length", "64", "--truncation",
      "truncate", "--limit", "5", "--json"],
     PrepConfig(model="M", data="SRC", prompt_format="chat", max_target_length=64, truncation="truncate", limit=5),
     True),
    (["infer", "--model", "M", "--adapter", "DIR", "--prompt", "Ann has 3 apples, and 4 more?", "--prompt", "2+2?",
      "--format", "plain", "--json"],
     InferConfig(model="M", adapter="DIR", prompt=["Ann has 3 apples, and 4 more?", "2+2?"], prompt_format="plain"),
     True),
    (["infer", "--model", "M", "--adapter", "DIR", "--input", "q.jsonl", "--out", "a.jsonl", "--k", "4",
      "--max-new-tokens", "5"],
     InferConfig(model="M", adapter="DIR", input="q.jsonl", out="a.jsonl", k=4, max_new_tokens=5), False),
    (["memory", "--model", "M", "--method", "lora", "--fit", "--gpu-gib", "40", "--gpus", "4", "--grad-ckpt", "--json"],
     MemoryConfig(model="M", method="lora", fit=True, gpu_gib=40.0, gpus=4, grad_ckpt=True), True),
    (["memory", "--model", "M", "--method", "lora", "--lora-r", "16", "--lora-targets", "all-linear", "--batch-size",
      "2", "--seq-len", "256", "--target-len", "64", "--zero-stage", "3", "--offload", "optimizer", "--no-grad-ckpt",
      "--precision", "bf16", "--optimizer", "adamw-8bit", "--nodes", "2", "--attn", "eager", "--lora-dropout", "0.1",
      "--persistence-threshold", "0", "--headroom", "0.2", "--cpu-gib", "512", "--global-batch", "256",
      "--train-config", "configs/train/flan_ul2_lora.yaml"],
     MemoryConfig(model="M", method="lora", lora_r=16, lora_targets="all-linear", batch_size=2, seq_len=256,
                  target_len=64, zero_stage=3, offload="optimizer", grad_ckpt=False, precision="bf16",
                  optimizer="adamw-8bit", nodes=2, attn="eager", lora_dropout=0.1, persistence_threshold=0,
                  headroom=0.2, cpu_gib=512.0, global_batch=256, train_config="configs/train/flan_ul2_lora.yaml"),
     False),
    (["serve", "--model", "M", "--adapter", "math=DIR", "--adapter", "DIR2", "--host", "0.0.0.0", "--port", "0",
      "--threads", "1", "--api-key-env", "VAR", "--served-model-name", "base", "--max-batch", "8",
      "--batch-window-ms", "2.5", "--device", "cpu", "--seed", "3", "--max-request-tokens", "5000",
      "--max-inflight-tokens", "6000", "--max-connections", "4", "--read-timeout", "2", "--context-length", "256"],
     ServeConfig(model="M", adapters=["math=DIR", "DIR2"], host="0.0.0.0", port=0, threads=1, api_key_env="VAR",
                 served_model_name="base", max_batch=8, batch_window_ms=2.5, device="cpu", seed=3,
                 max_request_tokens=5000, max_inflight_tokens=6000, max_connections=4, read_timeout=2.0,
                 context_length=256), False),
    (["eval", "--model", "M", "--adapter", "DIR", "--compare", "--limit", "100", "--split", "train", "--shots", "8",
      "--k", "4", "--seed", "1", "--out", "o", "--json", "max_new_tokens=8"],
     EvalConfig(model="M", adapter="DIR", compare=True, limit=100, split="train", shots=8, k=4, seed=1, out="o",
                max_new_tokens=8), True),
    (["merge", "--model", "M", "--adapter", "DIR", "--out", "merged", "--atol", "0.001"],
     MergeConfig(model="M", adapter="DIR", out="merged", atol=0.001), False),
    (["score", "IN.jsonl", "--out", "OUT.jsonl", "--json", "--lenient"],
     ScoreConfig(input="IN.jsonl", out="OUT.jsonl", lenient=True), True),
    (["data", "check", "FILE.jsonl", "--lenient"], DataCheckConfig(file="FILE.jsonl", lenient=True), False),
    (["models", "prepare", "tiny-t5", "--seed", "2"], ModelsPrepareConfig(name="tiny-t5", seed=2), False),
    (["models", "info", "NAME"], ModelsInfoConfig(name="NAME"), False),
    (["demo", "model=tiny-llama", "train_steps=3", "--output-dir", "d"],
     DemoConfig(model="tiny-llama", train_steps=3, output_dir="d"), False),
    (["train", "--config", "configs/train/smoke.yaml", "max_steps=2", "--json"],
     config.load_config(TrainConfig, "configs/train/smoke.yaml", ["max_steps=2"]), True),
]


@pytest.mark.parametrize("argv", [["memory", "--model", "M"], ["models", "info", "NAME"]], ids=lambda a: a[0])
def test_remote_code_runs_only_when_the_user_asks(argv):
    # a model repo's own Python code is off by default; only the explicit flag turns it on
    assert parse_argv(GROUP, argv)[0].trust_remote_code is False
    assert parse_argv(GROUP, [*argv, "--trust-remote-code"])[0].trust_remote_code is True
    assert parse_argv(GROUP, [*argv, "--no-trust-remote-code"])[0].trust_remote_code is False


@pytest.mark.parametrize("argv, expected, json_only", SPELLINGS, ids=lambda v: " ".join(v[:1]) if isinstance(v, list)
                         else None)
def test_documented_spellings_parse_to_the_same_config(argv, expected, json_only, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # configs/ paths as the docs write them
    assert parse_argv(GROUP, argv) == (expected, json_only)


def test_a_required_field_can_come_from_the_config_file(tmp_path):
    p = tmp_path / "merge.yaml"
    p.write_text("model: M\nadapter: run/final\nout: merged\n")
    assert parse_argv(GROUP, ["merge", "--config", str(p)])[0] == MergeConfig(model="M", adapter="run/final",
                                                                              out="merged")
    with pytest.raises(ConfigError, match="out is required"):
        parse_argv(GROUP, ["merge", "model=M", "adapter=A"])


# ------------------------------------------------------------------ layering: the library never imports the CLI




def test_the_launch_script_loads_without_typer_or_rich():
    # every rank of `accelerate launch fine_tune/train.py` imports it; the CLI's libraries stay out
    code = ("import importlib.util, sys\n"
            "spec = importlib.util.spec_from_file_location('train_script', 'fine_tune/train.py')\n"
            "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            "print(sorted(m for m in ('typer', 'rich', 'synthtune.cli', 'synthtune.jobs') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_a_positional_argument_may_follow_overrides():
    cfg, _ = parse_argv(GROUP, ["score", "out=o.jsonl", "in.jsonl"])
    assert cfg == ScoreConfig(input="in.jsonl", out="o.jsonl")
    cfg, _ = parse_argv(GROUP, ["models", "prepare", "seed=2", "tiny-t5"])
    assert cfg == ModelsPrepareConfig(name="tiny-t5", seed=2)


def test_comma_lists_mean_the_same_as_an_option_and_as_key_value():
    by_option, _ = parse_argv(GROUP, ["train", "--lora-targets", "q_proj,v_proj", "--lora-targets", "o_proj"])
    by_override, _ = parse_argv(GROUP, ["train", "lora_targets=q_proj,v_proj,o_proj"])
    assert by_option.lora_targets == by_override.lora_targets == ["q_proj", "v_proj", "o_proj"]
    cfg, _ = parse_argv(GROUP, ["synth", "--endpoint", "http://a:1/v1,http://b:2/v1", "--endpoint", "http://c:3/v1"])
    assert cfg.endpoints == ["http://a:1/v1", "http://b:2/v1", "http://c:3/v1"]
    # stop strings are taken as written: a comma is a character a stop string may hold
    cfg, _ = parse_argv(GROUP, ["synth", "--stop", "a,b"])
    assert cfg.stop == ["a,b"]


@pytest.mark.parametrize("command", ["synth", "train", "eval", "infer", "prep"])
def test_every_prompt_format_option_is_spelled_format(command):
    required = {"prep": ["model=tiny-llama", "data=bundled:train"], "infer": ["model=tiny-llama"]}
    cfg, _ = parse_argv(GROUP, [command, "--format", "chat", *required.get(command, [])])
    assert cfg.prompt_format == "chat"
