"""Charts drawn off screen: a figure on matplotlib's Agg canvas, saved as a PNG at one
resolution, the same way in every module that draws."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 120
"""Resolution of every PNG the platform writes."""


def new_figure(
    width: float, height: float, *, layout: Literal["constrained", "tight"] | None = None
) -> Figure:
    """A figure of ``width`` x ``height`` inches on its own Agg canvas.

    Args:
        width: Width in inches.
        height: Height in inches.
        layout: Matplotlib's layout engine; ``None`` lays the figure out with
            ``tight_layout`` when it is saved.
    """
    # The Agg canvas, not pyplot: no display, no global figure state in a long-lived process.
    figure = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Figure, path: Path) -> None:
    """Lay ``figure`` out (unless a layout engine does) and write it to ``path`` as a PNG."""
    if figure.get_layout_engine() is None:
        figure.tight_layout()
    figure.savefig(path, dpi=DPI, format="png")
