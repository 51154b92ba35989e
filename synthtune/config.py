"""One typed config per job: dataclass defaults <- YAML file <- ``key=value`` overrides.

Every field carries help text, and every numeric field its allowed range. Unknown keys fail with
the list of valid ones (and the closest match); wrong types and out-of-range values fail with the
file and line (or the override) and what is allowed, so a typo never silently falls back to a
default (nanoGPT's configurator refuses unknown keys for the same reason).

Values are read by the field's type, from the text the user wrote, never by YAML 1.1's guesses:

* a ``str`` field takes the text as written (``served_model=no`` is "no", ``0123`` is "0123");
* a ``bool`` takes only YAML 1.2's true/false (True/TRUE, False/FALSE): yes/no/on/off/1/0 mean
  booleans in YAML 1.1 and strings in YAML 1.2, so they are refused rather than guessed;
* an ``int`` takes decimal digits, and refuses a leading zero (YAML 1.1 reads ``0123`` as the
  octal 83, YAML 1.2 as 123: whichever we chose, someone would get the number they did not mean);
* a ``float`` takes decimal or exponent notation (``2e-4``), and ``.inf``/``.nan`` only to refuse
  them with a clear message where the field needs a finite number (all of them today);
* ``null``, ``~`` or nothing is None for a field that may be None (a list: the empty list).
  Quoting (``'null'``, ``"0123"``) always means the text itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from synthtune.errors import ConfigError
from synthtune.files import atomic_write_text

T = TypeVar("T")


@dataclass(frozen=True)
class Range:
    """The values a numeric field allows: optional bounds, a few extra values, and infinities or not.

    NaN is never allowed: every comparison with it is false, so a NaN threshold or rate silently
    disables what it controls.

    >>> Range(gt=0, le=1).describe("a number")
    'a number in (0, 1]'
    >>> Range(ge=1, also=(-1,)).problem(0, "an integer")
    'must be -1 or an integer >= 1'
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    also: tuple = ()  # sentinel values outside the bounds that mean something (max_steps=-1)
    inf: bool = False  # whether +-inf is a meaningful setting

    def describe(self, kind: str) -> str:
        lower = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else ""
        upper = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else ""
        if lower and upper:
            text = f"{kind} in {lower}, {upper}"
        elif lower:  # "[1" reads ">= 1", "(0" reads "> 0"
            text = f"{kind} {'>=' if lower[0] == '[' else '>'} {lower[1:]}"
        elif upper:
            text = f"{kind} {'<=' if upper[-1] == ']' else '<'} {upper[:-1]}"
        else:
            text = kind
        return " or ".join([*map(_num, self.also), text])

    def problem(self, value: int | float, kind: str) -> str | None:
        """Why ``value`` is not allowed (None when it is)."""
        if isinstance(value, float) and math.isnan(value):
            return f"must be {self.describe(kind)}; nan is not a number"
        if isinstance(value, float) and math.isinf(value) and not self.inf:
            return f"must be {self.describe(kind)}; infinity is not allowed here"
        if value in self.also:
            return None
        if ((self.ge is not None and not value >= self.ge) or (self.gt is not None and not value > self.gt)
                or (self.le is not None and not value <= self.le) or (self.lt is not None and not value < self.lt)):
            return f"must be {self.describe(kind)}"
        return None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


#: numpy (which transformers' set_seed also seeds) takes seeds in [0, 2**32 - 1].
SEED = {"ge": 0, "le": 2 ** 32 - 1}
#: One option for every command that draws k samples with a local model (the choices are
#: synthtune.generation.sampler.SAMPLERS; this module stays free of torch).
SAMPLER = dict(help="how a local model draws k samples: auto = the shared-prefill sampler on CPU, HF's batched "
               "generate(num_return_sequences=k) on any accelerator (faster on one measured H200 shape: "
               "bench/RESULTS.md); shared_prefix or generate forces one. Sampled draws differ between them",
               choices=["auto", "shared_prefix", "generate"])


def opt(default: Any, help: str, choices: Iterable[Any] | None = None, *, ge: float | None = None,
        gt: float | None = None, le: float | None = None, lt: float | None = None, also: tuple = (),
        inf: bool = False, unbounded: bool = False, flag: str | None = None, positional: bool = False,
        metavar: str | None = None, required: bool = False, split: str | None = None):
    """A dataclass field with help text and, optionally, the allowed values and its command-line spelling.

    Numeric fields declare their range here (``ge``/``gt``/``le``/``lt`` bounds, ``also`` for
    sentinels such as -1, ``inf`` when infinity means something, ``unbounded`` for any finite
    number); ``tests/test_config.py`` checks that every one does.

    The command line is generated from these fields (``synthtune/cli_options.py``): a field is
    the option ``--field-name`` unless ``flag`` names another spelling (``--format`` for
    ``prompt_format``), or a positional argument shown as ``metavar`` when ``positional``.
    ``split`` (lists only): each item of a repeated option is split on it too, so
    ``--lora-targets q_proj,v_proj`` means what ``lora_targets=q_proj,v_proj`` means.
    ``required`` fields default to None and must be given (by option, ``--config`` or ``key=value``)
    before a command runs (``check_required``).
    """
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if unbounded or any(b is not None for b in (ge, gt, le, lt)):
        meta["range"] = Range(ge=ge, gt=gt, le=le, lt=lt, also=tuple(also), inf=inf)
    if flag is not None:
        meta["flag"] = flag
    if positional:
        meta["positional"] = True
    if metavar is not None:
        meta["metavar"] = metavar
    if split is not None:
        meta["split"] = split
    if required:
        if default is not None:
            raise TypeError("a required field has no default (None until given)")
        meta["required"] = True
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> str:
    """How the command line spells field ``f``: its option (``--max-length``) or its positional metavar."""
    if f.metadata.get("positional"):
        return f.metadata.get("metavar") or f.name.upper()
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def check_required(cfg) -> None:
    """Raise ConfigError naming every required field of ``cfg`` that is still unset, and how to set it."""
    missing = [f for f in fields(cfg) if f.metadata.get("required") and getattr(cfg, f.name) is None]
    if missing:
        raise ConfigError("; ".join(f"{f.name} is required ({f.metadata['help']}): give {flag_of(f)}, or "
                                    f"{f.name}: in the --config file, or {f.name}=..." for f in missing))


