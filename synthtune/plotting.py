"""Figures drawn straight to PNG files, without pyplot.

Library code must not call ``matplotlib.use("Agg")``: it switches the backend for the whole
process, so a notebook's inline plots stop showing after the first synthtune call, and pyplot
figures stay registered until closed. A bare :class:`matplotlib.figure.Figure` renders to a file
through the Agg canvas on its own and leaves the user's matplotlib state alone.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from synthtune.files import atomic_write_bytes


@contextmanager
def png(path: str | Path, figsize: tuple[float, float], dpi: int = 110) -> Iterator[tuple]:
    """``with png(path, (w, h)) as (fig, ax): ...`` draws on ``ax``; the PNG is written on exit."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    ax = fig.subplots()
    yield fig, ax
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # rendered in memory, then replaced whole: a report or notebook never shows a half-written PNG
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())
