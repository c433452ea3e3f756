"""Re-check a published model version without torch: file hashes, then ONNX parity.

The export stores a parity fixture in the version (texts in their exact batches, and the
PyTorch encoder's outputs for them), so any machine with onnxruntime can confirm that the
graphs still reproduce the trained encoder.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bertrec.errors import ArtifactError
from bertrec.repository.artifacts import PARITY_EXPECTED, PARITY_TEXTS, TOKENIZER
from bertrec.repository.manifest import (
    EncoderVariant,
    Manifest,
    Parity,
    read_manifest,
    verify_files,
)
from bertrec.text import TextTokenizer

log = logging.getLogger(__name__)

FP32_MAX_ABS_ERR = 1e-4  # ONNX fp32 vs PyTorch, on the encoder's output
INT8_COSINE_SLACK = 0.01  # how far an int8 graph's mean cosine may fall below the recorded one
PARITY_N_TEXTS = 48
PARITY_BATCH_SIZE = 16
PARITY_POOL = 4096  # item texts sampled before picking the parity texts by length


@dataclass(frozen=True)
class ParityFixture:
    """Texts grouped exactly as they were run (padding per batch) and the expected outputs."""

    max_seq_len: int
    batches: list[list[str]]
    expected: np.ndarray  # float32 (sum of batch sizes, dim)

    @property
    def n_texts(self) -> int:
        return sum(len(b) for b in self.batches)

    def save(self, directory: Path) -> None:
        payload = {"max_seq_len": self.max_seq_len, "batches": self.batches}
        text = json.dumps(payload, ensure_ascii=False, indent=1)
        (directory / PARITY_TEXTS).write_text(text, encoding="utf-8")
        expected = np.ascontiguousarray(self.expected, dtype=np.float32)
        np.save(directory / PARITY_EXPECTED, expected, allow_pickle=False)

    @staticmethod
    def load(directory: Path) -> ParityFixture:
        try:
            raw = json.loads((directory / PARITY_TEXTS).read_text(encoding="utf-8"))
            expected = np.load(directory / PARITY_EXPECTED, allow_pickle=False)
            fixture = ParityFixture(int(raw["max_seq_len"]), raw["batches"], expected)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{directory}: unreadable parity fixture ({exc})") from exc
        if fixture.n_texts != len(expected):
            raise ArtifactError(
                f"{directory}: parity fixture has {fixture.n_texts} texts but "
                f"{len(expected)} expected rows"
            )
        return fixture


def select_parity_batches(
    tokenizer: TextTokenizer,
    texts: list[str],
    n_texts: int = PARITY_N_TEXTS,
    batch_size: int = PARITY_BATCH_SIZE,
    seed: int = 0,
) -> list[list[str]]:
    """Real texts spanning the length range, batched the ways the server will batch them.

    The first batch is one text at the full `max_seq_len` (built from item texts when none
    is that long), the second the shortest text alone, the rest mixed lengths padded per batch.

    Raises:
        ArtifactError: there is no non-empty text.
    """
    unique = list(dict.fromkeys(t for t in texts if t.strip()))
    if not unique:
        raise ArtifactError("no item texts to check ONNX parity on")
    rng = np.random.default_rng(seed)
    if len(unique) > PARITY_POOL:  # tokenising a whole large catalogue would take minutes
        unique = [unique[i] for i in np.sort(rng.choice(len(unique), PARITY_POOL, replace=False))]
    lengths = np.asarray(tokenizer.lengths(unique))
    order = np.argsort(lengths, kind="stable")
    picks = np.unique(np.linspace(0, len(unique) - 1, min(n_texts, len(unique))).round())
    chosen = [unique[i] for i in order[picks.astype(int)]]
    longest = chosen.pop()
    if int(lengths.max()) < tokenizer.max_length:
        longest = _full_length_text(tokenizer, [*chosen, longest])
    shortest = chosen.pop(0) if chosen else longest
    rest = [chosen[i] for i in rng.permutation(len(chosen))]
    mixed = [rest[i : i + batch_size] for i in range(0, len(rest), batch_size)]
    return [[longest], [shortest], *mixed]


def _full_length_text(tokenizer: TextTokenizer, texts: list[str]) -> str:
    joined = " ".join(texts)
    while tokenizer.lengths([joined])[0] < tokenizer.max_length and len(joined) < 1 << 20:
        joined = f"{joined} {joined}"
    return joined


def measure_parity(actual: np.ndarray, expected: np.ndarray) -> Parity:
    """Max absolute error and per-row cosine of `actual` against `expected` (both (n, dim))."""
    if actual.shape != expected.shape:
        raise ArtifactError(f"encoder output shape {actual.shape}, expected {expected.shape}")
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(e, axis=1)
    cosine = (a * e).sum(axis=1) / np.maximum(norms, 1e-12)
    return Parity(
        max_abs_err=float(np.abs(a - e).max(initial=0.0)),
        cos_mean=float(cosine.mean()),
        cos_min=float(cosine.min()),
        n_texts=len(a),
    )


def open_session(path: Path) -> Any:
    """An ONNX Runtime CPU session with full graph optimisation, as the server runs it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # the quantiser's graphs make ORT chatty about shapes
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path: Path, tokenizer: TextTokenizer, batches: list[list[str]]) -> np.ndarray:
    """The graph's outputs for `batches`, each padded to its own longest text, stacked."""
    session = open_session(path)
    wanted = {i.name for i in session.get_inputs()}
    outputs = []
    for batch in batches:
        feed = {k: v for k, v in tokenizer(batch).as_feed().items() if k in wanted}
        outputs.append(np.asarray(session.run(None, feed)[0], dtype=np.float32))
    return np.concatenate(outputs)


