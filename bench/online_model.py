"""The online evaluation's model: bertrec trained on the time split's train part and exported,
cached on disk under a key that hashes every input, so a rerun skips the minutes of training.

Training is `bench/quality_bertrec.train_and_load` (the quality benchmark's pipeline and its
validation-tuned defaults); only the exported model repository is kept.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from pathlib import Path

from bertrec.bench.quality_protocol import QualityData, RatingArrays
from bertrec.train.pipeline import TrainConfig

log = logging.getLogger(__name__)

MODEL = "bertrec"  # the model name train_and_load exports under
CACHE_FORMAT = "online-2"  # bump to invalidate every cached export
CODE_PACKAGES = ("bertrec.train", "bertrec.export", "bertrec.repository")  # what makes an export
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "bertrec-bench-cache" / "online"


def cache_key(data: QualityData, train: RatingArrays, cfg: TrainConfig) -> str:
    """SHA-256 (hex, first 16 digits) of the training rows, the catalogue and its texts, the
    training config and the source of the packages that train and export: any change in what
    the model learns from, or in how, gives another key."""
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    digest.update(source_digest().encode())
    for array in (train.users, train.items, train.ratings, train.rows):
        digest.update(array.tobytes())
    for text in (*data.user_ids.tolist(), *data.item_ids.tolist(), *data.item_texts):
        digest.update(text.encode() + b"\0")
    digest.update(repr(cfg).encode())
    return digest.hexdigest()[:16]


def source_digest() -> str:
    """SHA-256 of every Python file of `CODE_PACKAGES`, by path relative to its package."""
    import importlib

    digest = hashlib.sha256()
    for name in CODE_PACKAGES:
        module = importlib.import_module(name)
        assert module.__file__ is not None
        root = Path(module.__file__).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{name}/{path.relative_to(root)}\0".encode() + path.read_bytes())
    return digest.hexdigest()


def cached_repo(
    data: QualityData, train: RatingArrays, cfg: TrainConfig, cache: Path = DEFAULT_CACHE
) -> tuple[Path, bool]:
    """The model repository trained on `train`: (path, whether it came from the cache).

    A new export is built in a temporary folder next to the cache entry and renamed into
    place only when complete, so an interrupted run never leaves a half-written entry.
    """
    from bertrec.bench.quality_bertrec import train_and_load

    entry = cache / cache_key(data, train, cfg)
    if (entry / "repo" / MODEL).is_dir():
        log.info("model from the cache: %s", entry)
        return entry / "repo", True
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="building-", dir=cache) as tmp:
        workdir = Path(tmp)
        trained = train_and_load(data, train, workdir, cfg)
        log.info("trained in %s", trained.seconds)
        del trained  # only the exported repository is kept
        shutil.rmtree(workdir / "trained")
        entry.mkdir(exist_ok=True)
        (workdir / "repo").rename(entry / "repo")
    return entry / "repo", False
