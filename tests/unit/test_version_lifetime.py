"""A loaded version is frozen out of the collector's sight (`live_versions`), so a retired one
must be freed by refcounting alone: a reference cycle through it would keep its arrays and
sessions for the life of the process. Young collections start late enough that calls in flight
do not trigger them. Run in a child: `gc.freeze` and the thresholds are process-wide."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from bertrec.bench.synthetic import build_synthetic_repo

CHILD = textwrap.dedent(
    """
    import gc, sys, weakref
    from pathlib import Path
    from bertrec.server.config import ServerConfig
    from bertrec.server.feedback import Feedback
    from bertrec.server.live_versions import YOUNG_COLLECTION_THRESHOLD, version_loader
    from bertrec.server.metrics import ServerMetrics

    config = ServerConfig(model_repo=Path(sys.argv[1]), model="synthetic", ranker_threads=1,
                          providers=("CPUExecutionProvider",))
    metrics = ServerMetrics()
    feedback = Feedback(None, metrics.feedback, 1.0)
    load = version_loader(config, metrics, feedback)
    engine = load(1)
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == YOUNG_COLLECTION_THRESHOLD > 700, gc.get_threshold()
    refs = [weakref.ref(engine), weakref.ref(engine.model), weakref.ref(engine.model.ranker)]
    feedback.detach(engine.users)
    engine.close(drain=True, timeout_s=10)
    del engine
    print([ref() is None for ref in refs])
    """
)


def test_a_retired_version_is_freed_without_the_collector(tmp_path: Path) -> None:
    repo = build_synthetic_repo(tmp_path, n_items=300, n_users=20, dim=8)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(repo)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[True, True, True]", done.stdout
