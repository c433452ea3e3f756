"""The retry policy of every bertrec client: gRPC's own retries, set by a service config.

One file, `clients/service_config.json` (shipped in this package as `service_config.json`), holds
the policy that the Python, Go, Java, C++ and TypeScript clients all hand to their gRPC channel
(gRFC A6): up to 5 attempts of any `bertrec.v1.RecommenderService` call, retried on

- UNAVAILABLE: no server reached (not started yet, restarting, shutting down, network),
- RESOURCE_EXHAUSTED: a server work queue is full; the call was refused before any work,
- FAILED_PRECONDITION: the server is still loading or warming up its model (bertrec uses this
  code for nothing else; see proto/bertrec/v1/recommender.proto),

after a pause drawn uniformly from [0, min(initialBackoff * backoffMultiplier**(n-1),
maxBackoff)], all within the call's one deadline. Every RPC of the service is a read without side
effects, so a retry can never apply anything twice; the codes are chosen by whether another
attempt can succeed. Not retried: INVALID_ARGUMENT and NOT_FOUND (the same request fails the
same way), DEADLINE_EXCEEDED and CANCELLED (the caller's time is over), INTERNAL (a server fault
that a retry would repeat, possibly failing other callers' batches too). `retryThrottling` stops
retrying on a channel whose calls mostly fail (it spends a token per failure and earns a tenth of
one per success), so an overloaded server is not sent up to five times its load.

The two feedback writes, RecordFeedback and ForgetUser, have a method config of their own (a
method's own entry wins over the service's): the same attempts and backoff, on UNAVAILABLE and
RESOURCE_EXHAUSTED only. Retrying a write is safe because every event carries an idempotency key
(the store keeps a key once, so an attempt whose answer was lost is counted as a duplicate, not
stored twice) and forgetting a user twice leaves the same state. FAILED_PRECONDITION is left out
for them: besides a warm-up it also means the server has no feedback store, which no retry can
fix, and five attempts would only delay that error and spend the channel's throttling tokens.

gRPC does the retrying (and enforces the deadline across attempts), so the clients need no
loop of their own. The health service is left out on purpose: a probe should see the server's
state now, not after retries.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import grpc

T = TypeVar("T")

SERVICE = "bertrec.v1.RecommenderService"
# The writes, with a method config of their own (see the module docstring).
FEEDBACK_METHODS = ("RecordFeedback", "ForgetUser")
SERVICE_CONFIG_FILE = "service_config.json"
# gRFC A6: clients treat more than 5 attempts as 5, so a larger value would only mislead.
MAX_ATTEMPTS_LIMIT = 5


@functools.cache
def bundled_service_config() -> str:
    """The packaged service config, as JSON text (the one every bertrec client uses)."""
    return resources.files("bertrec.client").joinpath(SERVICE_CONFIG_FILE).read_text("utf-8")


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's retry policy for RecommenderService calls; None fields keep the bundled value.

    Attempt n+1 starts after a pause drawn uniformly from
    [0, min(initial_backoff_s * multiplier**(n-1), max_backoff_s)] (gRFC A6), never past the
    call's deadline. The timing fields apply to every method; `max_attempts=1` turns retries
    off for all of them.

    Args:
        max_attempts: attempts including the first, 1 to 5.
        initial_backoff_s: upper bound of the first pause, > 0.
        max_backoff_s: cap of the pause bound, > 0.
        multiplier: growth of the pause bound per attempt, > 0.
        jitter: deprecated and ignored: gRPC always draws the whole pause at random.
        retryable_codes: statuses that start another attempt of a read (every method but the
            feedback writes).
        feedback_retryable_codes: statuses that start another attempt of RecordFeedback and
            ForgetUser; empty turns their retries off.

    Raises:
        ValueError: a value out of range.
    """

    max_attempts: int | None = None
    initial_backoff_s: float | None = None
    max_backoff_s: float | None = None
    multiplier: float | None = None
    jitter: float | None = None  # fifth, as before: positional calls keep their meaning
    retryable_codes: tuple[grpc.StatusCode, ...] | None = None
    feedback_retryable_codes: tuple[grpc.StatusCode, ...] | None = None

    def __post_init__(self) -> None:
        if self.jitter is not None:
            warnings.warn(
                "RetryPolicy(jitter=...) is ignored: gRPC draws each pause from [0, backoff]",
                DeprecationWarning,
                stacklevel=3,
            )
        attempts = self.max_attempts
        if attempts is not None and not 1 <= attempts <= MAX_ATTEMPTS_LIMIT:
            raise ValueError(f"max_attempts must be 1..{MAX_ATTEMPTS_LIMIT}, got {attempts}")
        for name in ("initial_backoff_s", "max_backoff_s", "multiplier"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        for codes in (self.retryable_codes, self.feedback_retryable_codes):
            if codes is not None and grpc.StatusCode.OK in codes:
                raise ValueError("OK is not a retryable status")

    @classmethod
    def bundled(cls) -> RetryPolicy:
        """The policy of `service_config.json`, every field set."""
        config = json.loads(bundled_service_config())
        reads = _from_json(_method_config(config)["retryPolicy"])
        writes = _codes(_feedback_method_config(config)["retryPolicy"])
        return dataclasses.replace(reads, feedback_retryable_codes=writes)

    def resolved(self) -> RetryPolicy:
        """This policy with each None field taken from the bundled one."""
        base = RetryPolicy.bundled()
        return RetryPolicy(
            max_attempts=_pick(self.max_attempts, base.max_attempts),
            initial_backoff_s=_pick(self.initial_backoff_s, base.initial_backoff_s),
            max_backoff_s=_pick(self.max_backoff_s, base.max_backoff_s),
            multiplier=_pick(self.multiplier, base.multiplier),
            retryable_codes=_pick(self.retryable_codes, base.retryable_codes),
            feedback_retryable_codes=_pick(
                self.feedback_retryable_codes, base.feedback_retryable_codes
            ),
        )


def service_config(retry: RetryPolicy | None = None) -> dict[str, Any]:
    """The bundled service config, with `retry`'s fields (if given) in its retry policy."""
    config: dict[str, Any] = json.loads(bundled_service_config())
    if retry is None:
        return config
    policy = retry.resolved()
    for method, codes in (
        (_method_config(config), policy.retryable_codes),
        (_feedback_method_config(config), policy.feedback_retryable_codes),
    ):
        # gRPC rejects a retry policy without codes (and with it the whole service config).
        if policy.max_attempts == 1 or not codes:
            del method["retryPolicy"]
            continue
        method["retryPolicy"] = {
            "maxAttempts": policy.max_attempts,
            "initialBackoff": _duration(policy.initial_backoff_s),
            "maxBackoff": _duration(policy.max_backoff_s),
            "backoffMultiplier": policy.multiplier,
            "retryableStatusCodes": [code.name for code in codes],
        }
    return config


def channel_options(retry: RetryPolicy | None = None) -> list[tuple[str, Any]]:
    """gRPC channel options that apply the retry policy; pass them to any channel you build.

    Example (a TLS channel of your own):
        grpc.secure_channel(target, creds, options=channel_options())
    """
    return [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(service_config(retry), separators=(",", ":"))),
    ]


