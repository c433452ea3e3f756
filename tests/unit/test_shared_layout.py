"""Derived arrays shared by worker processes as one mapped file (server/shared_layout.py)."""

from __future__ import annotations

import errno
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest

from bertrec.server.ranking import Ranker, augmented_layout
from bertrec.server.shared_layout import LAYOUT_DIR_ENV, LayoutCache, layout_dir_from_env

SOURCES = ("a" * 64, "b" * 64)


def catalogue(n: int = 300, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)).astype(np.float32),
            rng.standard_normal(n).astype(np.float32))  # fmt: skip


def fill(out: np.ndarray) -> None:
    out[:] = np.arange(out.size, dtype=out.dtype).reshape(out.shape)


def layout_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_two_rankers_build_one_file_map_it_and_rank_as_the_heap_layout(tmp_path: Path) -> None:
    factors, bias = catalogue()
    cache = LayoutCache(tmp_path, SOURCES)
    first = Ranker(factors, bias, layout=cache)
    (built,) = [p for p in tmp_path.iterdir() if p.suffix == ".npy"]
    inode = built.stat().st_ino
    second = Ranker(factors, bias, layout=cache)
    heap = Ranker(factors, bias)

    assert built.stat().st_ino == inode  # mapped, not rebuilt
    assert len(layout_files(tmp_path)) == 2  # the array and its digest, no leftovers
    for ranker in (first, second):
        assert not ranker._items.flags.writeable  # a read-only map of the file
        np.testing.assert_array_equal(ranker._items, heap._items)
    queries = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    expected = heap.topk(queries, 7, exclude=[np.array([3, 4]), None, None, None, None])
    got = second.topk(queries, 7, exclude=[np.array([3, 4]), None, None, None, None])
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(e, g)
    scaled = second.scaled(np.full(300, 0.5, np.float32)).topk(queries, 4)
    reference = heap.scaled(np.full(300, 0.5, np.float32)).topk(queries, 4)
    np.testing.assert_array_equal(scaled[0], reference[0])


def test_the_key_changes_with_sources_shape_dtype_params_and_kind(tmp_path: Path) -> None:
    cache = LayoutCache(tmp_path, SOURCES)
    base = cache.key("ranker", (3, 4), np.dtype(np.float32), group_width=32)
    others = {
        LayoutCache(tmp_path, ("c" * 64, "b" * 64)).key("ranker", (3, 4), np.dtype(np.float32),
                                                         group_width=32),
        cache.key("ranker", (3, 5), np.dtype(np.float32), group_width=32),
        cache.key("ranker", (3, 4), np.dtype(np.float64), group_width=32),
        cache.key("ranker", (3, 4), np.dtype(np.float32), group_width=64),
        cache.key("item-order", (3, 4), np.dtype(np.float32), group_width=32),
    }  # fmt: skip
    assert base not in others and len(others) == 5
    assert base == LayoutCache(Path("/elsewhere"), SOURCES).key(
        "ranker", (3, 4), np.dtype(np.float32), group_width=32
    )


@pytest.mark.parametrize("damage", ["truncate", "flip_a_byte", "garbage", "digest"])
def test_a_damaged_file_is_never_mapped_but_rebuilt(tmp_path: Path, damage: str) -> None:
    cache = LayoutCache(tmp_path, SOURCES)
    cache.array("t", (50, 40), np.float32, fill)
    (path,) = [p for p in tmp_path.iterdir() if p.suffix == ".npy"]
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip_a_byte":  # right header and size, wrong content
        data[-100] ^= 0x55
        path.write_bytes(bytes(data))
    elif damage == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    else:
        path.with_suffix(".sha256").write_text("0" * 64)
    builds = []

    def counted(out: np.ndarray) -> None:
        builds.append(1)
        fill(out)

    again = cache.array("t", (50, 40), np.float32, counted)
    assert builds == [1]
    expected = np.empty((50, 40), np.float32)
    fill(expected)
    np.testing.assert_array_equal(again, expected)
    np.testing.assert_array_equal(np.load(path), expected)  # the file is whole again
    assert len(layout_files(tmp_path)) == 2


def test_a_build_that_fails_leaves_no_file(tmp_path: Path) -> None:
    def broken(out: np.ndarray) -> None:
        out[:5] = 1.0
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        LayoutCache(tmp_path, SOURCES).array("t", (50,), np.float32, broken)
    assert [p for p in tmp_path.iterdir() if p.suffix == ".npy"] == []
    assert all(not p.name.endswith(".npy.tmp") for p in tmp_path.iterdir())


def test_a_full_file_system_falls_back_to_the_heap(tmp_path: Path, monkeypatch) -> None:
    """No space for the file: the array is built on the heap and no file is left behind."""

    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    got = LayoutCache(tmp_path, SOURCES).array("t", (50, 40), np.float32, fill)
    expected = np.empty((50, 40), np.float32)
    fill(expected)
    np.testing.assert_array_equal(got, expected)
    assert got.flags.writeable  # a private heap array
    assert layout_files(tmp_path) == []


def slow_build(out: np.ndarray) -> None:
    """Deterministic, and slow enough that racing builders overlap."""
    time.sleep(0.2)
    factors, bias = catalogue(n=200, d=6)
    out[:] = augmented_layout(factors, bias)


def race(folder: str) -> bytes:
    cache = LayoutCache(Path(folder), SOURCES)
    return cache.array("race", (7, 224), np.float32, slow_build).tobytes()


def test_racing_builders_all_map_one_correct_file(tmp_path: Path) -> None:
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.map(race, [str(tmp_path)] * 4)
    expected = np.empty((7, 224), np.float32)
    slow_build(expected)
    assert all(r == expected.tobytes() for r in results)
    names = layout_files(tmp_path)
    assert len(names) == 2 and {Path(n).suffix for n in names} == {".npy", ".sha256"}, names


def test_without_a_directory_the_layout_stays_on_the_heap(monkeypatch) -> None:
    monkeypatch.delenv(LAYOUT_DIR_ENV, raising=False)
    assert layout_dir_from_env() is None
    factors, bias = catalogue()
    assert Ranker(factors, bias)._items.flags.writeable  # a private heap array
    monkeypatch.setenv(LAYOUT_DIR_ENV, "/run/x")
    assert layout_dir_from_env() == Path("/run/x")
