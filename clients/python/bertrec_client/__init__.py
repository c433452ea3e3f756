"""Python client for the bertrec gRPC API: `RecommenderClient` (blocking) and
`AsyncRecommenderClient` (asyncio), returning typed results (frozen dataclasses).

Every call takes an optional deadline (`timeout_s`, one for all its attempts). gRPC itself
retries UNAVAILABLE, RESOURCE_EXHAUSTED and FAILED_PRECONDITION (server starting up) with
exponential backoff, by the service config every bertrec client shares (`bertrec.client.retry`,
`RetryPolicy` to change it, `channel_options()` for a channel of your own); the feedback writes
(`record_feedback`, `forget_user`) on UNAVAILABLE and RESOURCE_EXHAUSTED only. Any other
failure, or the last attempt's, raises `RecommenderError` with the gRPC status code.

    from bertrec.client import Feedback, RecommenderClient

    with RecommenderClient("localhost:50051") as client:
        for item in client.recommend("u0001", k=10).items:
            print(item.rank, item.item_id, item.predicted_rating)
        client.record_feedback([Feedback("u0001", "i0042", "rating", rating=4.5)])

A server with TLS and tokens (`--tls-cert`, `--auth-file`): pass the CA to trust (or True for
the system's roots), the token (sent as `authorization: Bearer ...` on every call, never shown
in a repr or an error) and, for mTLS, the client's certificate and key
(`bertrec.client.security` says what is checked):

    from bertrec.client import read_token_file

    RecommenderClient("recs.internal:50051", tls="ca.crt", token=read_token_file("token"),
                      client_cert="client.crt", client_key="client.key")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bertrec.client.aio import AsyncRecommenderClient
    from bertrec.client.feedback import Feedback, FeedbackKind, FeedbackRecorded, UserForgotten
    from bertrec.client.retry import channel_options
    from bertrec.client.security import read_token_file
    from bertrec.client.sync import RecommenderClient
    from bertrec.client.types import (
        Contribution,
        Embeddings,
        ExplainedItem,
        Explanation,
        ModelInfo,
        ModelRef,
        RankedItem,
        Recommendations,
        RecommenderError,
        RetryPolicy,
        ScoredItem,
        Scores,
        SimilarItem,
        SimilarItems,
        UserRecommendations,
    )

# Where each public name lives. They are imported on first use (PEP 562), so a module of this
# package that needs no grpc (`cli_security`, which every `bertrec` command registers) can be
# imported without loading grpc and numpy through this file.
_HOME = {
    "AsyncRecommenderClient": "aio",
    "RecommenderClient": "sync",
    "channel_options": "retry",
    "read_token_file": "security",
    **dict.fromkeys(("Feedback", "FeedbackKind", "FeedbackRecorded", "UserForgotten"), "feedback"),
    **dict.fromkeys(
        ("Contribution", "Embeddings", "ExplainedItem", "Explanation", "ModelInfo", "ModelRef",
         "RankedItem", "Recommendations", "RecommenderError", "RetryPolicy", "ScoredItem",
         "Scores", "SimilarItem", "SimilarItems", "UserRecommendations"),
        "types",
    ),
}  # fmt: skip


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})


__all__ = [
    "AsyncRecommenderClient",
    "Contribution",
    "Embeddings",
    "ExplainedItem",
    "Explanation",
    "Feedback",
    "FeedbackKind",
    "FeedbackRecorded",
    "ModelInfo",
    "ModelRef",
    "RankedItem",
    "Recommendations",
    "RecommenderClient",
    "RecommenderError",
    "RetryPolicy",
    "ScoredItem",
    "Scores",
    "SimilarItem",
    "SimilarItems",
    "UserForgotten",
    "UserRecommendations",
    "channel_options",
    "read_token_file",
]
