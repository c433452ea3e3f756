"""The versioned model repository: listing, resolving and atomic, never-overwriting publish."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from bertrec.errors import ArtifactError, BertrecError
from bertrec.repository.versions import (
    list_versions,
    next_version,
    publish_version,
    remove_stale_builds,
    resolve_version,
)


def write_marker(text: str) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        (folder / "marker.txt").write_text(text)

    return build


def entries(repo: Path, model: str) -> list[str]:
    return sorted(p.name for p in (repo / model).iterdir())


def test_list_versions_is_numeric_and_ignores_other_entries(tmp_path: Path) -> None:
    model = tmp_path / "m"
    for name in ("1", "2", "10", ".tmp-3-abcd", "01", "latest", "0"):
        (model / name).mkdir(parents=True)
    (model / "7").write_text("a file, not a version")
    assert list_versions(tmp_path, "m") == [1, 2, 10]
    assert next_version(tmp_path, "m") == 11


def test_unknown_model_has_no_versions(tmp_path: Path) -> None:
    assert list_versions(tmp_path, "nothing") == []
    assert next_version(tmp_path, "nothing") == 1


def test_resolve_defaults_to_the_highest_version(tmp_path: Path) -> None:
    for _ in range(3):
        publish_version(tmp_path, "m", write_marker("x"))
    assert resolve_version(tmp_path, "m") == tmp_path / "m" / "3"
    assert resolve_version(tmp_path, "m", 2) == tmp_path / "m" / "2"


def test_resolve_missing_version_lists_the_available_ones(tmp_path: Path) -> None:
    publish_version(tmp_path, "m", write_marker("x"), version=2)
    publish_version(tmp_path, "m", write_marker("x"), version=5)
    with pytest.raises(ArtifactError, match=r"no version 3 \(has 2, 5\)"):
        resolve_version(tmp_path, "m", 3)


def test_resolve_missing_model_names_the_models_present(tmp_path: Path) -> None:
    publish_version(tmp_path, "books", write_marker("x"))
    with pytest.raises(ArtifactError, match=r"'films'.*models here: books"):
        resolve_version(tmp_path, "films")


def test_publish_numbers_versions_and_moves_the_build_into_place(tmp_path: Path) -> None:
    assert publish_version(tmp_path, "m", write_marker("one")) == (1, tmp_path / "m" / "1")
    number, path = publish_version(tmp_path, "m", write_marker("two"))
    assert number == 2
    assert (path / "marker.txt").read_text() == "two"
    assert entries(tmp_path, "m") == ["1", "2"]  # no temporary folder left


def test_publish_never_overwrites_an_existing_version(tmp_path: Path) -> None:
    publish_version(tmp_path, "m", write_marker("original"), version=4)
    with pytest.raises(ArtifactError, match="exists already"):
        publish_version(tmp_path, "m", write_marker("intruder"), version=4)
    assert (tmp_path / "m" / "4" / "marker.txt").read_text() == "original"
    assert entries(tmp_path, "m") == ["4"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failing_build_leaves_no_version_and_no_temp_folder(
    tmp_path: Path, error: BaseException
) -> None:
    seen: list[Path] = []

    def build(folder: Path) -> None:
        seen.append(folder)
        (folder / "half-written.bin").write_bytes(b"\0" * 1000)
        raise error

    with pytest.raises(type(error)):
        publish_version(tmp_path, "m", build)
    assert seen and seen[0].name.startswith(".")  # it did build in a hidden temp folder
    assert entries(tmp_path, "m") == []
    assert list_versions(tmp_path, "m") == []


def test_a_concurrent_export_taking_the_same_version_is_not_clobbered(tmp_path: Path) -> None:
    def racing_build(folder: Path) -> None:
        # Another exporter finishes version 1 while this one is still building it.
        publish_version(tmp_path, "m", write_marker("winner"), version=1)
        (folder / "marker.txt").write_text("loser")

    with pytest.raises(ArtifactError, match="another export"):
        publish_version(tmp_path, "m", racing_build)
    assert (tmp_path / "m" / "1" / "marker.txt").read_text() == "winner"
    assert entries(tmp_path, "m") == ["1"]


def test_rename_losing_the_race_fails_instead_of_replacing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_rename = os.rename

    def rename_after_a_rival(source: Path, target: Path) -> None:
        # The rival publishes between our last check and our rename.
        Path(target).mkdir()
        (Path(target) / "marker.txt").write_text("winner")
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename_after_a_rival)
    with pytest.raises(ArtifactError, match="could not publish"):
        publish_version(tmp_path, "m", write_marker("loser"))
    monkeypatch.undo()
    assert (tmp_path / "m" / "1" / "marker.txt").read_text() == "winner"
    assert entries(tmp_path, "m") == ["1"]


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "..", "x y", "a\\b"])
def test_unsafe_model_names_are_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(BertrecError, match="invalid model name"):
        publish_version(tmp_path, name, write_marker("x"))


def test_version_numbers_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(BertrecError, match="positive"):
        publish_version(tmp_path, "m", write_marker("x"), version=0)


# ---- build folders left by exports that died (issue 12, item 9) ---------------------------


def hold_lock(path: Path) -> int:
    """Take the flock a live exporter holds on its lock file (a new open file description,
    so this process's own cleaner cannot take it either)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_build_folder_without_a_lock_file_is_removed_by_the_next_publish(
    tmp_path: Path,
) -> None:
    stale = tmp_path / "m" / ".tmp-1-0badc0de"  # as a bertrec without lock files left it
    stale.mkdir(parents=True)
    (stale / "encoder.onnx").write_bytes(b"\0" * 1000)
    publish_version(tmp_path, "m", write_marker("x"))
    assert entries(tmp_path, "m") == ["1"]


