"""`bertrec export`: turn a training output into a published, verified model version.

The TextEncoder goes to ONNX with the legacy TorchScript exporter (its graph was the fastest
under ONNX Runtime here, see PERF-NOTES), is checked against PyTorch on real item texts, and is
written with the factor arrays, tokenizer, parity fixture and manifest into a new version.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bertrec.errors import ArtifactError, BertrecError
from bertrec.export.quantize import optimize_bert_graph, quantize_int8
from bertrec.export.verify import (
    ParityFixture,
    measure_parity,
    parity_problem,
    run_onnx,
    select_parity_batches,
)
from bertrec.repository.artifacts import (
    ARRAY_FILES,
    ENCODER_INT8_ONNX,
    ENCODER_ONNX,
    ENCODER_OPTIMIZED_ONNX,
    ITEM_TEXTS,
    OPTIONAL_FILES,
    TOKENIZER,
    FactorArrays,
    load_item_texts,
)
from bertrec.repository.manifest import (
    Dims,
    EncoderInfo,
    EncoderVariant,
    Manifest,
    Scoring,
    library_versions,
    write_manifest,
)
from bertrec.repository.versions import list_versions, next_version, publish_version
from bertrec.text import TextTokenizer, TokenBatch
from bertrec.train.checkpoint import (
    ENCODER_DIR,
    FACTORS_DIR,
    PROJECTION,
    TrainInfo,
    load_encoder,
)

log = logging.getLogger(__name__)

OPSET = 17
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "embedding"


@dataclass(frozen=True)
class TrainedModel:
    """What an export reads from a training output folder."""

    info: TrainInfo
    factors_dir: Path
    factors: FactorArrays  # memory-mapped: only shapes are read here
    texts: list[str]
    encoder: Any  # TextEncoder, eval mode
    tokenizer: TextTokenizer


def export_model(
    trained: Path,
    repo: Path,
    model: str,
    version: int | None = None,
    int8: bool = True,
    optimize: bool = False,
    max_seq_len: int | None = None,
) -> Path:
    """Export a training output as a new version of `model` in `repo`.

    Args:
        trained: a `bertrec train` output folder (train/checkpoint.py layout).
        version: the version number; None takes the next one.
        int8: also write the per-channel INT8 graph.
        optimize: also write ORT's fused fp32 graph (kept only if it passes parity).
        max_seq_len: tokens per text; defaults to the training setting.
    Returns:
        The published version folder.
    Raises:
        BertrecError: bad arguments or training output; ArtifactError when the version exists
            or the ONNX graph does not reproduce PyTorch within 1e-4.
    """
    if version is not None and version in list_versions(repo, model):
        raise ArtifactError(f"{repo}/{model}/{version} exists already; versions are immutable")
    source = load_trained(trained, max_seq_len)
    number = next_version(repo, model) if version is None else version

    def build(out: Path) -> None:
        build_version(out, source, model, number, int8=int8, optimize=optimize)

    _, path = publish_version(repo, model, build, number)
    return path


def load_trained(trained: Path, max_seq_len: int | None = None) -> TrainedModel:
    """Read and cross-check a training output folder.

    Raises:
        BertrecError: the folder, a file in it, or `max_seq_len` is wrong for this model.
    """
    if not trained.is_dir():
        raise BertrecError(f"{trained}: no such training output folder")
    info = TrainInfo.load(trained)
    factors_dir, enc_dir = trained / FACTORS_DIR, trained / ENCODER_DIR
    for path in [*(factors_dir / n for n in (*ARRAY_FILES, ITEM_TEXTS)), enc_dir / PROJECTION]:
        if not path.is_file():
            raise ArtifactError(f"{path}: missing from the training output")
    factors = FactorArrays.load(factors_dir, info.global_mean, mmap=True)
    texts = load_item_texts(factors_dir / ITEM_TEXTS)
    _check_shapes(trained, info, factors, texts)
    seq_len = max_seq_len or info.max_seq_len
    encoder, tokenizer = load_encoder(trained, seq_len, info.dim)
    limit = int(encoder.bert.config.max_position_embeddings)
    if not 2 <= seq_len <= limit:
        raise BertrecError(f"max_seq_len {seq_len} is outside 2..{limit} for this encoder")
    return TrainedModel(info, factors_dir, factors, texts, encoder, tokenizer)


def _check_shapes(trained: Path, info: TrainInfo, f: FactorArrays, texts: list[str]) -> None:
    n_items = len(f.item_ids)
    problem = f.shape_mismatch(len(f.user_ids), n_items, info.dim)
    if problem is None and len(texts) != n_items:
        problem = f"item texts has shape {(len(texts),)}, expected {(n_items,)}"
    if problem is not None:
        raise ArtifactError(f"{trained}: {problem}")


def build_version(
    out: Path, source: TrainedModel, model: str, version: int, int8: bool, optimize: bool
) -> Manifest:
    """Write every file of a version into the empty folder `out`; returns its manifest."""
    optional = tuple(n for n in OPTIONAL_FILES if (source.factors_dir / n).is_file())
    for name in (*ARRAY_FILES, *optional, ITEM_TEXTS):
        shutil.copyfile(source.factors_dir / name, out / name)
    tokenizer, encoder = source.tokenizer, source.encoder
    tokenizer.save(out / TOKENIZER)  # with this export's truncation length
    batches = select_parity_batches(tokenizer, source.texts)
    fixture = ParityFixture(tokenizer.max_length, batches, torch_embed(encoder, tokenizer, batches))
    fixture.save(out)
    variants = [_fp32_variant(out, source, fixture)]
    int8_source = out / ENCODER_ONNX
    if optimize:
        optimized = _optimized_variant(out, source, fixture)
        if optimized is not None:
            variants.append(optimized)
            int8_source = out / optimized.file
    if int8:
        quantize_int8(int8_source, out / ENCODER_INT8_ONNX)
        variants.append(_measured("int8", ENCODER_INT8_ONNX, "int8", out, tokenizer, fixture))
    info = source.info
    manifest = Manifest(
        model_name=model,
        version=version,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        base_encoder=info.base_encoder,
        dims=Dims(
            info.dim,
            encoder.hidden_size,
            tokenizer.max_length,
            len(source.factors.user_ids),
            len(source.factors.item_ids),
        ),
        scoring=Scoring(
            float(info.global_mean),
            tuple(info.rating_range),
            rating_score=source.factors.rating_score,
        ),
        encoder=EncoderInfo(ENCODER_ONNX, INPUT_NAMES, OUTPUT_NAME, OPSET, tuple(variants)),
        training_metrics=dict(info.metrics),
        library_versions=library_versions(),
    )
    return write_manifest(out, manifest)


def _fp32_variant(out: Path, source: TrainedModel, fixture: ParityFixture) -> EncoderVariant:
    # Longest and shortest text: a padded batch, so the attention mask is traced as data.
    sample = source.tokenizer([fixture.batches[0][0], fixture.batches[1][0]])
    export_encoder(source.encoder, sample, out / ENCODER_ONNX)
    variant = _measured("fp32", ENCODER_ONNX, "fp32", out, source.tokenizer, fixture)
    problem = parity_problem(variant, variant.parity)
    if problem:
        raise ArtifactError(f"ONNX export does not match PyTorch: {problem}")
    return variant


def _optimized_variant(
    out: Path, source: TrainedModel, fixture: ParityFixture
) -> EncoderVariant | None:
    config = source.encoder.bert.config
    target = out / ENCODER_OPTIMIZED_ONNX
    try:
        optimize_bert_graph(
            out / ENCODER_ONNX, target, int(config.num_attention_heads), int(config.hidden_size)
        )
        variant = _measured("fp32-optimized", target.name, "fp32", out, source.tokenizer, fixture)
    except Exception as exc:  # the optimiser is optional: a failure drops the variant
        log.warning("ORT optimiser failed (%s); keeping the plain fp32 graph only", exc)
        target.unlink(missing_ok=True)
        return None
    problem = parity_problem(variant, variant.parity)
    if problem:
        log.warning("dropping the optimised graph: %s", problem)
        target.unlink()
        return None
    return variant


def _measured(
    name: str, file: str, precision: str, out: Path, tok: TextTokenizer, fixture: ParityFixture
) -> EncoderVariant:
    parity = measure_parity(run_onnx(out / file, tok, fixture.batches), fixture.expected)
    log.info(
        "%s (%s): max abs err %.3g, cosine mean %.5f min %.5f",
        name,
        file,
        parity.max_abs_err,
        parity.cos_mean,
        parity.cos_min,
    )
    return EncoderVariant(name, file, precision, parity)


def export_encoder(encoder: Any, sample: TokenBatch, path: Path, opset: int = OPSET) -> None:
    """Trace `encoder` on `sample` and write an ONNX graph with dynamic batch and sequence.

    `sample` should be a padded batch of two or more texts, so the attention mask is traced
    as data rather than folded away. Raises onnx's ValidationError for an invalid graph.
    """
    import onnx

    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    dynamic_axes[OUTPUT_NAME] = {0: "batch"}
    with torch.no_grad(), warnings.catch_warnings():
        # The legacy exporter is deprecated and the tracer warns about shape checks that are
        # constant for our inputs; the parity check is what proves the graph right.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", "Exporting aten::index operator", UserWarning)
        torch.onnx.export(
            encoder.eval(),
            _as_tensors(sample),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    onnx.checker.check_model(str(path), full_check=True)


def torch_embed(encoder: Any, tokenizer: TextTokenizer, batches: list[list[str]]) -> np.ndarray:
    """PyTorch encoder outputs for `batches`, each padded to its own longest text, stacked."""
    with torch.inference_mode():
        rows = [encoder(*_as_tensors(tokenizer(batch))).float().numpy() for batch in batches]
    return np.concatenate(rows).astype(np.float32)


def _as_tensors(batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.from_numpy(batch.input_ids),
        torch.from_numpy(batch.attention_mask),
        torch.from_numpy(batch.token_type_ids),
    )
