"""The one retry policy file, as the Python client reads, changes and hands it to gRPC."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from bertrec.client import RetryPolicy, channel_options
from bertrec.client.retry import SERVICE, bundled_service_config, service_config

ROOT = Path(__file__).resolve().parents[2]
FILE = ROOT / "clients" / "service_config.json"


def retry_policy(config: dict) -> dict | None:
    (method,) = [m for m in config["methodConfig"] if {"service": SERVICE} in m["name"]]
    return method.get("retryPolicy")


def test_the_packaged_config_is_the_shared_file() -> None:
    assert json.loads(bundled_service_config()) == json.loads(FILE.read_text())


def test_the_bundled_policy_reads_the_file() -> None:
    policy = retry_policy(json.loads(FILE.read_text()))
    assert policy is not None
    bundled = RetryPolicy.bundled()
    assert bundled.max_attempts == policy["maxAttempts"]
    assert f"{bundled.initial_backoff_s:g}s" == policy["initialBackoff"]
    assert f"{bundled.max_backoff_s:g}s" == policy["maxBackoff"]
    assert bundled.multiplier == policy["backoffMultiplier"]
    assert [c.name for c in bundled.retryable_codes or ()] == policy["retryableStatusCodes"]
    assert RetryPolicy().resolved() == bundled


def test_no_policy_given_means_the_file_unchanged() -> None:
    assert service_config() == json.loads(FILE.read_text())
    assert service_config(RetryPolicy()) == json.loads(FILE.read_text())
    options = dict(channel_options())
    assert options["grpc.enable_retries"] == 1
    assert json.loads(options["grpc.service_config"]) == json.loads(FILE.read_text())


def test_a_policy_changes_only_the_fields_it_sets() -> None:
    config = service_config(RetryPolicy(max_attempts=3, initial_backoff_s=0.025))
    policy = retry_policy(config)
    want = retry_policy(json.loads(FILE.read_text()))
    assert policy == {**want, "maxAttempts": 3, "initialBackoff": "0.025s"}
    assert config["retryThrottling"] == json.loads(FILE.read_text())["retryThrottling"]


def test_one_attempt_drops_the_retry_policy() -> None:
    assert retry_policy(service_config(RetryPolicy(max_attempts=1))) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"max_attempts": 6},  # gRFC A6 caps attempts at 5
        {"initial_backoff_s": 0.0},
        {"max_backoff_s": -1.0},
        {"multiplier": 0.0},
        {"retryable_codes": (grpc.StatusCode.OK,)},
    ],
)
def test_bad_policies_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def test_jitter_is_accepted_but_deprecated() -> None:
    with pytest.warns(DeprecationWarning, match="jitter"):
        RetryPolicy(jitter=0.0)


FEEDBACK = [{"service": SERVICE, "method": m} for m in ("RecordFeedback", "ForgetUser")]


def feedback_policy(config: dict) -> dict | None:
    (method,) = [m for m in config["methodConfig"] if all(n in m["name"] for n in FEEDBACK)]
    return method.get("retryPolicy")


def test_the_feedback_writes_retry_only_where_nothing_was_done() -> None:
    """RecordFeedback and ForgetUser have their own entry (a method's entry wins over the
    service's): no FAILED_PRECONDITION, which also means "no feedback store" to them."""
    config = json.loads(FILE.read_text())
    (entry,) = [m for m in config["methodConfig"] if any(n in m["name"] for n in FEEDBACK)]
    assert sorted(entry["name"], key=str) == sorted(FEEDBACK, key=str)
    writes = feedback_policy(config)
    assert writes is not None
    assert writes["retryableStatusCodes"] == ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
    # One timing for reads and writes: RetryPolicy changes both alike.
    timing = ("maxAttempts", "initialBackoff", "maxBackoff", "backoffMultiplier")
    reads = retry_policy(config)
    assert reads is not None
    assert {k: writes[k] for k in timing} == {k: reads[k] for k in timing}
    bundled = RetryPolicy.bundled().feedback_retryable_codes
    assert bundled == (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_a_policy_changes_the_feedback_writes_too() -> None:
    config = service_config(RetryPolicy(max_attempts=3, initial_backoff_s=0.025))
    want = feedback_policy(json.loads(FILE.read_text()))
    assert feedback_policy(config) == {**want, "maxAttempts": 3, "initialBackoff": "0.025s"}
    # Widening the reads' codes leaves the writes' codes alone; they have a field of their own.
    policy = RetryPolicy(retryable_codes=(grpc.StatusCode.INTERNAL,))
    assert feedback_policy(service_config(policy)) == want
    only = RetryPolicy(feedback_retryable_codes=(grpc.StatusCode.UNAVAILABLE,))
    assert feedback_policy(service_config(only)) == {
        **want,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    assert retry_policy(service_config(only)) == retry_policy(json.loads(FILE.read_text()))


def test_one_attempt_or_no_codes_drops_the_feedback_retry_policy() -> None:
    assert feedback_policy(service_config(RetryPolicy(max_attempts=1))) is None
    config = service_config(RetryPolicy(feedback_retryable_codes=()))
    assert feedback_policy(config) is None and retry_policy(config) is not None
    with pytest.raises(ValueError):
        RetryPolicy(feedback_retryable_codes=(grpc.StatusCode.OK,))
