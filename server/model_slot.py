"""The one owner of the served model versions: leases for calls, atomic swaps, deferred close.

Every call takes a `Lease` on one loaded version at entry and finishes on it, whatever is
swapped in meanwhile; a version that is unloaded (or replaced) stops being handed out at once
but is closed (its sessions and memory-mapped arrays released) only after its last lease
ends. That is TF Serving's availability-preserving order: the new version is loaded and
warmed before the slot sees it, the swap is one pointer change under a lock, and the only
loaded version is never unloaded, so no call ever finds the slot empty.

The slot is generic over what a version is (`T`: the server keeps a started `Recommender`
per version); it never loads anything itself (`version_watcher.py` does), which keeps it
small enough to test exhaustively with fakes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, Protocol, TypeVar

import grpc

from bertrec.server.errors import NotFound, NotReady, ServiceError

log = logging.getLogger(__name__)

T = TypeVar("T")


class OnlyVersion(ServiceError):
    """Refused: unloading the only loaded version would leave nothing to serve."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class VersionMetrics(Protocol):
    """Where the slot and the watcher report version events (Prometheus in the server).

    `added`/`removed` bracket the life of a version's `version`-labelled series: removed is
    reported only once the version is closed, after its last in-flight call.
    """

    def added(self, version: int) -> None: ...

    def removed(self, version: int) -> None: ...

    def swapped(self, serving: int) -> None: ...

    def load_finished(self, version: int, duration_s: float) -> None: ...

    def load_failed(self, version: int) -> None: ...


class NoMetrics:
    """A `VersionMetrics` that records nothing."""

    def added(self, version: int) -> None:
        pass

    def removed(self, version: int) -> None:
        pass

    def swapped(self, serving: int) -> None:
        pass

    def load_finished(self, version: int, duration_s: float) -> None:
        pass

    def load_failed(self, version: int) -> None:
        pass


@dataclass(eq=False)
class _Entry(Generic[T]):
    version: int
    value: T
    leases: int = 0
    retired: bool = False  # no new leases; closed when `leases` reaches 0