# --------------------------------------------------------------------------------------------
# job configs
# --------------------------------------------------------------------------------------------


@dataclass
class DemoConfig:
    """`synthtune demo`: the README's whole pipeline on one small model, in one run.

    synthesize -> SFT set (kept + gold rationales) -> preprocess -> LoRA fine-tune -> base vs tuned.
    """

    model: str = opt("smollm2-135m-instruct", "HF id, local dir, or a built-in name (smollm2-135m-instruct, "
                     "tiny-llama, tiny-t5)")
    source: str = opt("bundled", "GSM8K source: train questions are synthesized and trained on, test ones "
                      "evaluated", ["bundled", "auto", "hub", "dir"])
    gsm8k_dir: str | None = opt(None, "folder with GSM8K's train.jsonl/test.jsonl (for source=dir/auto)")
    # 1. synthesis
    synth_questions: int = opt(8, "train questions to synthesize rationales for", ge=1)
    shots: int = opt(4, "exemplars per synthesis prompt, drawn from train only (held apart from the questions)", ge=0)
    k: int = opt(4, "samples per question", ge=1)
    rounds: int = opt(1, "synthesis rounds (unsolved questions are retried with fresh exemplars)", ge=1)
    temperature: float = opt(0.7, "synthesis sampling temperature", ge=0)
    synth_max_new_tokens: int = opt(200, "per sample; GSM8K rationales average ~120 tokens", ge=1)
    rationalize: bool = opt(True, "STaR rationalization: questions no sample solved are asked again with the gold "
                            "answer as a hint; checked rationales join the SFT set without the hint")
    synth_calculator: bool = opt(True, "synthesis samples with GSM8K's calculator writing each <<expr=>> result, so "
                                 "a 135M model's arithmetic slips do not fail the calculator check")
    # 2. SFT set, 3. preprocessing
    gold_rationales: bool = opt(True, "add the train split's gold rationales to the kept ones (a 135M model keeps "
                                "few of its own)")
    gold_limit: int | None = opt(200, "at most this many gold rationales (the first N of train; the bundled "
                                 "split has 36, the full GSM8K 7,473)", ge=0)
    max_length: int = opt(512, "token limit per training example (the histogram shows where the data sits)", ge=1)
    # 4. fine-tuning
    train_steps: int = opt(30, "LoRA optimizer steps", ge=1)
    train_batch_size: int = opt(4, "examples per step", ge=1)
    learning_rate: float = opt(5e-4, "peak LR (cosine after 3 warmup steps)", gt=0)
    lora_r: int = opt(16, "LoRA rank (all linear layers)", ge=1)
    # 5. evaluation
    eval_questions: int | None = opt(14, "test questions for base vs tuned, the first N (the bundled split has 14, "
                                     "the full GSM8K 1,319: hours on a CPU); null = the whole split", ge=1)
    eval_max_new_tokens: int = opt(200, "generation budget per answer", ge=1)
    eval_batch_size: int = opt(7, "questions per generate() call", ge=1)
    eval_calculator: bool = opt(True, "evaluate the tuned model once more with calculator-assisted decoding (the "
                                "report's 'tuned + calculator' column): its arithmetic errors apart from its reasoning")
    train_format: str = opt("plain", "prompt format for training and evaluation (plain: 'Question: ...\\nAnswer:')",
                            ["plain", "chat", "auto"])
    seed: int = opt(0, "seed for exemplars, sampling, init and data order", **SEED)
    output_dir: str | None = opt(None, "where results go; default outputs/demo/<timestamp>")
    device: str | None = opt(None, "cpu, cuda, cuda:1...; default: cuda when available")


