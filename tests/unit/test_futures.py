"""The encode -> rank chain: the handler waits on one future that the batchers' threads finish."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from bertrec.server.errors import ResourceExhausted
from bertrec.server.futures import chain


def test_result_flows_through_both_stages() -> None:
    first: Future[int] = Future()
    second: Future[str] = Future()
    seen: list[int] = []

    def then(value: int) -> Future[str]:
        seen.append(value)
        return second

    chained = chain(first, then)
    first.set_result(3)
    assert seen == [3] and not chained.done()
    second.set_result("ranked")
    assert chained.result(timeout=0) == "ranked"


@pytest.mark.parametrize("stage", ["first", "second", "then"])
def test_an_error_at_any_stage_ends_thechain(stage: str) -> None:
    first: Future[int] = Future()
    second: Future[str] = Future()

    def then(value: int) -> Future[str]:
        if stage == "then":
            raise ResourceExhausted("ranker queue is full")
        return second

    chained = chain(first, then)
    if stage == "first":
        first.set_exception(ResourceExhausted("encoder is overloaded"))
    else:
        first.set_result(1)
        if stage == "second":
            second.set_exception(ResourceExhausted("ranker is overloaded"))
    with pytest.raises(ResourceExhausted):
        chained.result(timeout=0)


def test_a_caller_leaving_cancels_the_stage_still_queued() -> None:
    first: Future[int] = Future()
    second: Future[str] = Future()
    chained = chain(first, lambda _: second)
    assert chained.cancel()
    assert first.cancelled()  # the encoder drops it before computing

    first2: Future[int] = Future()
    second2: Future[str] = Future()
    chained2 = chain(first2, lambda _: second2)
    first2.set_result(1)
    assert chained2.cancel()
    assert second2.cancelled()  # the ranker drops it before computing


def test_a_cancelled_stage_cancels_thechain() -> None:
    first: Future[int] = Future()
    chained = chain(first, lambda _: Future())
    first.cancel()
    assert chained.cancelled()
