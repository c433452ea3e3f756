"""Derived arrays built once per run and memory-mapped by every worker process.

Why: each worker of `bertrec serve --workers N` used to build its own heap copy of what it
derives from a model version (the Ranker's transposed, augmented catalogue: 260 MB at 1M x 64;
the id indexes). Built into a file instead, the copies are one set of page-cache pages that
every worker maps, and N workers cost about one.

The supervisor creates a private directory for the run (mode 0700, under $TMPDIR: /dev/shm is
64 MB in containers) and names it to its workers in LAYOUT_DIR_ENV; the directory, with every
version's files, is removed when the run ends (files of a version the workers swapped away
from stay until then). Without the variable (one process, tests, benchmarks) arrays stay on
the heap.

A file's name is a key: SHA-256 over the manifest's digests of the source arrays, the kind of
layout, FORMAT_VERSION, the shape, dtype and the builder's parameters (e.g. GROUP_WIDTH). A
builder writes a temporary file (its blocks reserved first), fsyncs it, records the content's
SHA-256 beside it, and links it into place (a link never replaces: of two racing builders one
wins and the other maps the winner's file, identical by construction). A reader maps a file
only if its header, shape, dtype and SHA-256 match, so a truncated or corrupted file is
rebuilt and replaced, never used. The supervisor, or the workers once a killed supervisor has
left them, remove the folder. Where no file can be written (a full $TMPDIR), the array is
built on the heap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

LAYOUT_DIR_ENV = "BERTREC_LAYOUT_DIR"
FORMAT_VERSION = 1
HASH_CHUNK_BYTES = 1 << 24


def layout_dir_from_env() -> Path | None:
    """The run's shared layout directory, if the supervisor named one."""
    value = os.environ.get(LAYOUT_DIR_ENV, "")
    return Path(value) if value else None


@dataclass(frozen=True)
class LayoutCache:
    """Where derived arrays of one set of source arrays are shared.

    Args:
        directory: the run's private directory (created by the supervisor).
        sources: SHA-256 digests of the source arrays (the manifest's), in a fixed order.
    """

    directory: Path
    sources: tuple[str, ...]

    def key(self, kind: str, shape: Sequence[int], dtype: np.dtype, **params: object) -> str:
        """The file name stem: changes with any input that changes the bytes."""
        spec = {
            "format": FORMAT_VERSION,
            "kind": kind,
            "sources": list(self.sources),
            "shape": [int(s) for s in shape],
            "dtype": np.dtype(dtype).str,
            "params": {k: repr(v) for k, v in sorted(params.items())},
        }
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
        return f"{kind}-{digest[:32]}"

    def array(
        self,
        kind: str,
        shape: Sequence[int],
        dtype: np.dtype | type,
        build: Callable[[np.ndarray], None],
        **params: object,
    ) -> np.ndarray:
        """The shared read-only array for this key, built by `build(out)` if no valid file is
        there yet. `build` must fill every element deterministically from the sources."""
        dt = np.dtype(dtype)
        path = self.directory / f"{self.key(kind, shape, dt, **params)}.npy"
        found = _mapped_if_valid(path, tuple(shape), dt)
        if found is not None:
            return found
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            _publish(tmp, path, tuple(shape), dt, build)
        except OSError as exc:  # a full or vanished $TMPDIR costs memory, not the server
            tmp.unlink(missing_ok=True)
            log.warning("cannot share %s (%s): building it on the heap", path.name, exc)
            return heap_or_shared(None, kind, shape, dt, build)
        finally:
            tmp.unlink(missing_ok=True)
        mapped = _mapped_if_valid(path, tuple(shape), dt)
        if mapped is None:  # only if something outside the run damages the folder meanwhile
            log.warning("shared layout file %s changed after it was written: heap copy", path)
            return heap_or_shared(None, kind, shape, dt, build)
        return mapped


def heap_or_shared(
    cache: LayoutCache | None,
    kind: str,
    shape: Sequence[int],
    dtype: np.dtype | type,
    build: Callable[[np.ndarray], None],
    **params: object,
) -> np.ndarray:
    """`cache.array(...)`, or without a cache a heap array filled by `build`."""
    if cache is not None:
        return cache.array(kind, shape, dtype, build, **params)
    out = np.empty(tuple(shape), dtype=dtype)
    build(out)
    return out


def _publish(
    tmp: Path, path: Path, shape: tuple[int, ...], dtype: np.dtype, build: Callable
) -> None:
    """Build into `tmp`, record its digest, and link it to `path` unless a valid file is
    there already (a racing builder's); an invalid one is replaced."""
    digest = _write(tmp, shape, dtype, build)
    _write_text_atomically(_digest_file(path), digest)
    try:
        os.link(tmp, path)
    except FileExistsError:
        if _mapped_if_valid(path, shape, dtype) is None:
            os.replace(tmp, path)
            log.warning("replaced an invalid shared layout file %s", path)


def _write(path: Path, shape: tuple[int, ...], dtype: np.dtype, build: Callable) -> str:
    """Build into a new .npy file, flushed and fsynced; returns the file's SHA-256.

    The file's blocks are reserved before it is mapped: writing a page of a sparse mapping on
    a full file system kills the process with SIGBUS, where `posix_fallocate` raises OSError.
    """
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    with path.open("r+b") as f:
        os.posix_fallocate(f.fileno(), 0, path.stat().st_size)
    try:
        build(out)
        out.flush()
    finally:
        del out
    with path.open("rb") as f:
        os.fsync(f.fileno())
    return _file_digest(path)


def _mapped_if_valid(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
    """The file mapped read-only, or None if absent, truncated, of another shape or dtype, or
    with content other than its recorded digest."""
    try:
        recorded = _digest_file(path).read_text().strip()
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if mapped.shape != shape or mapped.dtype != dtype or _file_digest(path) != recorded:
        return None
    return np.asarray(mapped)  # a plain view: memmap indexing runs Python per access


def _file_digest(path: Path) -> str:
    """SHA-256 of the whole file (it also brings the pages into the shared page cache)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _digest_file(path: Path) -> Path:
    return path.with_suffix(".sha256")


def _write_text_atomically(path: Path, text: str) -> None:
    """Racing builders write the same digest (deterministic builds), each atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
