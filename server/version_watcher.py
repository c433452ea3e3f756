"""Automatic pick-up and explicit control of model versions, on top of the `ModelSlot`.

The watcher decides which versions should be loaded (the version policy, an operator's pin
or unload), loads what is missing through a loader callable (verify every hash, memory-map,
warm up: everything that can fail happens before the slot sees the version), swaps the
newest wanted version in, and only then unloads the ones no longer wanted. A version that
fails to load is logged, counted and never served; whatever served before keeps serving.

What counts as a version: a numbered folder (`<repo>/<model>/<n>`, never an export's
`.tmp-*` build folder, which appears under its number only by one atomic rename) whose
manifest parses. A manifest that parses while files are still being copied in by hand
fails the loader's hash check instead; a failure is remembered with the folder's signature
(names, sizes, mtimes of its entries), so the same broken folder is not reloaded on every
poll, and is retried once it changes.

All changes (polls, explicit loads and unloads) run one at a time under one lock; reads of
the state (`states`, for the repository index) never wait for a load.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import grpc

from bertrec.errors import ArtifactError, BertrecError
from bertrec.repository.manifest import read_manifest
from bertrec.repository.versions import list_versions, model_dir
from bertrec.server.errors import NotFound, ServiceError
from bertrec.server.model_slot import ModelSlot, NoMetrics, VersionMetrics
from bertrec.server.version_policy import VersionPolicy

log = logging.getLogger(__name__)

T = TypeVar("T")
READY, LOADING, UNAVAILABLE = "READY", "LOADING", "UNAVAILABLE"


class LoadFailed(ServiceError):
    """An explicitly requested version could not be loaded; the served version is unchanged."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class VersionSource(Protocol):
    """The complete versions of one model, each with a signature that changes with its files."""

    def complete_versions(self) -> dict[int, Hashable]: ...


class RepositoryVersions:
    """`VersionSource` over a model repository folder (see the module docstring)."""

    def __init__(self, repo: Path, model: str) -> None:
        self.repo = repo
        self.model = model

    def complete_versions(self) -> dict[int, Hashable]:
        found: dict[int, Hashable] = {}
        for version in list_versions(self.repo, self.model):
            folder = model_dir(self.repo, self.model) / str(version)
            try:
                read_manifest(folder)
                found[version] = _signature(folder)
            except (ArtifactError, OSError) as exc:
                log.debug("version %d is not complete: %s", version, exc)
        return found


