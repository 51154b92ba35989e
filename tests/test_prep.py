"""Preprocessing: exact label masks, EOS kept (also when pad == eos), truncation counted, caching,
length grouping, packing that gives the unpacked loss, stats, and the `synthtune prep` CLI."""

from __future__ import annotations

import copy
import json
import random
import subprocess
from pathlib import Path

import pytest
import torch

from synthtune.data.gsm8k import load_source
from synthtune.errors import DataError
from synthtune.formats import encode_prompt, format_example, resolve_format
from synthtune.train.batching import (
    CausalCollator,
    LengthGroupedSampler,
    PackedCollator,
    Seq2SeqCollator,
    length_grouped_order,
    pack_sequences,
)
from synthtune.train.tokenize import (
    IGNORE_INDEX,
    length_stats,
    padding_waste,
    plot_length_histogram,
    tokenize_rows,
)

M = IGNORE_INDEX


@pytest.fixture(scope="module")
def rows():
    return load_source("bundled:train").rows


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "prep-cache"


# ---------------------------------------------------------------------------- collators


def test_causal_collator_exact_positions():
    feats = [{"input_ids": [5, 6, 7, 8], "labels": [M, M, 7, 8], "length": 4},
             {"input_ids": [5, 9], "labels": [M, 9]}]
    batch = CausalCollator(pad_token_id=0)(feats)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [5, 9, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[M, M, 7, 8], [M, 9, M, M]]
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # extra columns (length) are not passed on

    padded = CausalCollator(pad_token_id=0, pad_to_multiple_of=8)(feats)
    assert padded["input_ids"].shape == (2, 8)
    assert padded["labels"][0].tolist() == [M, M, 7, 8, M, M, M, M]


def test_causal_collator_keeps_eos_when_pad_is_eos():
    eos = 2  # SmolLM2: pad_token == eos_token == <|im_end|> (id 2)
    feats = [{"input_ids": [5, 6, 7, eos], "labels": [M, M, 7, eos]}, {"input_ids": [5, 9, eos], "labels": [M, 9, eos]}]
    batch = CausalCollator(pad_token_id=eos)(feats)
    assert batch["input_ids"].tolist() == [[5, 6, 7, eos], [5, 9, eos, eos]]
    # the real EOS is a label, the padding EOS is not: labels come from the rows, not from ids == pad
    assert batch["labels"].tolist() == [[M, M, 7, eos], [M, 9, eos, M]]


