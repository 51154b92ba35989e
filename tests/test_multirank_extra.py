"""Two ranks where users run many (issue #13, part 2): real DeepSpeed ZeRO-2/3 and torch FSDP2 on
2 CPU processes, launched as two machines where it matters.

The model is built for the purpose and saved to disk first: a 2-layer Llama whose layers add
nothing (o_proj and down_proj are zero), so each next token depends on the current token only,
through a table we write into the embeddings and the untied lm_head. Greedy decoding from each
eval question's last token then follows a known chain to EOS: known answers (2 of 3 right) and
known, different lengths, so the ranks of a ZeRO-3 evaluation stop generating at different
steps. A random initialization would answer nothing of the sort: it shows the real weights were
loaded.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from multirank_helpers import free_port
from safetensors.torch import load_file

from synthtune.config import TrainConfig, load_config
from synthtune.train.loop import train

pytestmark = pytest.mark.integration  # 2-process accelerate launches: ZeRO-2/3, FSDP2, two simulated machines

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "train" / "smoke.yaml"
ACC_DIR = REPO / "configs" / "accelerate"
BIN = Path(sys.executable).parent
ENTRY = REPO / "tests" / "multirank_entry.py"
WORLD = 2

# (question, the digits its chain writes, gold): 1 and 234 are right, 56 is not 99
QUESTIONS = [("How many apples", "1", "1"), ("How many pears", "234", "234"), ("How many plums", "56", "99")]
ONE_PROC_ACCUMULATION = 4  # = 2 accumulation steps x 2 ranks: the same examples per optimizer step


def child_env(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture(scope="module")
def bigram(tmp_path_factory) -> dict:
    """The chain model on disk, its eval questions, and the training overrides every run shares."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from synthtune.models import load_tokenizer, resolve_model

    root = tmp_path_factory.mktemp("bigram")
    src = resolve_model("tiny-llama")
    tok = load_tokenizer(src)
    # the prompt is the question itself, so its last token picks the chain
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}"
                         "{% else %} {{ m['content'] }}{% endif %}{% endfor %}")
    cfg = AutoConfig.from_pretrained(src)
    cfg.tie_word_embeddings = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    successor = {}
    for question, digits, _ in QUESTIONS:
        chain = [ids(question)[-1], *(ids(d)[0] for d in digits), tok.eos_token_id]
        successor.update(zip(chain, chain[1:], strict=False))
    assert len(successor) == sum(len(d) + 1 for _, d, _ in QUESTIONS), "chains must not share a token"
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        head.zero_()
        for k, (token, nxt) in enumerate(successor.items()):
            emb[token] = 0.0
            emb[token, k] = 1.0
            head[nxt, k] = 50.0 / math.sqrt(cfg.hidden_size)  # RMSNorm scales the row by sqrt(hidden)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    eval_file = root / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"question": q, "answer": f"#### {g}"}) + "\n" for q, _, g in QUESTIONS))
    common = [f"model={model_dir}", "prompt_format=chat", f"eval_data={eval_file}", "eval_accuracy_samples=3",
              "eval_max_new_tokens=8", "max_steps=2", "eval_steps=0", "logging_steps=1", "trace_memory=false",
              "log_with=none", "lora_targets=[all-linear]"]
    return {"dir": model_dir, "common": common}


@pytest.fixture(scope="module")
def one_process(bigram, tmp_path_factory) -> dict:
    """The reference: one process, in this one, accumulating what 2 ranks do in one step."""
    out = tmp_path_factory.mktemp("one") / "run"
    cfg = load_config(TrainConfig, SMOKE, [*bigram["common"], f"output_dir={out}", "save_steps=0",
                                           f"gradient_accumulation_steps={ONE_PROC_ACCUMULATION}"])
    summary = train(cfg, progress=False)
    summary["out"] = out
    return summary


def logged(summary: dict, key: str) -> dict[int, float]:
    return {h["step"]: h[key] for h in summary["history"] if key in h}


