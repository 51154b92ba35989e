"""`synthtune env`: what a bug report needs (versions, accelerator, paths, installed vs ``poetry.lock``).

Like ``accelerate env`` and DeepSpeed's ``ds_report``: paste its output into the issue. It is a
report, so it succeeds whatever it finds; a package out of step with the lock is shown in colour
with the command that puts it back.
"""

from __future__ import annotations

from typing import Any

from synthtune.config import EnvConfig
from synthtune.environment import report


def run(cfg: EnvConfig) -> dict[str, Any]:
    """The report (see :func:`synthtune.environment.report`); ``cfg`` has no settings yet."""
    return report()


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _gpus(gpus: list[dict]) -> str:
    return "; ".join(f"{g['name']} ({g['memory_gib']} GiB, sm {g['compute_capability']})" for g in gpus) or "none"


def _ops(ops: Any) -> str:
    if isinstance(ops, dict):
        prebuilt = ", ".join(ops["prebuilt"]) or "none"
        return f"compatible: {', '.join(ops['compatible']) or 'none'}; prebuilt: {prebuilt}"
    return _text(ops)


def table(result: dict[str, Any]):
    """The report as an aligned key/value grid for people (rich renderable); stdout keeps the JSON."""
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    shown = {"gpus": _gpus(result["gpus"]), "deepspeed_ops": _ops(result["deepspeed_ops"])}
    for key, value in result.items():
        if key in ("matches_lock", "lock_mismatches"):
            continue
        grid.add_row(key, Text(shown.get(key, _text(value))))
    mismatches = result["lock_mismatches"]
    if isinstance(mismatches, str):  # no poetry.lock to compare with
        grid.add_row("matches_lock", Text(mismatches, style="yellow"))
    elif not mismatches:
        grid.add_row("matches_lock", Text("yes", style="green"))
    else:
        grid.add_row("matches_lock", Text(f"NO: {len(mismatches)} package(s) differ from poetry.lock",
                                          style="bold red"))
        for line in mismatches:
            grid.add_row("", Text(line, style="yellow"))
    return grid