def test_unlocked_lock_files_are_removed_with_or_without_their_folder(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / ".tmp-1-aaaaaaaa").mkdir()
    (model / ".tmp-1-aaaaaaaa.lock").touch()  # died while building
    (model / ".tmp-2-bbbbbbbb.lock").touch()  # died before mkdir, or after the rename
    removed = remove_stale_builds(tmp_path, "m")
    assert removed == [model / ".tmp-1-aaaaaaaa"]
    assert entries(tmp_path, "m") == []


def test_a_build_folder_whose_lock_is_held_survives(tmp_path: Path) -> None:
    model = tmp_path / "m"
    (model / ".tmp-1-cccccccc").mkdir(parents=True)
    fd = hold_lock(model / ".tmp-1-cccccccc.lock")
    try:
        assert remove_stale_builds(tmp_path, "m") == []
        publish_version(tmp_path, "m", write_marker("x"), version=2)
        assert entries(tmp_path, "m") == [".tmp-1-cccccccc", ".tmp-1-cccccccc.lock", "2"]
    finally:
        os.close(fd)
    assert remove_stale_builds(tmp_path, "m") == [model / ".tmp-1-cccccccc"]


def test_an_export_keeps_its_lock_while_building(tmp_path: Path) -> None:
    seen: list[list[str]] = []

    def build(folder: Path) -> None:
        assert remove_stale_builds(tmp_path, "m") == []  # a rival export cleaning now
        seen.append(entries(tmp_path, "m"))
        (folder / "marker.txt").write_text("x")

    publish_version(tmp_path, "m", build)
    assert len(seen[0]) == 2 and seen[0][1] == seen[0][0] + ".lock"
    assert entries(tmp_path, "m") == ["1"]  # the lock file went with the build folder


def test_a_cleaner_racing_the_lock_creation_cannot_orphan_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_flock = fcntl.flock
    raced: list[bool] = []

    def flock_after_a_rival_cleaned(fd: int, operation: int) -> None:
        # A rival cleaner runs between the exporter's create and its flock: it takes the
        # still-unlocked lock file and unlinks it. The exporter must notice and start over.
        if operation == fcntl.LOCK_EX and not raced:
            raced.append(True)
            with monkeypatch.context() as inner:
                inner.setattr(fcntl, "flock", real_flock)
                remove_stale_builds(tmp_path, "m")
        real_flock(fd, operation)

    def build(folder: Path) -> None:
        monkeypatch.setattr(fcntl, "flock", real_flock)
        assert remove_stale_builds(tmp_path, "m") == []
        assert folder.is_dir() and Path(f"{folder}.lock").is_file()
        (folder / "marker.txt").write_text("x")

    (tmp_path / "m").mkdir()
    monkeypatch.setattr(fcntl, "flock", flock_after_a_rival_cleaned)
    publish_version(tmp_path, "m", build)
    assert raced and entries(tmp_path, "m") == ["1"]
