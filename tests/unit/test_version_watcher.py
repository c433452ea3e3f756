"""VersionWatcher over a fake repository and loader; RepositoryVersions over real folders."""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from pathlib import Path

import pytest
from test_model_slot import FakeVersion, RecordingMetrics, close

from bertrec.errors import ArtifactError
from bertrec.repository.manifest import Dims, EncoderInfo, Manifest, Scoring, write_manifest
from bertrec.server.errors import NotFound
from bertrec.server.model_slot import ModelSlot, OnlyVersion
from bertrec.server.version_policy import VersionPolicy
from bertrec.server.version_watcher import (
    LOADING,
    READY,
    UNAVAILABLE,
    LoadFailed,
    RepositoryVersions,
    VersionState,
    VersionWatcher,
)


class FakeRepo:
    """Complete versions with signatures, and a loader that fails for the broken ones."""

    def __init__(self, *versions: int) -> None:
        self.versions: dict[int, Hashable] = {v: "ok" for v in versions}
        self.broken: set[int] = set()
        self.loads: list[int] = []

    def complete_versions(self) -> dict[int, Hashable]:
        return dict(self.versions)

    def load(self, version: int) -> FakeVersion:
        self.loads.append(version)
        if version in self.broken:
            raise ArtifactError("item_factors.npy: SHA-256 differs (corrupted)")
        return FakeVersion(version)


def make(
    repo: FakeRepo, policy: VersionPolicy | None = None, metrics: RecordingMetrics | None = None
) -> tuple[VersionWatcher[FakeVersion], ModelSlot[FakeVersion]]:
    slot: ModelSlot[FakeVersion] = ModelSlot(close, metrics, close_in_background=False)
    return VersionWatcher(repo, slot, repo.load, policy, interval_s=0, metrics=metrics), slot


def test_the_first_load_serves_the_newest_version() -> None:
    watcher, slot = make(FakeRepo(1, 2))
    assert watcher.load_initial() == 2
    assert slot.loaded() == (2,)


def test_the_first_load_fails_when_nothing_loads() -> None:
    repo = FakeRepo(1)
    repo.broken.add(1)
    watcher, _ = make(repo)
    with pytest.raises(ArtifactError, match=r"nothing to serve: version 1: .*corrupted"):
        watcher.load_initial()
    with pytest.raises(ArtifactError, match="no complete version matches policy latest"):
        make(FakeRepo())[0].load_initial()


def test_a_new_version_is_loaded_swapped_in_and_the_old_one_unloaded() -> None:
    repo, metrics = FakeRepo(1), RecordingMetrics()
    watcher, slot = make(repo, metrics=metrics)
    watcher.load_initial()
    with slot.acquire() as lease:
        old = lease.value
    repo.versions[2] = "ok"
    result = watcher.poll_once()
    assert (result.loaded, result.unloaded, result.serving) == ((2,), (1,), 2)
    assert old.closed == 1
    assert ("loaded", 2) in metrics.events and ("swapped", 2) in metrics.events
    assert watcher.poll_once().loaded == ()  # nothing new: nothing loaded again
    assert repo.loads == [1, 2]


def test_a_broken_version_is_counted_never_served_and_not_retried_until_it_changes() -> None:
    repo, metrics = FakeRepo(6), RecordingMetrics()
    watcher, _slot = make(repo, metrics=metrics)
    watcher.load_initial()
    repo.versions[7] = "half-copied"
    repo.broken.add(7)
    result = watcher.poll_once()
    assert (result.failed, result.serving) == ((7,), 6)
    assert ("failed", 7) in metrics.events
    assert watcher.poll_once().failed == ()  # the same folder is not loaded again
    assert repo.loads == [6, 7]
    repo.versions[7] = "copy finished"  # the folder changed: worth another try
    repo.broken.discard(7)
    assert watcher.poll_once().serving == 7


def test_latest_k_keeps_k_loaded_and_the_newest_serves() -> None:
    repo = FakeRepo(1, 2, 3)
    watcher, slot = make(repo, VersionPolicy.latest(2))
    assert watcher.load_initial() == 3
    assert slot.loaded() == (2, 3)
    with slot.acquire(2) as lease:
        assert lease.version == 2
    repo.versions[4] = "ok"
    watcher.poll_once()
    assert slot.loaded() == (3, 4) and slot.serving == 4


def test_rollback_pins_the_version_until_a_load_without_version() -> None:
    repo = FakeRepo(4, 5, 6)
    watcher, slot = make(repo)
    watcher.load_initial()
    assert watcher.load(4) == 4
    assert slot.loaded() == (4,)
    repo.versions[7] = "ok"
    assert watcher.poll_once().serving == 4  # pinned: the new version is not picked up
    assert str(watcher.effective_policy) == "specific 4"
    assert watcher.load() == 7  # unpinned: the policy decides again
    assert slot.loaded() == (7,)


def test_an_explicit_load_of_a_missing_or_broken_version_changes_nothing() -> None:
    repo = FakeRepo(5, 6)
    repo.broken.add(5)
    watcher, slot = make(repo)
    watcher.load_initial()
    with pytest.raises(NotFound, match=r"version 9 is not in the repository \(complete: 5, 6\)"):
        watcher.load(9)
    with pytest.raises(LoadFailed, match=r"version 5 was not loaded: .*corrupted"):
        watcher.load(5)
    assert slot.serving == 6 and watcher.effective_policy == VersionPolicy.latest()


