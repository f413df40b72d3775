"""Progress bars of the tile loops: one rich bar per pass and phase (tiles done of all, rate,
time left), drawn on stderr while the pass runs and removed when it ends.

The runtime knows nothing of rich: each :class:`~fxstream.runtime.PassEngine` calls its observer
with ``(pass index, phase, tiles done, tiles in the pass)`` before its first tile and after each,
and :class:`TileProgress` is such an observer. ``fxstream.compile(..., progress=True)`` gives a
streamed model one; the ``fxstream infer`` command line turns it on when stderr is a terminal.
"""
from __future__ import annotations

import sys


class TileProgress:
    """An observer drawing one transient rich progress bar per running pass and phase.

    Args:
        console: a ``rich.console.Console`` to draw on (default: stderr).
        transient: remove each bar when its pass ends (default True); False leaves a line.
        bars: a started ``rich.progress.Progress`` of the caller's (an epoch bar, say) to add
            the pass bars to, instead of a display of its own (which rich allows one of).

    Example:
        >>> p = TileProgress()
        >>> p(0, "forward", 0, 2); p(0, "forward", 1, 2); p(0, "forward", 2, 2)
    """

    def __init__(self, console=None, transient: bool = True, bars=None):
        self.console, self.transient, self.bars = console, transient, bars
        self._live = None  # the rich Progress while some bar is shown
        self._tasks: dict[tuple[int, str], int] = {}

    def __call__(self, index: int, phase: str, done: int, total: int) -> None:
        key = (index, phase)
        if key not in self._tasks:
            if done >= total and done:  # a bar that was never started: nothing to draw
                return
            live = self._start()
            self._tasks[key] = live.add_task(f"pass {index} {phase}", total=total)
        live = self._live
        live.update(self._tasks[key], completed=done)
        if done >= total:
            task = self._tasks.pop(key)
            if self.transient:
                live.remove_task(task)
            if not self._tasks and self.bars is None:
                live.stop()
                self._live = None

    def _start(self):
        if self._live is None and self.bars is not None:
            self._live = self.bars
        if self._live is None:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            console = self.console or Console(file=sys.stderr)
            self._live = Progress(TextColumn("{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TextColumn("tiles"), _rate_column(),
                                  TimeElapsedColumn(), TextColumn("eta"),
                                  TimeRemainingColumn(), console=console,
                                  transient=self.transient)
            self._live.start()
        return self._live

    def close(self) -> None:
        """Stop drawing (bars of passes interrupted by an error are removed)."""
        if self._live is not None and self.bars is None:
            self._live.stop()
        self._live, self._tasks = None, {}

    def __getstate__(self):
        return {"console": None, "transient": self.transient, "bars": None, "_live": None,
                "_tasks": {}}


def _rate_column():
    """A rich column showing tiles per second (or seconds per tile when slower)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            speed = task.speed
            if not speed:
                return Text("? tiles/s", style="progress.data.speed")
            text = f"{speed:.2f} tiles/s" if speed >= 1 else f"{1 / speed:.1f} s/tile"
            return Text(text, style="progress.data.speed")

    return Rate()


__all__ = ["TileProgress"]
