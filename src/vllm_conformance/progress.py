"""Progress of long phases where a person sees it: outside pytest's capture, also under -n K.

Every pytest process of a run (the controller and each xdist worker) appends its lines to one
file, ``<run dir>/progress.log``; the process that owns the terminal (the xdist controller, or
the only process) tails that file and writes each line to the terminal as it comes. A file is
the channel because xdist has none from a worker to the controller while a test runs, and
because it stays: ``tail -f reports/<run>/progress.log`` from another shell shows the same.

A *phase* is one long step of one entry: waiting for GPUs, the server start, the full-length
prefills, an lm-eval run, the load run::

    with progress.phase(entry.id, "lm-eval gsm8k", total=1319, unit="docs") as step:
        for done in ...:
            step.update(done)

A phase writes a line when it starts and when it ends, on progress at most every
``interval_s``, and every ``interval_s`` without progress (a heartbeat: a silent two-hour run
shows that it is alive), each with the elapsed time and an ETA: from the rate so far when the
phase counts steps, else from its planned time. Its end is a ``phase`` record of the report.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Only the type: the report's views show the plan, whose times this module formats.
    from vllm_conformance.report.records import RecordWriter

#: Seconds between two lines of one phase (progress or heartbeat).
DEFAULT_INTERVAL_S = 60.0


def duration(seconds: float) -> str:
    """``45s``, ``12m05s``, ``2h04m``: what a person reads at a glance."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Writes the progress lines of one pytest process to the run's progress file.

    ``planned`` maps ``(entry, phase name)`` to planned seconds (from the cost plan); a phase
    of that name takes its ETA from there unless it counts steps. Without a ``path``
    nothing is written (tools that start servers outside pytest).
    """

    def __init__(
        self,
        path: Path | None,
        worker: str | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        writer: RecordWriter | None = None,
    ) -> None:
        self.path = path
        self.worker = worker or "main"
        self.interval_s = interval_s
        self.writer = writer
        self.planned: Mapping[tuple[str, str], float] = {}

    def line(self, entry: str | None, text: str) -> None:
        """Append one line (one ``write`` with ``O_APPEND``: lines of processes never mix)."""
        if self.path is None:
            return
        where = f" {entry}" if entry else ""
        data = f"[{self.worker} {time.strftime('%H:%M:%S')}]{where}: {text}\n".encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def phase(
        self,
        entry: str,
        name: str,
        *,
        total: int | None = None,
        unit: str = "",
        planned_s: float | None = None,
        detail: Callable[[], str] | None = None,
    ) -> Phase:
        """A long step of ``entry``; use it as a context manager. ``detail`` is asked for a
        short text at every line (e.g. the last line of a server log)."""
        if planned_s is None:
            planned_s = self.planned.get((entry, name))
        return Phase(self, entry, name, total, unit, planned_s, detail)


class Phase:
    """One long step; see :class:`Progress`."""

    def __init__(
        self,
        progress: Progress,
        entry: str,
        name: str,
        total: int | None,
        unit: str,
        planned_s: float | None,
        detail: Callable[[], str] | None,
    ) -> None:
        self.progress = progress
        self.entry = entry
        self.name = name
        self.total = total
        self.unit = unit
        self.planned_s = planned_s
        self.done = 0
        self._detail = detail
        self._note = ""
        self._began = time.monotonic()
        self._last = -float("inf")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)

    # -- what the caller does --------------------------------------------------------

    def update(self, done: int, note: str | None = None) -> None:
        """``done`` steps are finished; a line follows if one is due (or the last step)."""
        self.done = done
        if note is not None:
            self._note = note
        finished = self.total is not None and done >= self.total
        if finished or time.monotonic() - self._last >= self.progress.interval_s:
            self._say(self.status())

    def advance(self, steps: int = 1) -> None:
        self.update(self.done + steps)

    def note(self, text: str) -> None:
        """Show ``text`` with the next line (e.g. who holds the GPUs waited for)."""
        self._note = text

    # -- the lines -------------------------------------------------------------------

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._began

    def eta_s(self) -> float | None:
        """Seconds left: from the rate of counted steps, else from the plan (may be < 0)."""
        if self.total is not None and self.done > 0:
            return self.elapsed_s * (self.total - self.done) / self.done
        if self.planned_s is not None:
            return self.planned_s - self.elapsed_s
        return None

    def status(self) -> str:
        parts = [self.name]
        if self.total is not None:
            parts[0] += f": {self.done:,}/{self.total:,} {self.unit}".rstrip()
        parts.append(f"{duration(self.elapsed_s)} elapsed")
        eta = self.eta_s()
        if eta is not None:
            parts.append(f"ETA {duration(eta)}" if eta >= 0 else f"{duration(-eta)} over plan")
        text = self._note or (self._detail() if self._detail else "")
        if text:
            parts.append(text[:160])
        return ", ".join(parts)

    def _say(self, text: str) -> None:
        with self._lock:
            self._last = time.monotonic()
            self.progress.line(self.entry, text)

    def _heartbeat(self) -> None:
        interval = self.progress.interval_s
        while not self._stop.wait(min(interval, 5.0)):
            if time.monotonic() - self._last >= interval:
                self._say(self.status())

    # -- context manager -------------------------------------------------------------

    def __enter__(self) -> Phase:
        self._began = time.monotonic()
        planned = f" (planned {duration(self.planned_s)})" if self.planned_s is not None else ""
        self._say(f"{self.name} started{planned}")
        self._beat.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._beat.join()
        seconds = self.elapsed_s
        planned = f", planned {duration(self.planned_s)}" if self.planned_s is not None else ""
        counted = f", {self.done:,} {self.unit}".rstrip() if self.total is not None else ""
        if exc_type is None:
            self._say(f"{self.name} done in {duration(seconds)}{planned}{counted}")
        else:
            self._say(f"{self.name} FAILED after {duration(seconds)}{planned}: {exc_type.__name__}")
        if self.progress.writer is not None:
            self.progress.writer.write(
                "phase",
                entry=self.entry,
                phase=self.name,
                seconds=seconds,
                planned_s=self.planned_s,
                done=self.done if self.total is not None else None,
                total=self.total,
                outcome="ok" if exc_type is None else "failed",
            )


class TerminalTail:
    """Copies the lines of the run's progress file to the terminal as they come.

    It writes to a duplicate of the terminal's file descriptor, taken while pytest's capture
    is suspended, so lines that a test's thread produces reach the person without touching
    the capture state of the running test.
    """

    def __init__(self, path: Path, terminal: Any, poll_s: float = 1.0) -> None:
        self.path = path
        self.terminal = terminal
        self.poll_s = poll_s
        self._offset = 0
        self._partial = b""
        #: pytest's width of its current line when this last wrote
        self._width = 0
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, fd: int) -> None:
        """Tail into a duplicate of ``fd`` (the terminal's stdout)."""
        self._fd = os.dup(fd)
        self._thread.start()

    def stop(self) -> None:
        """Write what is left and close."""
        if self._fd is None:
            return
        self._stop.set()
        self._thread.join()
        self._copy()
        os.close(self._fd)
        self._fd = None

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._copy()

    def _copy(self) -> None:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except FileNotFoundError:
            return
        if not chunk:
            return
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        if not lines or self._fd is None:
            return
        writer = getattr(self.terminal, "_tw", None)
        width = writer.width_of_current_line if writer is not None else 0
        # pytest may be half-way through a row of progress dots (it wrote since our last
        # line, which ended one): start on a fresh line.
        lead = b"\n" if width and width != self._width else b""
        os.write(self._fd, lead + b"".join(b"[progress] " + line + b"\n" for line in lines))
        self._width = width


@dataclass(frozen=True)
class EntryProgress:
    """The run's :class:`~vllm_conformance.progress.Progress`, bound to one entry."""

    progress: Progress
    entry: str

    def phase(self, name: str, **options: Any) -> Phase:
        """:meth:`Progress.phase` of this entry (``total``, ``unit``, ``planned_s``,
        ``detail``)."""
        return self.progress.phase(self.entry, name, **options)

    def line(self, text: str) -> None:
        self.progress.line(self.entry, text)
