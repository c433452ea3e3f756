"""The recommender between the gRPC servicer and the model: validate, batch, assemble results.

Every request is fully validated (limits, duplicates, unknown ids) before any work is queued,
so a bad request is rejected on its own and never reaches a batch shared with others. Ranking
and encoding go through dynamic batchers; the tiny per-request steps (id lookups, predicted
ratings for k rows) run on the request thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from bertrec.explanation import ExplainedItem
from bertrec.results import (
    Embeddings,
    ModelInfo,
    ModelRef,
    RankedItem,
    Recommendations,
    ScoredItem,
    Scores,
    SimilarItem,
    SimilarItems,
)
from bertrec.server import errors, tracing
from bertrec.server.batcher import Batcher, BatcherConfig
from bertrec.server.config import ServerConfig
from bertrec.server.errors import Cancelled, DeadlineExceeded, InvalidArgument, NotFound
from bertrec.server.explain import explain as explain_scores
from bertrec.server.futures import chain, finished
from bertrec.server.metrics import ServerMetrics
from bertrec.server.model import WARMUP_TEXTS, Model, RankQuery, RankResult
from bertrec.server.online_users import OnlineUsers, UserState, no_tombstones

R = TypeVar("R")

# k when a request leaves it unset (0, proto3's default): the same as the v2 API and the clients.
DEFAULT_K = 10


@dataclass(frozen=True)
class Call:
    """What the engine needs from a call: its deadline and a way to learn it was cancelled.

    `on_done(callback)` registers `callback` to run when the call ends for any reason
    (grpc's `ServicerContext.add_callback`); it returns False when the call is already over.
    """

    deadline_s: float  # time.monotonic() value
    on_done: Callable[[Callable[[], object]], bool] | None = None

    @staticmethod
    def from_context(context: Any, default_timeout_s: float) -> Call:
        """The call behind a grpc `ServicerContext`; calls without a deadline (or a longer
        one) get `default_timeout_s`."""
        remaining = context.time_remaining()
        if remaining is None or remaining > default_timeout_s:
            remaining = default_timeout_s
        return Call(time.monotonic() + remaining, context.add_callback)


NO_ROWS = np.zeros(0, dtype=np.int64)
NO_ROWS.flags.writeable = False  # shared by every call that names no item


@dataclass(frozen=True, slots=True)
class RankedRows:
    """Ranked items as arrays, best first: ids, ranking scores and predicted ratings."""

    item_ids: list[str]
    scores: np.ndarray  # float32 (n,)
    ratings: np.ndarray  # float32 (n,)
    model: ModelRef


@dataclass(frozen=True)
class PendingRank:
    """A queued ranking query and what is needed to turn its rows into `Recommendations`."""

    future: Future[RankResult]
    vector: np.ndarray
    user: UserState | None  # None: a text query
    explain: bool = False  # attach explanations (server/explain.py) to the ranked items


class Recommender:
    """Answers the API's questions for one loaded model, batching the heavy work.

    Args:
        model: the loaded model version.
        config: limits and batching windows.
        metrics: where the batchers record their series.
        users: the version's users, folded-in feedback included (default: its training users
            only, as without a feedback store).
    """

    def __init__(
        self,
        model: Model,
        config: ServerConfig,
        metrics: ServerMetrics,
        users: OnlineUsers | None = None,
    ) -> None:
        self.model = model
        self.users = users if users is not None else OnlineUsers(model, no_tombstones)
        self.config = config
        self.ref = ModelRef(model.name, model.version)
        c = config
        ranking = BatcherConfig(
            c.ranker_max_batch_size, c.ranker_max_queue_delay_us, c.ranker_max_queue_size
        )
        encoding = BatcherConfig(
            c.encoder_max_batch_size, c.encoder_max_queue_delay_us, c.encoder_max_queue_size
        )
        self.ranker: Batcher[RankQuery, RankResult] = Batcher(
            "ranker", model.rank, ranking, metrics.for_batcher(model.name, "ranker"), "rank"
        )
        self.similar: Batcher[RankQuery, RankResult] = Batcher(
            "similar", model.similar, ranking, metrics.for_batcher(model.name, "similar"),
            "similar items",
        )  # fmt: skip
        self.encoder: Batcher[str, np.ndarray] = Batcher(
            "encoder", model.encode, encoding, metrics.for_batcher(model.name, "encoder"), "encode"
        )
        self._batchers: tuple[Batcher[Any, Any], ...] = (self.ranker, self.similar, self.encoder)

    def start(self) -> None:
        """Time one small and one full batch per batcher (see `Batcher.calibrate`), then serve.

        The model is warmed up already (`Model.warm_up`), so these runs measure steady speed.
        """
        c, m = self.config, self.model
        texts = [WARMUP_TEXTS[i % len(WARMUP_TEXTS)] for i in range(c.encoder_max_batch_size)]
        self.encoder.calibrate(texts)
        rng = np.random.default_rng(0)
        vectors = rng.standard_normal((c.ranker_max_batch_size, m.dim)).astype(np.float32)
        # As Recommend's queries, so the batch's time includes encoding the responses.
        queries = [RankQuery(v, min(DEFAULT_K, m.n_items), wire=True) for v in vectors]
        self.ranker.calibrate(queries)
        self.similar.calibrate(queries)
        for batcher in self._batchers:
            batcher.start()

    def close(self, drain: bool = True, timeout_s: float | None = None) -> None:
        for batcher in self._batchers:
            batcher.close(drain, timeout_s)

    def submit_recommend(
        self,
        user_id: str,
        k: int,
        exclude_rated: bool,
        include_ids: Sequence[str],
        exclude_ids: Sequence[str],
        deadline_s: float,
        explain: bool = False,
        wire: bool = False,
    ) -> PendingRank:
        """Validate a Recommend request and queue its ranking query (k=0: `DEFAULT_K`).

        `wire`: the caller sends the serialized response on as it is, so the ranking batch may
        encode it (`RankResult.wire`, `server.wire`; never with explanations).
        """
        k = self.resolve_k(k)
        self._check_ids(include_ids, "include_item_ids", allow_empty=True)
        self._check_ids(exclude_ids, "exclude_item_ids", allow_empty=True)
        user = self._user(user_id)
        include = self._item_rows(include_ids, "include_item_ids")
        exclude = self._item_rows(exclude_ids, "exclude_item_ids")
        if exclude_rated:
            exclude = np.concatenate([exclude, user.seen]) if len(exclude) else user.seen
        query = RankQuery(
            user.vector, k, exclude if len(exclude) else None,
            include if len(include) else None, user.row, user.rating, wire=wire and not explain,
        )  # fmt: skip
        return PendingRank(self.ranker.submit(query, deadline_s), user.vector, user, explain)

    def ranked(self, pending: PendingRank, result: RankResult) -> Recommendations:
        """Assemble ranked items (with predicted ratings) from a finished ranking query."""
        if pending.explain:
            return self._explained(pending, result, self._ratings(pending, result))
        rows = self.ranked_rows(pending, result)
        items = [
            RankedItem(item_id, score, rating, rank)
            for rank, (item_id, score, rating) in enumerate(
                zip(rows.item_ids, rows.scores.tolist(), rows.ratings.tolist(), strict=True),
                start=1,
            )
        ]
        return Recommendations(items, self.ref)

    def ranked_rows(self, pending: PendingRank, result: RankResult) -> RankedRows:
        """A finished ranking query's answer as arrays, best first (no explanations): what a
        response is built from without an object per item."""
        ids = self.model.item_ids_of(result.rows)  # one gather, not a lookup per item
        return RankedRows(ids, result.scores, self._ratings(pending, result), self.ref)

    def _ratings(self, pending: PendingRank, result: RankResult) -> np.ndarray:
        if result.ratings is not None:
            return result.ratings
        user = pending.user  # not from `Model.rank` (a stand-in model)
        return self.model.predicted_ratings(
            pending.vector, result.rows, user and user.row, user and user.rating
        )

    def recommend(
        self,
        user_id: str,
        k: int,
        exclude_rated: bool,
        include_ids: Sequence[str],
        exclude_ids: Sequence[str],
        call: Call,
        explain: bool = False,
    ) -> Recommendations:
        """Top-k items for a user by ranking score (items are `ExplainedItem`s if `explain`)."""
        pending = self.submit_recommend(
            user_id, k, exclude_rated, include_ids, exclude_ids, call.deadline_s, explain
        )
        return self.ranked(pending, wait(pending.future, call))

    def recommend_future(
        self,
        user_id: str,
        k: int,
        exclude_rated: bool,
        include_ids: Sequence[str],
        exclude_ids: Sequence[str],
        deadline_s: float,
    ) -> Future[Recommendations]:
        """`recommend` for callers that must not block (an asyncio server): the future is
        finished by the ranker's thread. Validation errors are raised at once."""
        pending = self.submit_recommend(
            user_id, k, exclude_rated, include_ids, exclude_ids, deadline_s
        )
        return chain(pending.future, lambda result: finished(self.ranked(pending, result)))

    def _explained(
        self, pending: PendingRank, result: RankResult, ratings: np.ndarray
    ) -> Recommendations:
        m, user = self.model, pending.user
        why = explain_scores(
            m.arrays, m.item_ids, pending.vector, user and user.row, result.rows,
            user and user.touches,
        )  # fmt: skip
        ids, scores = m.item_ids_of(result.rows), result.scores.tolist()
        items: list[RankedItem] = [
            ExplainedItem(item_id, score, rating, rank, reason)
            for rank, (item_id, score, rating, reason) in enumerate(
                zip(ids, scores, ratings.tolist(), why, strict=True), start=1
            )
        ]
        return Recommendations(items, self.ref)

    def recommend_users(
        self, user_ids: Sequence[str], k: int, call: Call, explain: bool = False
    ) -> list[Recommendations]:
        """Top-k items for each user (rated items excluded), in order (k=0: `DEFAULT_K`).

        Every query is validated and queued before any is waited for, so they join one ranking
        batch; an unknown user fails the whole call and withdraws the queries already queued.
        """
        k = self.resolve_k(k)
        pending: list[PendingRank] = []
        try:
            for user_id in user_ids:
                pending.append(
                    self.submit_recommend(user_id, k, True, (), (), call.deadline_s, explain)
                )
        except BaseException:
            for queued in pending:
                queued.future.cancel()
            raise
        return [self.ranked(p, wait(p.future, call)) for p in pending]

    def recommend_for_text(
        self, text: str, k: int, call: Call, explain: bool = False
    ) -> Recommendations:
        """Top-k items for a text folded into user space (k=0: `DEFAULT_K`)."""
        k = self.resolve_k(k)
        self._check_text(text, "text")
        folded: dict[str, np.ndarray] = {}
        trace = tracing.current_context()  # the ranker stage is queued from the encoder's thread

        def rank(text_vector: np.ndarray) -> Future[RankResult]:
            folded["vector"] = vector = self.model.fold_text(text_vector)
            with tracing.attached(trace):
                return self.ranker.submit(RankQuery(vector, k), call.deadline_s)

        # encode -> fold -> rank run on the batchers' side: the handler waits once.
        chained = chain(self.encoder.submit(text, call.deadline_s), rank)
        result = wait(chained, call)
        return self.ranked(PendingRank(chained, folded["vector"], None, explain), result)

    def score_items(self, user_id: str, item_ids: Sequence[str], call: Call) -> Scores:
        """Predicted ratings for the given items, in the given order."""
        self._check_ids(item_ids, "item_ids", allow_empty=False)
        user = self._user(user_id)
        rows = self._item_rows(item_ids, "item_ids")
        ratings = self.model.predicted_ratings(user.vector, rows, user.row, user.rating)
        items = [ScoredItem(i, float(r)) for i, r in zip(item_ids, ratings.tolist(), strict=True)]
        return Scores(items, self.ref)

    def similar_items(self, item_id: str, k: int, call: Call) -> SimilarItems:
        """The k items with the most similar factor vectors (cosine), the item excluded.

        k=0 means `DEFAULT_K`.
        """
        k = self.resolve_k(k)
        row = int(self._item_rows([_nonempty(item_id, "item_id")], "item_id", indexed=False)[0])
        query = RankQuery(self.model.unit_item(row), k, exclude=np.array([row], np.int64))
        result = wait(self.similar.submit(query, call.deadline_s), call)
        ids = self.model.item_ids_of(result.rows)
        items = [
            SimilarItem(item_id, score, rank)
            for rank, (item_id, score) in enumerate(
                zip(ids, result.scores.tolist(), strict=True), start=1
            )
        ]
        return SimilarItems(items, self.ref)

    def embed_text(self, texts: Sequence[str], call: Call) -> Embeddings:
        """Encoder vectors for the texts, in order; texts join other calls' batches."""
        if not texts:
            raise InvalidArgument("texts is empty", "texts", errors.EMPTY)
        if len(texts) > self.config.max_texts:
            raise InvalidArgument(
                f"{len(texts)} texts, more than max_texts {self.config.max_texts}",
                "texts", errors.TOO_MANY,
            )  # fmt: skip
        for i, text in enumerate(texts):
            self._check_text(text, f"texts[{i}]")
        futures: list[Future[np.ndarray]] = []
        try:
            for text in texts:
                futures.append(self.encoder.submit(text, call.deadline_s))
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        vectors = [wait(f, call) for f in futures]
        return Embeddings(np.stack(vectors).astype(np.float32, copy=False), self.ref)

    def info(self) -> ModelInfo:
        """The loaded model, its metrics and the request limits."""
        m, c = self.model, self.config
        manifest = m.manifest
        scoring = {
            "ranking": manifest.scoring.ranking_score,
            "rating": manifest.scoring.rating_score,
            "text_query": manifest.scoring.text_query_score,
            "recommend_order": manifest.scoring.recommend_order,
        }
        return ModelInfo(
            model=self.ref,
            dim=m.dim,
            user_count=m.n_users,
            item_count=m.n_items,
            execution_provider=m.encoder.provider,
            encoder_file=m.encoder_file,
            max_seq_len=manifest.dims.max_seq_len,
            metrics=flatten_numbers(manifest.training_metrics),
            scoring=scoring,
            max_k=c.max_k,
            max_item_ids=c.max_item_ids,
            max_texts=c.max_texts,
            max_text_bytes=c.max_text_bytes,
            created_at=manifest.created_at,
        )

    def resolve_k(self, k: int) -> int:
        """The k a request asks for: 0 (unset) means `DEFAULT_K` (capped at max_k).

        Raises:
            InvalidArgument: k is negative or above max_k.
        """
        if k == 0:
            return min(DEFAULT_K, self.config.max_k)
        if not 1 <= k <= self.config.max_k:
            raise InvalidArgument(
                f"k must be in 1..{self.config.max_k}, got {k}", "k", errors.INVALID_K
            )
        return k

    def _user(self, user_id: str) -> UserState:
        """The user's state; NotFound names the field and the reason (rich error details)."""
        try:
            return self.users.lookup(_nonempty(user_id, "user_id"))
        except NotFound as exc:
            raise NotFound(exc.message, "user_id", errors.UNKNOWN_USER) from None

    def _item_rows(self, ids: Sequence[str], name: str, indexed: bool = True) -> np.ndarray:
        """Rows of `ids`; NotFound names the unknown one's path (`item_ids[3]`)."""
        if not ids:  # most calls name no item: no lookup, no new array
            return NO_ROWS
        try:
            return self.model.item_rows(list(ids))
        except NotFound as exc:
            at = next(i for i, one in enumerate(ids) if self.model.item_row(one) is None)
            field = f"{name}[{at}]" if indexed else name
            raise NotFound(exc.message, field, errors.UNKNOWN_ITEM) from None

    def _check_text(self, text: str, name: str) -> None:
        if not text.strip():
            raise InvalidArgument(f"{name} is empty", name, errors.EMPTY)
        size = len(text.encode("utf-8"))
        if size > self.config.max_text_bytes:
            raise InvalidArgument(
                f"{name} is {size} bytes, more than max_text_bytes {self.config.max_text_bytes}",
                name, errors.TOO_LARGE,
            )  # fmt: skip

    def _check_ids(self, ids: Sequence[str], name: str, allow_empty: bool) -> None:
        if not ids and not allow_empty:
            raise InvalidArgument(f"{name} is empty", name, errors.EMPTY)
        if len(ids) > self.config.max_item_ids:
            raise InvalidArgument(
                f"{name} has {len(ids)} ids, more than max_item_ids {self.config.max_item_ids}",
                name, errors.TOO_MANY,
            )  # fmt: skip
        seen: set[str] = set()
        for i, item_id in enumerate(ids):
            if not item_id:
                raise InvalidArgument(f"{name} is empty", f"{name}[{i}]", errors.EMPTY)
            if item_id in seen:
                raise InvalidArgument(
                    f"{name} lists {item_id!r} more than once", f"{name}[{i}]", errors.DUPLICATE
                )
            seen.add(item_id)


def wait(future: Future[R], call: Call) -> R:
    """The future's result within the call's deadline; cancels the work if the caller leaves.

    Raises:
        DeadlineExceeded: the deadline passed first (the queued work is cancelled).
        Cancelled: the caller cancelled the call.
        ServiceError: whatever the batch resolved the future with.
    """
    if call.on_done is not None and not call.on_done(future.cancel):
        future.cancel()
    try:
        return future.result(timeout=max(call.deadline_s - time.monotonic(), 0.0))
    except TimeoutError:
        future.cancel()
        raise DeadlineExceeded("deadline exceeded before the result was ready") from None
    except CancelledError:
        raise Cancelled("call cancelled by the client") from None


def flatten_numbers(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested dict, keys joined with "." (booleans and text left out)."""
    flat: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_numbers(value, name + "."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def _nonempty(value: str, name: str) -> str:
    if not value:
        raise InvalidArgument(f"{name} is empty", name, errors.EMPTY)
    return value
