"""`thread_placement`: a policy or CPU set reaches the threads that exist and those to come."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from bertrec.server.thread_placement import schedule_every_thread

# Run in a child: the test process's own threads keep their policy.
CHILD = textwrap.dedent(
    """
    import os, sys, threading
    from pathlib import Path
    from bertrec.server.thread_placement import schedule_every_thread

    def policies():
        tasks = Path("/proc/self/task").iterdir()
        return sorted({os.sched_getscheduler(int(t.name)) for t in tasks})

    stop = threading.Event()
    before = threading.Thread(target=stop.wait)  # a thread that exists already
    before.start()
    assert schedule_every_thread(sys.argv[1])
    after = threading.Thread(target=stop.wait)  # one started afterwards
    after.start()
    print(policies(), len(list(Path("/proc/self/task").iterdir())))
    stop.set()
    """
)


@pytest.mark.parametrize(
    ("policy", "number"), [("batch", os.SCHED_BATCH), ("normal", os.SCHED_OTHER)]
)
def test_every_thread_before_and_after_gets_the_policy(policy: str, number: int) -> None:
    other = os.SCHED_BATCH if policy == "normal" else os.SCHED_OTHER  # start from the other

    def start_under_the_other_policy() -> None:
        os.sched_setscheduler(0, other, os.sched_param(0))

    done = subprocess.run(
        [sys.executable, "-c", CHILD, policy], capture_output=True, text=True, timeout=60,
        preexec_fn=start_under_the_other_policy,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found, threads = done.stdout.split("] ")
    assert found + "]" == str([number]) and int(threads) >= 3


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="must be one of"):
        schedule_every_thread("fifo")


def test_a_refused_policy_is_logged_and_serving_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A seccomp profile may forbid sched_setscheduler: one warning, no exception."""

    def refuse(*_args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    with caplog.at_level("WARNING"):
        assert schedule_every_thread("batch") is False
    assert "cannot set thread scheduling batch" in caplog.text