@dataclass
class SynthConfig:
    """`synthtune synth`: prompts -> k samples -> vote -> evaluator -> kept dataset, in rounds."""

    model: str = opt("smollm2-135m-instruct", "HF id, local dir, or a built-in name")
    backend: str = opt("hf", "generation backend: hf = this process loads the model; openai = OpenAI-compatible "
                       "servers (vLLM, TGI, llama.cpp, `synthtune serve`) at endpoints=...", ["hf", "openai"])
    endpoints: list[str] = opt([], "openai backend: server base URLs (http://host:8000/v1); requests go round-robin "
                               "over them. Not part of the resume fingerprint: rerun against other servers freely",
                               flag="--endpoint", split=",")
    served_model: str | None = opt(None, "openai backend: the model name the servers serve (vLLM "
                                   "--served-model-name, or a --lora-modules name); default: model")
    api_key_env: str | None = opt(None, "openai backend: name of the environment variable holding the API key "
                                  "(sent as a Bearer token; never logged or written). Unset: no key is sent")
    concurrency: int = opt(8, "openai backend: requests in flight at once over all endpoints; a batch only fills "
                           "it when batch_size >= concurrency", ge=1)
    request_timeout: float = opt(600.0, "openai backend: seconds per request (k long samples on a busy server "
                                 "take minutes); a timeout is retried", gt=0)
    max_retries: int = opt(6, "openai backend: retries per request on 429, 5xx, timeouts and connection errors", ge=0)
    retry_backoff: float = opt(1.0, "openai backend: first retry wait in seconds, doubled each retry (with "
                               "jitter, at most 60 s); a server's Retry-After wins when longer", ge=0)
    questions: str = opt("bundled:train", "questions to synthesize rationales for: bundled:SPLIT, gsm8k:SPLIT "
                         "(folder or hub), hub:SPLIT, dir:SPLIT, or a JSONL path (answer field optional)")
    exemplars: str | None = opt(None, "exemplar pool (same spec forms); default: the train split of the "
                                "questions' source. Never a test split. If it is the questions' own source, "
                                "it is split off so no question is ever an exemplar")
    exemplar_pool_size: int = opt(12, "rows held out as exemplars when exemplars and questions share a source", ge=0)
    limit: int | None = opt(None, "only the first N questions", ge=1)
    out: str | None = opt(None, "output directory; default outputs/synth/<model>-<questions>")
    gsm8k_dir: str | None = opt(None, "folder with GSM8K's train.jsonl/test.jsonl")
    shots: int = opt(8, "exemplars per prompt", ge=0)
    strategy: str = opt("random", "exemplar choice: random (fresh per question and round), fixed (shared "
                        "prefix), similar (lexical nearest)", ["random", "fixed", "similar"])
    prompt_format: str = opt("auto", "auto = chat template for instruct models, else plain", ["auto", "plain", "chat"],
                             flag="--format")
    k: int = opt(8, "samples per question in round 1", ge=1)
    k_growth: float = opt(1.0, "multiply k by this each later round (e.g. 2 for 8 -> 16)", gt=0)
    rounds: int = opt(2, "a question with no consensus or no passing path is retried up to this many rounds", ge=1)
    temperature: float = opt(0.7, "sampling temperature in round 1", ge=0)
    temperature_step: float = opt(0.2, "added to the temperature each later round (more diverse retries)", ge=0)
    top_p: float = opt(0.95, "nucleus sampling", gt=0, le=1)
    top_k: int = opt(0, "top-k sampling (0 = off)", ge=0)
    presence_penalty: float = opt(0.0, "subtracted once from the logit of every token a sample has already "
                                  "generated (OpenAI/vLLM semantics; the prompt does not count): > 0 steers each "
                                  "sample to new tokens, < 0 to repeats; -2 to 2, 0 = off", ge=-2, le=2)
    frequency_penalty: float = opt(0.0, "subtracted from a token's logit once per time the sample has already "
                                   "generated it (OpenAI/vLLM semantics): > 0 curbs loops of the same words; "
                                   "-2 to 2, 0 = off", ge=-2, le=2)
    max_new_tokens: int = opt(256, "per sample; GSM8K rationales average ~120 tokens", ge=1)
    calculator: bool = opt(False, "GSM8K's calculator writes each annotation's result: once a sample has written "
                           "<<expr=, the exact value of expr and >> are forced in (hf: they count toward "
                           "max_new_tokens); expressions the calculator cannot read are left to the model. "
                           "backend openai: plain prompts only (prompt_format=plain); each sample stops at '=' "
                           "and is continued after the result, one request per piece (the result is sent as "
                           "prompt: it counts neither in n_tokens nor toward max_new_tokens)")
    stop: list[str] = opt([], "extra stop strings (the plain format always stops at a new 'Question:' or "
                              "'Problem:' line)")
    batch_size: int = opt(4, "questions per batch; results are flushed after every batch", ge=1)
    sampler: str = opt("auto", **SAMPLER)
    min_agreement: float = opt(0.5, "without gold: below this majority share a question has no consensus", ge=0, le=1)
    use_gold: bool = opt(True, "keep only rationales that reach the gold answer when one exists (rejection "
                         "sampling); false = self-consistency only")
    min_calc: float = opt(1.0, "minimum fraction of correct calculations in a kept rationale", ge=0, le=1)
    reward_model: str | None = opt(None, "optional HF sequence-classification reward model (path or hub id)")
    min_reward: float | None = opt(None, "drop rationales scoring below this (reward model); none = rank only",
                                   unbounded=True)
    max_keep: int = opt(4, "at most this many distinct rationales per question", ge=1)
    diversity: str = opt("greedy", "greedy: no two kept paths with ROUGE-L F >= threshold; workshop: the 2023 "
                         "rule (mean self-ROUGE-L recall below the group mean); none", ["greedy", "workshop", "none"])
    rouge_threshold: float = opt(0.7, "ROUGE-L F at or above which two paths count as the same (Self-Instruct)", ge=0, le=1)
    rationalize: bool = opt(False, "STaR rationalization: a question no sample solved in a round is asked again "
                            "with its gold answer as a hint; rationales that pass the same evaluator are kept "
                            "without the hint (provenance.rationalized). Needs gold answers (use_gold)")
    rationalize_k: int | None = opt(None, "rationales sampled per unsolved question; default: the round's k", ge=1)
    seed: int = opt(0, "seed for exemplars and sampling", **SEED)
    device: str | None = opt(None, "cpu, cuda...; default cuda when available")
    trust_remote_code: bool = opt(False, "allow the model repo's own Python code to run")
    allow_changed_settings: bool = opt(False, "resume an output directory although settings that decide what is "
                                       "sampled or kept (k, temperature, max_new_tokens, stop, model, shots, ...) "
                                       "differ from its earlier runs; the change is logged and recorded in "
                                       "fingerprint.json. Off: such a rerun is refused, naming the settings")


