"""DeepSpeed on 2 CPU ranks (gloo) against 1 process without DeepSpeed on the same global batch.

Each case launches ``accelerate launch --config_file configs/accelerate/zero3_2proc_cpu.yaml
fine_tune/train.py`` (or zero2_2proc_cpu.yaml), the command users run, and
trains the same recipe in this process with twice the accumulation: 2 ranks x G micro-batches
and 1 process x 2G micro-batches see the same batches in each optimizer step (the loader
deals batch i of the epoch to rank i % 2). A case runs once (module cache) and several tests
inspect it. Cases with ``resume`` stop at step ``stop`` and finish in a second launch, so every check
of them (losses, saved weights) is on a resumed run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from multirank_helpers import (
    ACCELERATE_CONFIGS,
    SMOKE,
    expected_lrs,
    launch,
    logged,
    summary,
    without_dropout,
)
from safetensors.torch import load_file

from synthtune.config import TrainConfig, load_config
from synthtune.train.loop import train

pytestmark = pytest.mark.integration  # 2-process accelerate launches (DeepSpeed, gloo), shared by every test here


@dataclass(frozen=True)
class Case:
    name: str
    zero_stage: int
    method: str
    model: str = "tiny-llama"
    resume: bool = False
    stop: int = 2  # with resume: the first launch stops here
    accum: int = 2  # per rank; the 1-process reference accumulates twice as many
    steps: int = 4
    extra: tuple[str, ...] = ()


CASES = {c.name: c for c in [
    # final eval answers 2 questions by generation: under ZeRO-3 both ranks must join every forward
    Case("zero3_lora_causal", 3, "lora", resume=True, extra=("eval_accuracy_samples=2", "eval_max_new_tokens=4")),
    # the Flan-UL2 case on a tiny T5
    Case("zero3_lora_seq2seq", 3, "lora", model="tiny-t5", resume=True,
         extra=("lora_targets=[q,v]", "learning_rate=1e-2")),
    Case("zero3_full_causal", 3, "full", extra=("learning_rate=1e-3",)),
    Case("zero2_lora_causal", 2, "lora", resume=True),
    # G=1 over 6 steps crosses an epoch end (9 batches: 4 steps of 2 per epoch), where the
    # sharded loader pads rank 1 with a repeat of the epoch's first batch. It stops at step 4, the
    # epoch's last window: the resume must start the next epoch, not train rank 1's padding
    Case("zero2_full_causal", 2, "full", accum=1, steps=6, resume=True, stop=4, extra=("learning_rate=1e-3",)),
]}


@dataclass
class Run:
    case: Case
    two_ranks: Path
    one_process: Path
    two: dict  # summaries
    one: dict
    output: str  # the 2-rank launches' stdout and stderr


def _run(case: Case, root: Path) -> Run:
    two, one = root / "two_ranks", root / "one_process"
    model = without_dropout(case.model, root / "model") if case.model == "tiny-t5" else case.model
    common = [f"model={model}", f"method={case.method}", f"max_steps={case.steps}", "eval_steps=0",
              "logging_steps=1", "trace_memory=false", "log_with=none", "eval_accuracy_samples=0",
              # 6 eval rows in batches of 4: rank 1's batch of 2 is padded with 2 repeats
              "eval_limit=6", *case.extra]
    config_file = ACCELERATE_CONFIGS / f"zero{case.zero_stage}_2proc_cpu.yaml"
    ranks = [f"output_dir={two}", f"gradient_accumulation_steps={case.accum}", *common]
    output = ""
    if case.resume:
        for extra in ([f"stop_at_step={case.stop}"], ["resume_from=latest"]):
            proc = launch(*ranks, f"save_steps={case.stop}", *extra, config_file=config_file)
            output += proc.stdout + proc.stderr
    else:
        proc = launch(*ranks, "save_steps=0", config_file=config_file)
        output = proc.stdout + proc.stderr
    ref = train(load_config(TrainConfig, SMOKE, [f"output_dir={one}", f"gradient_accumulation_steps={2 * case.accum}",
                                                 "save_steps=0", *common]), progress=False)
    return Run(case, two, one, summary(two), ref, output)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache: dict[str, Run] = {}

    def get(name: str) -> Run:
        if name not in cache:
            cache[name] = _run(CASES[name], tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_match_one_process_step_by_step(runs, name):
    r = runs(name)
    two, one = r.two, r.one
    # what ran is what the launcher asked for: DeepSpeed over 2 processes, not a quiet fallback
    assert (two["distributed_type"], two["zero_stage"], two["processes"]) == ("DEEPSPEED", r.case.zero_stage, 2)
    assert (one["distributed_type"], one["processes"]) == ("NO", 1)
    # DeepSpeed's CPU shared-memory op (inference only) is not compiled: ~45 s of g++ per environment
    assert "deepspeed_shm_comm" not in r.output
    assert two["steps"] == one["steps"] == r.case.steps
    # Token-exact accumulation across ranks: each rank holds other label-token counts, and the
    # step's gradient is the mean over the tokens of both (the count is all-reduced first);
    # a per-rank mean would already change step 2's loss.
    losses = logged(two, "loss")
    assert list(losses) == list(range(1, r.case.steps + 1))
    # (2 ranks sum in another order: ~1e-7 apart on this machine; 1e-6 leaves a 10x margin)
    assert losses == pytest.approx(logged(one, "loss"), rel=1e-6)
    lrs = expected_lrs(r.case.steps, *r.case.extra)
    assert logged(two, "lr") == pytest.approx(dict(enumerate(lrs, start=1)), rel=1e-9)
    # each of the 6 eval rows counted once, though rank 1 ran 2 of them twice
    assert two["final_eval_loss"] == pytest.approx(one["final_eval_loss"], rel=1e-6)
    if not r.case.resume:  # a resumed run counts the tokens of its own launch
        assert two["train_tokens_run"] == one["train_tokens_run"]


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.zero_stage == 3])
def test_zero3_partitions_every_parameter_in_halves(runs, name):
    r = runs(name)
    parts = r.two["zero3_partitions"]
    assert [p["rank"] for p in parts] == [0, 1]
    for p in parts:
        # DeepSpeed pads a parameter's last slice, so a share is >= 1/2; the base too, not only
        # what trains (the frozen base is most of a LoRA model)
        assert p["full_numel"] == r.two["total_params"] and p["params"] > 0
        assert p["min_share"] >= 0.5 and p["max_share"] <= 0.5 + 1e-3, p
        assert p["local_numel"] == pytest.approx(p["full_numel"] / 2, rel=1e-3)
        # nothing is also held whole on every rank (ds_zero3_cpu.json: persistence threshold 0),
        # so the adapter must be gathered to be saved
        assert p["persistent_numel"] < 0.01 * p["full_numel"], p
    assert r.one["zero3_partitions"] is None and r.two["trainable_params"] == r.one["trainable_params"]


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.method == "lora"])
def test_saved_adapter_equals_the_one_process_adapter(runs, name):
    r = runs(name)
    two = load_file(r.two_ranks / "final" / "adapter_model.safetensors")
    one = load_file(r.one_process / "final" / "adapter_model.safetensors")
    assert two.keys() == one.keys() and len(two) > 0
    assert all(t.numel() > 0 for t in two.values()), "an empty partition was saved"
    assert any(t.abs().sum() > 0 for k, t in two.items() if "lora_B" in k), "lora_B left at its zero init"
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    # the ZeRO-3 save path writes the same self-describing files as the one-process path
    for f in ("synthtune_adapter.json", "tokenizer_config.json"):
        assert (r.two_ranks / "final" / f).read_text() == (r.one_process / "final" / f).read_text(), f


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.method == "full"])
def test_saved_full_model_loads_with_transformers_and_equals_one_process(runs, name):
    from transformers import AutoModelForCausalLM

    r = runs(name)
    assert r.two["trainable_params"] == r.two["total_params"]
    two = AutoModelForCausalLM.from_pretrained(r.two_ranks / "final").eval()
    one = AutoModelForCausalLM.from_pretrained(r.one_process / "final").eval()
    two_sd, one_sd = two.state_dict(), one.state_dict()
    assert two_sd.keys() == one_sd.keys()
    for k in one_sd:
        assert two_sd[k].numel() > 0, f"{k}: empty (ZeRO-3 partitions saved ungathered)"
        torch.testing.assert_close(two_sd[k], one_sd[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        torch.testing.assert_close(two(ids).logits, one(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.resume])
def test_stopped_run_resumes_on_two_ranks(runs, name):
    r = runs(name)
    # the second launch started from the stop's checkpoint (the other tests compare what it
    # finished with to a run that never stopped)
    assert "resumed from" in r.output and f"at step {r.case.stop}" in r.output
    ckpt = r.two_ranks / "checkpoints" / f"step-{r.case.stop:07d}"
    assert (ckpt / "random_states_0.pkl").exists() and (ckpt / "random_states_1.pkl").exists()
    shards = sorted(p.name for p in ckpt.rglob("*optim_states.pt"))  # DeepSpeed's own format
    assert len(shards) == 2 and "zero_pp_rank_1" in shards[1], "one optimizer shard per rank"
    assert r.two["steps"] == r.case.steps