def machine_launch(rank: int, port: int, overrides: list[str], *, config: Path, cwd: Path = REPO,
                   env: dict | None = None) -> subprocess.Popen:
    """One 'machine' of a 2-machine launch on this host: its own launcher, process group and cwd."""
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(config), "--num_machines", "2",
           "--num_processes", str(WORLD), "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
           "--main_process_port", str(port), "--mixed_precision", "no", str(ENTRY), "--config", str(SMOKE),
           *overrides]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env or child_env())


def finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    """Wait for every machine, killing all of them if any is still running at the deadline."""
    deadline = time.monotonic() + timeout
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out))
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        raise AssertionError(f"the launch hung: still running after {timeout:.0f} s") from None
    return results


def one_launch(config: Path, overrides: list[str], *, timeout: float = 300, env: dict | None = None) -> str:
    """Both ranks from one launcher on a free port."""
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(config), "--main_process_port", str(free_port()),
           str(ENTRY), "--config", str(SMOKE), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env or child_env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def cli_model_states(model_dir: Path, zero_stage: int) -> dict[str, int]:
    """`synthtune memory --zero-stage N --gpus 2`'s model-state part, for the smoke recipe's LoRA."""
    proc = subprocess.run([str(BIN / "synthtune"), "memory", "--model", str(model_dir), "--method", "lora",
                           "--lora-r", "8", "--lora-targets", "all-linear", "--precision", "fp32",
                           "--zero-stage", str(zero_stage), "--gpus", str(WORLD), "--json"],
                          capture_output=True, text=True, timeout=120, env=child_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)["model_states_bytes"]


def assert_states_match(measured: list[dict], estimate: dict[str, int], param_tensors: int) -> None:
    # DeepSpeed pads partitions to equal sizes: at most WORLD - 1 fp32 elements per tensor
    slack = 4 * (WORLD - 1) * param_tensors
    assert [m["rank"] for m in measured] == list(range(WORLD))
    for m in measured:
        for key in ("weights", "gradients", "optimizer"):
            assert abs(m[key] - estimate[key]) <= slack, (key, m, estimate)


