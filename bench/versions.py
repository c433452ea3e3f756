"""New versions of a published model without training or exporting: for swap benchmarks and
hot-reload tests.

`publish_variant` copies a published version, moves its factors by a seeded random amount
(so the new version's answers differ and can be told apart) and publishes the copy through the
repository's atomic publish, with a manifest of its own (new hashes, the new version number).
The encoder, tokenizer and parity files are the base version's, so the copy verifies and loads
exactly as an exported version does, in a fraction of a second for a small catalogue.
"""

from __future__ import annotations

import dataclasses
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bertrec.repository.artifacts import ITEM_FACTORS, MANIFEST, USER_FACTORS
from bertrec.repository.manifest import read_manifest, write_manifest
from bertrec.repository.versions import model_dir, next_version, publish_version

FACTOR_NOISE = 0.05  # relative to each array's standard deviation: enough to reorder top-k


def publish_variant(
    repo: Path, model: str, base_version: int, seed: int, version: int | None = None
) -> int:
    """Publish a copy of `base_version` with perturbed user and item factors.

    Args:
        seed: makes the perturbation (and so the version's answers) reproducible.
        version: the number to publish as (default: the next free one).
    Returns:
        The published version number.
    """
    number = next_version(repo, model) if version is None else version
    base = model_dir(repo, model) / str(base_version)
    publish_version(repo, model, lambda out: write_variant(base, out, number, seed), number)
    return number


def write_variant(base: Path, out: Path, version: int, seed: int) -> None:
    """Write into `out` the files of `base` with perturbed factors and a manifest for `version`."""
    rng = np.random.default_rng(seed)
    for path in base.iterdir():
        if path.name != MANIFEST:
            shutil.copyfile(path, out / path.name)
    for name in (USER_FACTORS, ITEM_FACTORS):
        array = np.load(base / name, allow_pickle=False)
        noise = rng.standard_normal(array.shape).astype(np.float32)
        scale = FACTOR_NOISE * float(array.std() or 1.0)
        np.save(out / name, (array + scale * noise).astype(np.float32), allow_pickle=False)
    manifest = read_manifest(base)
    created = datetime.now(UTC).isoformat(timespec="seconds")
    write_manifest(
        out, dataclasses.replace(manifest, version=version, created_at=created, files={})
    )
