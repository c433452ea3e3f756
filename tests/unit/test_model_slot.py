"""ModelSlot: leases, atomic swaps, deferred close, never empty, thread safety (with fakes)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest

from bertrec.server.errors import NotFound, NotReady
from bertrec.server.model_slot import ModelSlot, OnlyVersion


@dataclass(eq=False)
class FakeVersion:
    version: int
    closed: int = 0


@dataclass
class RecordingMetrics:
    events: list[tuple[str, int]] = field(default_factory=list)

    def added(self, version: int) -> None:
        self.events.append(("added", version))

    def removed(self, version: int) -> None:
        self.events.append(("removed", version))

    def swapped(self, serving: int) -> None:
        self.events.append(("swapped", serving))

    def load_finished(self, version: int, duration_s: float) -> None:
        self.events.append(("loaded", version))

    def load_failed(self, version: int) -> None:
        self.events.append(("failed", version))


def close(value: FakeVersion) -> None:
    value.closed += 1


def make_slot(metrics: RecordingMetrics | None = None) -> ModelSlot[FakeVersion]:
    return ModelSlot(close, metrics, close_in_background=False)


def test_an_empty_slot_is_not_ready() -> None:
    with pytest.raises(NotReady):
        make_slot().acquire()


def test_acquire_returns_the_serving_version_or_the_named_one() -> None:
    slot = make_slot()
    v1, v2 = FakeVersion(1), FakeVersion(2)
    slot.install(1, v1)
    slot.install(2, v2, serve=False)
    with slot.acquire() as lease:
        assert lease.value is v1 and lease.version == 1
    with slot.acquire(2) as lease:
        assert lease.value is v2
    with pytest.raises(NotFound, match=r"version 3 is not loaded \(loaded: 1, 2\)"):
        slot.acquire(3)


def test_a_call_finishes_on_its_version_and_the_old_one_closes_after_it() -> None:
    slot = make_slot()
    v1, v2 = FakeVersion(1), FakeVersion(2)
    slot.install(1, v1)
    lease = slot.acquire()
    slot.install(2, v2)
    slot.retain([2])
    assert slot.acquire().value is v2  # new calls see the new version at once
    assert lease.value is v1 and v1.closed == 0  # the call in flight keeps the old one
    lease.release()
    assert v1.closed == 1
    lease.release()  # a second release changes nothing
    assert v1.closed == 1


def test_an_unleased_old_version_closes_at_once() -> None:
    slot = make_slot()
    v1 = FakeVersion(1)
    slot.install(1, v1)
    slot.install(2, FakeVersion(2))
    slot.unload(1)
    assert v1.closed == 1
    assert slot.loaded() == (2,)


def test_the_only_version_is_never_unloaded() -> None:
    slot = make_slot()
    v1 = FakeVersion(1)
    slot.install(1, v1)
    with pytest.raises(OnlyVersion):
        slot.unload(1)
    assert slot.retain([7]) == []  # keeping nothing that is loaded changes nothing
    assert slot.acquire().value is v1 and v1.closed == 0


def test_unloading_the_serving_version_serves_the_newest_remaining() -> None:
    slot = make_slot()
    for v in (1, 2, 3):
        slot.install(v, FakeVersion(v), serve=v == 2)
    assert slot.serving == 2
    slot.unload(2)
    assert slot.serving == 3


def test_serve_rolls_back_to_a_loaded_version() -> None:
    slot = make_slot()
    slot.install(4, FakeVersion(4))
    slot.install(6, FakeVersion(6))
    slot.serve(4)
    assert slot.acquire().version == 4
    with pytest.raises(NotFound):
        slot.serve(5)


def test_retain_drops_the_rest_and_moves_the_default() -> None:
    slot = make_slot()
    versions = {v: FakeVersion(v) for v in (1, 2, 3)}
    for v, value in versions.items():
        slot.install(v, value, serve=v == 3)
    assert slot.retain([1, 2]) == [3]
    assert slot.serving == 2
    assert versions[3].closed == 1 and versions[1].closed == 0


def test_a_reload_of_the_same_number_replaces_it_and_keeps_its_series() -> None:
    metrics = RecordingMetrics()
    slot = make_slot(metrics)
    old, new = FakeVersion(1), FakeVersion(1)
    slot.install(1, old)
    slot.install(1, new)
    assert slot.acquire().value is new and old.closed == 1
    assert ("removed", 1) not in metrics.events
    assert metrics.events.count(("added", 1)) == 1


def test_metrics_see_adds_swaps_and_removal_after_the_last_call() -> None:
    metrics = RecordingMetrics()
    slot = make_slot(metrics)
    slot.install(1, FakeVersion(1))
    lease = slot.acquire()
    slot.install(2, FakeVersion(2))
    slot.unload(1)
    assert metrics.events == [("added", 1), ("swapped", 1), ("added", 2), ("swapped", 2)]
    lease.release()
    assert metrics.events[-1] == ("removed", 1)


def test_shutdown_closes_everything_after_the_last_lease() -> None:
    slot = ModelSlot(close, close_in_background=True)
    v1, v2 = FakeVersion(1), FakeVersion(2)
    slot.install(1, v1)
    slot.install(2, v2, serve=False)
    lease = slot.acquire(2)
    assert slot.shutdown(timeout_s=5)
    assert v1.closed == 1 and v2.closed == 0
    with pytest.raises(NotReady, match="shutting down"):
        slot.acquire()
    lease.release()
    assert slot.wait_closed(timeout_s=5)
    assert v2.closed == 1
    late = FakeVersion(3)  # a load that finished during shutdown
    with pytest.raises(NotReady):
        slot.install(3, late)
    assert late.closed == 1


def test_a_failing_close_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def broken(value: FakeVersion) -> None:
        raise RuntimeError("boom")

    slot: ModelSlot[FakeVersion] = ModelSlot(broken, close_in_background=False)
    slot.install(1, FakeVersion(1))
    slot.install(2, FakeVersion(2))
    slot.unload(1)
    assert "closing version 1 failed" in caplog.text


def test_background_close_runs_off_the_releasing_thread() -> None:
    closed_on: list[str] = []
    released = threading.Event()

    def record(value: FakeVersion) -> None:
        released.wait(5)
        closed_on.append(threading.current_thread().name)

    slot: ModelSlot[FakeVersion] = ModelSlot(record)
    slot.install(1, FakeVersion(1))
    lease = slot.acquire()
    slot.install(2, FakeVersion(2))
    slot.unload(1)
    lease.release()  # returns although the close blocks until `released`
    released.set()
    assert slot.wait_closed(timeout_s=5)
    assert closed_on == ["close-v1"]


def test_many_threads_swapping_and_calling_never_see_a_closed_version() -> None:
    slot = make_slot()
    slot.install(0, FakeVersion(0))
    errors: list[str] = []
    stop = threading.Event()

    def caller() -> None:
        while not stop.is_set():
            with slot.acquire() as lease:
                if lease.value.closed:
                    errors.append(f"version {lease.version} closed while leased")

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for thread in threads:
        thread.start()
    values = [FakeVersion(v) for v in range(1, 200)]
    for value in values:
        slot.install(value.version, value)
        slot.retain([value.version])
    stop.set()
    for thread in threads:
        thread.join(10)
    assert errors == []
    assert slot.loaded() == (199,)
    assert all(v.closed == 1 for v in values[:-1])


def test_a_closed_version_is_not_kept_alive_by_the_slot() -> None:
    import gc
    import weakref

    slot: ModelSlot[FakeVersion] = ModelSlot(close)
    slot.install(0, FakeVersion(0))
    refs = []
    for v in range(1, 20):
        value = FakeVersion(v)
        refs.append(weakref.ref(value))
        slot.install(v, value)
        del value
        slot.retain([v])
    assert slot.wait_closed(timeout_s=5)
    gc.collect()
    assert [r() for r in refs[:-1]] == [None] * 18  # memory goes with the last reference
    assert refs[-1]() is not None
    assert len(slot._closing) <= 1
