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


def os_thread_name(python_name: str) -> str:
    """The OS name for a thread called `python_name` (at most 15 bytes of UTF-8)."""
    anonymous = _ANONYMOUS.fullmatch(python_name)
    if anonymous is not None:
        target = anonymous["target"]
        python_name = _RENAMED_TARGETS.get(target, target.strip("_") or python_name)
    return python_name.encode()[:OS_NAME_BYTES].decode(errors="ignore")


def name_current_thread() -> None:
    """Set the calling thread's OS name from its Python name (Linux; elsewhere a no-op)."""
    global _libc
    if not sys.platform.startswith("linux"):
        return
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    name = os_thread_name(threading.current_thread().name).encode()
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)


def install() -> None:
    """Name every thread started from now on (idempotent; the main thread is left alone).

    `threading.setprofile` runs a hook in each new thread before its target: the hook names
    the thread and removes itself, so running threads carry no profiling cost.
    """
    global _installed
    if _installed:
        return
    _installed = True
    threading.setprofile(_name_then_unhook)


def _name_then_unhook(frame: FrameType, event: str, arg: Any) -> None:
    sys.setprofile(None)
    name_current_thread()