def test_seq2seq_collator_exact_positions():
    feats = [{"input_ids": [10, 11, 12], "labels": [20, 1]}, {"input_ids": [10], "labels": [21, 22, 23, 1]}]
    batch = Seq2SeqCollator(pad_token_id=0)(feats)
    assert batch["input_ids"].tolist() == [[10, 11, 12], [10, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[20, 1, M, M], [21, 22, 23, 1]]
    assert "decoder_input_ids" not in batch  # T5 shifts the labels itself
    assert Seq2SeqCollator(0, pad_to_multiple_of=4)(feats)["input_ids"].shape == (2, 4)


def test_packed_collator_masks_blocks_and_padding():
    feats = [{"input_ids": [1, 2, 3, 4, 5], "labels": [M, 2, M, M, 5], "position_ids": [0, 1, 0, 1, 2]},
             {"input_ids": [7, 8], "labels": [M, 8], "position_ids": [0, 1]}]
    batch = PackedCollator(pad_token_id=0)(feats)
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [[M, 2, M, M, 5], [M, 8, M, M, M]]
    allowed = (batch["attention_mask"][:, 0] == 0).int().tolist()
    assert allowed[0] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert allowed[1][3] == [0, 0, 1, 1, 0]  # padding attends only to padding
    no_mask = PackedCollator(pad_token_id=0, attention="position_ids")(feats)
    assert "attention_mask" not in no_mask  # transformers must see None to detect packing


# ---------------------------------------------------------------------------- formatting


def test_plain_format_text_and_prompt_ids_match_training(tiny_llama, rows):
    tok = tiny_llama.tokenizer
    prompt, target = format_example(rows[0], tok, fmt="plain", is_seq2seq=False)
    assert prompt == f"Question: {rows[0]['question'].strip()}\nAnswer:"
    assert target == " " + rows[0]["answer"].strip()  # the space goes with the answer (no lone 'Ġ' token)
    ex = tokenize_rows(rows[:1], tok, is_seq2seq=False, fmt="plain", cache_dir=None).dataset[0]
    p = encode_prompt(rows[0]["question"], tok, fmt="plain", is_seq2seq=False)
    assert ex["input_ids"][: len(p)] == p
    assert ex["labels"][: len(p)] == [M] * len(p) and ex["labels"][len(p)] != M


def test_format_resolution(tiny_llama, tiny_t5):
    assert resolve_format("auto", tiny_llama.tokenizer, False) == "chat"
    assert resolve_format("auto", tiny_t5.tokenizer, True) == "plain"
    with pytest.raises(ValueError, match="decoder-only"):
        resolve_format("chat", tiny_t5.tokenizer, True)


@pytest.mark.parametrize("fmt", ["plain", "chat"])
def test_causal_labels_mask_prompt_and_keep_eos(tiny_llama, rows, fmt, cache):
    tok = tiny_llama.tokenizer
    data = tokenize_rows(rows, tok, is_seq2seq=False, fmt=fmt, max_length=1024, cache_dir=cache)
    assert data.stats["n_truncated"] == 0 and len(data.dataset) == len(rows)
    for row, ex in zip(rows, data.dataset, strict=True):
        n_prompt = len(encode_prompt(row["question"], tok, fmt=fmt, is_seq2seq=False))
        assert ex["labels"][:n_prompt] == [M] * n_prompt
        assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
        assert ex["input_ids"][-1] == ex["labels"][-1] == tok.eos_token_id
        assert ex["labels"].count(tok.eos_token_id) == 1  # chat: the template's </s> is the EOS, not doubled
        answer = tok.decode(ex["labels"][n_prompt:], skip_special_tokens=True)
        assert answer.strip() == row["answer"].strip()


def test_eos_kept_when_pad_token_is_eos(tiny_llama, rows, cache):
    tok = copy.deepcopy(tiny_llama.tokenizer)
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id
    data = tokenize_rows(rows[:6], tok, is_seq2seq=False, fmt="plain", cache_dir=cache)
    feats = list(data.dataset)
    batch = CausalCollator(tok.pad_token_id)(feats)
    for i, f in enumerate(feats):
        n = len(f["input_ids"])
        assert batch["labels"][i, n - 1] == tok.eos_token_id  # the real EOS is learned
        assert (batch["labels"][i, n:] == M).all()  # the padding (also EOS ids) is not
        assert (batch["input_ids"][i, n:] == tok.eos_token_id).all()


def test_smollm2_tokenizer_pad_is_eos_and_eos_is_labelled(rows, cache):
    from synthtune.train.tokenize import load_tokenizer_for

    tok, is_seq2seq = load_tokenizer_for("smollm2-135m-instruct")
    assert not is_seq2seq and tok.pad_token_id == tok.eos_token_id  # the classic trap, for real
    for fmt in ("plain", "chat"):
        data = tokenize_rows(rows[:4], tok, is_seq2seq=False, fmt=fmt, cache_dir=cache)
        for ex in data.dataset:
            assert ex["labels"][-1] == tok.eos_token_id and ex["labels"].count(tok.eos_token_id) == 1


def test_seq2seq_labels_end_with_eos(tiny_t5, rows, cache):
    tok = tiny_t5.tokenizer
    data = tokenize_rows(rows, tok, is_seq2seq=True, fmt="plain", cache_dir=cache)
    assert "target" in data.stats and data.stats["recommended_max_target_length"] % 8 == 0
    for row, ex in zip(rows, data.dataset, strict=True):
        assert ex["input_ids"] == encode_prompt(row["question"], tok, fmt="plain", is_seq2seq=True)
        assert ex["labels"][-1] == tok.eos_token_id and M not in ex["labels"]
        assert tok.decode(ex["labels"][:-1]) == row["answer"].strip()
    batch = Seq2SeqCollator(tok.pad_token_id)(list(data.dataset)[:4])
    with torch.no_grad():
        loss = tiny_t5.model(**batch).loss
    assert torch.isfinite(loss)


def test_missing_answer_is_a_clear_error(tiny_llama):
    with pytest.raises(DataError, match="answer"):
        tokenize_rows([{"question": "q?", "answer": " "}], tiny_llama.tokenizer, is_seq2seq=False)


# ---------------------------------------------------------------------------- truncation and caching


def test_truncation_is_counted_and_reported(tiny_llama, rows, cache, capsys):
    tok = tiny_llama.tokenizer
    full = tokenize_rows(rows, tok, is_seq2seq=False, max_length=4096, cache_dir=cache, warn=False)
    over = sum(1 for n in full.lengths if n > 150)
    assert 0 < over < len(rows)

    dropped = tokenize_rows(rows, tok, is_seq2seq=False, max_length=150, cache_dir=cache)
    assert dropped.truncated == dropped.stats["n_dropped"] == over
    assert len(dropped.dataset) == len(rows) - over
    assert dropped.stats["truncated_fraction"] == pytest.approx(over / len(rows))
    assert f"{over} of {len(rows)} examples" in capsys.readouterr().err

    cut = tokenize_rows(rows, tok, is_seq2seq=False, max_length=150, truncation="truncate", cache_dir=cache)
    assert cut.truncated == over and len(cut.dataset) == len(rows)
    assert max(len(x) for x in cut.dataset["input_ids"]) == 150

    s2s = tokenize_rows(rows, tok, is_seq2seq=True, max_length=64, max_target_length=96, cache_dir=cache)
    manual = sum(1 for a, b in zip(s2s.lengths, s2s.target_lengths, strict=True) if a > 64 or b > 96)
    assert s2s.truncated == manual > 0 and len(s2s.dataset) == len(rows) - manual


def test_second_call_hits_the_cache(tiny_llama, rows, cache):
    tok = tiny_llama.tokenizer
    first = tokenize_rows(rows, tok, is_seq2seq=False, max_length=256, cache_dir=cache)
    again = tokenize_rows(rows, tok, is_seq2seq=False, max_length=256, cache_dir=cache)
    assert not first.from_cache and again.from_cache
    assert again.dataset["input_ids"][:] == first.dataset["input_ids"][:]
    # another max_length re-limits but does not re-tokenize; another tokenizer is another cache
    other_len = tokenize_rows(rows, tok, is_seq2seq=False, max_length=128, cache_dir=cache, warn=False)
    assert other_len.cache_files[0] == first.cache_files[0] and other_len.cache_files[1] != first.cache_files[1]
    tok2 = copy.deepcopy(tok)
    tok2.pad_token = tok2.eos_token
    assert tokenize_rows(rows, tok2, is_seq2seq=False, max_length=256, cache_dir=cache).cache_files[0] \
        != first.cache_files[0]


def test_datasets_input_is_accepted(tiny_llama, rows, cache):
    import datasets

    ds = datasets.Dataset.from_list([{**r, "extra": i} for i, r in enumerate(rows[:5])])
    data = tokenize_rows(ds, tiny_llama.tokenizer, is_seq2seq=False, cache_dir=cache)
    assert len(data.dataset) == 5 and set(data.dataset.column_names) == {"input_ids", "labels", "length"}


# ---------------------------------------------------------------------------- grouping


def test_length_grouped_order_is_a_seeded_permutation_that_groups():
    rng = random.Random(0)
    lengths = [rng.randint(20, 500) for _ in range(1000)]
    order = length_grouped_order(lengths, batch_size=8, seed=1)
    assert sorted(order) == list(range(1000))
    assert order == length_grouped_order(lengths, batch_size=8, seed=1)
    assert order != length_grouped_order(lengths, batch_size=8, seed=2)
    assert lengths[order[0]] == max(lengths)  # the longest batch first: an OOM shows at step 1

    def padded_tokens(idx):
        return sum(8 * max(lengths[i] for i in idx[k:k + 8]) for k in range(0, len(idx), 8))

    shuffled = list(range(1000))
    random.Random(1).shuffle(shuffled)
    assert padded_tokens(order) < 0.75 * padded_tokens(shuffled)
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=1)
    assert list(sampler) == order
    sampler.set_epoch(1)
    assert list(sampler) == length_grouped_order(lengths, batch_size=8, seed=2)


