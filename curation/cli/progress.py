"""Progress for long verbs, one rule for all of them: on a terminal a bar with
the rate and the time left; without one (cron, CI, a log file) one line per
chunk or step; nothing with ``--quiet``. ``--verbose`` also lets the libraries
(transformers, datasets) speak.

The same rule is handed to the Hugging Face and TRL progress bars
(``hf_progress``) instead of switching them off.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from curation.cli.verb import console


@dataclass
class Verbosity:
    quiet: bool = False
    verbose: bool = False

    @property
    def mode(self) -> str:
        """bar (a terminal), lines (no terminal) or off (--quiet)."""
        if self.quiet:
            return "off"
        return "bar" if console.is_terminal else "lines"


VERBOSITY = Verbosity()


def configure(quiet: bool, verbose: bool) -> None:
    """Set once by the dispatcher from --quiet / --verbose, and passed on to the libraries."""
    VERBOSITY.quiet, VERBOSITY.verbose = quiet, verbose
    from probes.models import set_library_progress

    set_library_progress(bars=VERBOSITY.mode == "bar", verbose=verbose)


def _eta(done: int, total: int | None, elapsed: float) -> str:
    if not total or not done or done >= total:
        return "—"
    left = elapsed / done * (total - done)
    return f"{int(left // 60)}m{int(left % 60):02d}s" if left >= 60 else f"{left:.0f}s"


class _RateColumn(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        return Text("—" if task.speed is None else f"{task.speed:.1f} {self.unit}/s")


@contextmanager
def track(description: str, total: int | None = None, unit: str = "rows") -> Iterator[Callable[[int], None]]:
    """A callable to advance by n; shows progress by the rule above."""
    mode = VERBOSITY.mode
    if mode == "off":
        yield lambda n: None
        return
    if mode == "lines":
        done = [0]
        started = time.monotonic()

        def log(n: int) -> None:
            done[0] += n
            elapsed = max(time.monotonic() - started, 1e-9)
            of = f"/{total}" if total else ""
            console.print(f"{description}: {done[0]}{of} {unit} ({done[0] / elapsed:.1f} {unit}/s, ETA {_eta(done[0], total, elapsed)})",
                          soft_wrap=True, highlight=False, markup=False)

        yield log
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               _RateColumn(unit), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


@contextmanager
def stages(description: str) -> Iterator[Callable[[str], None]]:
    """For work measured in named steps rather than counts (directions, strengths, runs of an
    experiment): a spinner showing the step on a terminal, one line per step without one,
    nothing with --quiet. Each line carries the time since the start."""
    mode = VERBOSITY.mode
    if mode == "off":
        yield lambda message: None
        return
    started = time.monotonic()
    if mode == "lines":
        yield lambda message: console.print(f"{description}: {message} ({time.monotonic() - started:.0f}s)",
                                            soft_wrap=True, highlight=False, markup=False)
        return
    with console.status(description) as status:
        yield lambda message: status.update(f"{description}: {message} ({time.monotonic() - started:.0f}s)")
