"""Training on tiny models: real runs through the real entry points."""

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from multirank_helpers import expected_lrs, free_port
from safetensors.torch import load_file

from synthtune.config import TrainConfig, load_config
from synthtune.errors import ConfigError
from synthtune.train.loop import train
from synthtune.train.setup import validate

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "train" / "smoke.yaml"
ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def _cfg(tmp_path, name="run", **kw) -> TrainConfig:
    base = {"output_dir": str(tmp_path / name), "trace_memory": False, "log_with": "none"}
    base.update(kw)
    def fmt(v):
        return "null" if v is None else json.dumps(v) if isinstance(v, list) else v

    return load_config(TrainConfig, SMOKE, [f"{k}={fmt(v)}" for k, v in base.items()])


def _launch(config_file: str, *overrides: str, timeout=600):
    # a free port, not the config's: make test runs two pytest workers, and so two launches at once
    cmd = [ACCELERATE, "launch", "--config_file", str(REPO / "configs" / "accelerate" / config_file),
           "--main_process_port", str(free_port()), str(REPO / "fine_tune" / "train.py"), "--config", str(SMOKE),
           *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.integration  # trains under accelerate launch
def test_smoke_recipe_via_accelerate_launch(tmp_path):
    out = tmp_path / "smoke"
    _launch("cpu.yaml", f"output_dir={out}")
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 20 and s["processes"] == 1
    assert s["final_train_loss"] < s["first_train_loss"] - 0.05, "the loss must fall"
    evals = [h["eval/loss"] for h in s["history"] if "eval/loss" in h]
    assert len(evals) == 2 and evals[-1] < evals[0]
    assert "final_eval_accuracy" in s and s["final_eval_n_questions"] == 4
    # the memory trace (on by default) lands beside the run
    assert (out / "memory_trace.png").exists() and (out / "memory_trace.csv").exists()
    assert s["memory"]
    # every trainable (LoRA) parameter moved away from its initialization
    from synthtune.train.loop import load_for_training

    cfg = load_config(TrainConfig, SMOKE)
    torch.manual_seed(cfg.seed)
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    init_model, *_ = load_for_training(cfg, "fp32")
    init = {k: v for k, v in init_model.state_dict().items() if "lora_" in k}
    final = load_file(out / "final" / "adapter_model.safetensors")
    assert len(final) == len(init) > 0
    for k, v in init.items():
        saved = final[k.replace(".default", "")]
        assert not torch.equal(saved, v), f"{k} did not change"
    # checkpoints: the last 2 of 10/20 are kept
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000010", "step-0000020"]


@pytest.mark.integration  # trains
def test_saved_adapter_reloads_with_same_logits(tmp_path):
    cfg = _cfg(tmp_path, max_steps=4, save_steps=4, eval_accuracy_samples=0)
    train(cfg, progress=False)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from synthtune.models import resolve_model
    from synthtune.train.setup import apply_lora

    base_path = resolve_model("tiny-llama")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path),
                                         str(tmp_path / "run" / "final")).eval()
    # the checkpoint holds the trained adapter, saved by a different path (accelerate's save_state);
    # the frozen base comes from the base model itself
    trained = apply_lora(AutoModelForCausalLM.from_pretrained(base_path), cfg, False)
    state = load_file(tmp_path / "run" / "checkpoints" / "step-0000004" / "model.safetensors")
    res = trained.load_state_dict(state, strict=False)
    assert not res.unexpected_keys and res.missing_keys and not any("lora_" in k for k in res.missing_keys)
    trained.eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 8]])
    with torch.no_grad():
        a, b = reloaded(ids).logits, trained(ids).logits
    assert torch.allclose(a, b, atol=1e-6)
    base = AutoModelForCausalLM.from_pretrained(base_path).eval()
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, a, atol=1e-4), "the adapter must change the outputs"


