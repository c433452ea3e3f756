"""`bertrec loadtest` end to end against the real test server: JSON report and PNG plots."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from server_harness import MODEL, Reference, ServerProcess

from bertrec.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", path
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100
    assert data.endswith(b"IEND\xaeB`\x82")


def test_closed_loop_mix_from_the_model_folder(
    server: ServerProcess, model_repo: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report.json"
    code = main([
        "loadtest", "--target", server.target, "--model-repo", str(model_repo), "--model", MODEL,
        "--mix", "recommend=8,recommend_for_text=1,similar_items=1,score_items=1",
        "--concurrency", "4", "--duration-s", "2", "--warmup-s", "0.5", "--out", str(out),
        "--quiet",
    ])  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert report["inputs_source"].startswith("model version folder")
    (step,) = report["steps"]
    summary = step["summary"]
    assert summary["requests"] > 0 and summary["ok"] == summary["requests"]
    assert summary["errors"] == {}
    assert set(step["per_rpc"]) <= {"recommend", "recommend_for_text", "similar_items",
                                     "score_items"}  # fmt: skip
    assert step["per_rpc"]["recommend"]["ok"] > 0
    assert summary["latency"]["percentiles_ms"]["p99"] > 0
    for name in ("latency_over_time.png", "latency_cdf.png"):
        _assert_png(tmp_path / name)


def test_open_loop_sweep_with_ids_from_flags_and_the_server(
    server: ServerProcess, ref: Reference, tmp_path: Path
) -> None:
    out = tmp_path / "sweep.json"
    code = main([
        "loadtest", "--target", server.target, "--user-ids", ",".join(ref.user_ids[:5]),
        "--mix", "recommend=3,similar_items=1", "--sweep-rates", "20,40",
        "--duration-s", "0.8", "--warmup-s", "0.2", "--out", str(out), "--quiet",
    ])  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert "discovered from RecommendForText" in report["inputs_source"]
    assert [s["rate_rps"] for s in report["steps"]] == [20.0, 40.0]
    for step in report["steps"]:
        assert step["summary"]["ok"] > 0 and step["summary"]["errors"] == {}
    _assert_png(tmp_path / "throughput_latency.png")
