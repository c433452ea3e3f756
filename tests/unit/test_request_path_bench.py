"""`bench.request_path` runs the server's Recommend steps in one thread: it must keep working
as the engine changes (it calls the batcher's own batch step; a call its batch did not resolve
fails it at once)."""

from __future__ import annotations

import math
from pathlib import Path

from bertrec.bench.request_path import STEPS, measure
from bertrec.bench.synthetic import build_synthetic_repo


def test_request_path_measures_every_step(tmp_path: Path) -> None:
    repo = build_synthetic_repo(tmp_path, n_items=300, n_users=50, dim=8)
    per_call = measure(repo, [1, 4], calls=8, rounds=1)
    assert list(per_call) == ["1", "4"]
    for costs in per_call.values():
        assert all(costs[step] > 0 and math.isfinite(costs[step]) for step in STEPS), costs