@dataclass
class TrainConfig:
    """`fine_tune/train.py` / `synthtune train`: full or LoRA fine-tuning, seq2seq or causal."""

    model: str = opt("tiny-llama", "HF id, local dir, or a built-in name (smollm2-135m-instruct, tiny-llama, tiny-t5)")
    random_init: bool = opt(False, "build the model from its config with random weights instead of loading them: "
                            "speed and memory checks of shapes whose weights you don't have (model may be a "
                            "config.json path)")
    tokenizer: str | None = opt(None, "tokenizer to use (model id, dir or built-in name); default: the model's")
    method: str = opt("lora", "full: every weight trains; lora: low-rank adapters (peft); qlora: LoRA on a 4-bit "
                      "base (CUDA + bitsandbytes)", ["full", "lora", "qlora"])
    lora_r: int = opt(8, "LoRA rank", ge=1)
    lora_alpha: int = opt(16, "LoRA scaling numerator (scale = alpha / r)", ge=1)
    lora_dropout: float = opt(0.05, "dropout on the LoRA input; costs one mask per adapted input on GPU", ge=0, lt=1)
    lora_targets: list[str] = opt(["all-linear"], "module names to adapt (e.g. q_proj,v_proj or q,v for T5), or "
                                  "all-linear", split=",")
    data: str = opt("bundled:train", "training data: bundled:train, gsm8k:train, a synth kept.jsonl, or any JSONL "
                    "with question and answer")
    eval_data: str | None = opt("bundled:test", "held-out data for eval loss and accuracy (none to skip)")
    eval_limit: int | None = opt(None, "use only the first N eval rows (the full GSM8K test has 1,319)", ge=1)
    gsm8k_dir: str | None = opt(None, "folder with GSM8K's train.jsonl/test.jsonl")
    limit: int | None = opt(None, "use only the first N training rows", ge=1)
    prompt_format: str = opt("plain", "plain: 'Question: ...\\nAnswer: ...'; chat: the tokenizer's chat template; "
                             "auto: chat when the tokenizer has one", ["plain", "chat", "auto"], flag="--format")
    max_length: int = opt(512, "token limit per example; GSM8K with SmolLM2's tokenizer: p99 399, max 543 "
                          "(the workshop's 256 cut 15.7% of answers)", ge=1)
    max_target_length: int | None = opt(None, "seq2seq: label length limit (default max_length)", ge=1)
    packing: bool = opt(False, "causal: pack examples into max_length rows (per-example attention); the fastest "
                        "on GPUs (1.5x bucketed batches with a Llama-1B shape on an H200)")
    attn_implementation: str = opt("auto", "attention kernel: auto (transformers' default: sdpa where the model "
                                   "has it; flash_attention_2 is opt-in until checked on a GPU); sdpa; flex_attention (CUDA: torch has no CPU "
                                   "backward); flash_attention_2 (CUDA, bf16, pip install flash-attn); eager (keeps "
                                   "B x heads x S x S probabilities)",
                                   ["auto", "sdpa", "flex_attention", "flash_attention_2", "eager"])
    packing_mode: str = opt("auto", "how packed rows keep examples apart: auto (mask for sdpa/eager, position_ids "
                            "for flex_attention, varlen for flash_attention_2); mask (a B x S x S additive mask); "
                            "position_ids (resets per example, transformers derives the mask or flex block "
                            "mask); varlen (the batch flattened to one row with cu_seqlens, flash-attn only)",
                            ["auto", "mask", "position_ids", "varlen"])
    group_by_length: bool = opt(True, "batch similar lengths together: less padding, same data per epoch")
    pad_to_multiple_of: int | None = opt(None, "pad each batch to a multiple of N tokens; 64 on GPUs keeps the "
                                         "number of batch shapes small (LoRA on unbucketed shapes ran 2-3x "
                                         "slower per step on an H200); none = pad to the longest row (best on CPUs)", ge=1)
    per_device_batch_size: int = opt(4, "micro-batch per process", ge=1)
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step; the loss is normalized by the "
                                           "label tokens of the whole window, so accumulation equals a big batch", ge=1)
    learning_rate: float = opt(2e-4, "peak LR (LoRA ~1e-4..3e-4; full fine-tuning ~1e-5..5e-5)", gt=0)
    weight_decay: float = opt(0.0, "AdamW weight decay", ge=0)
    lr_scheduler: str = opt("cosine", "decay after warmup", ["cosine", "linear", "constant"])
    warmup_steps: int = opt(0, "linear warmup, in optimizer steps", ge=0)
    max_steps: int = opt(-1, "optimizer steps to run; -1 = num_epochs over the data", ge=1, also=(-1,))
    num_epochs: float = opt(1.0, "epochs when max_steps is -1", gt=0)
    max_grad_norm: float = opt(1.0, "gradient clipping (0 = off)", ge=0)
    precision: str = opt("auto", "auto: bf16 weights for LoRA and bf16-mixed for full on bf16 GPUs, fp32 on CPU; "
                         "fp32; bf16 (weights and autocast); bf16-mixed (fp32 master weights, bf16 autocast)",
                         ["auto", "fp32", "bf16", "bf16-mixed"])
    gradient_checkpointing: bool = opt(False, "~30% slower, activations ~1/layers: recompute them in backward")
    compile: bool = opt(False, "torch.compile the model (slow first steps; pays off on long GPU runs)")
    loss_impl: str = opt("standard", "standard: full-vocabulary logits, upcast to fp32; chunked: the same summed loss "
                         "from the lm_head input, 1024 tokens at a time, recomputed in backward (less peak memory: "
                         "no fp32 batch x vocab logits; one more lm_head matmul)", ["standard", "chunked"])
    host_collectives: bool = opt(True, "several ranks on GPUs: reduce the per-step label count and stop flag over "
                                 "a CPU (gloo) group, so the CPU never waits for the GPU; gloo across nodes needs "
                                 "a routable interface (GLOO_SOCKET_IFNAME). false: over the GPU group (one "
                                 "device sync per step)")
    seed: int = opt(0, "seed for init, data order and dropout", **SEED)
    output_dir: str | None = opt(None, "run directory; default outputs/train/<model>-<method>")
    logging_steps: int = opt(5, "log loss/LR/tokens per second every N optimizer steps", ge=1)
    eval_steps: int = opt(0, "evaluate every N optimizer steps (0 = only at the end)", ge=0)
    eval_accuracy_samples: int = opt(16, "questions answered by greedy generation for accuracy at each eval "
                                     "(0 = loss only)", ge=0)
    eval_max_new_tokens: int = opt(192, "generation budget per eval answer", ge=1)
    eval_calculator: bool = opt(False, "in-training accuracy with GSM8K's calculator: once an answer has written "
                                "<<expr=, the exact value of expr and >> are forced in (as eval's calculator)")
    save_steps: int = opt(0, "checkpoint every N optimizer steps (0 = only the final model)", ge=0)
    save_total_limit: int = opt(2, "keep the last N checkpoints", ge=1)
    stop_at_step: int | None = opt(None, "save a checkpoint and stop at this step, as a preempted job would; "
                                   "continue later with resume_from=latest (the schedule still spans max_steps)", ge=1)
    resume_from: str | None = opt(None, "latest, or a checkpoint directory: restores model, optimizer, scheduler, "
                                  "RNG and data position")
    log_with: str = opt("auto", "accelerate tracker; auto: tensorboard when it is installed (the `tracking` "
                        "extra), else none. Metrics go to train_log.jsonl either way",
                        ["auto", "tensorboard", "wandb", "none"])
    trace_memory: bool = opt(True, "sample memory (and GPU utilization) in the background; CSV + PNG")
    device: str | None = opt(None, "single-process runs only: cpu or cuda (accelerate decides under launch)")
    trust_remote_code: bool = opt(False, "allow the model repo's own Python code to run")