def test_zero3_on_two_machines_loads_real_weights_and_evaluates_like_one_process(bigram, one_process, tmp_path):
    # configs/accelerate/zero3_multinode.yaml as shipped (zero3_init_flag: true), with 2 machines of
    # 1 process each on this host and a static rendezvous on 127.0.0.1.
    out = tmp_path / "z3"
    weights = tmp_path / "gathered.safetensors"
    port = free_port()
    overrides = [*bigram["common"], f"output_dir={out}", "save_steps=0"]
    env = child_env(SYNTHTUNE_TEST_WEIGHTS=str(weights))
    procs = [machine_launch(r, port, overrides, config=ACC_DIR / "zero3_multinode.yaml", env=env) for r in (0, 1)]
    for status, said in finish(procs, timeout=300):
        assert status == 0, said[-4000:]
    s = json.loads((out / "summary.json").read_text())
    assert (s["distributed_type"], s["zero_stage"], s["processes"]) == ("DEEPSPEED", 3, WORLD)

    # the partitions were filled by deepspeed.zero.Init from the checkpoint: each rank held only
    # its slice of every base weight, and gathered they are the checkpoint, bit for bit
    held = json.loads(Path(str(weights) + ".json").read_text())
    assert len(held) == WORLD
    for rank_held in held:
        for name, h in rank_held.items():
            assert h["local"] == 0 and h["partition"] == -(-h["full"] // WORLD), (name, h)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(bigram["dir"]).state_dict()
    gathered = load_file(weights)
    assert gathered.keys() == plain.keys()
    assert all(torch.equal(gathered[k], plain[k]) for k in plain)
    assert logged(s, "loss")[1] == pytest.approx(logged(one_process, "loss")[1], rel=1e-6)
    assert logged(s, "loss") == pytest.approx(logged(one_process, "loss"), rel=1e-5)
    assert logged(s, "lr") == pytest.approx(logged(one_process, "lr"))

    # different numbers of questions per rank (2 and 1), answers of different lengths per rank
    # (ranks stop at different steps): no hang, the same accuracy, no question counted twice
    assert one_process["final_eval_accuracy"] == pytest.approx(2 / 3)
    assert s["final_eval_n_questions"] == one_process["final_eval_n_questions"] == 3
    assert s["final_eval_accuracy"] == one_process["final_eval_accuracy"]
    assert s["final_eval_loss"] == pytest.approx(one_process["final_eval_loss"], rel=1e-5)

    # the estimator's per-rank model states are what DeepSpeed allocated on each rank
    measured = s["memory"]["model_states_bytes"]
    tensors = len(plain) + 2 * sum(1 for k in plain if k.endswith("_proj.weight"))
    # (every tensor of this small model is under DeepSpeed's persistence threshold of 1e5
    # elements: each rank holds it whole besides its partition, and the estimate says so)
    assert_states_match(measured, cli_model_states(bigram["dir"], 3), tensors)


def test_zero2_partitions_match_the_estimate(bigram, tmp_path):
    out = tmp_path / "z2"
    one_launch(ACC_DIR / "zero2_2proc_cpu.yaml", [*bigram["common"], f"output_dir={out}", "save_steps=0", "max_steps=1",
                                         "eval_data=null"])
    s = json.loads((out / "summary.json").read_text())
    assert (s["distributed_type"], s["zero_stage"], s["processes"]) == ("DEEPSPEED", 2, WORLD)
    from safetensors import safe_open

    with safe_open(str(bigram["dir"] / "model.safetensors"), "pt") as f:
        base_tensors = len(list(f.keys()))
    measured = s["memory"]["model_states_bytes"]
    assert_states_match(measured, cli_model_states(bigram["dir"], 2), 3 * base_tensors)
    assert all(m["gathered"] == 0 for m in measured)


def test_sigterm_to_one_machine_stops_every_rank_at_one_checkpoint_and_resumes(tmp_path):
    # A scheduler preempting one node signals that node's processes only (here: machine 1's
    # launcher and its worker, one process group). Both ranks must finish the same step, write one
    # checkpoint together and exit with the same status; the run then resumes where it stopped.
    out = tmp_path / "preempted"
    common = [f"output_dir={out}", "eval_steps=0", "save_steps=0", "log_with=none", "trace_memory=false",
              "logging_steps=1", "eval_accuracy_samples=0"]
    port = free_port()
    env = child_env(SYNTHTUNE_TEST_STATUS_DIR=str(tmp_path))
    procs = [machine_launch(r, port, [*common, "max_steps=5000"], config=ACC_DIR / "zero3_multinode.yaml", env=env)
             for r in (0, 1)]
    lines: list[list[str]] = [[], []]
    training = threading.Event()

    def read(i: int) -> None:
        for line in procs[i].stdout:
            lines[i].append(line)
            if re.search(r"\| *[1-9]\d*/5000", line):  # rank 0's progress bar: steps are done
                training.set()

    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in (0, 1)]
    for r in readers:
        r.start()
    try:
        assert training.wait(240), "".join(lines[0])[-3000:]
        time.sleep(1)  # some more steps
        os.killpg(procs[1].pid, signal.SIGTERM)
        statuses = [p.wait(120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    for r in readers:
        r.join(10)
    said = ["".join(x) for x in lines]
    assert "on SIGTERM, checkpoint written" in said[0], said[0][-3000:]
    # every rank exited 128 + SIGTERM, the one that got the signal and the one that did not, and
    # both launchers alike (torchrun's own status: 1, for a worker that did not exit 0)
    assert statuses[0] == statuses[1], statuses
    assert [(tmp_path / f"rank-{r}").read_text() for r in (0, 1)] == [str(128 + signal.SIGTERM)] * 2
    (ckpt_dir,) = (out / "checkpoints").iterdir()
    state = json.loads((ckpt_dir / "trainer_state.json").read_text())
    step = state["global_step"]
    assert state["processes"] == WORLD and 0 < step < 5000 and ckpt_dir.name == f"step-{step:07d}"
    assert not (out / "summary.json").exists()

    # resume (one launcher, the same 2 ranks) and stop 2 steps later: the losses and learning
    # rates of the whole run are those of one process that never stopped (the same max_steps:
    # the LR schedule spans it)
    later = [*common, "max_steps=5000", f"stop_at_step={step + 2}"]
    one_launch(ACC_DIR / "zero3_2proc_cpu.yaml", [*later, "resume_from=latest"])
    ref_out = tmp_path / "one"
    train(load_config(TrainConfig, SMOKE, [*later, f"output_dir={ref_out}",
                                           f"gradient_accumulation_steps={ONE_PROC_ACCUMULATION}"]), progress=False)
    resumed, ref = (json.loads((d / "checkpoints" / f"step-{step + 2:07d}" / "trainer_state.json").read_text())
                    for d in (out, ref_out))
    assert sorted(logged(resumed, "loss")) == list(range(1, step + 3))
    assert logged(resumed, "loss") == pytest.approx(logged(ref, "loss"), rel=1e-5)
    assert logged(resumed, "lr") == pytest.approx(logged(ref, "lr"))


def test_a_data_file_missing_on_one_machine_fails_every_rank_fast(tmp_path):
    # machine 0 has the data file, machine 1 (another cwd: another node's disk) does not. Before,
    # rank 1 exited alone and rank 0 waited for it in its first collective for the process
    # group's 30 minutes: nothing watches a worker on another node.
    from synthtune.data.gsm8k import load_source

    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node0.mkdir()
    node1.mkdir()
    rows = load_source("bundled:train").rows[:16]
    (node0 / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [f"output_dir={tmp_path / 'out'}", "data=train.jsonl", "max_steps=2", "log_with=none",
                 "trace_memory=false"]

    def every_rank_reports(*expected: str) -> None:
        port = free_port()
        procs = [machine_launch(r, port, overrides, config=ACC_DIR / "zero3_multinode.yaml", cwd=cwd)
                 for r, cwd in ((0, node0), (1, node1))]
        for status, said in finish(procs, timeout=180):
            assert status != 0
            # the same error on every rank: which rank, which key, which file
            assert all(e in said for e in expected), said[-3000:]
            assert "rank 0 of 2" not in said

    every_rank_reports("error: rank 1 of 2: data:", "train.jsonl")
    # now node 1 has the file, but a broken one: it passes the pre-flight check and fails while the
    # data loads, after the model is up; still every rank stops with rank 1's file:line error
    (node1 / "train.jsonl").write_text(json.dumps(rows[0]) + "\n{not json\n" + json.dumps(rows[1]) + "\n")
    every_rank_reports("rank 1 of 2:", "train.jsonl:2")


def test_fsdp2_on_two_cpu_ranks_trains_saves_and_resumes_like_one_process(bigram, one_process, tmp_path):
    # configs/accelerate/fsdp.yaml on 2 CPU ranks (gloo). accelerate would quietly make that DDP
    # on CPUs (tests/multirank_entry.py says where); SYNTHTUNE_TEST_FSDP_ON_CPU lets its FSDP2
    # path run, so our loop, checkpoints and evaluation run under real torch FSDP2 sharding.
    config = yaml.safe_load((ACC_DIR / "fsdp.yaml").read_text())
    config.update(num_processes=WORLD, mixed_precision="no", use_cpu=True, main_process_ip="127.0.0.1",
                  rdzv_backend="static", same_network=True)
    config["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] = False  # rank 0 reads, broadcasts: GPU-only
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "fsdp"
    env = child_env(SYNTHTUNE_TEST_FSDP_ON_CPU="1")
    common = [*bigram["common"], f"output_dir={out}", "save_steps=1"]
    one_launch(tmp_path / "fsdp.yaml", [*common, "stop_at_step=1"], env=env)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"]
    one_launch(tmp_path / "fsdp.yaml", [*common, "resume_from=latest"], env=env)
    s = json.loads((out / "summary.json").read_text())
    assert (s["distributed_type"], s["processes"]) == ("FSDP", WORLD)
    assert logged(s, "loss") == pytest.approx(logged(one_process, "loss"), rel=1e-5)
    assert logged(s, "lr") == pytest.approx(logged(one_process, "lr"))
    assert s["final_eval_accuracy"] == one_process["final_eval_accuracy"]
    assert s["final_eval_n_questions"] == 3
    mine, ref = (load_file(d / "final" / "adapter_model.safetensors") for d in (out, one_process["out"]))
    assert mine.keys() == ref.keys() and mine
    for k in ref:
        torch.testing.assert_close(mine[k], ref[k], rtol=1e-4, atol=1e-6)
