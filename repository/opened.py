"""One call from a repository to a version that is safe to serve: `open_version`.

Resolving, reading the manifest, hashing every file, checking finiteness and shapes were once
five calls strung together by the server; a new reader (the version watcher, a benchmark) that
forgot one of them would serve a corrupted or substituted version. Here they are one call, and
what it returns has passed every check. numpy and the standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bertrec.errors import ArtifactError
from bertrec.repository.artifacts import FactorArrays
from bertrec.repository.manifest import Manifest, read_manifest, verify_files
from bertrec.repository.versions import resolve_version


@dataclass(frozen=True)
class OpenedVersion:
    """A verified model version: its folder, its manifest and its memory-mapped arrays.

    The arrays are read-only maps of the files whose SHA-256 the manifest recorded, so they
    cost no load time and are shared through the page cache with any other reader.
    """

    folder: Path
    manifest: Manifest
    arrays: FactorArrays

    @property
    def model(self) -> str:
        return self.manifest.model_name

    @property
    def version(self) -> int:
        return self.manifest.version


def open_version(repo: Path, model: str, version: int | None = None) -> OpenedVersion:
    """Resolve `version` of `model` (None: the highest), verify it, and memory-map its arrays.

    Checks, in order: the folder and its entries stay inside `repo` (no symlink out), the
    manifest parses and names this model and version, every listed file has its recorded
    size and SHA-256, every float array is finite, and the arrays' shapes agree with the
    manifest's dimensions and with each other.

    Raises:
        ArtifactError: naming the first check that failed (missing model or version, bad
            manifest, hash mismatch, non-finite or inconsistent arrays).
        BertrecError: `model` is not a valid model name.
    """
    folder = resolve_version(repo, model, version)
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    arrays = FactorArrays.load(folder, manifest.scoring.global_mean, mmap=True)
    check_shapes(folder, manifest, arrays)
    return OpenedVersion(folder, manifest, arrays)


def check_shapes(folder: Path, manifest: Manifest, arrays: FactorArrays) -> None:
    """Refuse arrays whose shapes disagree with the manifest's dimensions or each other.

    Hashes prove the files are the ones exported, not that the export was consistent; a
    mismatch here would otherwise surface as an index error inside a batch.

    Raises:
        ArtifactError: naming the first array that disagrees.
    """
    dims = manifest.dims
    problem = arrays.shape_mismatch(dims.n_users, dims.n_items, dims.factor_dim)
    if problem is not None:
        raise ArtifactError(f"{folder}: {problem}")
    if arrays.rated_indptr[-1] != len(arrays.rated_indices):
        raise ArtifactError(f"{folder}: rated_indptr does not match rated_indices")
