"""The server's threads carry their roles at the OS level (`server/thread_names.py`).

Without it every thread of `bertrec serve` is "python" in /proc, `top -H` and `perf`, and
`bench.server` cannot say which part of the server spends a call's CPU.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

import pytest
from server_harness import Reference, ServerProcess

from bertrec.client import RecommenderClient

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")


def thread_names(pid: int) -> Counter[str]:
    names: Counter[str] = Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            names[(task / "comm").read_text().strip()] += 1
        except OSError:  # a thread that ended meanwhile
            continue
    return names


def test_serving_threads_are_named(
    server: ServerProcess, client: RecommenderClient, ref: Reference
) -> None:
    client.recommend(ref.user_ids[0], k=3)  # at least one handler thread has run a call
    names = thread_names(server.proc.pid)
    assert {"batcher-ranker", "batcher-similar", "batcher-encoder", "grpc-serve", "http"} <= set(
        names
    ), names
    # grpc_N: the unary handler pool (grpc's C core names its timer thread "grpc_global_tim")
    assert any(re.fullmatch(r"grpc_\d+", name) for name in names), names
    main = (Path(f"/proc/{server.proc.pid}/comm")).read_text().strip()
    assert main not in {"grpc-serve", "http"} and not main.startswith("batcher"), main
    # Only threads bertrec does not start itself (ONNX Runtime's, grpc's C core) may be
    # left with the process's name.
    assert names[main] <= 8, names
