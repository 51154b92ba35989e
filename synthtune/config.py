"""One typed config per job: dataclass defaults <- YAML file <- ``key=value`` overrides.

Every field carries help text. Unknown keys fail with the list of valid ones (and the closest
match), wrong types fail with the file, line and field, so a typo never silently falls back to
a default (nanoGPT's configurator refuses unknown keys for the same reason).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from synthtune.files import atomic_write_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is wrong; the message names where and how to fix it."""


def opt(default: Any, help: str, choices: Iterable[Any] | None = None):
    """A dataclass field with help text (and, optionally, the allowed values)."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


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
    synth_questions: int = opt(8, "train questions to synthesize rationales for")
    shots: int = opt(4, "exemplars per synthesis prompt, drawn from train only (held apart from the questions)")
    k: int = opt(4, "samples per question")
    rounds: int = opt(1, "synthesis rounds (unsolved questions are retried with fresh exemplars)")
    temperature: float = opt(0.7, "synthesis sampling temperature")
    synth_max_new_tokens: int = opt(200, "per sample; GSM8K rationales average ~120 tokens")
    # 2. SFT set, 3. preprocessing
    gold_rationales: bool = opt(True, "add the train split's gold rationales to the kept ones (a 135M model keeps "
                                "few of its own)")
    gold_limit: int | None = opt(200, "at most this many gold rationales (the first N of train; the bundled "
                                 "split has 36, the full GSM8K 7,473)")
    max_length: int = opt(512, "token limit per training example (the histogram shows where the data sits)")
    # 4. fine-tuning
    train_steps: int = opt(30, "LoRA optimizer steps")
    train_batch_size: int = opt(4, "examples per step")
    learning_rate: float = opt(5e-4, "peak LR (cosine after 3 warmup steps)")
    lora_r: int = opt(16, "LoRA rank (all linear layers)")
    # 5. evaluation
    eval_questions: int | None = opt(14, "test questions for base vs tuned, the first N (the bundled split has 14, "
                                     "the full GSM8K 1,319: hours on a CPU); null = the whole split")
    eval_max_new_tokens: int = opt(200, "generation budget per answer")
    eval_batch_size: int = opt(7, "questions per generate() call")
    train_format: str = opt("plain", "prompt format for training and evaluation (plain: 'Question: ...\\nAnswer:')",
                            ["plain", "chat", "auto"])
    seed: int = opt(0, "seed for exemplars, sampling, init and data order")
    output_dir: str | None = opt(None, "where results go; default outputs/demo/<timestamp>")
    device: str | None = opt(None, "cpu, cuda, cuda:1...; default: cuda when available")


@dataclass
class SynthConfig:
    """`synthtune synth`: prompts -> k samples -> vote -> evaluator -> kept dataset, in rounds."""

    model: str = opt("smollm2-135m-instruct", "HF id, local dir, or a built-in name")
    backend: str = opt("hf", "generation backend: hf = this process loads the model; openai = OpenAI-compatible "
                       "servers (vLLM, TGI, llama.cpp, `synthtune serve`) at endpoints=...", ["hf", "openai"])
    endpoints: list[str] = opt([], "openai backend: server base URLs (http://host:8000/v1); requests go round-robin "
                               "over them. Not part of the resume fingerprint: rerun against other servers freely")
    served_model: str | None = opt(None, "openai backend: the model name the servers serve (vLLM "
                                   "--served-model-name, or a --lora-modules name); default: model")
    api_key_env: str | None = opt(None, "openai backend: name of the environment variable holding the API key "
                                  "(sent as a Bearer token; never logged or written). Unset: no key is sent")
    concurrency: int = opt(8, "openai backend: requests in flight at once over all endpoints; a batch only fills "
                           "it when batch_size >= concurrency")
    request_timeout: float = opt(600.0, "openai backend: seconds per request (k long samples on a busy server "
                                 "take minutes); a timeout is retried")
    max_retries: int = opt(6, "openai backend: retries per request on 429, 5xx, timeouts and connection errors")
    retry_backoff: float = opt(1.0, "openai backend: first retry wait in seconds, doubled each retry (with "
                               "jitter, at most 60 s); a server's Retry-After wins when longer")
    questions: str = opt("bundled:train", "questions to synthesize rationales for: bundled:SPLIT, gsm8k:SPLIT "
                         "(folder or hub), hub:SPLIT, dir:SPLIT, or a JSONL path (answer field optional)")
    exemplars: str | None = opt(None, "exemplar pool (same spec forms); default: the train split of the "
                                "questions' source. Never a test split. If it is the questions' own source, "
                                "it is split off so no question is ever an exemplar")
    exemplar_pool_size: int = opt(12, "rows held out as exemplars when exemplars and questions share a source")
    limit: int | None = opt(None, "only the first N questions")
    out: str | None = opt(None, "output directory; default outputs/synth/<model>-<questions>")
    gsm8k_dir: str | None = opt(None, "folder with GSM8K's train.jsonl/test.jsonl")
    shots: int = opt(8, "exemplars per prompt")
    strategy: str = opt("random", "exemplar choice: random (fresh per question and round), fixed (shared "
                        "prefix), similar (lexical nearest)", ["random", "fixed", "similar"])
    prompt_format: str = opt("auto", "auto = chat template for instruct models, else plain", ["auto", "plain", "chat"])
    k: int = opt(8, "samples per question in round 1")
    k_growth: float = opt(1.0, "multiply k by this each later round (e.g. 2 for 8 -> 16)")
    rounds: int = opt(2, "a question with no consensus or no passing path is retried up to this many rounds")
    temperature: float = opt(0.7, "sampling temperature in round 1")
    temperature_step: float = opt(0.2, "added to the temperature each later round (more diverse retries)")
    top_p: float = opt(0.95, "nucleus sampling")
    top_k: int = opt(0, "top-k sampling (0 = off)")
    max_new_tokens: int = opt(256, "per sample; GSM8K rationales average ~120 tokens")
    stop: list[str] = opt([], "extra stop strings (plain format always stops at a new 'Problem:')")
    batch_size: int = opt(4, "questions per batch; results are flushed after every batch")
    min_agreement: float = opt(0.5, "without gold: below this majority share a question has no consensus")
    use_gold: bool = opt(True, "keep only rationales that reach the gold answer when one exists (rejection "
                         "sampling); false = self-consistency only")
    min_calc: float = opt(1.0, "minimum fraction of correct calculations in a kept rationale")
    reward_model: str | None = opt(None, "optional HF sequence-classification reward model (path or hub id)")
    min_reward: float | None = opt(None, "drop rationales scoring below this (reward model); none = rank only")
    max_keep: int = opt(4, "at most this many distinct rationales per question")
    diversity: str = opt("greedy", "greedy: no two kept paths with ROUGE-L F >= threshold; workshop: the 2023 "
                         "rule (mean self-ROUGE-L recall below the group mean); none", ["greedy", "workshop", "none"])
    rouge_threshold: float = opt(0.7, "ROUGE-L F at or above which two paths count as the same (Self-Instruct)")
    seed: int = opt(0, "seed for exemplars and sampling")
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
    lora_r: int = opt(8, "LoRA rank")
    lora_alpha: int = opt(16, "LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = opt(0.05, "dropout on the LoRA input; costs one mask per adapted input on GPU")
    lora_targets: list[str] = opt(["all-linear"], "module names to adapt (e.g. q_proj,v_proj or q,v for T5), or "
                                  "all-linear")
    data: str = opt("bundled:train", "training data: bundled:train, gsm8k:train, a synth kept.jsonl, or any JSONL "
                    "with question and answer")
    eval_data: str | None = opt("bundled:test", "held-out data for eval loss and accuracy (none to skip)")
    eval_limit: int | None = opt(None, "use only the first N eval rows (the full GSM8K test has 1,319)")
    gsm8k_dir: str | None = opt(None, "folder with GSM8K's train.jsonl/test.jsonl")
    limit: int | None = opt(None, "use only the first N training rows")
    prompt_format: str = opt("plain", "plain: 'Question: ...\nAnswer: ...'; chat: the tokenizer's chat template; "
                             "auto: chat when the tokenizer has one", ["plain", "chat", "auto"])
    max_length: int = opt(512, "token limit per example; GSM8K with SmolLM2's tokenizer: p99 399, max 543 "
                          "(the workshop's 256 cut 15.7% of answers)")
    max_target_length: int | None = opt(None, "seq2seq: label length limit (default max_length)")
    packing: bool = opt(False, "causal: pack examples into max_length rows (per-example attention); the fastest "
                        "on GPUs (1.5x bucketed batches with a Llama-1B shape on an H200)")
    group_by_length: bool = opt(True, "batch similar lengths together: less padding, same data per epoch")
    pad_to_multiple_of: int | None = opt(None, "pad each batch to a multiple of N tokens; 64 on GPUs keeps the "
                                         "number of batch shapes small (LoRA on unbucketed shapes ran 2-3x "
                                         "slower per step on an H200); none = pad to the longest row (best on CPUs)")
    per_device_batch_size: int = opt(4, "micro-batch per process")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step; the loss is normalized by the "
                                           "label tokens of the whole window, so accumulation equals a big batch")
    learning_rate: float = opt(2e-4, "peak LR (LoRA ~1e-4..3e-4; full fine-tuning ~1e-5..5e-5)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    lr_scheduler: str = opt("cosine", "decay after warmup", ["cosine", "linear", "constant"])
    warmup_steps: int = opt(0, "linear warmup, in optimizer steps")
    max_steps: int = opt(-1, "optimizer steps to run; -1 = num_epochs over the data")
    num_epochs: float = opt(1.0, "epochs when max_steps is -1")
    max_grad_norm: float = opt(1.0, "gradient clipping (0 = off)")
    precision: str = opt("auto", "auto: bf16 weights for LoRA and bf16-mixed for full on bf16 GPUs, fp32 on CPU; "
                         "fp32; bf16 (weights and autocast); bf16-mixed (fp32 master weights, bf16 autocast)",
                         ["auto", "fp32", "bf16", "bf16-mixed"])
    gradient_checkpointing: bool = opt(False, "~30% slower, activations ~1/layers: recompute them in backward")
    compile: bool = opt(False, "torch.compile the model (slow first steps; pays off on long GPU runs)")
    seed: int = opt(0, "seed for init, data order and dropout")
    output_dir: str | None = opt(None, "run directory; default outputs/train/<model>-<method>")
    logging_steps: int = opt(5, "log loss/LR/tokens per second every N optimizer steps")
    eval_steps: int = opt(0, "evaluate every N optimizer steps (0 = only at the end)")
    eval_accuracy_samples: int = opt(16, "questions answered by greedy generation for accuracy at each eval "
                                     "(0 = loss only)")
    eval_max_new_tokens: int = opt(192, "generation budget per eval answer")
    save_steps: int = opt(0, "checkpoint every N optimizer steps (0 = only the final model)")
    save_total_limit: int = opt(2, "keep the last N checkpoints")
    stop_at_step: int | None = opt(None, "save a checkpoint and stop at this step, as a preempted job would; "
                                   "continue later with resume_from=latest (the schedule still spans max_steps)")
    resume_from: str | None = opt(None, "latest, or a checkpoint directory: restores model, optimizer, scheduler, "
                                  "RNG and data position")
    log_with: str = opt("tensorboard", "accelerate tracker", ["tensorboard", "wandb", "none"])
    trace_memory: bool = opt(True, "sample memory (and GPU utilization) in the background; CSV + PNG")
    device: str | None = opt(None, "single-process runs only: cpu or cuda (accelerate decides under launch)")
    trust_remote_code: bool = opt(False, "allow the model repo's own Python code to run")


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def field_help(cls) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = (),
                **values: Any) -> T:
    """Build ``cls`` from defaults, then the YAML file, then ``key=value`` overrides, then ``values``."""
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
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        merged[key] = _coerce(cls, by_name, hints, key, value, f"override {item!r}")
    for key, value in values.items():
        if value is not None:
            merged[key] = _coerce(cls, by_name, hints, key, value, f"argument {key}")
    return cls(**merged)


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def cli_overrides(cfg, base=None, skip: Iterable[str] = ()) -> list[str]:
    """``key=value`` words that rebuild ``cfg`` from ``base`` (default: the class defaults).

    Reports print these so every stage can be rerun by hand; values are YAML, as overrides are read.
    """
    base = base if base is not None else type(cfg)()
    words = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in skip or value == getattr(base, f.name):
            continue
        text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
        text = text.removesuffix("\n...").strip()
        words.append(f"{f.name}={text}")
    return words


def save_config(cfg, path: str | Path) -> None:
    # atomic: a rerun replaces the file, and a crash mid-write must not leave half of it
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _read_yaml(path: Path) -> dict[str, tuple[Any, str]]:
    """Top-level mapping of a YAML file, each value with its 'file:line' for error messages."""
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(err, 'problem', err)}") from err
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{path}: the top level must be a mapping of key: value")
    out: dict[str, tuple[Any, str]] = {}
    for key_node, value_node in root.value:
        where = f"{path}:{key_node.start_mark.line + 1}"
        value = yaml.safe_load(yaml.serialize(value_node)) if value_node is not None else None
        out[str(key_node.value)] = (value, where)
    return out


def _coerce(cls, by_name, hints, key: str, value: Any, where: str) -> Any:
    if key not in by_name:
        close = difflib.get_close_matches(key, by_name, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{where}: unknown key {key!r} for {cls.__name__}.{hint} "
                          f"Valid keys: {', '.join(sorted(by_name))}")
    try:
        value = _to_type(hints[key], value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {key}: {err} (help: {by_name[key].metadata.get('help', '')})") from None
    choices = by_name[key].metadata.get("choices")
    if choices is not None and value is not None and value not in choices:
        raise ConfigError(f"{where}: {key} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def _to_type(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _to_type(arg, value)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise ValueError("; ".join(errors))
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_to_type(inner, v) for v in value]
        return items if origin is list else tuple(items)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit())):
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"expected a string, got {value!r}")
        return str(value)
    return value