@pytest.mark.integration  # trains
def test_seq2seq_tiny_t5_trains(tmp_path):
    cfg = _cfg(tmp_path, model="tiny-t5", lora_targets=["q", "v"], max_steps=10, eval_steps=0,
               eval_accuracy_samples=2, save_steps=0, learning_rate=1e-2)
    s = train(cfg, progress=False)
    assert s["kind"] == "seq2seq" and s["final_train_loss"] < s["first_train_loss"]
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").exists()
    # in-training accuracy also reports lm-eval's gsm8k figures on the same greedy answers
    (last,) = [h for h in s["history"] if "eval/accuracy" in h][-1:]
    assert last["eval/n_questions"] == 2
    # ... the figures `synthtune eval` (its own scoring code) gives the final adapter's greedy answers to the
    # same questions (the tiny model's figures are near 0 here: test_in_training_accuracy_figures_are_known
    # checks them on a model whose answers are known)
    from synthtune.config import EvalConfig
    from synthtune.data.gsm8k import load_split
    from synthtune.jobs.eval import evaluate_model
    from synthtune.models import load_with_adapter

    lm = load_with_adapter("tiny-t5", str(tmp_path / "run" / "final"), device="cpu")
    rows = load_split("test", "bundled").rows[:2]
    ecfg = EvalConfig(model="tiny-t5", limit=2, max_new_tokens=cfg.eval_max_new_tokens, batch_size=2,
                      prompt_format=cfg.prompt_format, device="cpu")
    _, ours = evaluate_model(ecfg, lm, rows, [], progress=False)
    assert {m: last[f"eval/{m}"] for m in ("accuracy", "format_rate", "lm_eval_strict_match",
                                          "lm_eval_flexible_extract")} == \
        {m: ours[m] for m in ("accuracy", "format_rate", "lm_eval_strict_match", "lm_eval_flexible_extract")}


@pytest.mark.integration  # trains the wrong-arithmetic models (calc_models: ~10 s each, once per process)
@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_in_training_accuracy_figures_are_known(kind):
    """eval_accuracy on a model whose greedy answer is known (calc_models.WRONG_COMPLETION, ending
    ``#### 76``), against golds chosen so that every figure differs: ours reads by value (76 == 76.0),
    lm-eval compares strings, strict-match reads ``#### n`` and flexible-extract the last number."""
    from accelerate import Accelerator
    from calc_models import WRONG_COMPLETION, wrong_calc_model, wrong_calc_t5

    from synthtune.data.gsm8k import load_split
    from synthtune.train.metrics import eval_accuracy

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only waits (see calc_models)
    try:
        lm = wrong_calc_model() if kind == "causal" else wrong_calc_t5()
        tok = lm.tokenizer
        questions = [r["question"] for r in load_split("test", "bundled").rows[:3]]
        full = len(tok(WRONG_COMPLETION, add_special_tokens=False)["input_ids"])
        cut = len(tok(WRONG_COMPLETION[:WRONG_COMPLETION.index(". ####")], add_special_tokens=False)["input_ids"])
        acc = Accelerator(cpu=True)
        cases = [  # (tokens generated, golds, expected figures)
            # the whole answer: "... 2*14 = <<2*14=36>>36. #### 76"
            (full, ["#### 76", "#### 76.0", "#### 36"],
             {"accuracy": 2 / 3, "format_rate": 1.0, "lm_eval_strict_match": 1 / 3, "lm_eval_flexible_extract": 1 / 3}),
            # cut before "####": "... <<2*14=36>>36": no strict answer; the last number is 36
            (cut, ["#### 36", "#### 36.0", "#### 76"],
             {"accuracy": 2 / 3, "format_rate": 0.0, "lm_eval_strict_match": 0.0, "lm_eval_flexible_extract": 1 / 3}),
        ]
        for n, golds, expected in cases:
            cfg = replace(TrainConfig(prompt_format="plain", per_device_batch_size=2), eval_max_new_tokens=n)
            rows = [{"question": q, "answer": a} for q, a in zip(questions, golds, strict=True)]
            got = eval_accuracy(acc, lm.model, tok, rows, cfg, kind == "seq2seq")
            assert got == {**{f"eval/{k}": pytest.approx(v) for k, v in expected.items()}, "eval/n_questions": 3}, \
                (n, got)
    finally:
        torch.set_num_threads(before)


@pytest.mark.integration  # trains
def test_full_finetuning_saves_whole_model(tmp_path):
    cfg = _cfg(tmp_path, method="full", max_steps=6, learning_rate=1e-3, eval_accuracy_samples=0, save_steps=0)
    s = train(cfg, progress=False)
    assert s["trainable_params"] == s["total_params"] and s["final_train_loss"] < s["first_train_loss"]
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