def _signature(folder: Path) -> Hashable:
    entries = []
    for path in folder.iterdir():
        stat = path.stat()
        entries.append((path.name, stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(entries))


@dataclass(frozen=True)
class PollResult:
    """What one pass changed, and the version serving after it."""

    loaded: tuple[int, ...]
    failed: tuple[int, ...]
    unloaded: tuple[int, ...]
    serving: int | None


@dataclass(frozen=True)
class VersionState:
    """One version as the repository index reports it (Triton's READY/LOADING/UNAVAILABLE)."""

    version: int
    state: str
    reason: str = ""


class VersionWatcher(Generic[T]):
    """Keeps the slot's versions in line with the repository, the policy and the operator.

    Args:
        source: the complete versions (`RepositoryVersions` in the server).
        slot: where loaded versions go.
        loader: version number -> a verified, warmed-up value; raises on any problem.
        policy: which versions to keep (`latest` by default).
        interval_s: seconds between polls of the background thread; 0 = no thread.
        metrics: load durations and failures (the slot reports swaps).
    """

    def __init__(
        self,
        source: VersionSource,
        slot: ModelSlot[T],
        loader: Callable[[int], T],
        policy: VersionPolicy | None = None,
        interval_s: float = 10.0,
        metrics: VersionMetrics | None = None,
    ) -> None:
        self._source = source
        self._slot = slot
        self._loader = loader
        self._policy = policy if policy is not None else VersionPolicy.latest()
        self._interval_s = interval_s
        self._metrics = metrics if metrics is not None else NoMetrics()
        self._control = threading.Lock()  # one change at a time
        self._state = threading.Lock()  # guards the fields `states` reads
        self._pin: VersionPolicy | None = None  # an operator's `load --version N`
        self._excluded: set[int] = set()  # unloaded by an operator: not reloaded by polls
        self._failed: dict[int, tuple[Hashable, str]] = {}  # version -> (signature, reason)
        self._loading: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def policy(self) -> VersionPolicy:
        """The configured version policy."""
        return self._policy

    @property
    def effective_policy(self) -> VersionPolicy:
        """The operator's pin if there is one, else the configured policy."""
        return self._pin if self._pin is not None else self._policy

    def poll_once(self) -> PollResult:
        """Bring the slot in line with the repository once (what the background thread does)."""
        with self._control:
            return self._apply()

    def load_initial(self) -> int:
        """The first load, before the server reports SERVING. Returns the serving version.

        Raises:
            ArtifactError: no version could be loaded (naming why), so there is nothing to serve.
        """
        result = self.poll_once()
        if result.serving is None:
            with self._state:
                reasons = [f"version {v}: {r}" for v, (_, r) in sorted(self._failed.items())]
            why = "; ".join(reasons) or f"no complete version matches policy {self.policy}"
            raise ArtifactError(f"nothing to serve: {why}")
        return result.serving

    def load(self, version: int | None = None) -> int:
        """An operator's load. With `version`, load it (if needed), serve it and pin it (a
        rollback, or a jump ahead) until a load without version, which follows the policy
        again (and retries versions that failed before). Returns the serving version.

        Raises:
            NotFound: `version` is not a complete version in the repository.
            LoadFailed: the version could not be loaded; the served version is unchanged.
        """
        with self._control:
            if version is None:
                with self._state:
                    self._pin = None
                    self._excluded.clear()
                    self._failed.clear()
                result = self._apply()
                if result.failed:
                    raise LoadFailed(self._reason(result.failed[-1]))
            else:
                self._load_pinned(version)
                result = self._apply()
        if result.serving is None:
            raise NotFound(f"no complete version matches policy {self.effective_policy}")
        return result.serving

    def unload(self, version: int) -> None:
        """An operator's unload: `version` stops serving and is not reloaded by polls until
        an explicit load.

        Raises:
            NotFound: it is not loaded.
            OnlyVersion: it is the only version loaded.
        """
        with self._control:
            self._slot.unload(version)
            with self._state:
                self._excluded.add(version)
                if self._pin is not None and version in self._pin.versions:
                    self._pin = None  # the pinned version is gone: the policy decides again

    def states(self) -> list[VersionState]:
        """Every version in the repository or loaded, ascending, with its state and why."""
        loaded = set(self._slot.loaded())
        serving = self._slot.serving
        try:
            available = set(self._source.complete_versions())
        except (BertrecError, OSError) as exc:
            log.warning("cannot list the repository: %s", exc)
            available = set()
        with self._state:
            loading, failed = self._loading, dict(self._failed)
            excluded, policy = set(self._excluded), self.effective_policy
        states = []
        for v in sorted(available | loaded | set(failed)):
            if v in loaded:
                states.append(VersionState(v, READY, "serving" if v == serving else ""))
            elif v == loading:
                states.append(VersionState(v, LOADING))
            elif v in failed:
                states.append(VersionState(v, UNAVAILABLE, f"load failed: {failed[v][1]}"))
            elif v in excluded:
                states.append(VersionState(v, UNAVAILABLE, "unloaded"))
            else:
                states.append(VersionState(v, UNAVAILABLE, f"not selected by policy {policy}"))
        return states

    def start(self) -> None:
        """Poll every `interval_s` on a background thread (nothing when the interval is 0)."""
        if self._interval_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="version-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop polling; waits up to `timeout_s` for a load in progress to finish."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.poll_once()
            except Exception:  # the watcher must outlive a bad poll; the old version serves
                log.exception("polling the model repository failed")

    def _apply(self) -> PollResult:
        """Load the wanted versions that are missing (newest first: it serves soonest), serve
        the newest wanted one, then unload the rest. Called under `_control`.

        When every wanted version failed, the policy is applied again without them (so a
        broken newest version falls back to the one before), at most once per failure.
        """
        available = self._source.complete_versions()
        loaded: list[int] = []
        failed: list[int] = []
        while True:
            wanted = self._wanted(available)
            for version in sorted(set(wanted) - set(self._slot.loaded()), reverse=True):
                value = self._load_one(version, available[version])
                if value is None:
                    failed.append(version)
                    continue
                self._slot.install(version, value, serve=False)
                loaded.append(version)
                self._serve_newest(wanted)
            ready = set(wanted) & set(self._slot.loaded())
            if ready or not (set(wanted) & set(failed)):
                break
        self._serve_newest(wanted)
        unloaded = self._slot.retain(wanted)
        return PollResult(tuple(sorted(loaded)), tuple(failed), tuple(unloaded), self._slot.serving)

    def _wanted(self, available: dict[int, Hashable]) -> list[int]:
        with self._state:
            candidates = [v for v, sig in available.items() if not self._failed_as(v, sig)]
            policy, excluded = self.effective_policy, set(self._excluded)
        return [v for v in policy.select(candidates) if v not in excluded]

    def _load_pinned(self, version: int) -> None:
        """Make sure `version` is loaded, then pin it. Called under `_control`."""
        available = self._source.complete_versions()
        if version not in available:
            listed = ", ".join(str(v) for v in sorted(available)) or "none"
            raise NotFound(f"version {version} is not in the repository (complete: {listed})")
        if version not in self._slot.loaded():
            value = self._load_one(version, available[version])
            if value is None:
                raise LoadFailed(self._reason(version))
            self._slot.install(version, value, serve=False)
        with self._state:
            self._pin = VersionPolicy.specific(version)
            self._excluded.discard(version)

    def _load_one(self, version: int, signature: Hashable) -> T | None:
        """The loaded value, or None after logging and counting the failure."""
        with self._state:
            self._loading = version
        start = time.monotonic()
        try:
            value = self._loader(version)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, BertrecError) else f"{type(exc).__name__}: {exc}"
            log.error("version %d not loaded, the served version is unchanged: %s", version, reason,
                      exc_info=not isinstance(exc, BertrecError))  # fmt: skip
            self._metrics.load_failed(version)
            with self._state:
                self._failed[version] = (signature, reason)
                self._loading = None
            return None
        duration_s = time.monotonic() - start
        self._metrics.load_finished(version, duration_s)
        log.info("version %d loaded in %.2f s", version, duration_s)
        with self._state:
            self._failed.pop(version, None)
            self._loading = None
        return value

    def _serve_newest(self, wanted: list[int]) -> None:
        ready = set(wanted) & set(self._slot.loaded())
        if ready and self._slot.serving != max(ready):
            self._slot.serve(max(ready))

    def _failed_as(self, version: int, signature: Hashable) -> bool:
        failure = self._failed.get(version)
        return failure is not None and failure[0] == signature

    def _reason(self, version: int) -> str:
        with self._state:
            failure = self._failed.get(version)
        return f"version {version} was not loaded: {failure[1] if failure else 'unknown'}"
