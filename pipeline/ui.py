"""Terminal output: one rich console and one progress bar style for every long job."""

from __future__ import annotations

import math
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)  # progress and messages on stderr; stdout stays clean for data


@contextmanager
def progress(description: str, unit: str = "img"):
    """Yields ``update(advance, total)``; shows count, rate and ETA (hidden when not a terminal)."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=None, rate="")

        def update(advance: int, total: int | None = None) -> None:
            bar.update(task, advance=advance, total=total)
            speed = bar.tasks[task].speed
            bar.update(task, rate=f"{speed:.1f} {unit}/s" if speed else "")

        yield update


@contextmanager
def no_progress(description: str, unit: str = "img"):
    """Same interface as `progress`, shows nothing (library calls and tests)."""
    yield lambda advance, total=None: None


def percent(value) -> str:
    """A fraction as a percentage with one decimal; "-" when there is none (None, NaN, -inf)."""
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"
