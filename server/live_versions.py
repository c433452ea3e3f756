"""How the server loads, serves and closes one model version: the glue between the config,
`ModelSlot`, `VersionWatcher` and the `Recommender`.

Each loaded version is a started `Recommender` of its own (the model, its batchers and its
sessions), so a call that leased it finishes on it even when a swap happens mid-call, and
closing it (after its last lease) stops exactly its batcher threads and drops its sessions
and memory-mapped arrays. Loading does everything that can fail before the slot sees the
version: resolve, verify every hash, map the arrays, create the sessions, warm up.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable

from bertrec.server.config import ServerConfig
from bertrec.server.engine import Recommender
from bertrec.server.feedback import Feedback
from bertrec.server.metrics import ServerMetrics
from bertrec.server.model_slot import ModelSlot
from bertrec.server.version_watcher import RepositoryVersions, VersionWatcher

CLOSE_TIMEOUT_S = 30.0  # a retired version has no callers left; its batchers stop at once
# Young collections start once tracked allocations outnumber frees by this many. At Python's
# 700 the objects that ~64 calls in flight hold made the count swing across it ~250 times a
# second: 7-13 us of collection per Recommend call (gc.callbacks, one pinned worker, c=64),
# each young collection walking every in-flight call's objects. At 10k none started in 5 s of
# that load. What a call leaves is freed by reference counting; only garbage in reference
# cycles (an exception and its traceback) waits longer: for 10k objects more, not 700.
YOUNG_COLLECTION_THRESHOLD = 10_000


def version_loader(
    config: ServerConfig, metrics: ServerMetrics, feedback: Feedback
) -> Callable[[int], Recommender]:
    """Version number -> a verified, warmed-up, started `Recommender` for it, with the
    feedback store replayed into its users (folded users survive swaps and restarts)."""

    def load(version: int) -> Recommender:
        from bertrec.server.model import load_model  # onnxruntime: only once we serve

        c = config
        model = load_model(dataclasses.replace(c, version=version))
        model.warm_up(c.warmup_iterations, c.ranker_max_batch_size, c.encoder_max_batch_size)
        users = feedback.users_for(model)
        engine = Recommender(model, c, metrics, users)
        try:
            engine.start()
        except BaseException:
            feedback.detach(users)
            raise
        metrics.set_model(
            model.name, model.version, model.encoder.provider, model.encoder_file,
            model.n_items, model.n_users,
        )  # fmt: skip
        # Everything alive now lives as long as the version: out of the collector's sight, a
        # full collection no longer walks the ~50k objects of the server's modules and model
        # (14 ms with the GIL held, at 10k items) while calls wait. The load's own cyclic
        # garbage is collected first, so none of it is frozen; objects already frozen are not
        # walked again. A retired version needs no collector: refcounting frees it.
        gc.collect()
        gc.freeze()
        gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])
        return engine

    return load


def build_versions(
    config: ServerConfig, metrics: ServerMetrics, feedback: Feedback
) -> tuple[ModelSlot[Recommender], VersionWatcher[Recommender]]:
    """The server's slot and the watcher that fills it (not started: see `VersionWatcher`), by
    the config's version policy and poll interval, with the model's version metrics."""
    version_metrics = metrics.for_versions(config.model)

    def close_version(engine: Recommender) -> None:
        """Stop a retired version's batchers and its feedback; its sessions and arrays go
        with the last reference."""
        feedback.detach(engine.users)
        engine.close(drain=True, timeout_s=CLOSE_TIMEOUT_S)

    slot: ModelSlot[Recommender] = ModelSlot(close_version, version_metrics)
    watcher = VersionWatcher(
        RepositoryVersions(config.model_repo, config.model),
        slot,
        version_loader(config, metrics, feedback),
        config.policy,
        config.poll_s,
        version_metrics,
    )
    return slot, watcher
