"""Give every thread of the server its Python name at the OS level too.

CPython before 3.14 starts threads without an OS name, so `top -H`, `perf`, `/proc/PID/task`
and the kernel's per-thread CPU and context-switch counters show 70 threads all called
"python": nobody can tell the gRPC handlers from the ranking batcher. Naming them costs one
`prctl` per thread start and makes the per-thread counters answer "which part of the server
spends the CPU of a call" (`bench.server` reports that breakdown from /proc).

The names are the Python ones ("batcher-ranker", "grpc_12", "http", ...), shortened to the
kernel's 15 bytes; grpc's own "Thread-N (_serve)" (its completion-queue poller) becomes
"grpc-serve". The main thread keeps its name, so `ps`, `pgrep` and `killall` still find the
process as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import re
import sys
import threading
from types import FrameType
from typing import Any

PR_SET_NAME = 15  # <linux/prctl.h>
OS_NAME_BYTES = 15  # TASK_COMM_LEN (16) less the terminating NUL
_ANONYMOUS = re.compile(r"Thread-\d+ \((?P<target>\w+)\)")
_RENAMED_TARGETS = {"_serve": "grpc-serve"}  # grpc._server's completion-queue loop

_installed = False
_libc: Any = None
_broken = False  # naming failed once (no usable libc): threads run unnamed, never die of it

log = logging.getLogger(__name__)


def os_thread_name(python_name: str) -> str:
    """The OS name for a thread called `python_name` (at most 15 bytes of UTF-8)."""
    anonymous = _ANONYMOUS.fullmatch(python_name)
    if anonymous is not None:
        target = anonymous["target"]
        python_name = _RENAMED_TARGETS.get(target, target.strip("_") or python_name)
    return python_name.encode()[:OS_NAME_BYTES].decode(errors="ignore")


def name_current_thread() -> None:
    """Set the calling thread's OS name from its Python name (Linux; elsewhere a no-op).

    Never raises: without a usable libc (a musl image, a sandbox) threads stay unnamed, which
    costs only the per-thread numbers, never the thread.
    """
    global _libc, _broken
    if _broken or not sys.platform.startswith("linux"):
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        name = os_thread_name(threading.current_thread().name).encode()
        _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)
    except (OSError, AttributeError) as exc:
        _broken = True
        log.warning("cannot name threads at the OS level (%s); they stay unnamed", exc)


def install() -> None:
    """Name every thread started from now on (idempotent; the main thread is left alone).

    `threading.setprofile` runs a hook in each new thread before its target: the hook names
    the thread and hands the thread to the hook that was installed before (a profiler's), or
    to none, so running threads carry no cost of ours.
    """
    global _installed
    if _installed:
        return
    _installed = True
    previous = threading.getprofile()

    def name_then_unhook(frame: FrameType, event: str, arg: Any) -> None:
        sys.setprofile(previous)
        name_current_thread()

    threading.setprofile(name_then_unhook)
