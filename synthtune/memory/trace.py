"""Measured memory while something runs: the workshop's nvitop view, as a CSV and a PNG.

A background thread samples, every ``interval_s``:

* GPU memory allocated and reserved by this process (``torch.cuda``), per visible device 0;
* GPU utilization and total used memory of that device, from NVML through nvitop's API;
* this process's CPU resident set size (psutil, an nvitop dependency).

On a machine without a GPU only the RSS column is filled, so the same code runs in tests and on
laptops. Usage::

    with MemoryTracer(out_dir, interval_s=0.5) as tr:
        train()
    tr.summary()  # {"peak_rss_gib": ..., "peak_allocated_gib": ..., ...}

or ``tr = MemoryTracer(out_dir); tr.start(); ...; summary = tr.stop()``. ``stop`` writes
``memory_trace.csv`` and ``memory_trace.png`` into ``out_dir`` and returns the summary.
"""

from __future__ import annotations

import csv
import os
import threading
import time
from pathlib import Path
from typing import Any

from synthtune.plotting import png

GIB = float(1 << 30)
CSV_NAME = "memory_trace.csv"
PNG_NAME = "memory_trace.png"
FIELDS = ("t_s", "rss_gib", "gpu_allocated_gib", "gpu_reserved_gib", "gpu_used_gib", "gpu_util_pct")


class MemoryTracer:
    """Sample memory and utilization on a thread; write CSV + PNG on stop."""

    def __init__(self, out_dir: str | os.PathLike, interval_s: float = 0.5, device: int = 0) -> None:
        self.out_dir = Path(out_dir)
        self.interval_s = float(interval_s)
        self.device = device
        self.rows: list[dict[str, float | None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._summary: dict[str, Any] | None = None
        self._cuda = False
        self._nvml = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> MemoryTracer:
        import psutil

        self._proc = psutil.Process()
        try:
            import torch

            self._cuda = torch.cuda.is_available()
            if self._cuda:
                # the true peak between samples: reset now, read max_memory_allocated at the end
                torch.cuda.reset_peak_memory_stats(self.device)
        except Exception:  # noqa: BLE001 - a tracer must never break the run it watches
            self._cuda = False
        if self._cuda:
            try:
                from nvitop import Device

                self._nvml = Device(self.device)
            except Exception:  # noqa: BLE001 - no NVML (e.g. inside some containers): torch numbers only
                self._nvml = None
        self._t0 = time.perf_counter()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="synthtune-memory-tracer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        if self._summary is not None:
            return self._summary
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self._summary = self._summarize()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._write_csv(self.out_dir / CSV_NAME)
        self._write_png(self.out_dir / PNG_NAME)
        return self._summary

    def summary(self) -> dict[str, Any]:
        """Peaks so far (after ``stop``: the final ones)."""
        return self._summary if self._summary is not None else self._summarize()

    def __enter__(self) -> MemoryTracer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- sampling ----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        row: dict[str, float | None] = dict.fromkeys(FIELDS)
        row["t_s"] = time.perf_counter() - self._t0
        try:
            row["rss_gib"] = self._proc.memory_info().rss / GIB
        except Exception:  # noqa: BLE001
            pass
        if self._cuda:
            try:
                import torch

                row["gpu_allocated_gib"] = torch.cuda.memory_allocated(self.device) / GIB
                row["gpu_reserved_gib"] = torch.cuda.memory_reserved(self.device) / GIB
            except Exception:  # noqa: BLE001
                pass
        if self._nvml is not None:
            try:
                used = self._nvml.memory_used()
                util = self._nvml.gpu_utilization()
                row["gpu_used_gib"] = used / GIB if isinstance(used, int) else None
                row["gpu_util_pct"] = float(util) if isinstance(util, (int, float)) else None
            except Exception:  # noqa: BLE001
                pass
        self.rows.append(row)

    # -- results -----------------------------------------------------------------------------
    def _peak(self, key: str) -> float | None:
        vals = [r[key] for r in self.rows if r.get(key) is not None]
        return round(max(vals), 4) if vals else None

    def _summarize(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "samples": len(self.rows),
            "duration_s": round(self.rows[-1]["t_s"], 3) if self.rows else 0.0,
            "interval_s": self.interval_s,
            "peak_rss_gib": self._peak("rss_gib"),
            "peak_allocated_gib": self._peak("gpu_allocated_gib"),
            "peak_reserved_gib": self._peak("gpu_reserved_gib"),
            "peak_gpu_used_gib": self._peak("gpu_used_gib"),
            "peak_gpu_util_pct": self._peak("gpu_util_pct"),
        }
        utils = [r["gpu_util_pct"] for r in self.rows if r.get("gpu_util_pct") is not None]
        out["mean_gpu_util_pct"] = round(sum(utils) / len(utils), 1) if utils else None
        if self._cuda:
            try:
                import torch

                # sampling misses short spikes; the allocator's own counter does not
                out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(self.device) / GIB, 4)
                out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(self.device) / GIB, 4)
            except Exception:  # noqa: BLE001
                pass
        out["csv"] = str(self.out_dir / CSV_NAME)
        out["png"] = str(self.out_dir / PNG_NAME)
        return out

    def _write_csv(self, path: Path) -> None:
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=FIELDS)
            w.writeheader()
            for r in self.rows:
                w.writerow({k: ("" if v is None else f"{v:.6g}") for k, v in r.items()})

    def _write_png(self, path: Path) -> None:
        plot_trace(self.rows, path)


def plot_trace(rows: list[dict[str, Any]], path: str | os.PathLike, title: str = "memory and utilization") -> None:
    """Memory lines on the left axis, GPU utilization on the right: nvitop's two lines."""
    t = [r["t_s"] for r in rows]
    with png(path, (8, 4), dpi=100) as (_, ax):
        for key, label in (("gpu_allocated_gib", "GPU allocated"), ("gpu_reserved_gib", "GPU reserved"),
                           ("gpu_used_gib", "GPU used (NVML)"), ("rss_gib", "CPU RSS")):
            pts = [(x, r[key]) for x, r in zip(t, rows, strict=True) if r.get(key) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("GiB")
        ax.set_ylim(bottom=0)
        util = [(x, r["gpu_util_pct"]) for x, r in zip(t, rows, strict=True) if r.get("gpu_util_pct") is not None]
        if util:
            ax2 = ax.twinx()
            ax2.plot([p[0] for p in util], [p[1] for p in util], color="tab:red", alpha=0.6, label="GPU util")
            ax2.set_ylabel("GPU utilization (%)")
            ax2.set_ylim(0, 105)
            ax2.legend(loc="upper right")
        ax.legend(loc="upper left")
        ax.set_title(title)
