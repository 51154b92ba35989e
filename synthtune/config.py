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
    """`synthtune demo`: the README's main job on the embedded model."""

    model: str = opt("smollm2-135m-instruct", "HF id, local dir, or a built-in name (smollm2-135m-instruct, "
                     "tiny-llama, tiny-t5)")
    source: str = opt("bundled", "GSM8K source for exemplars and questions", ["bundled", "auto", "hub", "dir"])
    gsm8k_dir: str | None = opt(None, "folder with GSM8K's train.jsonl/test.jsonl (for source=dir/auto)")
    shots: int = opt(8, "exemplars per prompt, drawn from the train split only")
    n_questions: int = opt(6, "how many test questions to answer")
    prompt_format: str = opt("auto", "auto = chat template for instruct models, else plain Problem:/Answer:",
                             ["auto", "plain", "chat"])
    max_new_tokens: int = opt(200, "generation budget per answer; GSM8K rationales average ~120 tokens")
    batch_size: int = opt(4, "prompts per generate() call")
    seed: int = opt(0, "seed for exemplar choice and sampling")
    output_dir: str | None = opt(None, "where results go; default outputs/demo/<timestamp>")
    device: str | None = opt(None, "cpu, cuda, cuda:1...; default: cuda when available")


@dataclass
class SynthConfig:
    """`synthtune synth`: prompts -> k samples -> vote -> evaluator -> kept dataset, in rounds."""

    model: str = opt("smollm2-135m-instruct", "HF id, local dir, or a built-in name")
    backend: str = opt("hf", "generation backend", ["hf"])
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


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


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