@dataclass
class EvalConfig:
    """`synthtune eval`: accuracy of a model (and optionally its LoRA adapter) on GSM8K."""

    model: str = opt("smollm2-135m-instruct", "base model: HF id, local dir, or a built-in name")
    adapter: str | None = opt(None, "LoRA adapter directory (a training run's final/)")
    split: str = opt("test", "split to evaluate", ["train", "test"])
    source: str = opt("bundled", "GSM8K source", ["bundled", "auto", "hub", "dir"])
    gsm8k_dir: str | None = opt(None, "folder with GSM8K's train.jsonl/test.jsonl")
    limit: int | None = opt(None, "only the first N questions", ge=1)
    shots: int = opt(0, "0: the training format 'Question: ...\\nAnswer:'; 8: few-shot exemplars from train, in the same "
                     "words, before it", ge=0)
    k: int = opt(1, "samples per question: 1 = greedy; >1 = sampling with maj@k and pass@k", ge=1)
    temperature: float = opt(0.7, "sampling temperature when k > 1", ge=0)
    max_new_tokens: int = opt(256, "generation budget per answer", ge=1)
    batch_size: int = opt(8, "questions per generate() call (k=1)", ge=1)
    sampler: str = opt("auto", **SAMPLER)
    calculator: bool = opt(False, "GSM8K's calculator writes each annotation's result: once an answer has written "
                           "<<expr=, the exact value of expr and >> are forced in (they count toward "
                           "max_new_tokens); expressions the calculator cannot read are left to the model")
    prompt_format: str = opt("plain", "plain or chat (the tokenizer's template); match what training used",
                             ["plain", "chat", "auto"], flag="--format")
    compare: bool = opt(False, "evaluate the base model and the adapter in one run, side by side")
    seed: int = opt(0, "seed for exemplars and sampling", **SEED)
    out: str | None = opt(None, "output directory; default outputs/eval/<timestamp>")
    device: str | None = opt(None, "cpu, cuda...; default cuda when available")


@dataclass
class ServeConfig:
    """`synthtune serve`: the model and adapters to serve, where, and the limits.

    The limits say what one request may cost and how much the server takes on at once. A request's
    cost is prompts x n x (prompt tokens + max_tokens), the KV-cache tokens it may hold in the
    worst case (the shared-prefill sampler often holds fewer).
    """

    model: str = opt("smollm2-135m-instruct", "base model: HF id, local dir, or a built-in name")
    adapters: list[str] = opt([], "LoRA adapter as NAME=DIR (or DIR: named after the folder), served as model NAME; "
                              "repeatable", flag="--adapter")
    host: str = opt("127.0.0.1", "address to bind; keep 127.0.0.1 unless others must reach it")
    port: int = opt(8000, "port (0 = any free one; the chosen one is printed)", ge=0, le=65535)
    served_model_name: str | None = opt(None, "name clients use for the base model (default: model)")
    api_key_env: str | None = opt(None, "require the key held in this environment variable (Authorization: Bearer)")
    max_batch: int = opt(32, "most prompts generated together in one batch", ge=1)
    sampler: str = opt("auto", **SAMPLER)
    batch_window_ms: float = opt(5.0, "how long the first request waits for others to batch with (latency vs "
                                 "batch size)", ge=0)
    threads: int | None = opt(None, "torch CPU threads (one per core; fewer when sharing the machine); unset or 0: "
                              "torch's default", ge=0)
    device: str | None = opt(None, "cpu, cuda...; default cuda when available")
    seed: int = opt(0, "seed for built-in tiny models and requests without a seed", **SEED)
    max_request_tokens: int = opt(65536, "per-request (and per-batch) budget of prompts x n x (prompt tokens + "
                                  "max_tokens); over it: 400 naming this limit", ge=1)
    max_inflight_tokens: int = opt(262144, "server-wide budget summed over the requests queued or running; a "
                                   "request that would pass it gets 503 with Retry-After; at least "
                                   "max_request_tokens", ge=1)
    max_connections: int = opt(512, "open client connections at once (no thread per connection); more get a "
                               "quick 503 and are closed. Capped by the open-file limit", ge=1)
    read_timeout: float = opt(30.0, "seconds a client has to send one whole request (headers and body), and "
                              "that an idle keep-alive connection stays open", gt=0)
    context_length: int | None = opt(None, "override the model's context in tokens; default: from the model "
                                     "config, else 512 for T5-style models (relative positions) whose config "
                                     "names none", ge=2)


@dataclass
class PrepConfig:
    """`synthtune prep`: tokenize data for fine-tuning (label masks, length stats, histogram, arrow dataset)."""

    model: str | None = opt(None, "HF id, local dir, or built-in name (only its tokenizer is loaded)", required=True)
    data: str | None = opt(None, "bundled:train, gsm8k:train, hub:train, dir:train or a JSONL", required=True)
    prompt_format: str = opt("auto", "plain, chat, or auto (chat when the model has a template)",
                             ["plain", "chat", "auto"], flag="--format")
    max_length: int = opt(512, "longest example (seq2seq: encoder input) in tokens", ge=1)
    max_target_length: int | None = opt(None, "seq2seq labels limit; default max_length", ge=1)
    truncation: str = opt("drop", "drop over-long examples, or truncate them (cuts the answer)", ["drop", "truncate"])
    out: str | None = opt(None, "output dir; default outputs/prep/<model>_<data>_<format>_<max_length>")
    limit: int | None = opt(None, "only the first N rows", ge=1)


@dataclass
class InferConfig:
    """`synthtune infer`: answer questions with a model and its LoRA adapter, in the format training used."""

    model: str | None = opt(None, "base model: HF id, local dir, or built-in name", required=True)
    adapter: str | None = opt(None, "LoRA adapter dir (a training run's final/)")
    prompt: list[str] = opt([], "a question (repeatable); or give input")
    input: str | None = opt(None, "JSONL with a question field")
    out: str | None = opt(None, "write results as JSONL here")
    k: int = opt(1, "samples per question (1 = greedy)", ge=1)
    temperature: float = opt(0.7, "sampling temperature when k > 1", ge=0)
    max_new_tokens: int = opt(256, "generation budget", ge=1)
    prompt_format: str = opt("plain", "plain or chat: what training used (auto: chat when the tokenizer has a "
                             "template)", ["plain", "chat", "auto"], flag="--format")
    batch_size: int = opt(8, "questions per generate() call", ge=1)
    sampler: str = opt("auto", **SAMPLER)
    calculator: bool = opt(False, "GSM8K's calculator writes each annotation's result: once an answer has written "
                           "<<expr=, the exact value of expr and >> are forced in (they count toward "
                           "max_new_tokens); expressions the calculator cannot read are left to the model")
    seed: int = opt(0, "seed for built-in tiny models and sampling", **SEED)
    device: str | None = opt(None, "cpu, cuda...; default cuda when available")