# ---------------------------------------------------------------------------- packing


def test_pack_sequences_structure(tiny_llama, rows, cache):
    data = tokenize_rows(rows, tiny_llama.tokenizer, is_seq2seq=False, max_length=256, cache_dir=cache)
    packed = pack_sequences(data.dataset, max_length=512)
    assert len(packed) < len(data.dataset) / 2
    assert sum(packed["n_examples"]) == len(data.dataset)
    assert sum(packed["length"]) == sum(data.dataset["length"])
    for row in packed:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) <= 512
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert len(starts) == row["n_examples"] and all(row["labels"][s] == M for s in starts)
    with pytest.raises(ValueError, match="longer than max_length"):
        pack_sequences(data.dataset, max_length=100)


@pytest.mark.parametrize("attention", ["mask", "position_ids"])
def test_packed_loss_equals_unpacked_loss(tiny_llama, rows, cache, attention):
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    data = tokenize_rows(rows[:16], tok, is_seq2seq=False, max_length=256, cache_dir=cache)
    examples = list(data.dataset)
    packed_rows = list(pack_sequences(data.dataset, max_length=512))
    assert len(packed_rows) <= len(examples) // 3  # several examples share each row
    batch = PackedCollator(tok.pad_token_id, attention=attention)(packed_rows)
    # position_ids mode needs use_cache=False: with a cache, transformers skips packed detection
    extra = {"use_cache": False} if attention == "position_ids" else {}
    flat = {"input_ids": batch["input_ids"], "labels": batch["labels"]}  # no per-example attention
    with torch.no_grad():
        unpacked = model(**CausalCollator(tok.pad_token_id)(examples))
        packed = model(**batch, **extra)
        leaky = model(**flat)
    assert packed.loss.item() == pytest.approx(unpacked.loss.item(), abs=1e-5)
    # token by token: each example's logits inside its packed row equal its unpacked logits
    worst = worst_leaky = 0.0
    for r, row in enumerate(packed_rows):
        start = 0
        for i in row["example_ids"]:
            n = len(examples[i]["input_ids"])
            ref = unpacked.logits[i, :n]
            worst = max(worst, (packed.logits[r, start:start + n] - ref).abs().max().item())
            worst_leaky = max(worst_leaky, (leaky.logits[r, start:start + n] - ref).abs().max().item())
            start += n
    assert worst < 1e-4  # fp32 noise
    assert worst_leaky > max(1e-3, 100 * worst)  # without the block structure examples leak into each other


