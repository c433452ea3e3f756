"""`bertrec export` / `bertrec verify`: ONNX graph, parity, INT8, manifest, integrity, CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fakes import make_trained_output

from bertrec.cli import main
from bertrec.errors import ArtifactError
from bertrec.export.onnx_export import export_model, torch_embed
from bertrec.export.verify import (
    ParityFixture,
    measure_parity,
    parity_problem,
    verify_version,
)
from bertrec.repository.artifacts import (
    ARRAY_FILES,
    ENCODER_INT8_ONNX,
    ENCODER_ONNX,
    ENCODER_OPTIMIZED_ONNX,
    ITEM_FACTORS,
    MANIFEST,
    PARITY_EXPECTED,
    PARITY_TEXTS,
    RANKING_SCORE,
    TOKENIZER,
    USER_IDS,
)
from bertrec.repository.manifest import (
    EncoderVariant,
    Parity,
    read_manifest,
    verify_files,
)
from bertrec.repository.versions import list_versions
from bertrec.text import TextTokenizer
from bertrec.train.checkpoint import load_encoder, load_item_texts

DIM = 16


@pytest.fixture(scope="module")
def trained(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_trained_output(tmp_path_factory.mktemp("trained"), tiny_bert_dir, dim=DIM)


@pytest.fixture(scope="module")
def version_dir(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    return export_model(trained, repo, "books", int8=True, optimize=True)


@pytest.fixture
def copied_version(version_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the exported version that a test may damage."""
    return Path(shutil.copytree(version_dir, tmp_path / "books" / "1"))


def embed_onnx(path: Path, tokenizer: TextTokenizer, texts: list[str]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["embedding"], tokenizer(texts).as_feed())[0])


# --- the ONNX graph ------------------------------------------------------------------------


def test_exported_graph_passes_the_checker_with_dynamic_int64_inputs(version_dir: Path) -> None:
    model = onnx.load(str(version_dir / ENCODER_ONNX))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    assert sorted(inputs) == ["attention_mask", "input_ids", "token_type_ids"]
    for tensor in inputs.values():
        assert tensor.elem_type == onnx.TensorProto.INT64
        assert all(d.dim_param for d in tensor.shape.dim)  # batch and sequence are symbolic
    (output,) = model.graph.output
    assert output.name == "embedding"
    assert output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    batch, dim = output.type.tensor_type.shape.dim
    assert batch.dim_param and dim.dim_value == DIM


