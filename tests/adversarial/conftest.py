"""The adversarial suite's server: the real `bertrec serve` on loopback, one per test module.

A test module may define `SERVER_SETTINGS` (a dict of `serve` settings, e.g.
`{"max_concurrent_rpcs": 4}`) to change its server's limits; they are laid over `DEFAULTS`,
which keep the limits small (so "over the limit" is cheap to send) and the batching windows
short (so thousands of fuzzed calls stay fast). Request tables built at import read the same
`rpcs.LIMITS` the servers start with; tests read any other setting from
`AdversarialServer.settings`, never from a copy, so the two cannot drift apart.

Every server has a feedback store (SQLite in the module's own tmp folder), so RecordFeedback
and ForgetUser are attacked past their "no store" answer, and a test can read the store file
to see what an attack left in it.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_harness import MODEL, ServerProcess, start_server

from adversarial.rpcs import LIMITS, MAX_REQUEST_BYTES

Settings = Mapping[str, int | str]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]  # (name, labels) -> value
DEFAULTS: Settings = {
    **LIMITS,
    "max_request_bytes": MAX_REQUEST_BYTES,
    "encoder_max_batch_size": 16,
    "encoder_max_queue_size": 64,
    "encoder_max_queue_delay_us": 2000,
    "ranker_max_queue_delay_us": 2000,
    "grpc_max_workers": 16,
    "max_concurrent_rpcs": 64,
}


@dataclass(frozen=True)
class AdversarialServer:
    """A running server, where to reach it, and the settings it was started with."""

    process: ServerProcess
    settings: Settings
    model: str = MODEL

    @property
    def target(self) -> str:
        return self.process.target

    def log(self) -> str:
        """The server's stderr so far (its log)."""
        return self.process.stderr()

    @property
    def feedback_db(self) -> Path:
        """The SQLite file of the server's feedback store."""
        url = str(self.settings["feedback_store"])
        assert url.startswith("sqlite://"), url
        return Path(url.removeprefix("sqlite://"))

    def samples(self) -> Samples:
        """Every sample the server's /metrics shows now."""
        return scrape(self.process.metrics_url)


def scrape(metrics_url: str) -> Samples:
    """Every sample of a Prometheus endpoint, keyed by name and label set."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture(scope="module")
def adversarial_server(
    request: pytest.FixtureRequest, model_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AdversarialServer]:
    """A fresh server for this module, with `DEFAULTS` overridden by its `SERVER_SETTINGS`, and
    a fresh feedback store."""
    store = tmp_path_factory.mktemp("adversarial-feedback") / "feedback.db"
    settings = {
        **DEFAULTS,
        "feedback_store": f"sqlite://{store}",
        **getattr(request.module, "SERVER_SETTINGS", {}),
    }
    flags = [arg for name, value in settings.items()
             for arg in ("--" + name.replace("_", "-"), str(value))]  # fmt: skip
    process = start_server(model_repo, tmp_path_factory.mktemp("adversarial-logs"), *flags)
    try:
        process.wait_serving()
        yield AdversarialServer(process, settings)
    finally:
        process.terminate()


@pytest.fixture(scope="module")
def adversarial_channel(adversarial_server: AdversarialServer) -> Iterator[grpc.Channel]:
    """One channel to the module's server (a plain one: no retries, no client-side limits)."""
    with grpc.insecure_channel(adversarial_server.target) as channel:
        yield channel
