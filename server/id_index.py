"""External id <-> row over the memory-mapped id array, with no Python object per id.

Why: a version's ids used to become a Python list of str plus a dict of str -> row in every
worker process: ~140 MB of private heap at 1M items (measured, `bench.model_memory`), paid
again by each worker. Here the ids stay the version's memory-mapped unicode array (shared
through the page cache), and lookups binary-search it through a sorted permutation (int64 rows
ordered by id; in a run's shared layout directory, one file for every worker).

A lookup costs a binary search instead of a hash (measured in `bench.model_memory`); batches
of ids are looked up in one vectorised `np.searchsorted`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import overload

import numpy as np

from bertrec.errors import ArtifactError
from bertrec.server.shared_layout import LayoutCache, heap_or_shared

NOT_FOUND = -1


class IdList(Sequence[str]):
    """Row -> external id, read from the (mapped) unicode array: `ids[row]`, `len(ids)`."""

    def __init__(self, ids: np.ndarray) -> None:
        self._ids = ids

    def __len__(self) -> int:
        return len(self._ids)

    @overload
    def __getitem__(self, row: int) -> str: ...

    @overload
    def __getitem__(self, row: slice) -> list[str]: ...

    def __getitem__(self, row: int | slice) -> str | list[str]:
        if isinstance(row, slice):
            return [str(v) for v in self._ids[row].tolist()]
        return str(self._ids[row])

    def __iter__(self) -> Iterator[str]:
        return (str(v) for v in self._ids.tolist())

    def of(self, rows: np.ndarray) -> list[str]:
        """The ids of many rows at once (one gather and one `tolist`, no per-row indexing)."""
        return list(self._ids[np.asarray(rows, dtype=np.int64)].tolist())


class IdIndex:
    """Lookups of external ids in one id array (users or items of a version).

    Args:
        ids: unicode (n,) in row order, typically memory-mapped.
        kind: "user" or "item", for error messages.
        where: the version folder, for error messages.
        layout: where worker processes share the sorted permutation; None: on the heap.
    Raises:
        ArtifactError: the ids are not unique (or not unicode).
    """

    def __init__(
        self, ids: np.ndarray, kind: str, where: Path, layout: LayoutCache | None = None
    ) -> None:
        if ids.ndim != 1 or ids.dtype.kind != "U":
            raise ArtifactError(f"{where}: {kind} ids must be a 1-d unicode array: {ids.dtype}")
        self.ids = ids
        self.list = IdList(ids)

        def build(out: np.ndarray) -> None:
            out[:] = np.argsort(ids, kind="stable")

        self._order = heap_or_shared(layout, f"{kind}-order", ids.shape, np.int64, build)
        ordered = ids[self._order]
        if len(ids) > 1 and bool(np.any(ordered[1:] == ordered[:-1])):
            at = int(np.flatnonzero(ordered[1:] == ordered[:-1])[0])
            raise ArtifactError(f"{where}: {kind} ids are not unique ({str(ordered[at])!r})")

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, id_: str) -> int | None:
        """Row of one id, or None if the array does not hold it."""
        if not len(self.ids):
            return None
        # The array's own method and `.item()`: numpy's function wrapper and a 0-d array per
        # step cost more than the search itself on this per-call path.
        at = int(self.ids.searchsorted(id_, sorter=self._order))
        if at == len(self.ids):
            return None
        row: int = self._order.item(at)
        return row if self.ids.item(row) == id_ else None

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Rows (int64) of many ids, NOT_FOUND (-1) for those the array does not hold."""
        if not len(ids) or not len(self.ids):
            return np.full(len(ids), NOT_FOUND, dtype=np.int64)
        if any("\x00" in i for i in ids):
            # numpy strips trailing NULs, so "a\x00" would match "a": look these up singly.
            return np.array([NOT_FOUND if (r := self.row(i)) is None else r for i in ids])
        wanted = np.asarray(ids, dtype=str)
        at = np.minimum(np.searchsorted(self.ids, wanted, sorter=self._order), len(self.ids) - 1)
        rows = self._order[at]
        return np.where(self.ids[rows] == wanted, rows, NOT_FOUND).astype(np.int64)
