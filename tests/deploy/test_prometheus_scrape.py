"""A real Prometheus scrapes a real bertrec server; the committed rules and dashboard queries
are run against what it collected.

The server is the integration tests' (server_harness, the tiny exported model); Prometheus is
the Debian package's binary on loopback with the committed prometheus.yml, changed only in its
target, its 1 s intervals and the rules path. Every wait is a poll with a deadline.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import DEPLOY, tool
from server_harness import SHARED_FLAGS, ServerProcess, start_server

from bertrec.client import RecommenderClient, RecommenderError, RetryPolicy

# Each call is counted once: the server's error ratio is what this traffic makes it.
NO_RETRY = RetryPolicy(max_attempts=1)
JOB = "bertrec"
USERS = ("u0001", "u0002", "u0003", "u0004", "u0005")
TEN_TEXTS = [f"text {i}" for i in range(10)]  # > the shared server's encoder queue of 8
# Known traffic, sent once Prometheus has scraped every series at least twice.
N_OK, N_NOT_FOUND, N_EXHAUSTED = 20, 5, 5
ERROR_RATIO = N_EXHAUSTED / (N_OK + N_NOT_FOUND + N_EXHAUSTED)  # NOT_FOUND is not an error
# rate() extrapolates each series to the window edges, and its "counter started at zero"
# heuristic shortens that per series, so ratios of rates are close, not exact.
RATIO_TOLERANCE = 0.15
BUSY_METHODS = ("Recommend", "EmbedText")  # the methods the known traffic calls
Series = list[dict[str, Any]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def poll(what: str, check: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=5) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> Series:
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]

    def values(self, expr: str, by: str) -> dict[str, float]:
        return {s["metric"].get(by, ""): float(s["value"][1]) for s in self.query(expr)}


@pytest.fixture(scope="module")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(model_repo, tmp_path_factory.mktemp("logs"), *SHARED_FLAGS)
    try:
        proc.wait_serving()
        yield proc
    finally:
        proc.terminate()


@pytest.fixture(scope="module")
def prometheus(
    server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    binary = tool("prometheus")
    # Every series the known traffic touches exists before the first scrape, so all samples
    # of one rate() window share timestamps and the ratios below are exact up to extrapolation.
    with RecommenderClient(server.target, timeout_s=10.0, retry=NO_RETRY) as client:
        client.recommend(USERS[0], k=5)
        with pytest.raises(RecommenderError):
            client.recommend("ghost", k=5)
        with pytest.raises(RecommenderError):
            client.embed_text(TEN_TEXTS)
        client.recommend_for_text("space battles with robots", k=3)
        client.similar_items(client.recommend(USERS[1], k=1).item_ids[0], k=3)
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    config["rule_files"] = [str(DEPLOY / "prometheus" / "rules" / "bertrec.rules.yml")]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == JOB
    job["static_configs"] = [{"targets": [f"127.0.0.1:{server.metrics_port}"]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (work / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        prom = Prometheus(f"http://127.0.0.1:{port}")
        poll("Prometheus to be ready", lambda: proc.poll() is None and _ready(prom.url))
        poll(
            "two scrapes",
            lambda: prom.values(f'count_over_time(up{{job="{JOB}"}}[1m])', "job").get(JOB, 0) >= 2,
        )
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if sys.exc_info()[0] is not None:
            print((work / "prometheus.log").read_text()[-3000:])


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def traffic(server: ServerProcess, prometheus: Prometheus) -> Prometheus:
    """Send the known traffic; return once the rules have been evaluated on all of it."""
    with RecommenderClient(server.target, timeout_s=10.0, retry=NO_RETRY) as client:
        for i in range(N_OK):
            client.recommend(USERS[i % len(USERS)], k=5)
        for _ in range(N_NOT_FOUND):
            with pytest.raises(RecommenderError, match="NOT_FOUND"):
                client.recommend("ghost", k=5)
        for _ in range(N_EXHAUSTED):
            with pytest.raises(RecommenderError, match="RESOURCE_EXHAUSTED"):
                client.embed_text(TEN_TEXTS)
    ok = f'grpc_server_handled_total{{job="{JOB}",grpc_method="Recommend",grpc_code="OK"}}'
    poll("the last calls to be scraped", lambda: prometheus.values(ok, "job").get(JOB) == N_OK + 2)
    scraped_at = time.time()
    poll(
        "the rules to be evaluated after that scrape",
        lambda: (
            prometheus.values("timestamp(bertrec:grpc_error_ratio:rate5m)", "job").get(JOB, 0)
            > scraped_at + 1
        ),
    )
    return prometheus


def test_target_is_up_with_the_jobs_labels(traffic: Prometheus) -> None:
    (up,) = traffic.query(f'up{{job="{JOB}"}}')
    assert up["value"][1] == "1"


def test_every_rule_evaluates_without_error(traffic: Prometheus) -> None:
    groups = traffic.get("/api/v1/rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == 10
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
    alerts = {r["name"]: r["state"] for r in rules if r["type"] == "alerting"}
    # 1 in 6 calls failed: the error alert is pending (it fires after 5 minutes); nothing else.
    assert alerts == {
        "BertrecHighErrorRatio": "pending",
        "BertrecLatencyP99OverSLO": "inactive",
        "BertrecNotReady": "inactive",
        "BertrecNoTraffic": "inactive",
        "BertrecModelVersionMismatch": "inactive",
    }


def test_recording_rules(traffic: Prometheus) -> None:
    ratio = traffic.values("bertrec:grpc_error_ratio:rate5m", "job")
    assert ratio[JOB] == pytest.approx(ERROR_RATIO, rel=RATIO_TOLERANCE)
    errors = traffic.values("bertrec:grpc_errors:rate5m > 0", "grpc_method")
    assert set(errors) == {"EmbedText"}
    requests = traffic.values("bertrec:grpc_requests:rate5m", "grpc_method")
    assert requests["Recommend"] / requests["EmbedText"] == pytest.approx(
        (N_OK + N_NOT_FOUND) / N_EXHAUSTED, rel=RATIO_TOLERANCE
    )
    for quantile in ("p50", "p99"):
        latency = traffic.values(f"bertrec:grpc_latency_seconds:{quantile}_rate5m", "grpc_method")
        assert 0 < latency["Recommend"] < 1.0, latency
        assert set(latency) >= {"Recommend", "EmbedText"}


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "bertrec.json").read_text())
    return [
        (f"{p['title']} [{t['refId']}]", t["expr"])
        for p in dashboard["panels"]
        for t in p.get("targets", ())  # rows have none
    ]


def grafana_to_promql(expr: str) -> str:
    # The dashboard's only variables; Grafana's $__rate_interval becomes the rules' window.
    return expr.replace("$__rate_interval", "5m").replace("$job", JOB)


@pytest.mark.parametrize(
    "title, expr", dashboard_queries(), ids=[t for t, _ in dashboard_queries()]
)
def test_dashboard_query(traffic: Prometheus, title: str, expr: str) -> None:
    result = traffic.query(grafana_to_promql(expr))
    assert result, f"{title}: no series for {expr}"
    labels = [s["metric"] for s in result]
    values = [float(s["value"][1]) for s in result]
    # A quantile or mean over a window without calls is NaN: allowed only where none were sent.
    for metric, value in zip(labels, values, strict=True):
        busy = metric.get("grpc_method") in BUSY_METHODS or metric.get("batcher") == "ranker"
        assert not (busy and math.isnan(value)), (title, metric)
    name = title.split(" [")[0]
    by_method = {m.get("grpc_method"): v for m, v in zip(labels, values, strict=True)}
    by_batcher = {m.get("batcher"): v for m, v in zip(labels, values, strict=True)}
    if name == "Request rate by method":
        assert by_method["Recommend"] > 0 and by_method["EmbedText"] > 0
    elif name == "Server-side error ratio":
        assert values == [pytest.approx(ERROR_RATIO, rel=RATIO_TOLERANCE)]
    elif name.startswith("Latency"):
        assert 0 < by_method["Recommend"] < 1.0
        assert "Check" not in by_method  # health checks stay out of the latency panels
    elif name == "Batch size distribution":
        by_le = {m["le"]: v for m, v in zip(labels, values, strict=True)}
        # Calls were sent one at a time: every batch in the window had one item.
        assert by_le["1.0"] > 0 and by_le["1.0"] == pytest.approx(
            by_le["+Inf"], rel=RATIO_TOLERANCE
        )
    elif name == "Mean batch size by batcher":
        assert by_batcher["ranker"] == pytest.approx(1.0, rel=RATIO_TOLERANCE)
    elif name.startswith(("Queue wait", "Inference")):
        assert 0 < by_batcher["ranker"] < 1.0
    elif name == "In-flight requests by replica":
        assert values == [0.0]
    elif name.startswith("Rejected calls") and title.endswith("[A]"):
        # EmbedText's 10 texts overflow the 8-text encoder queue: rejected by the encoder.
        assert by_batcher["encoder"] > 0 and by_batcher["ranker"] == 0, by_batcher
    elif name.startswith("Rejected calls"):  # at admission: nothing, these calls were few
        by_reason = {m["reason"]: v for m, v in zip(labels, values, strict=True)}
        assert by_reason == {"calls": 0.0, "bytes": 0.0, "streams": 0.0}
    elif name.startswith("Dropped queued items"):
        drops = {(m["batcher"], m["reason"]): v for m, v in zip(labels, values, strict=True)}
        assert set(drops) >= {
            (b, r) for b in ("encoder", "ranker") for r in ("expired", "cancelled")
        }
        # Recommend calls were sent one at a time with long deadlines: none dropped.
        assert drops[("ranker", "expired")] == drops[("ranker", "cancelled")] == 0
    elif name == "Queue depth by batcher":
        assert set(by_batcher) >= {"encoder", "ranker", "similar"} and set(values) == {0.0}
    elif name == "Failed batches by batcher":
        assert set(values) == {0.0}
    elif name == "Auth failures by reason":
        by_reason = {m["reason"]: v for m, v in zip(labels, values, strict=True)}
        assert by_reason == dict.fromkeys(
            ("missing", "invalid_token", "malformed", "forbidden"), 0.0
        )
    elif name == "Model version":
        assert labels == [{"model": "tiny", "version": "1"}]  # one replica serving version 1
        assert values == [1.0]
    else:
        pytest.fail(f"no expectation written for panel {name!r}")


def test_prometheus_adapter_query_serves_in_flight_requests(traffic: Prometheus) -> None:
    values = yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    series = rule["seriesQuery"].split("{")[0]
    # The adapter fills these in per HPA query; outside Kubernetes, the job and instance.
    query = (
        rule["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", f'job="{JOB}"')
        .replace("<<.GroupBy>>", "instance")
    )
    assert list(traffic.values(query, "instance").values()) == [0.0]


def test_container_healthcheck_script_sees_serving(server: ServerProcess) -> None:
    script = DEPLOY / "docker" / "healthcheck.py"
    result = subprocess.run(
        [sys.executable, str(script), server.target], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    closed = subprocess.run(
        [sys.executable, str(script), f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert closed.returncode == 1 and "UNAVAILABLE" in closed.stderr
