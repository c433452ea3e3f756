"""A versioned model repository on disk: `<repo>/<model>/<version>/`, versions 1, 2, 3, ...

A version appears by one atomic `rename` of a fully built folder, so a reader never sees a
half-written version, and an interrupted export leaves nothing behind. Temporary build folders
are dot-prefixed and ignored. Imported by the server: standard library only.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from bertrec.errors import ArtifactError, BertrecError

log = logging.getLogger(__name__)

_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TEMP_PREFIX = ".tmp-"


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
    return model_dir(repo, model) / str(chosen)


def publish_version(
    repo: Path,
    model: str,
    build: Callable[[Path], None],
    version: int | None = None,
) -> tuple[int, Path]:
    """Build a new version in a temporary folder, then move it into place in one step.

    Args:
        build: writes every file of the version into the folder it is given.
        version: the number to publish as; None takes the next free one.
    Returns:
        The version number and its folder.
    Raises:
        ArtifactError: the version exists already, or another export published it meanwhile
            (nothing is overwritten). Whatever `build` raises is re-raised after cleanup.
    """
    folder = model_dir(repo, model)
    number = next_version(repo, model) if version is None else version
    if number < 1:
        raise BertrecError(f"version must be a positive integer, got {number}")
    final = folder / str(number)
    if final.exists():
        raise ArtifactError(f"{final}: version {number} exists already; versions are immutable")
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / f"{_TEMP_PREFIX}{number}-{secrets.token_hex(4)}"
    temp.mkdir()  # mkdir, not mkdtemp: the version keeps the umask's permissions
    try:
        build(temp)
        _fsync_tree(temp)
        _rename_no_replace(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    _fsync_dir(folder)
    log.info("published %s", final)
    return number, final


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
