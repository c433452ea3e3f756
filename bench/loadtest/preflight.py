"""Before any load: is a bertrec server answering at the target, and is it SERVING?

One health check with a short deadline tells "nothing listens there" (gRPC fails the call at
once with UNAVAILABLE, "Connection refused") from "a server is up but still loading its model"
(health NOT_SERVING). Only the second is worth waiting for; the first is reported at once, in
words, instead of as a DEADLINE_EXCEEDED after the whole readiness wait.
"""

from __future__ import annotations

import grpc

from bertrec.client import RecommenderClient, RecommenderError
from bertrec.errors import BertrecError

PROBE_TIMEOUT_S = 2.0  # a live server on any network answers a health check well within this


def wait_until_serving(client: RecommenderClient, target: str, ready_timeout_s: float) -> None:
    """Return once the server at `target` reports SERVING.

    Raises:
        BertrecError: at once when nothing answers there; after `ready_timeout_s` when a server
            answers but never reports SERVING.
    """
    try:
        status = client.health(timeout_s=PROBE_TIMEOUT_S)
    except RecommenderError as exc:
        raise BertrecError(unreachable(target, exc)) from None
    if status == "SERVING":
        return
    try:
        client.wait_until_serving(ready_timeout_s)
    except RecommenderError as exc:
        raise BertrecError(
            f"{target} answers but is not SERVING ({exc.details}); is its model still "
            "loading? (--ready-timeout-s waits longer)"
        ) from None


def unreachable(target: str, exc: RecommenderError) -> str:
    """A one-line reason why the health check of `target` failed."""
    if exc.code == grpc.StatusCode.UNAVAILABLE:
        refused = "connection refused" in exc.details.lower()
        why = "connection refused" if refused else exc.details
        return f"cannot connect to {target}: {why} (is `bertrec serve` running there?)"
    if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return (f"no answer from {target} within {PROBE_TIMEOUT_S:g} s (wrong host or port, or "
                "a firewall dropping packets?)")  # fmt: skip
    if exc.code == grpc.StatusCode.UNIMPLEMENTED:
        return f"{target} has no grpc.health.v1 service: is it a bertrec server?"
    return f"health check of {target} failed: {exc}"
