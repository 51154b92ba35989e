"""`synthtune check-vllm`: would vLLM load this LoRA adapter? A table of its rules, without vLLM.

Nothing is merged or written: the adapter's files are read, and its base's config (no weights)
when the base is on this machine.
"""

from __future__ import annotations

from synthtune.config import CheckVllmConfig
from synthtune.vllm_rules import as_rows, check_adapter


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
