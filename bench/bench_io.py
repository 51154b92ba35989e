"""Helper, not a benchmark: what every benchmark records beside its numbers (the machine), and the JSON it writes."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

from synthtune.files import atomic_write_text


def machine(**extra) -> dict:
    """Date and machine; the load average says whether other jobs shared the CPU."""
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                        "loadavg_1m_at_end": round(os.getloadavg()[0], 2), **extra}}


def emit(result: dict, out: Path | None) -> None:
    """Print the result as JSON, and write it to ``out`` when given."""
    print(json.dumps(result, indent=2))
    if out:
        write_json(result, out)


def write_json(result: dict, out: Path) -> None:
    """Write the result as indented JSON (the record a results table is generated from)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # atomic: a bench that rewrites its file as it goes (loop_bench) can be killed mid-write
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
