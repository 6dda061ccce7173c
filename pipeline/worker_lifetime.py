"""Make a worker process exit when the process that started it dies.

A parent killed with SIGKILL (the OOM killer, a cluster's time limit) cannot stop its workers, and
they would run on, orphaned, holding their memory. ``exit_with_parent()``, called once in the worker
(the local executor's worker initializer does), ends the worker within about half a second of its
parent's death.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time

POLL_S = 0.5
_PR_SET_PDEATHSIG = 1

_watching = False


def exit_with_parent(parent_pid: int | None = None) -> None:
    """Exit (status 1, no cleanup) once ``parent_pid`` (default: the process that started this one)
    is no longer this process's parent. Calling it again does nothing."""
    global _watching
    if _watching:
        return
    _watching = True
    parent = _started_by() if parent_pid is None else parent_pid
    if sys.platform.startswith("linux"):
        _kill_on_parent_death(parent)
    if os.getppid() != parent:  # it died before the watch began
        os._exit(1)
    threading.Thread(target=_watch, args=(parent,), name="exit-with-parent", daemon=True).start()


def _started_by() -> int:
    """The pid of the process that started this one, as recorded at its start where multiprocessing
    knows it, so that a parent dead before the watch begins is noticed too. A forkserver's workers
    are the forkserver's children, which exits when its own parent does."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.pid is None or multiprocessing.get_start_method(allow_none=True) == "forkserver":
        return os.getppid()
    return parent.pid


def _watch(parent: int) -> None:
    while True:
        time.sleep(POLL_S)
        if os.getppid() != parent:
            os._exit(1)


def _kill_on_parent_death(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies: unlike the watch thread, this
    also reaches a worker stuck in native code that holds the GIL.

    PR_SET_PDEATHSIG fires when the *thread* that forked us exits, not the process, and
    ProcessPoolExecutor spawns workers from whichever thread calls ``submit`` (or from its manager
    thread, to replace a worker). So it is set only when the parent's main thread forked us, which
    in Python lives as long as the process; otherwise the watch thread alone does the job."""
    try:
        with open(f"/proc/{parent}/task/{parent}/children") as f:
            if str(os.getpid()) not in f.read().split():
                return
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no /proc/PID/task/TID/children, or no prctl: the watch suffices
        pass
