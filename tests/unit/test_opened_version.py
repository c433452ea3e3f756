"""bertrec.repository as its own package: imports none of train/export/server, and
`open_version` returns only versions that passed every check."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bertrec.bench.synthetic import MODEL, build_synthetic_repo
from bertrec.errors import ArtifactError
from bertrec.repository.artifacts import ITEM_BIAS, ITEM_FACTORS
from bertrec.repository.manifest import read_manifest, write_manifest
from bertrec.repository.opened import open_version
from bertrec.repository.versions import publish_version


def test_the_repository_package_imports_none_of_train_export_server() -> None:
    code = (
        "import sys\n"
        "import bertrec.repository, bertrec.repository.artifacts, bertrec.repository.manifest\n"
        "import bertrec.repository.versions, bertrec.repository.opened\n"
        "parts = ('bertrec.train', 'bertrec.export', 'bertrec.server', 'bertrec.bench')\n"
        "bad = sorted(m for m in sys.modules if m.startswith(parts) or m in ('torch', 'onnx'))\n"
        "sys.exit(f'imported {bad}' if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_synthetic_repo(tmp_path_factory.mktemp("opened"), n_items=40, n_users=8, dim=4)


def _copy_of_version_1(repo: Path, short_item_bias: bool = False) -> int:
    """Publish the next version as a copy of version 1, `item_bias` cut short if asked, its
    manifest rewritten so that the hashes agree (only the deeper checks can object)."""
    source = repo / MODEL / "1"

    def build(out: Path) -> None:
        for path in source.iterdir():
            (out / path.name).write_bytes(path.read_bytes())
        if short_item_bias:
            np.save(out / ITEM_BIAS, np.zeros(3, np.float32))
        manifest = read_manifest(source)
        write_manifest(out, dataclasses.replace(manifest, version=number))

    number = max(int(p.name) for p in (repo / MODEL).iterdir() if p.name.isdigit()) + 1
    publish_version(repo, MODEL, build, number)
    return number


def test_open_version_returns_the_latest_verified_and_memory_mapped(repo: Path) -> None:
    opened = open_version(repo, MODEL)
    assert (opened.model, opened.version, opened.folder) == (MODEL, 1, repo / MODEL / "1")
    assert opened.manifest.dims.n_items == 40
    assert isinstance(opened.arrays.item_factors, np.memmap)
    assert not opened.arrays.item_factors.flags.writeable
    np.testing.assert_array_equal(opened.arrays.item_factors, np.load(opened.folder / ITEM_FACTORS))


def test_open_version_refuses_a_corrupted_file(repo: Path) -> None:
    number = _copy_of_version_1(repo)
    factors = repo / MODEL / str(number) / ITEM_FACTORS
    data = bytearray(factors.read_bytes())
    data[-1] ^= 0xFF
    factors.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="SHA-256 differs"):
        open_version(repo, MODEL, number)


def test_open_version_refuses_arrays_that_disagree_with_the_manifest(repo: Path) -> None:
    number = _copy_of_version_1(repo, short_item_bias=True)
    with pytest.raises(ArtifactError, match=r"item_bias has shape \(3,\)"):
        open_version(repo, MODEL, number)


def test_open_version_names_a_missing_version(repo: Path) -> None:
    with pytest.raises(ArtifactError, match="has no version 99"):
        open_version(repo, MODEL, 99)
