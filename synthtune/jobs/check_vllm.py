"""`synthtune check-vllm`: would vLLM load this LoRA adapter? Its LoRA rules, checked without vLLM.

The rules follow vLLM's own checks (``vllm/lora/peft_helper.py``: ``PEFTHelper.validate_legal``
and ``_validate_features``; ``vllm/config/lora.py``: ``LoRAConfig``), as of vLLM 0.11-0.12:

* the rank (and every ``rank_pattern`` rank) is at most ``--max-lora-rank``, whose allowed values
  are 1, 8, 16, 32, 64, 128, 256, 320 and 512, default 16;
* ``modules_to_save`` is empty, or only ``classifier``/``score`` for classification models;
* no DoRA, no bias (``bias="none"``, no ``lora_bias``), and none of the PEFT variants vLLM does
  not implement (aLoRA, layer replication, BD-LoRA, QALoRA, inits that rewrite the base);
* LoRA sits on linear layers (vLLM wraps its linear layers; anything else finds no LoRA slot).

Two more make the adapter usable at all: safetensors weights (a pickled ``.bin`` can run code
when loaded) and a base that can be found: a hub id or a directory that exists.

Nothing is merged or written: the adapter's files are read, and its base's config (no weights)
when the base is on this machine.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from synthtune.config import VLLM_MAX_LORA_RANKS as MAX_LORA_RANKS
from synthtune.config import CheckVllmConfig
from synthtune.errors import ConfigError

DEFAULT_MAX_LORA_RANK = 16  # LoRAConfig.max_lora_rank's default
#: The only ``modules_to_save`` vLLM accepts (heads of classification models).
ALLOWED_MODULES_TO_SAVE = ("classifier", "score")
#: ``init_lora_weights`` strings that only set the adapter's first weights (so the saved adapter is a plain LoRA).
PLAIN_LORA_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|"
                       r"lora_embedding_B|lora_magnitude_vector)(?:\.[\w-]+)?(?:\.weight)?$")


@dataclass
class RuleResult:
    rule: str
    ok: bool
    detail: str
    fix: str = ""


def smallest_rank_for(rank: int) -> int | None:
    """The smallest allowed ``--max-lora-rank`` that fits ``rank`` (None above 512).

    >>> smallest_rank_for(8), smallest_rank_for(17), smallest_rank_for(600)
    (8, 32, None)
    """
    return next((m for m in MAX_LORA_RANKS if m >= rank), None)


def _read_config(adapter: Path) -> dict:
    path = adapter / "adapter_config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"adapter: {adapter} holds no adapter_config.json (pass a training run's final/)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"adapter: {path} is not valid JSON ({err})") from err
    if not isinstance(cfg, dict):
        raise ConfigError(f"adapter: {path} holds {type(cfg).__name__}, not a JSON object")
    return cfg


def lora_modules(adapter: Path) -> dict[str, set[str]]:
    """Module name -> the kinds of LoRA tensors (``lora_A``, ``lora_embedding_A``...) the weights hold for it."""
    from safetensors import safe_open

    found: dict[str, set[str]] = {}
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            m = _LORA_KEY.match(key)
            name, kind = (m["module"], m["kind"]) if m else (key, "other")
            found.setdefault(name, set()).add(kind)
    return found


def _rank(cfg: dict, max_lora_rank: int) -> RuleResult:
    ranks = [cfg.get("r")] + list((cfg.get("rank_pattern") or {}).values())
    if not all(isinstance(r, int) and r > 0 for r in ranks):
        return RuleResult("rank <= --max-lora-rank", False, f"r={cfg.get('r')!r} and rank_pattern "
                          f"{cfg.get('rank_pattern')!r} hold a rank that is not a positive integer",
                          "retrain with lora_r a positive integer")
    top = max(ranks)
    need = smallest_rank_for(top)
    if top <= max_lora_rank:
        return RuleResult("rank <= --max-lora-rank", True, f"rank {top} <= {max_lora_rank}")
    fix = (f"start vLLM with --max-lora-rank {need}" if need else
           f"retrain with lora_r <= {MAX_LORA_RANKS[-1]} (vLLM's largest --max-lora-rank)")
    return RuleResult("rank <= --max-lora-rank", False, f"rank {top} > {max_lora_rank}", fix)


def _features(cfg: dict) -> list[RuleResult]:
    save = [m for m in (cfg.get("modules_to_save") or []) if m not in ALLOWED_MODULES_TO_SAVE]
    init = cfg.get("init_lora_weights", True)
    plain_init = not isinstance(init, str) or init.lower() in PLAIN_LORA_INITS
    variants = [name for name, on in (("aLoRA (alora_invocation_tokens)", cfg.get("alora_invocation_tokens")),
                                      ("layer_replication", cfg.get("layer_replication")),
                                      ("BD-LoRA (use_bdlora)", cfg.get("use_bdlora")),
                                      ("QALoRA (use_qalora)", cfg.get("use_qalora")),
                                      (f"init_lora_weights={init!r}", not plain_init)) if on]
    bias = [f"bias={cfg.get('bias')!r}"] if cfg.get("bias", "none") != "none" else []
    bias += ["lora_bias=true"] if cfg.get("lora_bias") else []
    return [
        RuleResult("no modules_to_save", not save,
                   f"modules_to_save {save} (vLLM allows only {list(ALLOWED_MODULES_TO_SAVE)}, for classifiers)"
                   if save else "none", "retrain without modules_to_save (put LoRA on those layers instead), "
                   "or merge it (synthtune merge) and serve the merged model" if save else ""),
        RuleResult("no DoRA", not cfg.get("use_dora"), "use_dora=true" if cfg.get("use_dora") else "plain LoRA",
                   "retrain with use_dora off, or merge it (synthtune merge) and serve the merged model"
                   if cfg.get("use_dora") else ""),
        RuleResult("no bias", not bias, ", ".join(bias) if bias else 'bias="none"',
                   'retrain with bias="none" and lora_bias off, or merge and serve the merged model' if bias else ""),
        RuleResult("no PEFT variant vLLM lacks", not variants, ", ".join(variants) if variants else "none",
                   "retrain as a plain LoRA, or merge and serve the merged model" if variants else ""),
    ]


def _weights(adapter: Path) -> RuleResult:
    if (adapter / "adapter_model.safetensors").exists():
        return RuleResult("safetensors weights", True, "adapter_model.safetensors")
    other = sorted(p.name for p in adapter.glob("adapter_model*"))
    return RuleResult("safetensors weights", False, f"no adapter_model.safetensors (found {other or 'nothing'})",
                      "re-save with save_pretrained(..., safe_serialization=True)")


def _base(cfg: dict, model: str | None) -> RuleResult:
    base = model or cfg.get("base_model_name_or_path")
    if not base:
        return RuleResult("base model resolvable", False, "adapter_config.json names no base_model_name_or_path",
                          "set base_model_name_or_path to the base's hub id, or pass --model")
    if Path(base).expanduser().is_dir():
        hub = "" if _HUB_ID.match(base) else " (a local path: other machines need the hub id)"
        return RuleResult("base model resolvable", True, f"{base} exists{hub}")
    if _HUB_ID.match(base):
        return RuleResult("base model resolvable", True, f"hub id {base}")
    return RuleResult("base model resolvable", False, f"{base} is neither a directory here nor a hub id",
                      "set base_model_name_or_path in adapter_config.json to the base's hub id or local directory")


def _base_config(base: str, seed: int):
    """The base's config when it is on this machine (or the hub answers), else None. Never converts or downloads
    weights: the embedded model counts only once converted."""
    from synthtune.errors import ModelError
    from synthtune.models import EMBEDDED_MODEL, converted_embedded_model, load_config, resolve_model

    if base == EMBEDDED_MODEL:
        path = converted_embedded_model()
        return load_config(str(path)) if path else None
    try:
        return load_config(resolve_model(base, seed=seed))
    except (ModelError, ConfigError, OSError, ValueError):
        return None


def _targets(adapter: Path, cfg: dict, config) -> RuleResult:
    """Every module the weights adapt must be a linear layer of the base (vLLM has LoRA slots only there)."""
    import torch

    from synthtune.models import is_seq2seq_config, meta_model

    rule = "targets are linear layers"
    fix = ("retrain with LoRA on linear layers only (lora_targets: [all-linear], or q_proj, k_proj, v_proj, "
           "o_proj, gate_proj, up_proj, down_proj)")
    modules = lora_modules(adapter)
    if not modules:
        return RuleResult(rule, False, "adapter_model.safetensors holds no LoRA weights", "retrain: the adapter is empty")
    if config is None:
        # no base here: the tensor kinds still tell embedding LoRA and unknown tensors from linear ones
        bad = sorted(n for n, kinds in modules.items() if not kinds <= {"lora_A", "lora_B"})
        detail = f"{len(modules)} modules; base not on this machine, so checked by tensor kind only"
        return RuleResult(rule, not bad, detail + (f"; not linear: {bad[:3]}" if bad else ""), fix if bad else "")
    if is_seq2seq_config(config) or cfg.get("task_type") == "SEQ_2_SEQ_LM":
        return RuleResult(rule, False, f"{config.model_type} is an encoder-decoder model; vLLM's LoRA serves "
                          f"decoder-only models", "serve it with synthtune serve, or merge it (synthtune merge) "
                          "for other servers")
    tree = dict(meta_model(config).named_modules())
    bad = []
    for name, kinds in sorted(modules.items()):
        module = tree.get(name)
        if not isinstance(module, torch.nn.Linear) or not kinds <= {"lora_A", "lora_B"}:
            bad.append(f"{name} ({type(module).__name__ if module is not None else 'not in the base'})")
    if bad:
        return RuleResult(rule, False, f"{len(bad)} of {len(modules)} not linear: {', '.join(bad[:3])}", fix)
    return RuleResult(rule, True, f"all {len(modules)} adapted modules are linear layers")


def check_adapter(adapter: str | Path, *, max_lora_rank: int = DEFAULT_MAX_LORA_RANK,
                  model: str | None = None) -> list[RuleResult]:
    """Every rule's result for ``adapter`` served by vLLM with ``--max-lora-rank max_lora_rank`` on ``model``.

    ``model`` defaults to the base the adapter records; when it cannot be found, the target rule
    is checked from the tensor names alone.
    """
    from synthtune.models import adapter_base

    if max_lora_rank not in MAX_LORA_RANKS:
        raise ConfigError(f"max_lora_rank={max_lora_rank}: vLLM allows only {', '.join(map(str, MAX_LORA_RANKS))}")
    adapter = Path(adapter)
    cfg = _read_config(adapter)
    results = [RuleResult("peft_type LORA", cfg.get("peft_type") == "LORA", f"peft_type={cfg.get('peft_type')!r}",
                          "vLLM serves LoRA adapters only: merge other PEFT types and serve the merged model"
                          if cfg.get("peft_type") != "LORA" else ""),
               _rank(cfg, max_lora_rank), *_features(cfg), _weights(adapter)]
    results.append(_base(cfg, model))
    if (adapter / "adapter_model.safetensors").exists():
        local, seed = (model, 0) if model else adapter_base(adapter)
        results.append(_targets(adapter, cfg, _base_config(local, seed)))
    return results


def as_rows(results: list[RuleResult]) -> list[dict]:
    return [asdict(r) for r in results]


def run(cfg: CheckVllmConfig) -> dict:
    """Every rule's result, and whether all pass (``ok``): the command exits 1 when one fails."""
    results = check_adapter(cfg.adapter, max_lora_rank=cfg.max_lora_rank, model=cfg.model)
    return {"adapter": cfg.adapter, "max_lora_rank": cfg.max_lora_rank, "ok": all(r.ok for r in results),
            "rules": as_rows(results)}


def table(report: dict):
    """The rules as a rich table: rule, result, how to fix."""
    from rich.table import Table
    from rich.text import Text

    t = Table(title=f"vLLM readiness of {report['adapter']} (--max-lora-rank {report['max_lora_rank']})")
    for col in ("rule", "result", "how to fix"):
        t.add_column(col, overflow="fold")
    for r in report["rules"]:
        mark = Text("pass", style="green") if r["ok"] else Text("FAIL", style="bold red")
        t.add_row(Text(r["rule"]), Text.assemble(mark, " ", r["detail"]), Text(r["fix"]))
    return t
