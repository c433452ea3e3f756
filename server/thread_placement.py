"""Where and how every thread of a serving process runs: its CPUs and its scheduling policy.

Both are per thread on Linux, and a new thread inherits both from the thread that creates it.
Threads that exist already when a setting is made (numpy's OpenBLAS pool starts on import,
grpc's on first use) are therefore set one by one from /proc/self/task, and every thread
started afterwards inherits the setting; so does a child process (fork and exec keep both).

Why SCHED_BATCH (`thread_scheduling`): a call hops between threads of one interpreter (grpc's
poller, a handler, the batcher, the handler again), and each hop wakes a thread that needs the
GIL its waker still holds. Under SCHED_OTHER the kernel lets the woken thread preempt the waker
at once, on the same core; the woken thread finds the GIL held, asks for it and blocks, and the
waker resumes: two switches and a GIL request for nothing, once per future the batcher resolves.
SCHED_BATCH is the same fair scheduler, same CPU share and nice value, except that a woken
thread never preempts a running one: it runs when the waker blocks or its slice ends, by which
time the GIL is usually free. A woken thread waits up to a scheduler tick longer at worst; no
privilege is needed to choose it (sched(7)).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

THREAD_SCHEDULING = ("batch", "normal")  # the values of `ServerConfig.thread_scheduling`


def pin_every_thread(cpus: set[int]) -> None:
    """Run every thread of this process on `cpus`, and so every thread started from now on."""
    _every_thread(lambda tid: os.sched_setaffinity(tid, cpus))


def schedule_every_thread(policy: str) -> bool:
    """Give every thread of this process (and every thread and child it starts from now on)
    the scheduling policy `policy` ("batch": SCHED_BATCH, "normal": SCHED_OTHER).

    Returns:
        False where the platform has no such policy or the kernel refused it (logged once);
        the threads then keep the policy they had, which only costs speed.
    Raises:
        ValueError: a policy not in THREAD_SCHEDULING.
    """
    if policy not in THREAD_SCHEDULING:
        raise ValueError(f"thread scheduling must be one of {THREAD_SCHEDULING}, got {policy!r}")
    number = getattr(os, "SCHED_BATCH" if policy == "batch" else "SCHED_OTHER", None)
    if number is None or not hasattr(os, "sched_setscheduler"):
        log.warning("thread scheduling %s is not available on this platform", policy)
        return False
    param = os.sched_param(0)  # the only priority SCHED_OTHER and SCHED_BATCH take
    try:
        os.sched_setscheduler(0, number, param)  # this thread: its errors are reported
    except OSError as exc:  # e.g. a seccomp profile that forbids sched_setscheduler
        log.warning("cannot set thread scheduling %s: %s", policy, exc)
        return False
    _every_thread(lambda tid: os.sched_setscheduler(tid, number, param))
    return True


def _every_thread(apply: Callable[[int], None]) -> None:
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            apply(int(task.name))
