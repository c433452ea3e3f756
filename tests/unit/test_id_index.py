"""Id <-> row lookups over the memory-mapped id arrays (server/id_index.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bertrec.errors import ArtifactError
from bertrec.server.id_index import NOT_FOUND, IdIndex
from bertrec.server.shared_layout import LayoutCache

IDS = ["i10", "i2", "café", "日本語", "🙂", "a", "", "zz", "i1", "A"]


def mapped(tmp_path: Path, ids: list[str]) -> np.ndarray:
    """The ids as a version stores them: a unicode .npy, memory-mapped."""
    path = tmp_path / "ids.npy"
    np.save(path, np.asarray(ids, dtype=str))
    return np.asarray(np.load(path, mmap_mode="r"))


@pytest.fixture(params=["heap", "shared"])
def index(request, tmp_path: Path) -> IdIndex:
    layout = LayoutCache(tmp_path, ("f" * 64,)) if request.param == "shared" else None
    return IdIndex(mapped(tmp_path, IDS), "item", tmp_path, layout)


def test_every_id_finds_its_row_and_unknown_ids_find_none(index: IdIndex) -> None:
    assert [index.row(i) for i in IDS] == list(range(len(IDS)))
    for unknown in ["i3", "i", "i100", "cafe", "b", " a", "a ", "a\x00", "zzz", "\x00"]:
        assert index.row(unknown) is None, unknown
    assert len(index) == len(IDS)


def test_many_ids_at_once_match_the_single_lookups(index: IdIndex) -> None:
    asked = ["🙂", "nope", "i1", "", "a\x00", "i10", "i10", "日本語"]
    expected = [NOT_FOUND if (r := index.row(i)) is None else r for i in asked]
    np.testing.assert_array_equal(index.rows(asked), expected)
    assert index.rows(["i2", "A"]).dtype == np.int64
    np.testing.assert_array_equal(index.rows(["longer than any id there is"]), [NOT_FOUND])
    assert index.rows([]).shape == (0,)


def test_rows_to_ids_vectorised_and_as_a_sequence(index: IdIndex) -> None:
    ids = index.list
    rows = np.array([3, 0, 4, 4, 9], dtype=np.int32)
    assert ids.of(rows) == ["日本語", "i10", "🙂", "🙂", "A"]
    assert all(type(i) is str for i in ids.of(rows))
    assert len(ids) == len(IDS) and list(ids) == IDS and ids[2] == "café" and ids[-1] == "A"
    assert type(ids[0]) is str and ids[1:3] == ["i2", "café"]
    assert ids.of(np.zeros(0, np.int64)) == []


@pytest.mark.parametrize("duplicated", [["x", "y", "x"], ["b", "a", "b", "c", "a"], ["", ""]])
def test_duplicate_ids_are_rejected_at_load(tmp_path: Path, duplicated: list[str]) -> None:
    with pytest.raises(ArtifactError, match="item ids are not unique"):
        IdIndex(mapped(tmp_path, duplicated), "item", tmp_path)
    layout = LayoutCache(tmp_path / "shared", ("e" * 64,))
    layout.directory.mkdir()
    with pytest.raises(ArtifactError, match="not unique"):
        IdIndex(mapped(tmp_path, duplicated), "item", tmp_path, layout)


def test_an_empty_array_finds_nothing(tmp_path: Path) -> None:
    index = IdIndex(np.zeros(0, dtype="<U1"), "user", tmp_path)
    assert index.row("a") is None and len(index) == 0 and len(index.list) == 0
    np.testing.assert_array_equal(index.rows(["a"]), [NOT_FOUND])


def test_non_unicode_ids_are_an_artifact_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="unicode"):
        IdIndex(np.arange(3), "user", tmp_path)


def test_two_indexes_of_one_array_share_the_order_file(tmp_path: Path) -> None:
    layout = LayoutCache(tmp_path / "shared", ("d" * 64,))
    layout.directory.mkdir()
    ids = mapped(tmp_path, IDS)
    first, second = IdIndex(ids, "item", tmp_path, layout), IdIndex(ids, "item", tmp_path, layout)
    assert len(list(layout.directory.glob("item-order-*.npy"))) == 1
    assert not second._order.flags.writeable
    np.testing.assert_array_equal(first._order, second._order)
    assert [second.row(i) for i in IDS] == list(range(len(IDS)))
