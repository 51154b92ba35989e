"""The loss curve of a training run, written next to its ``summary.json``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from synthtune.plotting import png


def plot_history(history: Sequence[dict], path: Path | str) -> Path | None:
    """Train loss (and eval loss / accuracy, where measured) against optimizer steps.

    Returns the PNG path, or None when the history holds no loss to draw.
    """
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval/loss"]) for h in history if "eval/loss" in h]
    acc = [(h["step"], h["eval/accuracy"], h.get("eval/format_rate")) for h in history if "eval/accuracy" in h]
    if not train and not evals:
        return None
    with png(path, (6.5, 3.6)) as (_, ax):
        if train:
            ax.plot(*zip(*train, strict=True), marker=".", color="#4c72b0", label="train loss (per token)")
        if evals:
            ax.plot(*zip(*evals, strict=True), marker="o", color="#c44e52", label="eval loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if acc:
            # accuracy lives on [0, 1]: a second axis keeps it readable beside a loss of any scale
            ax2 = ax.twinx()
            steps = [a[0] for a in acc]
            ax2.plot(steps, [a[1] for a in acc], marker="s", color="#55a868", label="eval accuracy")
            if all(a[2] is not None for a in acc):
                ax2.plot(steps, [a[2] for a in acc], marker="^", color="#8172b2", label="eval '#### n' format rate")
            ax2.set_ylim(-0.02, 1.02)
            ax2.set_ylabel("rate")
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        ax.legend(handles, labels, fontsize=8, loc="upper right")
        ax.set_title("Training curve")
    return Path(path)