def test_a_broken_newest_version_falls_back_to_the_one_before() -> None:
    repo = FakeRepo(1, 2, 3)
    repo.broken.update((2, 3))
    watcher, _slot = make(repo)
    assert watcher.load_initial() == 1
    assert repo.loads == [3, 2, 1]


def test_a_load_without_version_retries_failed_versions_and_reports_a_failure() -> None:
    repo = FakeRepo(1, 2)
    repo.broken.add(2)
    watcher, slot = make(repo)
    watcher.load_initial()
    assert slot.serving == 1
    with pytest.raises(LoadFailed, match="version 2"):
        watcher.load()
    repo.broken.discard(2)
    assert watcher.load() == 2


def test_an_unloaded_version_is_not_reloaded_by_polls() -> None:
    repo = FakeRepo(1, 2)
    watcher, slot = make(repo, VersionPolicy.latest(2))
    watcher.load_initial()
    watcher.unload(1)
    assert watcher.poll_once().loaded == ()
    assert slot.loaded() == (2,)
    with pytest.raises(OnlyVersion):
        watcher.unload(2)
    watcher.load(1)  # an explicit load brings it back (and pins it)
    assert slot.loaded() == (1,)


def test_states_report_ready_loading_and_why_a_version_is_unavailable() -> None:
    repo = FakeRepo(1, 2, 3)
    repo.broken.add(3)
    watcher, _ = make(repo, VersionPolicy.latest(2))
    watcher.load_initial()
    assert watcher.states() == [
        VersionState(1, UNAVAILABLE, "not selected by policy latest 2"),
        VersionState(2, READY, "serving"),
        VersionState(3, UNAVAILABLE, "load failed: item_factors.npy: SHA-256 differs (corrupted)"),
    ]


def test_states_show_a_version_while_it_loads() -> None:
    repo = FakeRepo(1)
    started, release = threading.Event(), threading.Event()

    def slow(version: int) -> FakeVersion:
        if version == 2:
            started.set()
            release.wait(5)
        return FakeVersion(version)

    slot: ModelSlot[FakeVersion] = ModelSlot(close, close_in_background=False)
    watcher = VersionWatcher(repo, slot, slow, interval_s=0)
    watcher.load_initial()
    repo.versions[2] = "ok"
    poll = threading.Thread(target=watcher.poll_once)
    poll.start()
    assert started.wait(5)
    assert VersionState(2, LOADING) in watcher.states()  # the index does not wait for loads
    assert slot.acquire().version == 1  # calls keep going to the old version meanwhile
    release.set()
    poll.join(5)
    assert slot.serving == 2


def test_an_unexpected_loader_error_is_logged_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    repo = FakeRepo(1)

    def buggy(version: int) -> FakeVersion:
        if version == 2:
            raise ValueError("bug")
        return FakeVersion(version)

    slot: ModelSlot[FakeVersion] = ModelSlot(close, close_in_background=False)
    watcher = VersionWatcher(repo, slot, buggy, interval_s=0)
    watcher.load_initial()
    repo.versions[2] = "ok"
    assert watcher.poll_once().failed == (2,)
    assert "ValueError: bug" in caplog.text and "Traceback" in caplog.text
    assert slot.serving == 1


def test_the_background_thread_picks_up_new_versions() -> None:
    repo = FakeRepo(1)
    slot: ModelSlot[FakeVersion] = ModelSlot(close, close_in_background=False)
    watcher = VersionWatcher(repo, slot, repo.load, interval_s=0.01)
    watcher.load_initial()
    watcher.start()
    try:
        repo.versions[2] = "ok"
        deadline = time.monotonic() + 10
        while slot.serving != 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert slot.serving == 2
    finally:
        watcher.stop(5)


def test_an_interval_of_zero_starts_no_thread() -> None:
    watcher, _ = make(FakeRepo(1))
    watcher.start()
    assert watcher._thread is None


# ------------------------------------------------------------------ RepositoryVersions on disk


def _version(repo: Path, model: str, version: int) -> Path:
    folder = repo / model / str(version)
    folder.mkdir(parents=True)
    (folder / "data.bin").write_bytes(b"x" * version)
    write_manifest(
        folder,
        Manifest(
            model_name=model,
            version=version,
            created_at="1970-01-01T00:00:00+00:00",
            base_encoder="none",
            dims=Dims(4, 4, 8, 1, 1),
            scoring=Scoring(3.5, (1.0, 5.0)),
            encoder=EncoderInfo("encoder.onnx", ("input_ids",), "embedding", 17, ()),
        ),
    )
    return folder


def test_only_numbered_folders_with_a_manifest_count(tmp_path: Path) -> None:
    _version(tmp_path, "m", 1)
    _version(tmp_path, "m", 2)
    (tmp_path / "m" / ".tmp-3-abcd").mkdir()  # an export in progress (or killed)
    (tmp_path / "m" / "4").mkdir()  # copied in by hand, manifest not there yet
    (tmp_path / "m" / "5").mkdir()
    (tmp_path / "m" / "5" / "manifest.json").write_text("{not json")
    assert sorted(RepositoryVersions(tmp_path, "m").complete_versions()) == [1, 2]


def test_the_signature_changes_when_a_file_changes(tmp_path: Path) -> None:
    folder = _version(tmp_path, "m", 1)
    source = RepositoryVersions(tmp_path, "m")
    before = source.complete_versions()[1]
    (folder / "data.bin").write_bytes(b"longer now")
    assert source.complete_versions()[1] != before