class Lease(Generic[T]):
    """One call's reference to one loaded version; release it (or leave the `with`) once.

    Attributes:
        version: the version number the call runs on.
        value: that version's served object.
    """

    __slots__ = ("_entry", "_slot", "value", "version")

    def __init__(self, slot: ModelSlot[T], entry: _Entry[T]) -> None:
        self._slot: ModelSlot[T] | None = slot
        self._entry = entry
        self.version = entry.version
        self.value = entry.value

    def release(self) -> None:
        """Give the reference back; later calls do nothing."""
        slot, self._slot = self._slot, None
        if slot is not None:
            slot._release(self._entry)

    def __enter__(self) -> Lease[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class ModelSlot(Generic[T]):
    """The loaded versions of one model, which of them serves by default, and their leases.

    Args:
        close: releases a version's resources; called once per version, after its last
            lease, never under the slot's lock.
        metrics: version events (`added`, `removed`, `swapped`).
        close_in_background: run `close` on a short-lived thread, so the call that drops
            the last lease (a request handler) does not pay for it.
    """

    def __init__(
        self,
        close: Callable[[T], None],
        metrics: VersionMetrics | None = None,
        close_in_background: bool = True,
    ) -> None:
        self._close = close
        self._metrics = metrics if metrics is not None else NoMetrics()
        self._background = close_in_background
        self._lock = threading.Lock()
        self._entries: dict[int, _Entry[T]] = {}  # the addressable versions
        self._default: _Entry[T] | None = None
        self._closing: list[threading.Thread] = []
        self._shut = False

    def acquire(self, version: int | None = None) -> Lease[T]:
        """A lease on `version`, or on the default (serving) version when None.

        Raises:
            NotReady: nothing is loaded yet, or the slot is shut down.
            NotFound: `version` is not loaded (the message lists what is).
        """
        with self._lock:
            entry = self._default if version is None else self._entries.get(version)
            if entry is None:
                raise self._missing(version)
            entry.leases += 1
            return Lease(self, entry)

    def install(self, version: int, value: T, serve: bool = True) -> None:
        """Add a loaded, warmed-up version; with `serve` it becomes the default at once.

        A version loaded already is replaced (a reload): calls holding the old object finish
        on it, and it is closed after them. The first version installed always serves.

        Raises:
            NotReady: the slot is shut down (a load that finished during shutdown); `value`
                is closed first, so nothing leaks.
        """
        entry = _Entry(version, value)
        with self._lock:
            shut = self._shut
            old = None if shut else self._entries.get(version)
            swapped = not shut and (serve or self._default is None or self._default is old)
            if not shut:
                self._entries[version] = entry
                if swapped:
                    self._default = entry
            to_close = self._retire(old) if old is not None else None
        if shut:
            self._close_entry(entry)
            raise NotReady("the server is shutting down")
        if old is None:
            self._metrics.added(version)
        if swapped:
            self._metrics.swapped(version)
        log.info("version %d %s", version, "now serves" if swapped else "loaded")
        self._close_later(to_close)

    def serve(self, version: int) -> None:
        """Make a loaded version the default (a rollback to an older one, or forward again).

        Raises:
            NotFound: `version` is not loaded.
        """
        with self._lock:
            entry = self._entries.get(version)
            if entry is None:
                raise self._missing(version)
            changed = entry is not self._default
            self._default = entry
        if changed:
            self._metrics.swapped(version)
            log.info("version %d now serves", version)

    def unload(self, version: int) -> None:
        """Stop handing out `version`; it is closed after its last lease. When it was the
        default, the newest remaining version becomes the default.

        Raises:
            NotFound: `version` is not loaded.
            OnlyVersion: it is the only loaded version.
        """
        with self._lock:
            entry = self._entries.get(version)
            if entry is None:
                raise self._missing(version)
            if len(self._entries) == 1:
                raise OnlyVersion(
                    f"version {version} is the only one loaded; load another before unloading it"
                )
            del self._entries[version]
            serving = None
            if entry is self._default:
                self._default = self._entries[max(self._entries)]
                serving = self._default.version
            to_close = self._retire(entry)
        if serving is not None:
            self._metrics.swapped(serving)
        log.info("version %d unloaded", version)
        self._close_later(to_close)

    def retain(self, versions: Collection[int]) -> list[int]:
        """Unload every loaded version not in `versions` in one step, unless that would
        unload all of them (then nothing changes: the old version keeps serving). When the
        default goes, the newest kept version becomes the default. Returns those unloaded."""
        with self._lock:
            if not any(v in versions for v in self._entries):
                return []
            drop = sorted(v for v in self._entries if v not in versions)
            retired = [self._entries.pop(v) for v in drop]
            to_close = [e for e in retired if self._retire(e) is not None]
            serving = None
            if self._default is not None and self._default.retired:
                self._default = self._entries[max(self._entries)]
                serving = self._default.version
        if serving is not None:
            self._metrics.swapped(serving)
        if drop:
            log.info("versions %s unloaded", ", ".join(str(v) for v in drop))
        for entry in to_close:
            self._close_later(entry)
        return drop

    @property
    def serving(self) -> int | None:
        """The default version, or None before the first install (and after shutdown)."""
        entry = self._default
        return entry.version if entry is not None else None

    def loaded(self) -> tuple[int, ...]:
        """The addressable versions, ascending."""
        with self._lock:
            return tuple(sorted(self._entries))

    def shutdown(self, timeout_s: float | None = None) -> bool:
        """Hand out no more leases, close every version after its last lease, and wait up to
        `timeout_s` for the closes. Returns True when all finished in time."""
        with self._lock:
            self._shut = True
            entries = list(self._entries.values())
            self._entries.clear()
            self._default = None
            to_close = [e for e in entries if self._retire(e) is not None]
        for entry in to_close:
            self._close_later(entry)
        return self.wait_closed(timeout_s)

    def wait_closed(self, timeout_s: float | None = None) -> bool:
        """Wait for the closes started so far. Returns True when none is still running.

        A version still leased is not closing yet: it is not waited for.
        """
        with self._lock:
            threads = list(self._closing)
        for thread in threads:
            thread.join(timeout_s)
        with self._lock:
            self._closing = [t for t in self._closing if t.is_alive()]
            return not self._closing

    def _release(self, entry: _Entry[T]) -> None:
        with self._lock:
            entry.leases -= 1
            to_close = entry if entry.retired and entry.leases == 0 else None
        self._close_later(to_close)

    def _retire(self, entry: _Entry[T]) -> _Entry[T] | None:
        """Mark retired (under the lock); returns the entry if it can be closed right away."""
        entry.retired = True
        return entry if entry.leases == 0 else None

    def _close_later(self, entry: _Entry[T] | None) -> None:
        if entry is None:
            return
        if not self._background:
            self._close_entry(entry)
            return
        thread = threading.Thread(
            target=self._close_entry, args=(entry,), name=f"close-v{entry.version}", daemon=True
        )
        with self._lock:  # finished closes are dropped here, so the list stays short
            self._closing = [t for t in self._closing if t.is_alive()]
            self._closing.append(thread)
        thread.start()

    def _close_entry(self, entry: _Entry[T]) -> None:
        try:
            self._close(entry.value)
        except Exception:  # a failed close must not take the server down; it is only memory
            log.exception("closing version %d failed", entry.version)
        with self._lock:
            reloaded = entry.version in self._entries  # the same number, a newer object
        if not reloaded:
            self._metrics.removed(entry.version)
        log.info("version %d closed", entry.version)

    def _missing(self, version: int | None) -> ServiceError:
        if self._shut:
            return NotReady("the server is shutting down")
        if not self._entries:
            return NotReady("the model is still loading; retry when health reports SERVING")
        loaded = ", ".join(str(v) for v in sorted(self._entries))
        return NotFound(f"version {version} is not loaded (loaded: {loaded})")