@dataclass
class MergeConfig:
    """`synthtune merge`: fold a LoRA adapter into its base, save safetensors, verify the logits."""

    model: str | None = opt(None, "the adapter's base model (default: the base the adapter records)")
    adapter: str | None = opt(None, "LoRA adapter dir (a training run's final/)", required=True)
    out: str | None = opt(None, "new directory for the merged model", required=True)
    atol: float = opt(1e-4, "allowed logit difference vs the adapter model: atol + rtol x max|logit|", ge=0)
    rtol: float = opt(1e-5, "relative part of the allowed logit difference (fp32 rounding grows with scale)", ge=0)


#: vLLM's allowed ``--max-lora-rank`` values (``vllm/config/lora.py``, ``MaxLoRARanks``); its default is 16.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class CheckVllmConfig:
    """`synthtune check-vllm`: would vLLM load this LoRA adapter? Its rules, checked without vLLM; nothing is written."""

    adapter: str | None = opt(None, "LoRA adapter dir (a training run's final/)", required=True, positional=True,
                              metavar="ADAPTER")
    max_lora_rank: int = opt(16, "the --max-lora-rank the vLLM server runs with (vLLM's default: 16)",
                             VLLM_MAX_LORA_RANKS, ge=1, le=512)
    model: str | None = opt(None, "the base vLLM serves (default: the base the adapter records)")


@dataclass
class ScoreConfig:
    """`synthtune score`: extraction, correctness, majority vote, maj@k and pass@k of any model's outputs."""

    input: str | None = opt(None, "JSONL rows with question, answer, completions (or completion)", required=True,
                            positional=True, metavar="IN.jsonl")
    out: str | None = opt(None, "where the scored JSONL is written", required=True)
    lenient: bool = opt(False, "skip malformed rows (and report how many) instead of failing")


@dataclass
class DataCheckConfig:
    """`synthtune data check`: fields, final answers and every calculator annotation of a GSM8K-format file."""

    file: str | None = opt(None, "JSONL with question and answer fields (GSM8K format)", required=True,
                           positional=True, metavar="FILE.jsonl")
    lenient: bool = opt(False, "skip malformed rows (and report them) instead of failing")


@dataclass
class ModelsPrepareConfig:
    """`synthtune models prepare`: fetch, convert or build a model once; prints its local path."""

    name: str | None = opt(None, "smollm2-135m-instruct, tiny-llama, tiny-t5, an HF id or a dir", required=True,
                           positional=True, metavar="NAME")
    seed: int = opt(0, "seed for the tiny models", **SEED)


@dataclass
class ModelsInfoConfig:
    """`synthtune models info`: a model's kind, size and the dtype/device it would load with."""

    name: str | None = opt(None, "smollm2-135m-instruct, tiny-llama, tiny-t5, an HF id or a dir", required=True,
                           positional=True, metavar="NAME")
    trust_remote_code: bool = opt(False, "allow the model repo's own Python code to run")


@dataclass
class EnvConfig:
    """`synthtune env`: versions, accelerator, paths and installed packages against poetry.lock, for a bug report.

    No fields: the report reads only the installed environment and the checkout it runs from.
    """


@dataclass
class MemoryConfig:
    """`synthtune memory`: estimate peak GPU memory per GPU for a training setup, or fit the fastest that fits.

    The setup fields mirror ``synthtune.memory.estimate.Setup`` (a test keeps them in step); the
    defaults are the command's, e.g. a micro-batch of 8.
    """

    model: str = opt("smollm2-135m-instruct", "HF id, local dir, config.json path, or built-in name")
    method: str = opt("full", "full | lora | qlora (4-bit base)", ["full", "lora", "qlora"])
    lora_r: int = opt(8, "LoRA rank", ge=1)
    lora_targets: str = opt("q,v", "comma list of module names (q,v) or all-linear")
    lora_dropout: float = opt(0.0, "LoRA dropout (>0 keeps a mask and an input copy per adapter)", ge=0, lt=1)
    batch_size: int = opt(8, "micro-batch per GPU", ge=1)
    seq_len: int = opt(256, "tokens per sequence (seq2seq: encoder length)", ge=1)
    target_len: int | None = opt(None, "seq2seq decoder length (default: seq_len)", ge=1)
    grad_ckpt: bool = opt(False, "gradient checkpointing (~30% slower)")
    precision: str = opt("bf16-mixed", "fp32 | bf16 (bf16 weights) | bf16-mixed (fp32 weights + autocast)",
                         ["fp32", "bf16", "bf16-mixed"])
    optimizer: str = opt("adamw", "adamw | adamw-8bit | sgd", ["adamw", "adamw-8bit", "sgd"])
    zero_stage: int = opt(0, "DeepSpeed ZeRO stage 0..3", ge=0, le=3)
    offload: str = opt("none", "none | optimizer | all (ZeRO offload to CPU)", ["none", "optimizer", "all"])
    gpus: int = opt(1, "GPUs per node", ge=1)
    nodes: int = opt(1, "nodes", ge=1)
    attn: str = opt("sdpa", "sdpa | flash | eager (eager keeps S x S probabilities)", ["sdpa", "flash", "eager"])
    loss_impl: str = opt("standard", "standard | chunked (training's loss_impl: no batch x vocab fp32 logits)",
                         ["standard", "chunked"])
    persistence_threshold: int = opt(100_000, "ZeRO-3: parameters of at most this many elements stay whole on every "
                                     "GPU (DeepSpeed's stage3_param_persistence_threshold)", ge=0)
    fit: bool = opt(False, "search method/ZeRO/ckpt/micro-batch for the fastest setup that fits")
    gpu_gib: float = opt(80.0, "fit: memory per GPU, GiB", gt=0)
    headroom: float = opt(0.1, "fit: fraction kept free for the allocator's fragmentation", ge=0, lt=1)
    cpu_gib: float | None = opt(None, "fit: host RAM per node, GiB (enables offload options)", gt=0)
    global_batch: int | None = opt(None, "fit: sequences per optimizer step (sets gradient accumulation)", ge=1)
    train_config: str = opt("configs/train/X.yaml", "fit: training recipe named in the printed command")
    trust_remote_code: bool = opt(False, "allow the model repo's own Python code to run")


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def field_help(cls) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = (), /, *,
                option_names: dict[str, str] | None = None, **values: Any) -> T:
    """Build ``cls`` from defaults, then the YAML file, then ``key=value`` overrides, then ``values``.

    ``values`` are Python values (from command-line options or code); None means "not given". A
    string is taken as written, also for a number field (``"8"`` is 8, but never null). Errors
    name a value's source as ``option_names[key]`` (``option --k``) when given, else ``argument key``.
    """
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in fields(cls)}
    merged: dict[str, Any] = {}
    if path is not None:
        for key, (value, where) in _read_yaml(Path(path)).items():
            merged[key] = _coerce(cls, by_name, hints, key, value, where)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. max_steps=50)")
        merged[key] = _coerce(cls, by_name, hints, key, _override_value(raw), f"override {item!r}")
    for key, value in values.items():
        if value is not None:
            where = (option_names or {}).get(key) or f"argument {key}"
            merged[key] = _coerce(cls, by_name, hints, key, value, where)
    return cls(**merged)


