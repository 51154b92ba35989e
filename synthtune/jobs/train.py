"""`synthtune train`: fine-tune on one process, with the same recipes as ``fine_tune/train.py``.

    synthtune train --config configs/train/smoke.yaml max_steps=10

The loop is :func:`synthtune.train.loop.train`; ``accelerate launch fine_tune/train.py`` runs the
same function on many processes.
"""

from __future__ import annotations

from synthtune.config import TrainConfig
from synthtune.train.loop import exit_status, train


def run(cfg: TrainConfig, *, progress: bool = True) -> tuple[dict, int]:
    """Train; returns the summary (without the per-step history) and the process exit status.

    The status is 128 + the signal when SIGTERM/SIGINT stopped the run after writing a checkpoint.
    """
    summary = train(cfg, progress=progress)
    summary.pop("history", None)
    return summary, exit_status(summary)
