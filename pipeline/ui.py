"""Terminal output: one rich console and one progress bar style for every long job."""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

# Progress and messages on stderr (stdout stays clean for data). No markup: paths and messages such as
# "x [y]" or "[mask_path]" print as they are; colour goes through `style` and the helpers below.
console = Console(stderr=True, markup=False)


def warn(message: str) -> None:
    console.print(Text.assemble(("warning: ", "yellow"), message), highlight=False)


def error(message: str) -> None:
    console.print(Text.assemble(("error: ", "red"), message), highlight=False, soft_wrap=True)


def one_line(message: str) -> str:
    """A user error raised in a DataLoader worker comes back wrapped in the worker's traceback: keep the
    original message, its last line."""
    if "Original Traceback" not in message:
        return message
    last = message.strip().splitlines()[-1]
    return last.split("Error: ", 1)[-1] if "Error: " in last else last


def bold(text: str) -> Text:
    return Text(text, style="bold")


@contextmanager
def progress(description: str, unit: str = "img"):
    """Yields ``update(advance, total)``; shows count, rate and ETA (hidden when not a terminal). The bar
    appears at the first update, so an error found while setting up stays the only line printed."""
    columns = (
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    bar = Progress(*columns, console=console, transient=False)
    task = bar.add_task(description, total=None, rate="")
    lock = threading.Lock()  # worker threads update one bar

    def update(advance: int, total: int | None = None) -> None:
        with lock:
            if not bar.live.is_started:
                bar.start()
            bar.update(task, advance=advance, total=total)
            speed = bar.tasks[task].speed
            bar.update(task, rate=f"{speed:.1f} {unit}/s" if speed else "")

    try:
        yield update
    finally:
        if bar.live.is_started:
            bar.stop()


@contextmanager
def no_progress(description: str, unit: str = "img"):
    """Same interface as `progress`, shows nothing (library calls and tests)."""
    yield lambda advance, total=None: None


def percent(value) -> str:
    """A fraction as a percentage with one decimal; "-" when there is none (None, NaN, -inf)."""
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"
