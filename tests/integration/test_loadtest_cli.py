"""`bertrec loadtest` end to end against the real test server: JSON report, PNG plots, the
pass/fail exit status, a server that cannot be reached, and a machine without matplotlib."""

from __future__ import annotations

import json
import socket
import struct
import sys
import time
from pathlib import Path

import pytest
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


def _short_run(target: str, *flags: str) -> list[str]:
    return ["loadtest", "--target", target, "--concurrency", "2", "--duration-s", "0.5",
            "--warmup-s", "0", "--quiet", *flags]  # fmt: skip


def test_a_run_whose_calls_fail_exits_1_with_the_reason(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "failing.json"
    code = main(_short_run(server.target, "--user-ids", "ghost-1,ghost-2", "--out", str(out)))
    assert code == 1
    printed = capsys.readouterr().out
    assert "verdict: FAIL (errors <= 1.00%)" in printed
    assert "calls failed (100.00% > 1.00%: NOT_FOUND" in printed
    verdict = json.loads(out.read_text())["verdict"]
    assert verdict["passed"] is False and "NOT_FOUND" in verdict["reasons"][0]


def test_a_p99_threshold_fails_a_run_that_is_too_slow(
    server: ServerProcess, ref: Reference, capsys: pytest.CaptureFixture[str]
) -> None:
    users = ",".join(ref.user_ids[:3])
    assert main(_short_run(server.target, "--user-ids", users, "--max-p99-ms", "1e6")) == 0
    assert "verdict: PASS (errors <= 1.00%, p99 <= 1e+06 ms)" in capsys.readouterr().out
    assert main(_short_run(server.target, "--user-ids", users, "--max-p99-ms", "0.001")) == 1
    assert "ms > 0.001 ms" in capsys.readouterr().out


def test_a_closed_port_fails_at_once_with_connection_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{sock.getsockname()[1]}"
    start = time.monotonic()
    code = main(_short_run(target, "--user-ids", "u1", "--ready-timeout-s", "600"))
    # Not a speed test: a loadtest that waited for readiness would take the whole 600 s.
    assert time.monotonic() - start < 60
    assert code == 2
    err = capsys.readouterr().err
    assert f"cannot connect to {target}: connection refused" in err
    assert "DEADLINE_EXCEEDED" not in err


def test_without_matplotlib_the_json_is_written_and_plots_are_skipped(
    server: ServerProcess,
    ref: Reference,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "report.json"
    users = ",".join(ref.user_ids[:3])
    assert main(_short_run(server.target, "--user-ids", users, "--out", str(out))) == 0
    assert json.loads(out.read_text())["verdict"]["passed"] is True
    assert not list(tmp_path.glob("*.png"))
    assert "plots skipped, matplotlib is not installed" in capsys.readouterr().err

    asked = tmp_path / "plots"
    assert main(_short_run(server.target, "--user-ids", users, "--plots", str(asked))) == 2
    assert "--plots needs matplotlib" in capsys.readouterr().err
    assert not asked.exists()
