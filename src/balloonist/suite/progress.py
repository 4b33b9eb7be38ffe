"""How the suite shows its progress: a rich bar at a terminal, plain lines otherwise.

Both are context managers yielding the executor's done callback, (done, total).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from balloonist.suite.executors import DoneCallback

__all__ = ["progress_bar", "progress_lines", "progress_view"]


@contextmanager
def progress_bar(console: Console, total: int) -> Iterator[DoneCallback]:
    columns = (
        TextColumn("runs"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("elapsed"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("suite", total=total)
        yield lambda done, _total: bar.update(task, completed=done)


@contextmanager
def progress_lines(stream: TextIO, total: int, *, fraction: float = 0.1) -> Iterator[DoneCallback]:
    """One flushed line every ``fraction`` of the runs, and one at the end."""
    start_s = time.monotonic()
    step = max(1, math.ceil(total * fraction))

    def on_done(done: int, all_runs: int) -> None:
        if done % step == 0 or done == all_runs:
            elapsed_s = time.monotonic() - start_s
            print(f"suite: {done}/{all_runs} runs done, {elapsed_s:.0f} s", file=stream, flush=True)

    yield on_done


@contextmanager
def progress_view(stream: TextIO, total: int) -> Iterator[DoneCallback]:
    """The bar when a person is watching ``stream``, plain lines otherwise."""
    if stream.isatty():
        with progress_bar(Console(file=stream), total) as on_done:
            yield on_done
    else:
        with progress_lines(stream, total) as on_done:
            yield on_done