def check_config(cfg) -> None:
    """Raise ConfigError when a field of ``cfg`` (built in code, say) breaks its type's rules or range."""
    hints = typing.get_type_hints(type(cfg))
    by_name = {f.name: f for f in fields(cfg)}
    for f in fields(cfg):
        _coerce(type(cfg), by_name, hints, f.name, getattr(cfg, f.name), f"{type(cfg).__name__}.{f.name}")


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def cli_overrides(cfg, base=None, skip: Iterable[str] = ()) -> list[str]:
    """``key=value`` words that rebuild ``cfg`` from ``base`` (default: the class defaults).

    Reports print these so every stage can be rerun by hand. A string goes as written unless it
    would read back differently (``null``, surrounding spaces, a leading quote): then it is quoted.
    """
    base = base if base is not None else type(cfg)()
    hints = typing.get_type_hints(type(cfg))
    words = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in skip or value == getattr(base, f.name):
            continue
        words.append(f"{f.name}={override_text(hints[f.name], value)}")
    return words


def override_text(tp: Any, value: Any) -> str:
    """The text that, after ``key=``, reads back as ``value`` for a field of type ``tp``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # 2e-05, inf: both read back exactly
    if isinstance(value, (list, tuple)):
        # flow style quotes most items that need it, but not all: PyYAML leaves a lone U+00A0 bare,
        # and a bare item is stripped as Python strips text. Anything that would read back
        # differently goes with every item double-quoted, which always reads back as written.
        text = yaml.safe_dump(list(value), default_flow_style=True, allow_unicode=True, width=2 ** 31).strip()
        try:
            if list(_to_type(tp, _override_value(text))) == list(value):
                return text
        except ValueError:
            pass
        return yaml.safe_dump(list(value), default_flow_style=True, default_style='"', allow_unicode=True,
                              width=2 ** 31).strip()
    text = str(value)
    try:
        if _to_type(tp, _override_value(text)) == text:
            return text
    except ValueError:
        pass
    return yaml.safe_dump(text, default_style='"', allow_unicode=True, width=2 ** 31).strip()


def save_config(cfg, path: str | Path) -> None:
    # atomic: a rerun replaces the file, and a crash mid-write must not leave half of it
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# --------------------------------------------------------------------------------------------
# reading values: text as written, typed by the field (see the module docstring)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Text:
    """A scalar as the user wrote it. Quoted text is never null and never split on commas."""

    text: str
    quoted: bool = False
    flow: list | str | None = None  # an override written as [a, b]: its items, or why it is not a list


@dataclass(frozen=True, repr=False)
class _Mapping:
    """A YAML mapping where a value was expected: no field takes one."""

    def __repr__(self) -> str:  # what "got ..." in an error shows
        return "a mapping (key: value)"


_NULLS = frozenset({"", "~", "null", "Null", "NULL"})
_TRUE, _FALSE = frozenset({"true", "True", "TRUE"}), frozenset({"false", "False", "FALSE"})
_DECIMAL = re.compile(r"[-+]?[0-9]+")
_LEADING_ZERO = re.compile(r"([-+]?)0+([0-9]+)")
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_INF = re.compile(r"([-+]?)\.?(inf|Inf|INF)")
_NAN = re.compile(r"\.?(nan|NaN|NAN)")
#: torch and numpy hold integers in 64 bits; a bigger one fails deep inside them, so it fails here.
_INT_LIMIT = 2 ** 63


def _read_yaml(path: Path) -> dict[str, tuple[Any, str]]:
    """Top-level mapping of a YAML file, each value (as nodes' text) with its 'file:line'."""
    if not path.is_file():
        raise ConfigError(f"config file {path} " + ("is a directory" if path.is_dir() else "does not exist"))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {err.start}); save the file as UTF-8") from None
    try:
        # compose, never construct: values stay the text the user wrote, and no tag runs code
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.reader.ReaderError as err:  # a character YAML forbids: it names a position, not a line
        line = text[:err.position].count("\n") + 1
        raise ConfigError(f"{path}:{line}: not valid YAML: {str(err).splitlines()[0]}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(err, 'problem', err)}") from err
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{path}: nested too deeply to be a config (values are scalars or flat lists)") from None
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{path}: the top level must be a mapping of key: value")
    out: dict[str, tuple[Any, str]] = {}
    for key_node, value_node in root.value:
        where = f"{path}:{key_node.start_mark.line + 1}"
        if not isinstance(key_node, yaml.ScalarNode):
            raise ConfigError(f"{where}: a key must be a plain name, e.g. max_steps: 50")
        key = key_node.value
        if key in out:
            raise ConfigError(f"{where}: {key} is set twice (first at line {out[key][1].rsplit(':', 1)[1]}); "
                              f"keep one")
        out[key] = (_from_node(value_node, nested=False), where)
    return out


def _from_node(node: yaml.Node, nested: bool) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return _Text(node.value, quoted=node.style is not None)
    if isinstance(node, yaml.SequenceNode):
        # one level only: no field holds nested lists (and a recursive alias cannot recurse here)
        return [] if nested else [_from_node(n, nested=True) for n in node.value]
    return _Mapping()


