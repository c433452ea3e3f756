"""A versioned model repository on disk: `<repo>/<model>/<version>/`, versions 1, 2, 3, ...

A version appears by one atomic `rename` of a fully built folder, so a reader never sees a
half-written version. The build folder (`.tmp-<n>-<hex>`, dot-prefixed so readers ignore it) is
owned by its exporter through an flock held on `.tmp-<n>-<hex>.lock` beside it; a build folder
whose lock nobody holds was left by an export that died (kill -9, power loss) and is removed by
the next export. A version whose folder or files lead out of the repository is refused.
Imported by the server: standard library only.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bertrec.errors import ArtifactError, BertrecError

log = logging.getLogger(__name__)

_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TEMP_PREFIX = ".tmp-"
_LOCK_SUFFIX = ".lock"


def model_dir(repo: Path, model: str) -> Path:
    """`<repo>/<model>` after checking that `model` is a plain, safe folder name.

    Raises:
        BertrecError: the name is empty, starts with a dot or holds a path separator.
    """
    if not _MODEL_NAME.fullmatch(model):
        raise BertrecError(
            f"invalid model name {model!r}: use letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit)"
        )
    return repo / model


def list_versions(repo: Path, model: str) -> list[int]:
    """Published versions of `model`, ascending (empty when the model has none)."""
    folder = model_dir(repo, model)
    if not folder.is_dir():
        return []
    versions = [_version_number(p.name) for p in folder.iterdir() if p.is_dir()]
    return sorted(v for v in versions if v is not None)


def next_version(repo: Path, model: str) -> int:
    """One more than the highest published version (1 for a new model)."""
    return max(list_versions(repo, model), default=0) + 1


def resolve_version(repo: Path, model: str, version: int | None = None) -> Path:
    """The folder of `version` of `model`, or of its highest version when `version` is None.

    Raises:
        ArtifactError: the model or the version does not exist (the message lists what does).
    """
    versions = list_versions(repo, model)
    if not versions:
        models = sorted(p.name for p in repo.iterdir() if p.is_dir()) if repo.is_dir() else []
        available = ", ".join(m for m in models if not m.startswith(".")) or "none"
        raise ArtifactError(f"{repo}: no versions of model {model!r} (models here: {available})")
    chosen = versions[-1] if version is None else version
    if chosen not in versions:
        listed = ", ".join(str(v) for v in versions)
        raise ArtifactError(f"{repo}: model {model!r} has no version {chosen} (has {listed})")
    version_dir = model_dir(repo, model) / str(chosen)
    check_contained(repo, version_dir)
    return version_dir


def check_contained(repo: Path, version_dir: Path) -> None:
    """Refuse a version whose folder, or any entry in it, resolves outside `repo`.

    Hashes prove only that a folder agrees with its own manifest; a symlink out of the
    repository would serve files that whoever controls the repository never published.
    Links that stay inside the repository (a file shared with another version) are fine.

    Raises:
        ArtifactError: naming the entry and where it leads.
    """
    root = repo.resolve()
    for path in (version_dir, *sorted(version_dir.iterdir())):
        target = path.resolve()
        if not target.is_relative_to(root):
            raise ArtifactError(
                f"{path} leads to {target}, outside the repository {root} "
                "(symlinks out of the repository are refused)"
            )


def version_of_folder(version_dir: Path) -> tuple[str, int | None]:
    """The model name and version number a folder stands for by its place in the repository.

    `<repo>/<model>/<n>` and a build folder `<repo>/<model>/.tmp-<n>-<hex>` both stand for
    version n of model; any other folder name gives None for the version.
    """
    name = version_dir.name
    if name.startswith(_TEMP_PREFIX):
        name = name[len(_TEMP_PREFIX) :].split("-", 1)[0]
    return version_dir.parent.name, _version_number(name)


def publish_version(
    repo: Path,
    model: str,
    build: Callable[[Path], None],
    version: int | None = None,
) -> tuple[int, Path]:
    """Build a new version in a temporary folder, then move it into place in one step.

    First removes the build folders of exports that died (see `remove_stale_builds`).

    Args:
        build: writes every file of the version into the folder it is given.
        version: the number to publish as; None takes the next free one.
    Returns:
        The version number and its folder.
    Raises:
        ArtifactError: the version exists already, another export published it meanwhile
            (nothing is overwritten), or the build left a link out of the repository.
            Whatever `build` raises is re-raised after cleanup.
    """
    folder = model_dir(repo, model)
    number = next_version(repo, model) if version is None else version
    if number < 1:
        raise BertrecError(f"version must be a positive integer, got {number}")
    final = folder / str(number)
    if final.exists():
        raise ArtifactError(f"{final}: version {number} exists already; versions are immutable")
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(repo, model)
    with _owned_build_folder(folder, number) as temp:
        build(temp)
        check_contained(repo, temp)
        _fsync_tree(temp)
        _rename_no_replace(temp, final)
    _fsync_dir(folder)
    log.info("published %s", final)
    return number, final


def remove_stale_builds(repo: Path, model: str) -> list[Path]:
    """Remove the build folders (and lock files) of `model` that no live export owns.

    An export holds an flock on its `.lock` file from before its build folder exists until
    after the folder is renamed or removed, so a lock that can be taken belongs to an export
    that died (the kernel drops a dead process's locks); a build folder without a lock file
    was left by a bertrec from before lock files. Safe to run while other exports build.

    Returns:
        The build folders removed.
    """
    folder = model_dir(repo, model)
    if not folder.is_dir():
        return []
    stems = {p.name.removesuffix(_LOCK_SUFFIX) for p in folder.iterdir()}
    removed = []
    for stem in sorted(s for s in stems if s.startswith(_TEMP_PREFIX)):
        build_dir = folder / stem
        if _remove_if_unowned(build_dir, folder / (stem + _LOCK_SUFFIX)):
            removed.append(build_dir)
    for path in removed:
        log.warning("removed %s, left by an interrupted export", path)
    return removed


def _remove_if_unowned(build_dir: Path, lock: Path) -> bool:
    """Remove `build_dir` and `lock` unless a live export holds the lock; True if it did."""
    try:
        # Read-only: flock needs no write access, so a lock file of another user works too.
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        # The exporter creates its lock before the folder and unlinks it only after the
        # folder is gone, so a folder seen without its lock belongs to no live export.
        return _rmtree(build_dir)
    try:
        if not _try_lock(fd):
            return False  # a live export is building here
        existed = _rmtree(build_dir)
        lock.unlink(missing_ok=True)  # only ever while holding the lock: see _owned_build_folder
        return existed
    finally:
        os.close(fd)


@contextmanager
def _owned_build_folder(folder: Path, number: int) -> Iterator[Path]:
    """A fresh build folder, owned (flock on its lock file) until the block ends; removed
    if the block raises. The lock is taken before the folder exists."""
    while True:
        stem = f"{_TEMP_PREFIX}{number}-{secrets.token_hex(4)}"
        lock = folder / (stem + _LOCK_SUFFIX)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _same_file(fd, lock):
            break
        # A cleaner took the lock between our create and flock and unlinked it: start over.
        os.close(fd)
    temp = folder / stem
    try:
        temp.mkdir()  # mkdir, not mkdtemp: the version keeps the umask's permissions
        try:
            yield temp
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
    finally:
        lock.unlink(missing_ok=True)  # before releasing the lock, so no cleaner ever sees it free
        os.close(fd)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _rmtree(path: Path) -> bool:
    existed = path.is_dir()
    shutil.rmtree(path, ignore_errors=True)
    return existed


def _version_number(name: str) -> int | None:
    """`name` as a version number, or None for anything else ("01", ".tmp-3-ab", "latest")."""
    if not (name.isascii() and name.isdigit()) or name != str(int(name)) or int(name) < 1:
        return None
    return int(name)


def _rename_no_replace(source: Path, target: Path) -> None:
    # POSIX rename() replaces an empty target folder but fails on a non-empty one, and every
    # published version holds files; the exists() check covers the empty case.
    if target.exists():
        raise ArtifactError(f"{target}: another export published version {target.name} first")
    try:
        os.rename(source, target)
    except OSError as exc:
        raise ArtifactError(
            f"{target}: could not publish (another export may have taken version "
            f"{target.name}): {exc.strerror}"
        ) from exc


def _fsync_tree(folder: Path) -> None:
    """Flush the built files to disk so the rename never publishes data still in page cache."""
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; durability is best effort there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
