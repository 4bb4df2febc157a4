"""Run a server command that ends itself when the process that launched it dies.

A server leads its own session so that teardown can end its whole process group; the price
is that nothing else ends it: when its launcher is killed (a Ray actor whose node's raylet
died, a driver killed with SIGKILL), the server keeps running, holding its GPUs. This
wrapper sits between the two::

    python -m vllm_conformance.launch.lifeline FD -- python -m vllm... --port 8000

It runs the command in its own process group and session (it inherits both), and reads
``FD``, the read end of a pipe whose only write end the launcher holds. The kernel closes
that end however the launcher dies, so end of file means "launcher gone": the wrapper then
ends every process of its session that carries the server's tag, as teardown would. It
exits with the command's exit code (128 + N for a signal N), so callers see the server's.

The watching is done one process further down: a Ray worker that exits SIGKILLs its
direct children (``kill_child_processes_on_worker_exit``), which would take the watcher
with it and leave the server; its grandchildren it leaves alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from types import FrameType

from vllm_conformance.launch import procs


def _keep_waiting(signum: int, frame: FrameType | None) -> None:
    # Teardown signals the whole group: the server shuts down, and the wrapper waits for it.
    return None


def _watch(fd: int, child: subprocess.Popen[bytes]) -> None:
    while os.read(fd, 1):
        pass
    if child.poll() is not None:
        return
    print(
        "vllm-conformance lifeline: the launcher of this server is gone; ending the server",
        file=sys.stderr,
        flush=True,
    )
    procs.end_tagged(os.environ[procs.TAG_VAR], session=os.getsid(0), spare=os.getpid())


def main(argv: list[str]) -> int:
    inner = argv[:1] == ["--inner"]
    fd, separator, *command = argv[inner:]
    if separator != "--" or not command:
        raise SystemExit("usage: python -m vllm_conformance.launch.lifeline FD -- COMMAND...")
    signal.signal(signal.SIGTERM, _keep_waiting)
    signal.signal(signal.SIGINT, _keep_waiting)
    if inner:
        child = subprocess.Popen(command)
        threading.Thread(target=_watch, args=(int(fd), child), daemon=True).start()
    else:
        watcher = [sys.executable, "-m", __spec__.name, "--inner", fd, "--", *command]
        child = subprocess.Popen(watcher, pass_fds=(int(fd),))
        os.close(int(fd))
    code = child.wait()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