def _override_value(raw: str) -> _Text:
    """The value of ``key=value``: its text; YAML quoting and ``[a, b]`` lists are understood."""
    text = raw.strip()
    if text[:1] in ("'", '"'):
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except (yaml.YAMLError, RecursionError):
            node = None
        if isinstance(node, yaml.ScalarNode) and node.style in ("'", '"'):
            return _Text(node.value, quoted=True)
    flow = None
    if text[:1] == "[":
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            flow = ([_from_node(n, nested=True) for n in node.value] if isinstance(node, yaml.SequenceNode)
                    else "it is not one list")
        except yaml.YAMLError as err:
            flow = f"not a valid YAML list ({getattr(err, 'problem', None) or err})"
        except RecursionError:  # PyYAML composes nested lists recursively
            flow = "nested too deeply (a list holds plain items)"
    return _Text(text, flow=flow)


def _coerce(cls, by_name, hints, key: str, value: Any, where: str) -> Any:
    if key not in by_name:
        close = difflib.get_close_matches(key, by_name, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{where}: unknown key {key!r} for {cls.__name__}.{hint} "
                          + (f"Valid keys: {', '.join(sorted(by_name))}" if by_name else "It takes no keys."))
    meta = by_name[key].metadata
    try:
        value = _to_type(hints[key], value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {key}: {err} (help: {meta.get('help', '')})") from None
    choices = meta.get("choices")
    if choices is not None and value is not None and value not in choices:
        raise ConfigError(f"{where}: {key} must be one of {', '.join(map(str, choices))}, got {value!r}")
    rng = meta.get("range")
    for item in (value if isinstance(value, list) else [value]):
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            # a field without a declared range (tests require one) still refuses nan and inf
            problem = (rng or Range()).problem(item, _kind(item, rng))
            if problem:
                raise ConfigError(f"{where}: {key}={item!r} is out of range: {key} {problem} "
                                  f"(help: {meta.get('help', '')})")
    return value


def _kind(value: int | float, rng: Range | None) -> str:
    if isinstance(value, int):
        return "an integer"
    return "a number" if rng is not None and rng.inf else "a finite number"


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, _Text) and not value.quoted and value.text.strip() in _NULLS)


def _to_type(tp: Any, value: Any) -> Any:
    """``value`` (a ``_Text``, a list of them, or a Python value from code) as type ``tp``."""
    if isinstance(value, str):  # a Python string from code or a typed CLI option: text, never null
        value = _Text(value, quoted=True)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if _is_null(value) and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _to_type(arg, value)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise ValueError("; ".join(errors))
    if tp is Any:
        return value.text if isinstance(value, _Text) else value
    if origin in (list, tuple):
        return _to_list(tp, origin, args, value)
    if _is_null(value):
        raise ValueError("is empty (null) but needs a value; remove the key to keep the default")
    if isinstance(value, (list, tuple, _Mapping)):
        what = "a mapping" if isinstance(value, _Mapping) else "a list"
        raise ValueError(f"expected {_expected(tp)}, got {what}")
    if tp is bool:
        return _to_bool(value)
    if tp is int:
        return _to_int(value)
    if tp is float:
        return _to_float(value)
    if tp is str:
        if isinstance(value, _Text):
            return value.text
        raise ValueError(f"expected a string, got {value!r}")
    return value.text if isinstance(value, _Text) else value


def _expected(tp: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _to_list(tp: Any, origin: Any, args: tuple, value: Any) -> list | tuple:
    if _is_null(value):
        items: list = []
    elif isinstance(value, _Text):
        if isinstance(value.flow, str):
            raise ValueError(f"{value.text!r} is {value.flow}; write [a, b] or a,b")
        if value.flow is not None:
            items = value.flow
        elif value.quoted:  # quoting keeps commas: one item
            items = [value]
        else:
            items = [_Text(v.strip(), quoted=True) for v in value.text.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(f"expected a list (a,b or [a, b]), got {value!r}")
    inner = args[0] if args else Any
    converted = []
    for i, item in enumerate(items):
        try:
            converted.append(_to_type(inner, item))
        except ValueError as err:
            raise ValueError(f"item {i + 1}: {err}") from None
    return converted if origin is list else tuple(converted)


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = value.text.strip() if isinstance(value, _Text) else repr(value)
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(f"expected true or false, got {text!r}. Booleans are written true/false (or True, TRUE, "
                     f"False, FALSE) as in YAML 1.2; yes/no/on/off/y/n/1/0 are refused because YAML 1.1 "
                     f"reads them as booleans and YAML 1.2 as strings")


def _to_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, _Text):
        text = value.text.strip()
        zero = _LEADING_ZERO.fullmatch(text)
        if zero:
            fixed = f"{zero.group(1).replace('+', '')}{zero.group(2)}"
            raise ValueError(f"got {text!r}: a leading zero is ambiguous (YAML 1.1 reads 0123 as the octal "
                             f"number 83, YAML 1.2 as 123), so it is refused; write {fixed} for the decimal "
                             f"number")
        if not _DECIMAL.fullmatch(text):
            raise ValueError(f"expected an integer (decimal digits, e.g. 42), got {text!r}")
        if len(text.lstrip("+-")) > 19:  # before int(): a huge digit string is slow to convert
            raise ValueError(f"{text!r} is too large (integers must fit in 64 bits)")
        number = int(text)
    else:
        raise ValueError(f"expected an integer, got {value!r}")
    if abs(number) >= _INT_LIMIT:
        raise ValueError(f"{number} is too large (integers must fit in 64 bits)")
    return number


def _to_float(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an int past float's range, given from code
            # (str() of such an int can itself fail past 4,300 digits: its size comes from its bits)
            raise ValueError(f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits is too large "
                             f"for a number") from None
    if not isinstance(value, _Text):
        raise ValueError(f"expected a number, got {value!r}")
    text = value.text.strip()
    if _LEADING_ZERO.fullmatch(text):
        return _to_int(value)  # raises the leading-zero message
    if _FLOAT.fullmatch(text):
        return float(text)
    inf = _INF.fullmatch(text)
    if inf:
        return -math.inf if inf.group(1) == "-" else math.inf
    if _NAN.fullmatch(text):
        return math.nan
    raise ValueError(f"expected a number (e.g. 0.7, 2e-4), got {text!r}")