def test_onnx_matches_torch_on_texts_of_varied_length(trained: Path, version_dir: Path) -> None:
    encoder, tokenizer = load_encoder(trained, max_seq_len=64, dim=DIM)
    texts = load_item_texts(trained / "factors" / "item_texts.jsonl")
    by_length = sorted(texts, key=lambda t: tokenizer.lengths([t])[0])
    batches = [[by_length[0]], [by_length[-1]], by_length[: len(texts) // 2 : 4], texts]
    assert len({tokenizer(b).input_ids.shape[1] for b in batches}) >= 3  # really varied widths
    assert tokenizer([by_length[-1]]).input_ids.shape[1] == 64  # a truncated text is included
    for batch in batches:
        actual = embed_onnx(version_dir / ENCODER_ONNX, tokenizer, batch)
        expected = torch_embed(encoder, tokenizer, [batch])
        assert actual.shape == (len(batch), DIM)
        assert np.abs(actual - expected).max() <= 1e-4


def test_parity_fixture_holds_real_texts_in_single_and_mixed_batches(
    trained: Path, version_dir: Path
) -> None:
    fixture = ParityFixture.load(version_dir)
    tokenizer = TextTokenizer.from_file(version_dir / TOKENIZER, fixture.max_seq_len)
    assert [len(b) for b in fixture.batches[:2]] == [1, 1]
    assert tokenizer.lengths(fixture.batches[0]) == [fixture.max_seq_len]
    assert any(len(set(tokenizer.lengths(b))) > 1 for b in fixture.batches[2:])
    items = set(load_item_texts(version_dir / "item_texts.jsonl"))
    assert all(t in items for b in fixture.batches[1:] for t in b)
    assert fixture.expected.shape == (fixture.n_texts, DIM)
    encoder, _ = load_encoder(trained, max_seq_len=fixture.max_seq_len, dim=DIM)
    recomputed = torch_embed(encoder, tokenizer, fixture.batches)
    np.testing.assert_allclose(recomputed, fixture.expected, atol=1e-6)


def test_variants_are_recorded_with_measured_parity(version_dir: Path) -> None:
    variants = {v.name: v for v in read_manifest(version_dir).encoder.variants}
    assert sorted(variants) == ["fp32", "fp32-optimized", "int8"]
    assert variants["fp32"].file == ENCODER_ONNX
    assert variants["fp32-optimized"].file == ENCODER_OPTIMIZED_ONNX
    for name in ("fp32", "fp32-optimized"):
        assert variants[name].parity.max_abs_err <= 1e-4
    int8 = variants["int8"]
    assert int8.file == ENCODER_INT8_ONNX and (version_dir / ENCODER_INT8_ONNX).is_file()
    assert 0.5 < int8.parity.cos_min <= int8.parity.cos_mean <= 1.0
    assert int8.parity.max_abs_err > 0  # really quantised, not a copy of fp32
    fp32_size = (version_dir / ENCODER_ONNX).stat().st_size
    assert (version_dir / ENCODER_INT8_ONNX).stat().st_size < fp32_size / 2


def test_export_fails_when_onnx_disagrees_with_torch(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bertrec.export.onnx_export as onnx_export

    real = onnx_export.torch_embed
    monkeypatch.setattr(onnx_export, "torch_embed", lambda *a: real(*a) + np.float32(3e-4))
    with pytest.raises(ArtifactError, match=r"max abs error 3\.\d+e-04 vs PyTorch exceeds 1e-04"):
        export_model(trained, tmp_path, "books", int8=False)
    assert list_versions(tmp_path, "books") == []


# --- the manifest and file integrity ------------------------------------------------------


def test_manifest_lists_every_file_with_its_sha256(version_dir: Path) -> None:
    manifest = read_manifest(version_dir)
    on_disk = {p.name for p in version_dir.iterdir()} - {MANIFEST}
    assert set(manifest.files) == on_disk
    assert {*ARRAY_FILES, TOKENIZER, PARITY_TEXTS, PARITY_EXPECTED} <= on_disk
    for name, entry in manifest.files.items():
        data = (version_dir / name).read_bytes()
        assert entry.sha256 == hashlib.sha256(data).hexdigest(), name
        assert entry.bytes == len(data)


def test_manifest_describes_the_model(trained: Path, version_dir: Path) -> None:
    manifest = read_manifest(version_dir)
    assert (manifest.model_name, manifest.version, manifest.schema_version) == ("books", 1, 1)
    assert datetime.fromisoformat(manifest.created_at).utcoffset() == timedelta(0)
    dims = manifest.dims
    assert (dims.factor_dim, dims.text_hidden_size, dims.max_seq_len) == (DIM, 32, 64)
    assert (dims.n_users, dims.n_items) == (40, 60)
    assert manifest.scoring.ranking_score == RANKING_SCORE
    assert manifest.scoring.recommend_order == "ranking"
    assert manifest.scoring.rating_range == (1.0, 5.0)
    train_info = json.loads((trained / "train_info.json").read_text())
    assert manifest.scoring.global_mean == pytest.approx(train_info["global_mean"])
    assert manifest.training_metrics == train_info["metrics"]
    assert manifest.encoder.input_names == ("input_ids", "attention_mask", "token_type_ids")
    assert manifest.encoder.output_name == "embedding"
    libraries = {"bertrec", "torch", "transformers", "onnx", "onnxruntime", "numpy", "tokenizers"}
    assert libraries <= set(manifest.library_versions)


def test_every_array_memory_maps_with_its_recorded_shape(version_dir: Path) -> None:
    manifest = read_manifest(version_dir)
    npy = sorted(p for p in version_dir.iterdir() if p.suffix == ".npy")
    assert len(npy) == len(ARRAY_FILES) + 1  # + the parity outputs
    for path in npy:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        assert isinstance(array, np.memmap), path.name
        entry = manifest.files[path.name]
        assert (entry.shape, entry.dtype) == (array.shape, array.dtype.str)


def test_verify_version_passes_on_a_fresh_export(version_dir: Path) -> None:
    report = verify_version(version_dir)
    assert report.ok, report.problems
    assert report.files_checked == len(report.manifest.files)
    assert [v.name for v, _ in report.parity] == ["fp32", "fp32-optimized", "int8"]
    for variant, measured in report.parity:
        assert measured.cos_mean == pytest.approx(variant.parity.cos_mean, abs=1e-3)


def test_one_corrupted_byte_is_caught_and_named(copied_version: Path) -> None:
    path = copied_version / ITEM_FACTORS
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the float data, so the file still loads
    path.write_bytes(bytes(data))
    np.load(path)
    with pytest.raises(ArtifactError, match=f"{ITEM_FACTORS}.*SHA-256"):
        verify_files(copied_version, read_manifest(copied_version))
    report = verify_version(copied_version)
    assert not report.ok and ITEM_FACTORS in report.problems[0]


def test_a_truncated_file_is_caught_and_named(copied_version: Path) -> None:
    path = copied_version / USER_IDS
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ArtifactError, match=f"{USER_IDS}.*bytes"):
        verify_files(copied_version, read_manifest(copied_version))


def test_a_missing_file_is_caught_and_named(copied_version: Path) -> None:
    (copied_version / ENCODER_INT8_ONNX).unlink()
    with pytest.raises(ArtifactError, match=f"{ENCODER_INT8_ONNX}: missing"):
        verify_files(copied_version, read_manifest(copied_version))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.unlink(), "no manifest.json"),
        (lambda p: p.write_text("{ not json"), "unreadable manifest"),
        (lambda p: p.write_text(json.dumps({"schema_version": 2})), "schema_version 2"),
        (
            lambda p: p.write_text(json.dumps({"schema_version": 1})),
            "dims is missing or not an object",
        ),
    ],
)
def test_bad_manifests_are_clear_errors(
    copied_version: Path, damage: Callable[[Path], object], message: str
) -> None:
    damage(copied_version / MANIFEST)
    with pytest.raises(ArtifactError, match=message):
        read_manifest(copied_version)


