"""Future plumbing for the request path: stages that hand their result on without waking the
request thread in between.

A handler blocks on one `concurrent.futures.Future`; the batcher threads finish each stage and
start the next from the finishing thread, so a multi-stage call (encode -> fold -> rank) costs the
handler one wait instead of one per stage.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

R = TypeVar("R")
T = TypeVar("T")


def chain(first: Future[T], then: Callable[[T], Future[R]]) -> Future[R]:
    """A future for `then(first's result)`, started by the thread that finishes `first`.

    The handler blocks on one future instead of waking between stages; an error or
    cancellation of either stage ends the chain, and cancelling the chain cancels the stage
    still queued, so a caller that leaves frees both batchers' work.
    """
    chained: Future[R] = Future()
    stages: list[Future[Any]] = [first]

    def stop_stages(done: Future[R]) -> None:
        if done.cancelled():
            for stage in stages:
                stage.cancel()

    def pass_on(stage: Future[R]) -> None:
        if stage.cancelled():
            chained.cancel()
        elif (error := stage.exception()) is not None:
            settle(chained, error=error)
        else:
            settle(chained, result=stage.result())

    def start_second(done: Future[T]) -> None:
        if done.cancelled():
            chained.cancel()
            return
        try:
            second = then(done.result())
        except BaseException as error:  # the first stage's error, or the second's refusal
            settle(chained, error=error)
            return
        stages.append(second)
        second.add_done_callback(pass_on)
        if chained.cancelled():
            second.cancel()

    chained.add_done_callback(stop_stages)
    first.add_done_callback(start_second)
    return chained


def finished(result: R) -> Future[R]:
    done: Future[R] = Future()
    done.set_result(result)
    return done


def settle(future: Future[R], result: R | None = None, error: BaseException | None = None) -> None:
    """Resolve `future` unless it was cancelled meanwhile (the caller left)."""
    if not future.set_running_or_notify_cancel():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]
