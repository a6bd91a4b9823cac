"""The one progress type of the engine: ``callback(fraction, message)`` with fraction in [0, 1].

The CLI maps it to a tqdm bar, the UI to ``gr.Progress``; engine code only ever calls it.
"""
from __future__ import annotations

from typing import Callable, Optional

Progress = Callable[[float, str], None]


def null_progress(fraction: float, message: str) -> None:
    """A callback that ignores everything (the default where none is given)."""


def ensure(progress: Optional[Progress]) -> Progress:
    return progress if progress is not None else null_progress


def span(progress: Optional[Progress], start: float, end: float, prefix: str = "") -> Progress:
    """A callback for a sub-task that reports 0..1 of its own work as start..end of the parent's, each message after
    ``prefix``."""
    parent = ensure(progress)

    def report(fraction: float, message: str) -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        parent(start + (end - start) * fraction, prefix + message)

    return report
