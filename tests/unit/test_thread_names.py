"""`server/thread_names.py`: OS thread names from Python names, installed without costing a
thread its life or a profiler its hook."""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bertrec.server import thread_names

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")


def os_name_of(thread: threading.Thread) -> str:
    return Path(f"/proc/self/task/{thread.native_id}/comm").read_text().strip()


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The module as before any install, and no thread hook left behind."""
    monkeypatch.setattr(thread_names, "_installed", False)
    monkeypatch.setattr(thread_names, "_broken", False)
    monkeypatch.setattr(thread_names, "_libc", None)
    yield
    threading.setprofile(None)


@linux_only
def test_install_names_new_threads_and_keeps_a_profilers_hook(fresh: None) -> None:
    seen: list[str] = []

    def profiler(frame: Any, event: str, arg: Any) -> None:
        seen.append(threading.current_thread().name)

    threading.setprofile(profiler)
    thread_names.install()
    names: list[str] = []
    done = threading.Event()

    def work() -> None:
        names.append(Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text())
        done.set()

    thread = threading.Thread(target=work, name="batcher-test")
    thread.start()
    thread.join(10)
    assert done.is_set()
    assert names == ["batcher-test\n"]
    assert "batcher-test" in seen  # the profiler still profiles the new thread


def test_a_missing_libc_leaves_threads_unnamed_but_running(
    fresh: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_libc(*args: Any, **kwargs: Any) -> Any:
        raise OSError("libc.so.6: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    thread_names.install()
    ran = threading.Event()
    threads = [threading.Thread(target=ran.set, name=f"grpc_{i}") for i in range(2)]
    for thread in threads:
        thread.start()
        thread.join(10)
    assert ran.is_set()
    assert thread_names._broken == sys.platform.startswith("linux")


@pytest.mark.parametrize(
    ("python_name", "os_name"),
    [
        ("batcher-ranker", "batcher-ranker"),
        ("grpc_12", "grpc_12"),
        ("Thread-1 (_serve)", "grpc-serve"),  # grpc's completion-queue poller
        ("Thread-7 (_follow)", "follow"),
        ("version-watcher", "version-watcher"),  # exactly 15 bytes
        ("a-much-longer-thread-name", "a-much-longer-t"),  # the kernel keeps 15 bytes
        ("ééééééééé", "ééééééé"),  # cut on a character boundary
    ],
)
def test_os_thread_name(python_name: str, os_name: str) -> None:
    assert thread_names.os_thread_name(python_name) == os_name
    assert len(thread_names.os_thread_name(python_name).encode()) <= 15
