"""Terminal output: one rich console and one progress bar style for every long job."""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager

from rich.console import Console, ConsoleDimensions
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

UNWRAPPED = 100_000  # the width of a console that is not a terminal


class _Console(Console):
    """Wraps at the terminal's width on a terminal; elsewhere (a pipe, a log file) never, whatever COLUMNS says:
    a table or a path stays whole on its line, for grep and for scripts."""

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        return size if self.is_terminal else ConsoleDimensions(UNWRAPPED, size.height)

    @size.setter
    def size(self, value) -> None:
        Console.size.fset(self, value)


# Results (tables, reports, figures) on stdout, where `> file` and pipes take them; progress, messages and warnings
# on stderr. No markup: paths and messages such as "x [y]" or "[mask_path]" print as they are; colour goes through
# `style` and the helpers below.
out = _Console(markup=False)
console = _Console(stderr=True, markup=False)


def print_table(table, to: Console = out) -> None:
    """A table with its title on a line of its own: rich would wrap a title longer than the table (a path) to
    the table's width."""
    title, table.title = table.title, None
    if title:
        to.print(title, soft_wrap=True, highlight=False)
    to.print(table)


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


def plural(count: int, noun: str, many: str | None = None) -> str:
    """'1 epoch', '2 epochs' ('1 process', '2 processes' with ``many``)."""
    return f"{count} {noun if count == 1 else many or noun + 's'}"


def percent(value) -> str:
    """A fraction as a percentage with one decimal; "-" when there is none (None, NaN, -inf)."""
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"
