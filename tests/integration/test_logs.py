"""Structured logs on the real server: `--log-format json` writes one JSON object per line
(replacing the CLI's text format), `--log-level` filters, and `--access-log` writes one line per
call with method, code, duration, peer, request id and principal; never the caller's text,
ids or token."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_harness import serving

from bertrec.server.auth import hash_token
from bertrec.server.metrics import code_label
from bertrec.v1 import recommender_pb2 as pb
from bertrec.v1 import recommender_pb2_grpc as pb_grpc

SECRET_TEXT = "zanzibar marmalade confession"  # user text: must never reach the log
SERVICE = "/bertrec.v1.RecommenderService/"


def auth_file(path: Path, token: str) -> Path:
    path.write_text(
        f'[[token]]\nname = "web-frontend"\nsha256 = "{hash_token(token)}"\nroles = ["read"]\n'
    )
    return path


def parsed(stderr: str) -> list[dict[str, Any]]:
    """Every line of the server's stderr as JSON (a line that is not JSON fails the test)."""
    lines = []
    for line in stderr.splitlines():
        if not line.strip():
            continue
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON log line: {line!r}") from None
    return lines


def test_json_logs_and_access_log(model_repo: Path, version_dir: Path, tmp_path: Path) -> None:
    token = secrets.token_urlsafe(32)
    flags = ("--log-format", "json", "--access-log", "--auth-file",
             str(auth_file(tmp_path / "auth.toml", token)))  # fmt: skip
    user_id = str(np.load(version_dir / "user_ids.npy")[0])
    bearer = ("authorization", f"Bearer {token}")
    with serving(model_repo, tmp_path / "logs", *flags) as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            text = pb.RecommendForTextRequest(text=SECRET_TEXT, k=2)
            _, call = stub.RecommendForText.with_call(
                text, timeout=10, metadata=[bearer, ("x-request-id", "req-text-1")]
            )
            assert dict(call.trailing_metadata())["x-request-id"] == "req-text-1"
            recommend = pb.RecommendRequest(user_id=user_id, k=2)
            stub.Recommend(recommend, timeout=10, metadata=[bearer])
            with pytest.raises(grpc.RpcError) as refused:
                stub.Recommend(
                    recommend, timeout=10, metadata=[("authorization", f"Bearer {token}x")]
                )
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert server.terminate() == 0
        stderr = server.stderr()
    lines = parsed(stderr)
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line), line
        assert line["level"] in ("INFO", "WARNING", "ERROR")  # --log-level info: no DEBUG
    messages = [line["message"] for line in lines]
    assert any(m.startswith("serving tiny version 1") for m in messages), messages
    assert "stopped" in messages
    access = [line for line in lines if line["logger"] == "bertrec.access"]
    ours = [line for line in access if line["method"].startswith(SERVICE)]
    assert [(a["method"], a["code"]) for a in ours] == [
        (SERVICE + "RecommendForText", "OK"),
        (SERVICE + "Recommend", "OK"),
        (SERVICE + "Recommend", code_label(grpc.StatusCode.UNAUTHENTICATED)),
    ]
    assert ours[0]["request_id"] == "req-text-1"
    assert ours[1]["request_id"] != ours[2]["request_id"]  # made by the server when not sent
    for line in ours:
        assert line["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:")), line
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    assert [line.get("principal") for line in ours] == ["web-frontend", "web-frontend", None]
    health = [line for line in access if line["method"] == "/grpc.health.v1.Health/Check"]
    assert health and all(line["code"] == "OK" for line in health)
    assert SECRET_TEXT not in stderr and "zanzibar" not in stderr
    assert token not in stderr and hash_token(token) not in stderr
    assert all(user_id not in json.dumps(line) for line in access)
