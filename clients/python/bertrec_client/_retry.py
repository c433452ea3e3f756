"""The retry decision shared by the sync and asyncio clients."""

from __future__ import annotations

import random
import time

import grpc

from bertrec.client.types import RecommenderError, RetryPolicy


def next_pause_s(
    error: grpc.RpcError, attempt: int, policy: RetryPolicy, deadline_s: float
) -> float:
    """Seconds to wait before retrying after `error`, or raise it as a `RecommenderError`.

    Only UNAVAILABLE is retried (the server never started the work); every other status, the
    last allowed attempt, or a pause that would end past the deadline raises.
    """
    code: grpc.StatusCode = error.code()
    details: str = error.details() or ""
    pause = policy.backoff_s(attempt, random.random())
    if (
        code != grpc.StatusCode.UNAVAILABLE
        or attempt >= policy.max_attempts
        or time.monotonic() + pause >= deadline_s
    ):
        raise RecommenderError(code, details) from error
    return pause


def remaining_s(deadline_s: float) -> float:
    """Time left before the call's deadline; raises DEADLINE_EXCEEDED when none is left."""
    left = deadline_s - time.monotonic()
    if left <= 0:
        raise RecommenderError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
    return left
