"""What a run tells whoever watches it: one interface through every layer of `extract run`.

`Reporter` is handed from the CLI (or a test, or a benchmark) to `extract.run.run`, which
passes the same object to the extraction loop or the dask client. Its methods do nothing
here; override the ones you need:

- ``start(job, totals)``: the config, store and model are accepted; what the run covers and
  what was found complete already.
- ``advance(images, forwards)``: after every U-Net call (one process) or every chunk (dask):
  ``forwards`` more (image, t) rows computed, ``images`` more images with every t done.
- ``chunks(done, total)``: image chunks complete (data and completion records written).
- ``log(line)``: a line worth showing (a distributed run's cluster and dashboard).

`BarReporter` is the CLI's progress bar; `rate_text` and `eta_seconds` are its arithmetic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Totals:
    """A run's size when it starts: images and (image, t) forwards of the whole plan, image
    chunks; and how much of each was found complete."""

    images: int
    forwards: int
    chunks: int
    images_done: int = 0
    forwards_done: int = 0
    chunks_done: int = 0


class Reporter:
    """A run's observer; every method is optional (does nothing here)."""

    def start(self, job, totals: Totals) -> None:
        pass

    def advance(self, images: int, forwards: int) -> None:
        pass

    def chunks(self, done: int, total: int) -> None:
        pass

    def log(self, line: str) -> None:
        pass


_UNITS = (("s", 1.0), ("min", 60.0), ("h", 3600.0))


def rate_text(count: float, seconds: float, what: str) -> str:
    """``count`` per ``seconds`` in the first unit (per s, per min, per h) where it is at least 1,
    with three significant figures: never a rate rounded to 0 (``0.02 images/s`` is ``1.20
    images/min``)."""
    if seconds <= 0 or count <= 0:
        return f"- {what}/s"
    unit, scale = next(((u, k) for u, k in _UNITS if count / seconds * k >= 1), _UNITS[-1])
    return f"{count / seconds * scale:.3g} {what}/{unit}"


def eta_seconds(done: float, remaining: float, seconds: float) -> float | None:
    """Time left at the rate so far (``done`` in ``seconds``); None before the first unit is done."""
    if done <= 0 or seconds <= 0:
        return None
    return remaining * seconds / done


def clock(seconds: float | None) -> str:
    """``1:02:03``, or ``-:--:--`` when unknown."""
    if seconds is None:
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class BarReporter(Reporter):
    """`extract run`'s progress bar on ``console`` (rich): images and forwards done of the run,
    chunks, the rate in a unit that is not rounded to 0, and an ETA from the first U-Net call.

    The bar advances per U-Net call in forwards, so a real-size run (minutes per batch) shows
    movement from its first call; chunks found complete count as done but not towards the rate."""

    def __init__(self, console, disable: bool = False, now=time.perf_counter):
        from rich.progress import BarColumn, Progress, TextColumn

        self.now, self.disable = now, disable
        self.bar = Progress(
            TextColumn("[bold]extract"), BarColumn(), TextColumn("{task.description}"), console=console, disable=disable
        )
        self.task = self.bar.add_task("", total=None)
        self.totals = Totals(0, 0, 0)
        self.images = self.forwards = self.computed = 0
        self.chunk_text = ""
        self.since = now()

    def start(self, job, totals: Totals) -> None:
        self.totals = totals
        self.images, self.forwards = totals.images_done, totals.forwards_done
        self.chunk_text = f"chunks {totals.chunks_done}/{totals.chunks}"
        self.since = self.now()
        self.bar.update(self.task, total=totals.forwards, completed=self.forwards)
        self._show()
        self.bar.start()

    def advance(self, images: int, forwards: int) -> None:
        self.images += images
        self.forwards += forwards
        self.computed += forwards
        self.bar.update(self.task, completed=self.forwards)
        self._show()

    def chunks(self, done: int, total: int) -> None:
        self.chunk_text = f"chunks {done}/{total}"
        self._show()

    def log(self, line: str) -> None:
        from rich.markup import escape

        if not self.disable:
            self.bar.console.print(escape(line), highlight=False, soft_wrap=True)

    def text(self) -> str:
        """The bar's text: ``images 3/18, forwards 6/36, chunks 0/2, 1.20 forwards/min, ETA 0:25:00``."""
        t = self.totals
        elapsed = self.now() - self.since
        return (
            f"images {self.images}/{t.images}, forwards {self.forwards}/{t.forwards}, {self.chunk_text}, "
            f"{rate_text(self.computed, elapsed, 'forwards')}, "
            f"ETA {clock(eta_seconds(self.computed, t.forwards - self.forwards, elapsed))}"
        )

    def _show(self) -> None:
        self.bar.update(self.task, description=self.text())

    def stop(self) -> None:
        self.bar.stop()


class Recorder(Reporter):
    """Keeps everything a run reports, with the time it started computing (tests, benchmarks)."""

    def __init__(self):
        self.started_at: float | None = None
        self.totals: Totals | None = None
        self.advances: list[tuple[int, int]] = []
        self.chunk_counts: list[tuple[int, int]] = []
        self.lines: list[str] = []

    def start(self, job, totals: Totals) -> None:
        self.started_at, self.totals = time.perf_counter(), totals

    def advance(self, images: int, forwards: int) -> None:
        self.advances.append((images, forwards))

    def chunks(self, done: int, total: int) -> None:
        self.chunk_counts.append((done, total))

    def log(self, line: str) -> None:
        self.lines.append(line)
