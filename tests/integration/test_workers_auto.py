"""`bertrec serve --workers auto` (the images' setting) serves one process per usable CPU: a server
started on one CPU (its affinity mask narrowed before it execs, as `taskset` does) sizes itself
to one worker and serves alone, without the supervisor."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from server_harness import serving

from bertrec.client import RecommenderClient

RESOLVED = re.compile(r"workers (\d+) \(auto\); usable CPUs (\d+) \(affinity (\d+),")


def pinned_python(folder: Path, cpu: int) -> Path:
    """A `python` that runs this interpreter pinned to `cpu` (the server inherits the mask)."""
    script = folder / "python-on-one-cpu"
    script.write_text(
        f"#!{sys.executable}\nimport os, sys\nos.sched_setaffinity(0, {{{cpu}}})\n"
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
    )
    script.chmod(0o755)
    return script


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity")
@pytest.mark.parametrize("auto", ["auto", "0"])
def test_auto_on_one_cpu_serves_as_one_process(
    model_repo: Path, tmp_path: Path, ref, auto: str
) -> None:
    python = pinned_python(tmp_path, min(os.sched_getaffinity(0)))
    with serving(model_repo, tmp_path / "logs", "--workers", auto, python=str(python)) as server:
        with RecommenderClient(server.target, timeout_s=30) as client:
            user = ref.user_ids[0]
            assert client.recommend(user, k=3).item_ids == [i for i, _ in ref.recommend(user, 3)]
        resolved = RESOLVED.search(server.stderr())
        assert resolved, server.stderr()[-3000:]
        assert resolved.groups() == ("1", "1", "1")
        assert "bertrec.server.workers" not in server.stderr()  # no supervisor started