def parity_problem(variant: EncoderVariant, measured: Parity) -> str | None:
    """Why `measured` is not good enough for `variant`, or None when it is."""
    if variant.precision == "fp32" and measured.max_abs_err > FP32_MAX_ABS_ERR:
        return (
            f"{variant.file}: max abs error {measured.max_abs_err:.2e} vs PyTorch exceeds "
            f"{FP32_MAX_ABS_ERR:.0e}"
        )
    floor = variant.parity.cos_mean - INT8_COSINE_SLACK
    if variant.precision == "int8" and measured.cos_mean < floor:
        return (
            f"{variant.file}: mean cosine {measured.cos_mean:.4f} vs PyTorch, recorded at "
            f"export {variant.parity.cos_mean:.4f}"
        )
    return None


@dataclass
class VerifyReport:
    version_dir: Path
    manifest: Manifest
    files_checked: int = 0
    parity: list[tuple[EncoderVariant, Parity]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_version(version_dir: Path) -> VerifyReport:
    """Check hashes, then (with onnxruntime installed) every encoder variant's parity.

    Returns:
        A report; `report.ok` is False when a file or a graph failed its check.
    Raises:
        ArtifactError: no readable manifest, so nothing can be checked.
    """
    report = VerifyReport(version_dir, read_manifest(version_dir))
    try:
        verify_files(version_dir, report.manifest)
    except ArtifactError as exc:
        report.problems.append(str(exc))
        return report
    report.files_checked = len(report.manifest.files)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        report.notes.append("onnxruntime is not installed: ONNX parity not checked")
        return report
    try:
        fixture = ParityFixture.load(version_dir)
    except ArtifactError as exc:
        report.problems.append(str(exc))
        return report
    tokenizer = TextTokenizer.from_file(version_dir / TOKENIZER, fixture.max_seq_len)
    for variant in report.manifest.encoder.variants:
        try:
            actual = run_onnx(version_dir / variant.file, tokenizer, fixture.batches)
            measured = measure_parity(actual, fixture.expected)
        except Exception as exc:  # an ORT load/run failure is this variant's verdict, not a crash
            report.problems.append(f"{variant.file}: ONNX Runtime could not run it ({exc})")
            continue
        report.parity.append((variant, measured))
        problem = parity_problem(variant, measured)
        if problem:
            report.problems.append(problem)
    return report
