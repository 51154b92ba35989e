"""k-sample throughput: workshop-style vs HF num_return_sequences vs naive shared prefill vs sample_k.

Run (CPU, repo root; the issue's setting):
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/sampling_bench.py --threads 2 --out bench/results/sampling_bench_cpu_t2_passive.json
(PASSIVE: idle OpenMP threads sleep instead of spinning when another job shares the cores; see bench/RESULTS.md)
GPU, random-init SmolLM2-135M-shaped model in bf16, random 2,057-token prompt (imports only torch,
transformers and synthtune.generation.sampler from the checkout):
    python bench/sampling_bench.py --random-init --device cuda --out $OUT/sampling_bench_h200.json
With --profile DIR, each of --profile-variants then runs once more under torch.profiler: DIR gets
its op table (sampling_profile_<variant>.txt, by self device time on a GPU) and the JSON its aten op
and kernel-launch counts per new token, to see where sample_k's many small ops go on a GPU.

Every variant decodes exactly --new tokens per sample (EOS is suppressed: ``min_new_tokens`` for
generate, ``ignore_eos=True`` for sample_k) with the same sampling settings, so all do the same
amount of work and tokens/s = k * new / seconds. Variants run one after another in one process;
each is timed --repeats times and the best time is reported (other processes may share the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("workshop", "hf", "naive", "ours")
LABELS = {
    "workshop": "workshop-style: k generate calls, 1 sample each",
    "hf": "HF generate(num_return_sequences=k)",
    "naive": "naive shared prefill (DynamicCache.batch_repeat_interleave(k) + generate)",
    "ours": "synthtune sample_k (prefix once, shared-prefix attention)",
}


def load_sampler(standalone: bool):
    if standalone:
        # the GPU machine has torch + transformers but not synthtune's other dependencies; the
        # sampler needs only those plus synthtune.generation.base, importable from the checkout
        sys.path.insert(0, str(REPO))
    from synthtune.generation import sampler

    return sampler


class IdTokenizer:
    """Stand-in tokenizer for the random-init model: prompts are token ids, decode shows ids."""

    eos_token_id = 2
    pad_token_id = 2

    def __call__(self, text, add_special_tokens=True):
        raise TypeError("the random-init bench passes token ids")

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def build_random(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                      max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = LlamaForCausalLM(cfg).to(device=args.device, dtype=dtype).eval()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 2
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, cfg.vocab_size, (args.prompt_len,), generator=g).tolist()
    lm = SimpleNamespace(model=model, tokenizer=IdTokenizer(), is_seq2seq=False, device=args.device, dtype=dtype)
    return lm, prompt, f"random-init SmolLM2-135M shape ({dtype})", "random token ids"


def build_real(args):
    from synthtune.data.gsm8k import load_split
    from synthtune.models import load_model
    from synthtune.synth.prompts import build_prompt

    lm = load_model(args.model, device=args.device)
    gdir = os.environ.get("SYNTHTUNE_GSM8K_DIR") or str(REPO.parent / "shared" / "data" / "gsm8k")
    if (Path(gdir) / "train.jsonl").exists():
        pool, source = load_split("train", "dir", gsm8k_dir=gdir).rows, f"GSM8K train ({gdir})"
        question = load_split("test", "dir", gsm8k_dir=gdir).rows[0]["question"]
    else:
        pool, source = load_split("train", "bundled").rows, "bundled sample"
        question = load_split("test", "bundled").rows[0]["question"]
    # exemplars are drawn per seed; take the draw whose prompt length is closest to the issue's
    # 2,057 tokens so the numbers are comparable
    best = None
    for seed in range(32):
        prompt = build_prompt(question, pool, k=8, fmt="plain", seed=seed)
        ids = lm.tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens)["input_ids"]
        if best is None or abs(len(ids) - args.prompt_len) < abs(len(best) - args.prompt_len):
            best = ids
    ids = best
    return lm, ids, f"{args.model} ({lm.dtype})", f"8-shot plain prompt, exemplars from {source}"


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def run_variant(name, lm, ids, args, sampler):
    model, k, new = lm.model, args.k, args.new
    dev = lm.device
    x = torch.tensor([ids], device=dev)
    gen = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
               max_new_tokens=new, min_new_tokens=new, pad_token_id=lm.tokenizer.pad_token_id)
    torch.manual_seed(args.seed)
    with torch.inference_mode():
        if name == "workshop":
            outs = [model.generate(input_ids=x, attention_mask=torch.ones_like(x), **gen) for _ in range(k)]
            return sum(o.shape[1] - x.shape[1] for o in outs)
        if name == "hf":
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), num_return_sequences=k, **gen)
            return (out.shape[1] - x.shape[1]) * out.shape[0]
        if name == "naive":
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
            model(input_ids=x[:, :-1], past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache.batch_repeat_interleave(k)
            xk = x.repeat(k, 1)
            out = model.generate(input_ids=xk, attention_mask=torch.ones_like(xk), past_key_values=cache, **gen)
            return (out.shape[1] - x.shape[1]) * out.shape[0]
    params = sampler.SamplingParams(max_new_tokens=new, temperature=args.temperature, top_p=args.top_p,
                                    top_k=args.top_k, num_samples=k, seed=args.seed)
    # forced: on a GPU sample_k's auto would take HF's generate, which variant (2) already measures
    res = sampler.sample_k(lm, [ids], params, ignore_eos=True, sampler="shared_prefix")
    return sum(s.n_tokens for s in res[0])


def profile_variants(names, lm, ids, args, sampler, out_dir: Path) -> dict:
    """Each variant once under torch.profiler: the op table to ``out_dir``, the counts returned."""
    from torch.profiler import ProfilerActivity, profile

    cuda = str(lm.device).startswith("cuda")
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    out_dir.mkdir(parents=True, exist_ok=True)
    found = {}
    for name in names:
        sync(args.device)
        with profile(activities=activities) as prof:
            tokens = run_variant(name, lm, ids, args, sampler)
            sync(args.device)
        avg = prof.key_averages()
        table = avg.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=40)
        (out_dir / f"sampling_profile_{name}.txt").write_text(table + "\n")
        aten = sum(e.count for e in avg if e.key.startswith("aten::"))
        launches = sum(e.count for e in avg if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel"))
        found[name] = {"new_tokens": tokens, "aten_ops": aten, "aten_ops_per_new_token": round(aten / tokens, 1),
                       "kernel_launches": launches, "kernel_launches_per_new_token": round(launches / tokens, 1)}
        print(f"  profile {name}: {found[name]}", flush=True)
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--prompt-len", type=int, default=2057, help="prompt length (random-init) or target length (GSM8K prompt)")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--profile", type=Path, help="also profile --profile-variants, writing their op tables here")
    ap.add_argument("--profile-variants", default="hf,ours")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sampler = load_sampler(args.random_init)
    lm, ids, model_desc, prompt_desc = (build_random if args.random_init else build_real)(args)

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": __import__("transformers").__version__, "threads": torch.get_num_threads(),
           "cpus": os.cpu_count(), "device": args.device,
           "card": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
           "loadavg_start": os.getloadavg()}
    print(json.dumps(env), flush=True)
    print(f"model: {model_desc}; prompt: {prompt_desc}, {len(ids)} tokens; k={args.k}, new={args.new}", flush=True)

    # warm-up on a short prompt: first-call costs (kernel selection, CUDA context, allocator)
    # must not be charged to whichever variant runs first
    short = SimpleNamespace(**{**vars(args), "k": 2, "new": 4})
    for name in args.variants.split(","):
        run_variant(name, lm, ids[:64], short, sampler)
        sync(args.device)

    rows = []
    for name in args.variants.split(","):
        best, tokens = None, 0
        for _ in range(args.repeats):
            sync(args.device)
            t = time.perf_counter()
            tokens = run_variant(name, lm, ids, args, sampler)
            sync(args.device)
            dt = time.perf_counter() - t
            best = dt if best is None else min(best, dt)
            print(f"  {name}: {dt:.2f} s ({tokens} new tokens)", flush=True)
        rows.append({"variant": name, "label": LABELS[name], "seconds": best, "new_tokens": tokens,
                     "tok_per_s": tokens / best})
    base = next((r for r in rows if r["variant"] == "workshop"), None)
    print("\n| variant | seconds | new tokens | new tok/s | vs workshop-style |\n|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['tok_per_s'] / base['tok_per_s']:.2f}x" if base else "-"
        r["vs_workshop"] = r["tok_per_s"] / base["tok_per_s"] if base else None
        print(f"| {r['label']} | {r['seconds']:.2f} | {r['new_tokens']} | {r['tok_per_s']:.1f} | {ratio} |")
    profiled = (profile_variants(args.profile_variants.split(","), lm, ids, args, sampler, args.profile)
                if args.profile else None)
    env["loadavg_end"] = os.getloadavg()
    print(json.dumps({"loadavg_end": env["loadavg_end"]}))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"env": env, "model": model_desc, "prompt": prompt_desc,
                                              "prompt_tokens": len(ids), "k": args.k, "new": args.new,
                                              "argv": sys.argv, "rows": rows,
                                              **({"profile": profiled} if profiled else {})}, indent=2))


if __name__ == "__main__":
    main()