def test_verify_without_onnxruntime_still_checks_hashes(
    version_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes the import fail
    report = verify_version(version_dir)
    assert report.ok and report.files_checked and not report.parity
    assert "not installed" in report.notes[0]


def test_parity_rules() -> None:
    rows = np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    assert measure_parity(rows, rows) == Parity(0.0, 1.0, 1.0, 2)
    tilted = measure_parity(np.array([[1.0, 1.0], [0.0, 2.0]], np.float32), rows)
    assert tilted.cos_min == pytest.approx(2**-0.5) and tilted.max_abs_err == 1.0
    fp32 = EncoderVariant("fp32", "e.onnx", "fp32", Parity(0, 1, 1, 2))
    assert parity_problem(fp32, Parity(0.9e-4, 1, 1, 2)) is None
    assert "exceeds" in (parity_problem(fp32, Parity(1.1e-4, 1, 1, 2)) or "")
    int8 = EncoderVariant("int8", "q.onnx", "int8", Parity(0.1, 0.99, 0.97, 2))
    assert parity_problem(int8, Parity(0.2, 0.985, 0.9, 2)) is None
    assert "recorded at export" in (parity_problem(int8, Parity(0.2, 0.97, 0.9, 2)) or "")


# --- versions: never overwritten, never half-written ----------------------------------------


def test_export_never_overwrites_a_version(trained: Path, version_dir: Path) -> None:
    repo = version_dir.parent.parent
    before = (version_dir / MANIFEST).read_bytes()
    with pytest.raises(ArtifactError, match="exists already"):
        export_model(trained, repo, "books", version=1)
    assert (version_dir / MANIFEST).read_bytes() == before


def test_an_interrupted_export_leaves_no_version_and_no_temp_folder(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bertrec.export.onnx_export as onnx_export

    def crash(source: Path, target: Path) -> None:
        target.write_bytes(b"partial")
        raise RuntimeError("killed while quantising")

    monkeypatch.setattr(onnx_export, "quantize_int8", crash)
    with pytest.raises(RuntimeError, match="killed"):
        export_model(trained, tmp_path, "books", int8=True)
    assert list((tmp_path / "books").iterdir()) == []


# --- the command line ------------------------------------------------------------------------


def test_cli_export_then_verify(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = str(tmp_path / "repo")
    assert (
        main(
            [
                "export",
                "--trained",
                str(trained),
                "--repo",
                repo,
                "--model",
                "m",
                "--no-int8",
                "--max-seq-len",
                "32",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"published {tmp_path / 'repo' / 'm' / '1'}" in out and "max abs err" in out
    manifest = read_manifest(tmp_path / "repo" / "m" / "1")
    assert manifest.dims.max_seq_len == 32 and manifest.encoder.variant("int8") is None

    assert main(["verify", "--repo", repo, "--model", "m"]) == 0
    assert "OK" in capsys.readouterr().out

    path = tmp_path / "repo" / "m" / "1" / ITEM_FACTORS
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")
    assert main(["verify", "--repo", repo, "--model", "m", "--version", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and ITEM_FACTORS in out


def test_cli_user_errors_exit_2_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-training-output"
    repo = str(tmp_path / "repo")
    assert main(["export", "--trained", str(missing), "--repo", repo, "--model", "m"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err
    assert main(["verify", "--repo", repo, "--model", "m"]) == 2
    err = capsys.readouterr().err
    assert "no versions of model 'm'" in err and "Traceback" not in err


def test_torch_is_not_imported_by_the_serving_modules() -> None:
    import subprocess

    code = (
        "import sys; import bertrec.repository.manifest, bertrec.repository.versions, "
        "bertrec.export.verify, bertrec.export.cli; "
        "bad = {'torch', 'onnx', 'transformers', 'onnxruntime'} & set(sys.modules); "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
