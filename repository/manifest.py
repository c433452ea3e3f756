"""`manifest.json`: what a model version holds, how to score with it, and how to check it.

Imported by the server, so only the standard library and numpy are allowed here.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bertrec import __version__
from bertrec.errors import ArtifactError
from bertrec.repository.artifacts import (
    ARRAY_FILES,
    ENCODER_ONNX,
    ITEM_TEXTS,
    MANIFEST,
    PARITY_EXPECTED,
    PARITY_TEXTS,
    RANKING_SCORE,
    RATING_SCORE,
    SCHEMA_VERSION,
    TEXT_QUERY_SCORE,
    TOKENIZER,
)
from bertrec.repository.versions import version_of_folder

REQUIRED_FILES = (ENCODER_ONNX, TOKENIZER, ITEM_TEXTS, PARITY_TEXTS, PARITY_EXPECTED, *ARRAY_FILES)
LIBRARIES = ("torch", "transformers", "onnx", "onnxruntime", "numpy", "tokenizers")
_CHUNK_BYTES = 1 << 20
_FINITE_CHUNK_BYTES = 1 << 24  # bounds the temporary mask of the finiteness check


@dataclass(frozen=True)
class Dims:
    factor_dim: int
    text_hidden_size: int
    max_seq_len: int
    n_users: int
    n_items: int


@dataclass(frozen=True)
class Scoring:
    """How scores are formed from the arrays (the formulas are the strings in artifacts.py)."""

    global_mean: float
    rating_range: tuple[float, float]
    ranking_score: str = RANKING_SCORE
    rating_score: str = RATING_SCORE
    text_query_score: str = TEXT_QUERY_SCORE
    recommend_order: str = "ranking"


@dataclass(frozen=True)
class Parity:
    """Agreement of an ONNX graph with the PyTorch encoder on the stored parity texts."""

    max_abs_err: float
    cos_mean: float
    cos_min: float
    n_texts: int


@dataclass(frozen=True)
class EncoderVariant:
    name: str  # "fp32", "fp32-optimized" or "int8"
    file: str
    precision: str  # "fp32" or "int8"
    parity: Parity


@dataclass(frozen=True)
class EncoderInfo:
    file: str
    input_names: tuple[str, ...]
    output_name: str
    opset: int
    variants: tuple[EncoderVariant, ...]
    parity_texts: str = PARITY_TEXTS
    parity_expected: str = PARITY_EXPECTED

    def variant(self, name: str) -> EncoderVariant | None:
        return next((v for v in self.variants if v.name == name), None)


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int
    shape: tuple[int, ...] | None = None  # .npy only
    dtype: str | None = None  # .npy only, numpy's dtype.str (e.g. "<f4", "<U12")


@dataclass(frozen=True)
class Manifest:
    model_name: str
    version: int
    created_at: str  # UTC, ISO 8601
    base_encoder: str
    dims: Dims
    scoring: Scoring
    encoder: EncoderInfo
    files: dict[str, FileEntry] = field(default_factory=dict)
    training_metrics: dict[str, Any] = field(default_factory=dict)
    library_versions: dict[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape an export (absent ones are left out)."""
    found = {"bertrec": __version__}
    for name in LIBRARIES:
        candidates = (name, "onnxruntime-gpu") if name == "onnxruntime" else (name,)
        for dist in candidates:
            try:
                found[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return found


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks so large arrays never sit in memory whole."""
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK_BYTES)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def describe_file(path: Path) -> FileEntry:
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    if path.suffix == ".npy":
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        shape, dtype = tuple(int(n) for n in array.shape), array.dtype.str
    return FileEntry(sha256_file(path), path.stat().st_size, shape, dtype)


def write_manifest(version_dir: Path, manifest: Manifest) -> Manifest:
    """Describe every file in `version_dir` (flat) and write `manifest.json`.

    Refuses what the server would refuse at load, so a bad version is never published:
    a manifest naming another model or version than the folder it is written into, and
    NaN or infinity in a float array.

    Returns:
        `manifest` with `files` filled in, as written.
    Raises:
        ArtifactError: the folder holds a sub-folder (a version is flat), the manifest
            disagrees with the folder's place, or a float array is not finite.
    """
    check_location(version_dir, manifest)
    files: dict[str, FileEntry] = {}
    for path in sorted(version_dir.iterdir()):
        if path.name == MANIFEST:
            continue
        if not path.is_file():
            raise ArtifactError(f"{path}: a model version holds only files")
        files[path.name] = describe_file(path)
    check_finite(version_dir, files)
    complete = replace(manifest, files=files)
    text = json.dumps(asdict(complete), indent=2, default=_json_default) + "\n"
    (version_dir / MANIFEST).write_text(text, encoding="utf-8")
    return complete


def read_manifest(version_dir: Path) -> Manifest:
    """Parse and validate `<version_dir>/manifest.json`.

    Raises:
        ArtifactError: missing, not JSON, an unsupported schema, or a field missing/mistyped.
    """
    path = version_dir / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{version_dir}: no {MANIFEST} (not a model version, or incomplete)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: unreadable manifest ({exc})") from exc
    doc = _Fields(raw, str(path), "")
    schema = doc.integer("schema_version")
    if schema != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: schema_version {schema} is not supported "
            f"(this bertrec {__version__} reads schema_version {SCHEMA_VERSION})"
        )
    return _parse_manifest(doc)


def verify_files(version_dir: Path, manifest: Manifest) -> None:
    """Check a version folder against its manifest before anything is served from it.

    The manifest must name the model and version of the folder's place in the repository
    (a copied or renamed folder would otherwise be served under the wrong version), every
    file must be present with its recorded size and SHA-256, and every float array finite
    (one NaN would fail whole batches, other callers' queries included).

    Raises:
        ArtifactError: naming the first disagreement: the model or version, a file that is
            missing, unlisted but required, of the wrong size or with the wrong hash, or a
            float array holding NaN or infinity.
    """
    check_location(version_dir, manifest)
    for name in REQUIRED_FILES:
        if name not in manifest.files:
            raise ArtifactError(f"{version_dir}: {name} is not listed in {MANIFEST}")
    for name, entry in manifest.files.items():
        path = version_dir / name
        if not path.is_file():
            raise ArtifactError(f"{path}: missing")
        size = path.stat().st_size
        if size != entry.bytes:
            raise ArtifactError(
                f"{path}: {size} bytes, manifest says {entry.bytes} (truncated or replaced)"
            )
        if sha256_file(path) != entry.sha256:
            raise ArtifactError(f"{path}: SHA-256 differs from the manifest (corrupted)")
    check_finite(version_dir, manifest.files)


def check_location(version_dir: Path, manifest: Manifest) -> None:
    """Refuse a manifest whose model name or version differ from the folder's place.

    `version_dir` is `<repo>/<model>/<version>` or an export's build folder for that version.

    Raises:
        ArtifactError: naming both sides of the disagreement.
    """
    model, version = version_of_folder(version_dir)
    if manifest.model_name != model:
        raise ArtifactError(
            f"{version_dir}: {MANIFEST} is for model {manifest.model_name!r}, "
            f"but the folder belongs to model {model!r}"
        )
    if manifest.version != version:
        where = f"version {version}" if version is not None else "no version number"
        raise ArtifactError(
            f"{version_dir}: {MANIFEST} is for version {manifest.version}, "
            f"but the folder is {where}"
        )


def check_finite(version_dir: Path, names: Iterable[str]) -> None:
    """Refuse NaN and infinity in every float `.npy` among `names` (memory-mapped, chunked).

    A 1M x 64 float32 array (256 MB) takes 30-60 ms once in page cache (hashing has just put
    it there), about a fifth of the SHA-256 computed over the same file.

    Raises:
        ArtifactError: naming the file and the first row holding a non-finite value.
    """
    for name in names:
        if not name.endswith(".npy"):
            continue
        array = np.load(version_dir / name, mmap_mode="r", allow_pickle=False)
        if array.dtype.kind not in "fc":
            continue
        row = _first_nonfinite_row(array)
        if row is not None:
            raise ArtifactError(
                f"{version_dir / name}: row {row} holds NaN or infinity "
                "(a non-finite factor would fail every batch that touches it)"
            )


def _first_nonfinite_row(array: np.ndarray) -> int | None:
    rows = array.reshape(1, -1) if array.ndim == 0 else array.reshape(len(array), -1)
    row_bytes = max(1, rows.shape[1] * rows.itemsize)
    step = max(1, _FINITE_CHUNK_BYTES // row_bytes)
    for start in range(0, len(rows), step):
        finite = np.isfinite(rows[start : start + step])
        if not finite.all():  # a flat reduction: per-row ones cost 3x as much
            return start + int(np.argmin(finite.all(axis=1)))
    return None


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


class _Fields:
    """Typed access to one JSON object; errors name the manifest and the dotted field."""

    def __init__(self, raw: Any, source: str, prefix: str) -> None:
        if not isinstance(raw, dict):
            raise ArtifactError(f"{source}: {prefix.rstrip('.') or 'manifest'} is not an object")
        self.raw, self.source, self.prefix = raw, source, prefix

    def _get(self, key: str, kinds: tuple[type, ...], what: str) -> Any:
        value = self.raw.get(key)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ArtifactError(f"{self.source}: {self.prefix}{key} is missing or not {what}")
        return value

    def integer(self, key: str) -> int:
        return int(self._get(key, (int,), "an integer"))

    def number(self, key: str) -> float:
        return float(self._get(key, (int, float), "a number"))

    def text(self, key: str) -> str:
        return str(self._get(key, (str,), "a string"))

    def sequence(self, key: str) -> list[Any]:
        return list(self._get(key, (list,), "a list"))

    def mapping(self, key: str) -> dict[str, Any]:
        return dict(self._get(key, (dict,), "an object"))

    def obj(self, key: str) -> _Fields:
        return _Fields(self.mapping(key), self.source, f"{self.prefix}{key}.")


def _parse_manifest(doc: _Fields) -> Manifest:
    dims, scoring = doc.obj("dims"), doc.obj("scoring")
    rating_range = scoring.sequence("rating_range")
    if len(rating_range) != 2:
        raise ArtifactError(f"{doc.source}: scoring.rating_range must be [low, high]")
    listed = doc.obj("files")
    files = {name: _parse_file(listed.obj(name), name) for name in listed.raw}
    return Manifest(
        model_name=doc.text("model_name"),
        version=doc.integer("version"),
        created_at=doc.text("created_at"),
        base_encoder=doc.text("base_encoder"),
        dims=Dims(**{k: dims.integer(k) for k in Dims.__dataclass_fields__}),
        scoring=Scoring(
            global_mean=scoring.number("global_mean"),
            rating_range=(float(rating_range[0]), float(rating_range[1])),
            ranking_score=scoring.text("ranking_score"),
            rating_score=scoring.text("rating_score"),
            text_query_score=scoring.text("text_query_score"),
            recommend_order=scoring.text("recommend_order"),
        ),
        encoder=_parse_encoder(doc.obj("encoder")),
        files=files,
        training_metrics=doc.mapping("training_metrics"),
        library_versions={str(k): str(v) for k, v in doc.mapping("library_versions").items()},
        schema_version=doc.integer("schema_version"),
    )


def _parse_encoder(enc: _Fields) -> EncoderInfo:
    variants = []
    for i, raw in enumerate(enc.sequence("variants")):
        var = _Fields(raw, enc.source, f"{enc.prefix}variants[{i}].")
        par = var.obj("parity")
        parity = Parity(
            max_abs_err=par.number("max_abs_err"),
            cos_mean=par.number("cos_mean"),
            cos_min=par.number("cos_min"),
            n_texts=par.integer("n_texts"),
        )
        name, file, precision = var.text("name"), var.text("file"), var.text("precision")
        variants.append(EncoderVariant(name, _safe_name(file, enc.source), precision, parity))
    return EncoderInfo(
        file=_safe_name(enc.text("file"), enc.source),
        input_names=tuple(str(n) for n in enc.sequence("input_names")),
        output_name=enc.text("output_name"),
        opset=enc.integer("opset"),
        variants=tuple(variants),
        parity_texts=_safe_name(enc.text("parity_texts"), enc.source),
        parity_expected=_safe_name(enc.text("parity_expected"), enc.source),
    )


def _parse_file(entry: _Fields, name: str) -> FileEntry:
    _safe_name(name, entry.source)
    shape = entry.raw.get("shape")
    dtype = entry.raw.get("dtype")
    return FileEntry(
        sha256=entry.text("sha256"),
        bytes=entry.integer("bytes"),
        shape=tuple(int(n) for n in shape) if isinstance(shape, list) else None,
        dtype=str(dtype) if dtype is not None else None,
    )


def _safe_name(name: str, source: str) -> str:
    """File names in a manifest are plain names inside the version folder, never paths."""
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ArtifactError(f"{source}: {name!r} is not a plain file name")
    return name
