import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FeedbackKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEEDBACK_KIND_UNSPECIFIED: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_RATING: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_CLICK: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_PURCHASE: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_SKIP: _ClassVar[FeedbackKind]
FEEDBACK_KIND_UNSPECIFIED: FeedbackKind
FEEDBACK_KIND_RATING: FeedbackKind
FEEDBACK_KIND_CLICK: FeedbackKind
FEEDBACK_KIND_PURCHASE: FeedbackKind
FEEDBACK_KIND_SKIP: FeedbackKind

class ModelRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "k", "exclude_rated", "include_item_ids", "exclude_item_ids", "explain", "model")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_RATED_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    k: int
    exclude_rated: bool
    include_item_ids: _containers.RepeatedScalarFieldContainer[str]
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    explain: bool
    model: ModelRef
    def __init__(self, user_id: _Optional[str] = ..., k: _Optional[int] = ..., exclude_rated: _Optional[bool] = ..., include_item_ids: _Optional[_Iterable[str]] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., explain: _Optional[bool] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class Contribution(_message.Message):
    __slots__ = ("item_id", "contribution")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    contribution: float
    def __init__(self, item_id: _Optional[str] = ..., contribution: _Optional[float] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("bias_part", "collaborative_part", "text_part", "contributions", "contributions_total")
    BIAS_PART_FIELD_NUMBER: _ClassVar[int]
    COLLABORATIVE_PART_FIELD_NUMBER: _ClassVar[int]
    TEXT_PART_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    bias_part: float
    collaborative_part: float
    text_part: float
    contributions: _containers.RepeatedCompositeFieldContainer[Contribution]
    contributions_total: float
    def __init__(self, bias_part: _Optional[float] = ..., collaborative_part: _Optional[float] = ..., text_part: _Optional[float] = ..., contributions: _Optional[_Iterable[_Union[Contribution, _Mapping]]] = ..., contributions_total: _Optional[float] = ...) -> None: ...

class RankedItem(_message.Message):
    __slots__ = ("item_id", "score", "predicted_rating", "rank", "explanation")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_RATING_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    predicted_rating: float
    rank: int
    explanation: Explanation
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., predicted_rating: _Optional[float] = ..., rank: _Optional[int] = ..., explanation: _Optional[_Union[Explanation, _Mapping]] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("items", "model")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[RankedItem]
    model: ModelRef
    def __init__(self, items: _Optional[_Iterable[_Union[RankedItem, _Mapping]]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class RecommendForTextRequest(_message.Message):
    __slots__ = ("text", "k", "explain", "model")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    text: str
    k: int
    explain: bool
    model: ModelRef
    def __init__(self, text: _Optional[str] = ..., k: _Optional[int] = ..., explain: _Optional[bool] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class RecommendForTextResponse(_message.Message):
    __slots__ = ("items", "model")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[RankedItem]
    model: ModelRef
    def __init__(self, items: _Optional[_Iterable[_Union[RankedItem, _Mapping]]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class ScoreItemsRequest(_message.Message):
    __slots__ = ("user_id", "item_ids", "model")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    model: ModelRef
    def __init__(self, user_id: _Optional[str] = ..., item_ids: _Optional[_Iterable[str]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "predicted_rating")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_RATING_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    predicted_rating: float
    def __init__(self, item_id: _Optional[str] = ..., predicted_rating: _Optional[float] = ...) -> None: ...

class ScoreItemsResponse(_message.Message):
    __slots__ = ("items", "model")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    model: ModelRef
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class SimilarItemsRequest(_message.Message):
    __slots__ = ("item_id", "k", "model")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    k: int
    model: ModelRef
    def __init__(self, item_id: _Optional[str] = ..., k: _Optional[int] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class SimilarItem(_message.Message):
    __slots__ = ("item_id", "similarity", "rank")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    similarity: float
    rank: int
    def __init__(self, item_id: _Optional[str] = ..., similarity: _Optional[float] = ..., rank: _Optional[int] = ...) -> None: ...

class SimilarItemsResponse(_message.Message):
    __slots__ = ("items", "model")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[SimilarItem]
    model: ModelRef
    def __init__(self, items: _Optional[_Iterable[_Union[SimilarItem, _Mapping]]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class EmbedTextRequest(_message.Message):
    __slots__ = ("texts", "model")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    model: ModelRef
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class EmbedTextResponse(_message.Message):
    __slots__ = ("embeddings", "dim", "model")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    dim: int
    model: ModelRef
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., dim: _Optional[int] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model", "dim", "user_count", "item_count", "execution_provider", "encoder_file", "max_seq_len", "metrics", "scoring", "max_k", "max_item_ids", "max_texts", "max_text_bytes", "created_at")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ScoringEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    USER_COUNT_FIELD_NUMBER: _ClassVar[int]
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FILE_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    SCORING_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    MAX_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXTS_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    dim: int
    user_count: int
    item_count: int
    execution_provider: str
    encoder_file: str
    max_seq_len: int
    metrics: _containers.ScalarMap[str, float]
    scoring: _containers.ScalarMap[str, str]
    max_k: int
    max_item_ids: int
    max_texts: int
    max_text_bytes: int
    created_at: str
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., dim: _Optional[int] = ..., user_count: _Optional[int] = ..., item_count: _Optional[int] = ..., execution_provider: _Optional[str] = ..., encoder_file: _Optional[str] = ..., max_seq_len: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., scoring: _Optional[_Mapping[str, str]] = ..., max_k: _Optional[int] = ..., max_item_ids: _Optional[int] = ..., max_texts: _Optional[int] = ..., max_text_bytes: _Optional[int] = ..., created_at: _Optional[str] = ...) -> None: ...

class FeedbackEvent(_message.Message):
    __slots__ = ("user_id", "item_id", "kind", "rating", "occurred_at", "idempotency_key")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    item_id: str
    kind: FeedbackKind
    rating: float
    occurred_at: _timestamp_pb2.Timestamp
    idempotency_key: str
    def __init__(self, user_id: _Optional[str] = ..., item_id: _Optional[str] = ..., kind: _Optional[_Union[FeedbackKind, str]] = ..., rating: _Optional[float] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class RecordFeedbackRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[FeedbackEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[FeedbackEvent, _Mapping]]] = ...) -> None: ...

class RecordFeedbackResponse(_message.Message):
    __slots__ = ("accepted", "duplicates")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    duplicates: int
    def __init__(self, accepted: _Optional[int] = ..., duplicates: _Optional[int] = ...) -> None: ...

class ForgetUserRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class ForgetUserResponse(_message.Message):
    __slots__ = ("events_deleted", "had_model_factors")
    EVENTS_DELETED_FIELD_NUMBER: _ClassVar[int]
    HAD_MODEL_FACTORS_FIELD_NUMBER: _ClassVar[int]
    events_deleted: int
    had_model_factors: bool
    def __init__(self, events_deleted: _Optional[int] = ..., had_model_factors: _Optional[bool] = ...) -> None: ...

class RecommendBatchRequest(_message.Message):
    __slots__ = ("user_ids", "k", "exclude_rated", "model")
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_RATED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    user_ids: _containers.RepeatedScalarFieldContainer[str]
    k: int
    exclude_rated: bool
    model: ModelRef
    def __init__(self, user_ids: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ..., exclude_rated: _Optional[bool] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class UserRecommendations(_message.Message):
    __slots__ = ("user_id", "items", "found")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    items: _containers.RepeatedCompositeFieldContainer[RankedItem]
    found: bool
    def __init__(self, user_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[RankedItem, _Mapping]]] = ..., found: _Optional[bool] = ...) -> None: ...

class RecommendBatchResponse(_message.Message):
    __slots__ = ("results", "model")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[UserRecommendations]
    model: ModelRef
    def __init__(self, results: _Optional[_Iterable[_Union[UserRecommendations, _Mapping]]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class StreamRecommendationsRequest(_message.Message):
    __slots__ = ("user_ids", "k", "exclude_rated", "model")
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_RATED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    user_ids: _containers.RepeatedScalarFieldContainer[str]
    k: int
    exclude_rated: bool
    model: ModelRef
    def __init__(self, user_ids: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ..., exclude_rated: _Optional[bool] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class StreamRecommendationsResponse(_message.Message):
    __slots__ = ("results", "model")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[UserRecommendations]
    model: ModelRef
    def __init__(self, results: _Optional[_Iterable[_Union[UserRecommendations, _Mapping]]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...