@pytest.mark.integration  # trains
def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    common = dict(max_steps=1, eval_data=None, save_steps=0, group_by_length=False, warmup_steps=0,
                  lr_scheduler="constant", learning_rate=1e-2, max_grad_norm=0.0)
    train(_cfg(tmp_path, "big", per_device_batch_size=4, gradient_accumulation_steps=1, **common), progress=False)
    train(_cfg(tmp_path, "acc", per_device_batch_size=1, gradient_accumulation_steps=4, **common), progress=False)
    big = load_file(tmp_path / "big" / "final" / "adapter_model.safetensors")
    acc = load_file(tmp_path / "acc" / "final" / "adapter_model.safetensors")
    assert big.keys() == acc.keys()
    for k in big:
        assert torch.allclose(big[k], acc[k], atol=1e-6), k


@pytest.mark.integration  # trains
def test_resume_matches_uninterrupted_run(tmp_path):
    common = dict(max_steps=8, save_steps=4, eval_steps=0, eval_accuracy_samples=0, lora_dropout=0.1)
    full = train(_cfg(tmp_path, "full", **common), progress=False)
    stopped = train(_cfg(tmp_path, "resumed", stop_at_step=4, **common), progress=False)
    assert stopped["stopped_at_step"] == 4
    resumed = train(_cfg(tmp_path, "resumed", resume_from="latest", **common), progress=False)
    assert resumed["steps"] == 8
    assert resumed["final_train_loss"] == pytest.approx(full["final_train_loss"], rel=1e-5)
    assert resumed["final_eval_loss"] == pytest.approx(full["final_eval_loss"], rel=1e-5)
    # the records before the stop come back with the checkpoint: the summary covers the whole run
    assert resumed["first_train_loss"] == pytest.approx(full["first_train_loss"], rel=1e-5)
    assert _logged(resumed, "loss") == pytest.approx(_logged(full, "loss"), rel=1e-5)
    # LoRA checkpoints hold the adapter, not the frozen base: as many tensors as trainable ones
    saved = load_file(tmp_path / "resumed" / "checkpoints" / "step-0000004" / "model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    assert sum(t.numel() for t in saved.values()) == full["trainable_params"]
    # a checkpoint from other LoRA settings is refused with the reason, not half-loaded
    with pytest.raises(ConfigError, match="does not match this model"):
        train(_cfg(tmp_path, "resumed", resume_from="latest", lora_r=4, **common), progress=False)
    # so is one trained on other base weights of the same shape (tiny-llama built from another seed)
    with pytest.raises(ConfigError, match="other base weights"):
        train(_cfg(tmp_path, "resumed", resume_from="latest", seed=1, **common), progress=False)
    # and one written by another number of processes (the data position is per process)
    state_file = tmp_path / "resumed" / "checkpoints" / "step-0000008" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["processes"] == 1
    state_file.write_text(json.dumps({**state, "processes": 2}))
    with pytest.raises(ConfigError, match="written by 2 process"):
        train(_cfg(tmp_path, "resumed", resume_from="latest", **common), progress=False)


def _logged(summary: dict, key: str) -> dict[int, float]:
    return {h["step"]: h[key] for h in summary["history"] if key in h}


@pytest.mark.integration  # trains on 2 launched processes
def test_two_process_ddp_run_stops_and_resumes(tmp_path):
    out = tmp_path / "ddp"
    common = (f"output_dir={out}", "max_steps=6", "eval_steps=0", "save_steps=3", "trace_memory=false",
              "log_with=none", "logging_steps=1")
    _launch("cpu_2proc.yaml", *common, "stop_at_step=3")
    ckpt = out / "checkpoints" / "step-0000003"
    assert (ckpt / "random_states_0.pkl").exists() and (ckpt / "random_states_1.pkl").exists()
    saved = load_file(ckpt / "model.safetensors")  # the adapter, not the frozen base
    assert saved and all("lora_" in k for k in saved)
    _launch("cpu_2proc.yaml", *common, "resume_from=latest")
    s = json.loads((out / "summary.json").read_text())
    assert s["processes"] == 2 and s["steps"] == 6 and s["final_eval_n_questions"] == 4
    assert s["distributed_type"] == "MULTI_CPU"
    # one scheduler step per optimizer step: accelerate's default would step it once per process
    lrs = expected_lrs(6)
    assert _logged(s, "lr") == pytest.approx({k: lrs[k - 1] for k in range(1, 7)})
    # and it ends where one process that never stopped ends, in this one (twice the accumulation:
    # the same examples in each optimizer step; tests/test_multirank.py compares DeepSpeed the same way)
    w = train(load_config(TrainConfig, SMOKE, [*(c for c in common if not c.startswith("output_dir=")),
                                               f"output_dir={tmp_path / 'whole'}", "gradient_accumulation_steps=4"]),
              progress=False)
    assert w["processes"] == 1
    assert _logged(s, "loss") == pytest.approx(_logged(w, "loss"), rel=1e-5)
    assert s["final_eval_loss"] == pytest.approx(w["final_eval_loss"], rel=1e-5)


@pytest.mark.integration  # trains
def test_packed_training_counts_the_same_real_tokens(tmp_path):
    # packed batches carry a 4D additive mask: summing it as a token count overflowed to -inf
    common = ("max_steps=-1", "num_epochs=1", "gradient_accumulation_steps=1", "eval_steps=0", "save_steps=0",
              "log_with=none", "trace_memory=false")
    runs = {pk: train(load_config(TrainConfig, SMOKE, [f"output_dir={tmp_path / str(pk)}", f"packing={pk}",
                                                         *common]), progress=False) for pk in (True, False)}
    assert runs[True]["steps"] < runs[False]["steps"]  # several examples per packed row
    assert runs[True]["train_tokens_run"] == runs[False]["train_tokens_run"] > 0
    assert runs[True]["tokens_per_s"] > 0


@pytest.mark.parametrize("override,match", [
    (["lora_targets=[nope_proj]"], "match no module"),
    (["max_length=100000"], "over tiny-llama's limit"),
    (["data=/no/such/file.jsonl"], "data:"),
    (["resume_from=/no/such/ckpt"], "resume_from"),
    (["model=tiny-t5", "packing=true"], "packing"),
    (["pad_to_multiple_of=0"], "pad_to_multiple_of"),
    # device=cpu: the same answer on a GPU machine
    (["attn_implementation=flash_attention_2", "device=cpu"], "attn_implementation=flash_attention_2: .*install|"
                                                              "attn_implementation=flash_attention_2 needs a CUDA"),
    (["attn_implementation=flex_attention", "device=cpu"], "flex_attention trains on CUDA only"),
    (["packing=true", "packing_mode=varlen", "device=cpu"], "packing_mode=varlen is not a layout attn_implementation=sdpa takes"),
    (["model=tiny-t5", "attn_implementation=flash_attention_2"], "T5ForConditionalGeneration .* has no flash"),
])
def test_bad_configs_fail_before_loading(override, match):
    with pytest.raises(ConfigError, match=match):  # out-of-range values already fail in load_config
        validate(load_config(TrainConfig, SMOKE, override))


@pytest.mark.integration  # runs the CLI in a subprocess
def test_cli_reports_config_errors_cleanly(synthtune_bin):
    proc = subprocess.run([synthtune_bin, "train", "--config", str(SMOKE), "lora_targets=[nope]"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "lora_targets" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.integration  # trains under DeepSpeed
def test_deepspeed_zero3_random_init_trains_like_plain_training_resumes_and_saves_a_real_adapter(tmp_path):
    # Real DeepSpeed ZeRO-3 (its CPU accelerator), not accelerate's DDP fallback. A random-init
    # model must be built outside deepspeed.zero.Init: under it transformers skips weight init and
    # the base is uninitialized memory (the H200 check's LoRA that did not learn). The smoke
    # recipe accumulates 2 micro-batches, so the LR schedule is also checked under DeepSpeed.
    common = ("max_steps=4", "eval_steps=0", "trace_memory=false", "log_with=none", "logging_steps=1",
              "random_init=true", "eval_accuracy_samples=2")
    plain, z3 = tmp_path / "plain", tmp_path / "z3"
    _launch("cpu.yaml", f"output_dir={plain}", "save_steps=0", *common)
    _launch("zero3_1proc.yaml", f"output_dir={z3}", "save_steps=2", "stop_at_step=2", *common)
    ds_files = list((z3 / "checkpoints" / "step-0000002").rglob("*_states.pt"))
    assert ds_files  # DeepSpeed's own format
    _launch("zero3_1proc.yaml", f"output_dir={z3}", "save_steps=2", "resume_from=latest", *common)
    p, z = (json.loads((d / "summary.json").read_text()) for d in (plain, z3))
    assert (z["distributed_type"], z["zero_stage"]) == ("DEEPSPEED", 3)
    assert (p["distributed_type"], p["zero_stage"]) == ("NO", None)
    assert z["trainable_params"] == p["trainable_params"] and z["total_params"] == p["total_params"]
    # the frozen base (fp32 here) is not in the checkpoint: only the adapter and its optimizer state
    frozen_bytes = 4 * (z["total_params"] - z["trainable_params"])
    assert sum(f.stat().st_size for f in ds_files) < frozen_bytes
    assert _logged(z, "loss") == pytest.approx(_logged(p, "loss"), rel=1e-5)
    lrs = expected_lrs(4)
    assert _logged(z, "lr") == pytest.approx({k: lrs[k - 1] for k in range(1, 5)})
    assert z["final_eval_loss"] == pytest.approx(p["final_eval_loss"], rel=1e-5)
    # The resumed run saved a real adapter (one process on DeepSpeed's CPU accelerator;
    # tests/test_multirank.py compares ZeRO-3's adapters on 2 ranks with one process's).
    assert z["steps"] == 4
    adapter = load_file(z3 / "final" / "adapter_model.safetensors")
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k), "lora_B left at its zero init"
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from synthtune.models import resolve_model

    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama")).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, str(z3 / "final")).eval()
        assert not torch.allclose(tuned(ids).logits, before, atol=1e-5)


def test_limit_and_eval_limit_take_the_first_rows():
    from synthtune.train.data import build_train_data
    from synthtune.train.tokenize import load_tokenizer_for

    tok, seq2seq = load_tokenizer_for("tiny-llama")
    tok.pad_token = tok.pad_token or tok.eos_token
    cfg = load_config(TrainConfig, SMOKE, ["limit=5", "eval_limit=3", "eval_accuracy_samples=10"])
    data = build_train_data(cfg, tok, seq2seq)
    assert (data.stats["train"]["n"], data.stats["eval"]["n"], len(data.eval_questions)) == (5, 3, 3)
    full = build_train_data(load_config(TrainConfig, SMOKE, ["eval_accuracy_samples=100"]), tok, seq2seq)
    assert (full.stats["train"]["n"], full.stats["eval"]["n"]) == (36, 14)
    assert [q["question"] for q in data.eval_questions] == [q["question"] for q in full.eval_questions[:3]]


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-t5"])
def test_pad_to_multiple_of_buckets_every_batch_shape(model):
    from synthtune.train.data import build_train_data
    from synthtune.train.tokenize import IGNORE_INDEX, load_tokenizer_for

    tok, seq2seq = load_tokenizer_for(model)
    tok.pad_token = tok.pad_token or tok.eos_token
    cfg = load_config(TrainConfig, SMOKE, [f"model={model}", "pad_to_multiple_of=64"])
    data = build_train_data(cfg, tok, seq2seq)
    for loader in (data.train_loader, data.eval_loader):
        for batch in loader:
            lengths = batch["attention_mask"].sum(1)
            # the smallest multiple of 64 that holds the longest row, on both sides for seq2seq
            assert batch["input_ids"].shape[1] == -(-int(lengths.max()) // 64) * 64
            real_labels = (batch["labels"] != IGNORE_INDEX).sum(1)
            last_label = max(int(torch.nonzero(row != IGNORE_INDEX).max()) + 1 for row in batch["labels"])
            assert batch["labels"].shape[1] == -(-(last_label if not seq2seq else int(real_labels.max())) // 64) * 64
            if not seq2seq:  # the padded columns carry neither attention nor loss
                cols = torch.arange(batch["labels"].shape[1])
                assert (batch["labels"][cols[None, :] >= lengths[:, None]] == IGNORE_INDEX).all()


@pytest.mark.integration  # runs fine_tune/train.py in a subprocess
def test_train_script_reports_user_errors_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "fine_tune" / "train.py"), "--config", str(SMOKE),
                           f"output_dir={tmp_path / 'none'}", "resume_from=latest", "log_with=none",
                           "trace_memory=false"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2 and "resume_from=latest: no checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.integration  # trains, signals launched processes
@pytest.mark.parametrize("launcher", ["python", "cpu_2proc.yaml"])
def test_sigterm_finishes_the_step_writes_a_checkpoint_and_the_run_resumes(tmp_path, launcher):
    # A scheduler preempting the job sends SIGTERM to the whole process group; under torchrun the
    # agent forwards it to the workers as well, and every rank must stop at the same step.
    import signal
    import threading

    out = tmp_path / "preempted"
    common = [f"output_dir={out}", "max_steps=5000", "eval_steps=0", "save_steps=0", "log_with=none",
              "trace_memory=false"]
    script = [str(REPO / "fine_tune" / "train.py"), "--config", str(SMOKE), *common]
    cmd = ([sys.executable, *script] if launcher == "python" else
           [ACCELERATE, "launch", "--config_file", str(REPO / "configs" / "accelerate" / launcher),
            "--main_process_port", str(free_port()), *script])
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if re.search(r"\| *[1-9]\d*/5000", line):  # (rank 0's) progress bar: a step is done
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert ready.wait(180), "".join(lines)[-3000:]
    time.sleep(1)  # some more steps
    os.killpg(proc.pid, signal.SIGTERM)
    status = proc.wait(120)
    reader.join(10)
    said = "".join(lines)
    assert "on SIGTERM, checkpoint written" in said, said[-3000:]
    if launcher == "python":  # under torchrun the launcher's own status is torchrun's
        assert status == 128 + signal.SIGTERM and "Traceback" not in said
    (ckpt_dir,) = (out / "checkpoints").iterdir()  # one step, agreed by every rank
    state = json.loads((ckpt_dir / "trainer_state.json").read_text())
    step = state["global_step"]
    assert 0 < step < 5000 and ckpt_dir.name == f"step-{step:07d}"
    assert state["processes"] == (1 if launcher == "python" else 2)
    assert not (out / "summary.json").exists()  # stopped, not finished
    if launcher == "python":
        more = load_config(TrainConfig, SMOKE, [*common, "resume_from=latest", f"stop_at_step={step + 2}"])
        assert train(more, progress=False)["stopped_at_step"] == step + 2
    else:
        _launch(launcher, *common, "resume_from=latest", f"stop_at_step={step + 2}")
        assert (out / "checkpoints" / f"step-{step + 2:07d}").is_dir()


def test_tracker_auto_takes_tensorboard_only_when_it_is_installed(monkeypatch):
    from synthtune.train.setup import resolve_tracker

    assert resolve_tracker("auto") == "tensorboard"  # the dev install has the `tracking` extra
    assert resolve_tracker("none") is None
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what an install without the extra sees
    assert resolve_tracker("auto") is None
    with pytest.raises(ConfigError, match=r"log_with: tensorboard needs the tensorboard package.*synthtune\[tracking\]"):
        resolve_tracker("tensorboard")


def test_a_deepspeed_launch_without_deepspeed_says_which_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    with pytest.raises(ConfigError, match=r"DeepSpeed is not installed: pip install 'synthtune\[zero\]'"):
        train(_cfg(tmp_path))
    assert not (tmp_path / "run").exists()  # stopped before writing anything


@pytest.mark.integration  # trains
def test_the_default_tracker_writes_tensorboard_events_when_tensorboard_is_installed(tmp_path):
    cfg = load_config(TrainConfig, SMOKE, [f"output_dir={tmp_path / 'run'}", "max_steps=2", "eval_steps=0",
                                           "save_steps=0", "trace_memory=false", "eval_accuracy_samples=0"])
    cfg = replace(cfg, log_with=TrainConfig().log_with)  # the default, whatever the recipe says
    assert cfg.log_with == "auto"
    train(cfg, progress=False)
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))
