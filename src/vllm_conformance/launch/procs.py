"""Find and end the processes of one server, by tag rather than by name or port.

Killing vLLM's API server can leave engine and tensor-parallel workers holding GPUs while
the port is already free. Every server is therefore started in its own session with an
environment variable carrying a unique tag, which all its descendants inherit; teardown
ends the process group and then sweeps ``/proc`` for anything still carrying the tag.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

TAG_VAR = "VLLM_CONFORMANCE_TAG"


def _stat(proc: Path) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name: state, ppid, pgrp, session, ..."""
    try:
        return (proc / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def is_running(pid: int) -> bool:
    """The process exists and is not a zombie (exited, not yet reaped by its parent)."""
    stat = _stat(Path(f"/proc/{pid}"))
    return stat is not None and stat[0] != "Z"


def tagged_pids(tag: str, session: int | None = None, var: str = TAG_VAR) -> list[int]:
    """Live processes whose environment holds ``var=tag`` (``VLLM_CONFORMANCE_TAG=tag``).

    With ``session`` (the server's PID: it leads its own session), processes of that
    session count too, in case one rewrote its environment.
    """
    needle = f"{var}={tag}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        stat = _stat(proc)
        if stat is None or stat[0] == "Z":
            continue
        if session is not None and int(stat[3]) == session:
            pids.append(int(proc.name))
            continue
        try:
            # A process that is exiting has no memory map left, and recent kernels refuse
            # to open its environ (ESRCH): only the session above still finds it.
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(proc.name))
    return pids


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_gone(
    tag: str, session: int | None, timeout: float, var: str = TAG_VAR, spare: int | None = None
) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = [pid for pid in tagged_pids(tag, session, var) if pid != spare]
        if not left or time.monotonic() >= deadline:
            return left
        # /proc offers no wait primitive for non-children; poll at a short interval.
        time.sleep(0.1)


def end_process_group(pgid: int, tag: str, grace: float = 20.0) -> list[int]:
    """SIGTERM the group, SIGKILL it after ``grace`` seconds, then sweep by tag.

    Returns the PIDs that survived everything (an empty list is success).
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    left = _wait_gone(tag, pgid, grace)
    if left:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        _signal_all(tagged_pids(tag, pgid), signal.SIGKILL)
        left = _wait_gone(tag, pgid, 10.0)
    return left


def end_tagged(
    tag: str,
    var: str = TAG_VAR,
    grace: float = 20.0,
    session: int | None = None,
    spare: int | None = None,
) -> list[int]:
    """SIGTERM every process carrying ``var=tag`` (and of ``session``), SIGKILL what is left
    after ``grace`` seconds; ``spare`` (the caller itself) is left alone.

    Returns the PIDs that survived (an empty list is success).
    """
    _signal_all(_wait_gone(tag, session, 0, var, spare), signal.SIGTERM)
    left = _wait_gone(tag, session, grace, var, spare)
    if left:
        _signal_all(left, signal.SIGKILL)
        left = _wait_gone(tag, session, 10.0, var, spare)
    return left