# ---------------------------------------------------------------------------- stats and plot


def test_length_stats_and_waste(tmp_path):
    s = length_stats(range(1, 101))
    assert (s["p50"], s["p90"], s["p99"], s["max"], s["min"], s["mean"]) == (50, 90, 99, 100, 1, 50.5)
    assert s["recommended_max_length"] == 104  # p99 rounded up to a multiple of 8
    assert length_stats(range(1, 101), multiple=64)["recommended_max_length"] == 128
    assert length_stats([])["n"] == 0
    assert padding_waste([128, 256, 512], 256) == pytest.approx(1 - (128 + 256 + 256) / 768)
    path = tmp_path / "h" / "hist.png"
    plot_length_histogram([10, 20, 20, 30, 300], path, max_length=256)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- CLI


@pytest.mark.integration  # runs the CLI in a subprocess
def test_prep_cli(synthtune_bin, tmp_path):
    out = tmp_path / "prep"
    proc = subprocess.run([synthtune_bin, "prep", "--model", "tiny-llama", "--data", "bundled:train",
                           "--max-length", "160", "--out", str(out), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["format"] == "chat" and summary["kind"] == "causal"  # auto: tiny-llama has a chat template
    assert summary["n"] == 36 and summary["n_kept"] == 36 - summary["n_truncated"] > 0
    assert summary["recommended_max_length"] >= summary["p99"]
    assert "exceed max_length=160" in proc.stderr
    for key in ("dataset", "stats", "histogram"):
        assert (out / summary[key].split("/")[-1]).exists()
    from synthtune.train.tokenize import load_prepared

    ds = load_prepared(out)
    assert len(ds) == summary["n_kept"]
    assert json.loads((out / "stats.json").read_text())["n_truncated"] == summary["n_truncated"]

    bad = subprocess.run([synthtune_bin, "prep", "--model", "tiny-t5", "--data", "bundled:train", "--format", "chat",
                          "--out", str(tmp_path / "bad")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "decoder-only" in bad.stderr


def test_a_rerun_that_dies_while_saving_keeps_the_previous_dataset(tmp_path, monkeypatch):
    # The old rerun deleted dataset/ first, then saved: a crash in between left nothing, or a
    # half-written dataset. Now the new one is saved beside it and swapped in whole.
    import datasets

    from synthtune.jobs.prep import run_prep
    from synthtune.train.tokenize import load_prepared

    out = tmp_path / "prep"
    run_prep("tiny-llama", "bundled:train", max_length=128, limit=6, out=out, cache_dir=tmp_path / "cache")
    before = load_prepared(out).to_list()

    def dies_mid_save(self, path, **kwargs):
        (Path(path)).mkdir(parents=True, exist_ok=True)
        (Path(path) / "data-00000-of-00001.arrow").write_bytes(b"half an arrow file")
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", dies_mid_save)
    with pytest.raises(KeyboardInterrupt):
        run_prep("tiny-llama", "bundled:train", max_length=128, limit=4, out=out, cache_dir=tmp_path / "cache")
    assert load_prepared(out).to_list() == before
    assert sorted(p.name for p in out.iterdir()) == ["dataset", "length_hist.png", "stats.json"]
