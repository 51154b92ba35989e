"""`synthtune synth`: prompts -> k samples -> vote -> evaluator -> kept dataset, in rounds (resumable).

    synthtune synth --config configs/synth/smollm2_bundled.yaml --out outputs/synth/run1

The loop itself is :func:`synthtune.synth.pipeline.run_synthesis`; this is the command's entry point.
"""

from __future__ import annotations

from collections.abc import Callable

from synthtune.config import SynthConfig
from synthtune.synth.pipeline import run_synthesis


def run(cfg: SynthConfig, *, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) synthesis into ``cfg.out``; returns the summary also written to ``summary.json``."""
    return run_synthesis(cfg, progress=progress, log=log)