def _method_config(config: dict[str, Any]) -> dict[str, Any]:
    for method in config["methodConfig"]:
        if {"service": SERVICE} in method["name"]:
            found: dict[str, Any] = method
            return found
    raise ValueError(f"{SERVICE_CONFIG_FILE} has no methodConfig for {SERVICE}")


def _feedback_method_config(config: dict[str, Any]) -> dict[str, Any]:
    """The method config naming the feedback writes (each of them, in one entry)."""
    names = [{"service": SERVICE, "method": m} for m in FEEDBACK_METHODS]
    for method in config["methodConfig"]:
        if all(name in method["name"] for name in names):
            found: dict[str, Any] = method
            return found
    raise ValueError(f"{SERVICE_CONFIG_FILE} has no methodConfig for {', '.join(FEEDBACK_METHODS)}")


def _from_json(policy: dict[str, Any]) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=int(policy["maxAttempts"]),
        initial_backoff_s=_seconds(policy["initialBackoff"]),
        max_backoff_s=_seconds(policy["maxBackoff"]),
        multiplier=float(policy["backoffMultiplier"]),
        retryable_codes=_codes(policy),
    )


def _codes(policy: dict[str, Any]) -> tuple[grpc.StatusCode, ...]:
    return tuple(grpc.StatusCode[name] for name in policy["retryableStatusCodes"])


def _seconds(duration: str) -> float:
    """A JSON (protobuf Duration) string such as "0.2s" in seconds."""
    if not duration.endswith("s"):
        raise ValueError(f"not a duration: {duration!r}")
    return float(duration[:-1])


def _duration(seconds: float | None) -> str:
    """Seconds as a protobuf Duration string: 0.25 -> "0.25s" (nanosecond precision)."""
    assert seconds is not None
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def _pick(value: T | None, default: T | None) -> T | None:
    return default if value is None else value
