"""RecommendResponse wire bytes for a whole ranking batch at once, built in numpy.

Why: a loaded server pays for a call's own Python about twice what it costs alone (38 us of
plain Python added to each Recommend cost the 2-worker server 77 us more per call). Built as
protobuf messages, the response cost each handler thread a gather of the item ids, one
`RankedItem` per item and a serialisation after it woke (~15 us per call alone). The ranker's
thread instead encodes the responses of the whole batch in one vectorised pass (2.6 us per
call in a batch of 13), and the handler thread returns those bytes as they are
(`interceptor`: a handler may answer pre-encoded bytes).

The bytes are exactly what protobuf's `SerializeToString` gives for the same
`RecommendResponse` (tests compare them byte for byte): fields in number order, and
proto3's implicit presence, so an empty id and a float whose bits are all zero (+0.0, not
-0.0) are left out:

    RecommendResponse  = items* (field 1) , model (field 2)
    RankedItem         = item_id (1, string) , score (2, fixed32) , predicted_rating (3, fixed32)
                         , rank (4, varint)

Item ids are read from the version's unicode array (UTF-32, one row per item, memory-mapped)
for just the rows being answered: no copy of the catalogue's ids. A batch answering any id
outside ASCII (whose UTF-8 form the array does not hold) is not encoded here; its callers build
protobuf messages as before.
"""

from __future__ import annotations

import itertools

import numpy as np

from bertrec.v1 import recommender_pb2 as pb

_ITEMS = 0x0A  # RecommendResponse.items: field 1, length-delimited
_MODEL = 0x12  # RecommendResponse.model: field 2, length-delimited
_ITEM_ID = 0x0A  # RankedItem.item_id: field 1, length-delimited
_SCORE = 0x15  # RankedItem.score: field 2, fixed32
_RATING = 0x1D  # RankedItem.predicted_rating: field 3, fixed32
_RANK = 0x20  # RankedItem.rank: field 4, varint
_FIXED = 14  # a RankedItem's bytes besides its id: 2 (id tag, length) + 5 + 5 + 2 (rank)
_ONE_BYTE = 0x7F  # the largest varint of one byte
MAX_ID_BYTES = _ONE_BYTE - _FIXED  # longest id whose RankedItem length fits in one byte
# Queries per batch from which one pass costs less per query than a message each (~15 us at
# k=10 here): the pass costs 24 us for one query, 6.6 us each for 4, 2.6 each for 13.
WIRE_FROM = 4


class RecommendWire:
    """Encodes RecommendResponses of one model version from ranked arrays.

    Every length and rank here is a one-byte varint: batches where that does not hold (an id
    longer than MAX_ID_BYTES, a rank past 127), or where proto3 would leave a field out (an
    empty id, a score or rating of +0.0), are left to protobuf, as are non-ASCII ids.

    Args:
        item_ids: the version's unicode (n_items,) id array, in row order.
        model_name, version: the `model` every response names.
    """

    def __init__(self, item_ids: np.ndarray, model_name: str, version: int) -> None:
        if item_ids.ndim != 1 or item_ids.dtype.kind != "U":
            raise ValueError(f"item ids must be a 1-d unicode array, got {item_ids.dtype}")
        width = item_ids.dtype.itemsize // 4
        # (n, width) code points, trailing NULs as padding: a view, nothing copied.
        self._codes = item_ids.view(np.uint32).reshape(len(item_ids), width)
        ref = pb.ModelRef(name=model_name, version=version).SerializeToString()
        self._model_field = bytes([_MODEL, len(ref)]) + ref if len(ref) <= _ONE_BYTE else None

    def responses(
        self, rows: np.ndarray, scores: np.ndarray, ratings: np.ndarray, counts: list[int]
    ) -> list[bytes] | None:
        """Serialized RecommendResponse of each query: its first `counts[b]` entries of `rows`
        (item rows), `scores` and `ratings` (each (B, width)), ranked 1, 2, ...

        Returns None for a batch this encoder leaves to protobuf (class docstring).
        """
        model_field = self._model_field
        batch, top = rows.shape
        if model_field is None or not self._codes.shape[1] or max(counts, default=0) > _ONE_BYTE:
            return None
        full = all(n == top for n in counts)  # the usual batch: k answers each, one k
        if full:
            answered, per_query = None, [top] * batch
            item_rows, score, rating = rows.reshape(-1), scores.reshape(-1), ratings.reshape(-1)
        else:
            answered = np.arange(top) < np.asarray(counts)[:, None]
            item_rows, score, rating = rows[answered], scores[answered], ratings[answered]
            per_query = counts
        if not len(item_rows):
            return [model_field] * batch
        # The answered ids' code points, no wider than an id this encoder can say plus one
        # column: the array is as wide as the catalogue's longest id, whatever is answered.
        columns = min(self._codes.shape[1], MAX_ID_BYTES + 1)
        codes = self._codes[item_rows, :columns]
        if columns > MAX_ID_BYTES and codes[:, MAX_ID_BYTES].any():
            return None  # an answered id is too long for one-byte lengths
        score = np.ascontiguousarray(score, dtype="<f4")
        rating = np.ascontiguousarray(rating, dtype="<f4")
        if (
            int(codes.max()) > 0x7F  # not ASCII
            or not score.view(np.uint32).all()  # +0.0: proto3 leaves the field out
            or not rating.view(np.uint32).all()
        ):
            return None
        width = codes.shape[1]
        used = codes != 0
        same_length = bool(used[:, -1].all())  # every id fills the array's width
        if same_length:
            lengths = np.full(len(codes), width)
        else:
            # An id ends at its last non-NUL code point (numpy pads with, and strips, those).
            if not used.any(axis=1).all():  # an empty id: proto3 leaves the field out
                return None
            lengths = width - np.argmax(used[:, ::-1], axis=1)
        # One row per item: the item's tag and length, the id's tag and length, the id padded
        # to `width`, then score, rating and rank; any padding is cut out below.
        table = np.empty((len(codes), 4 + width + 12), dtype=np.uint8)
        table[:, :4] = (_ITEMS, 0, _ITEM_ID, 0)
        table[:, 1] = lengths + _FIXED
        table[:, 3] = lengths
        table[:, 4 : 4 + width] = codes
        tail = table[:, 4 + width :]
        tail[:, 0] = _SCORE
        tail[:, 1:5] = score.view(np.uint8).reshape(-1, 4)
        tail[:, 5] = _RATING
        tail[:, 6:10] = rating.view(np.uint8).reshape(-1, 4)
        tail[:, 10] = _RANK
        if answered is None:
            tail.reshape(batch, top, -1)[:, :, 11] = np.arange(1, top + 1)
        else:
            tail[:, 11] = np.nonzero(answered)[1] + 1
        if same_length:
            items = table.tobytes()
            entry = width + _FIXED + 2
            ends = [entry * n for n in itertools.accumulate(per_query)]
        else:
            keep = np.ones(table.shape, dtype=bool)
            keep[:, 4 : 4 + width] = np.arange(width) < lengths[:, None]
            items = table[keep].tobytes()  # every item's bytes, query after query
            owner = np.repeat(np.arange(batch), per_query)
            sizes = np.bincount(owner, weights=lengths + _FIXED + 2, minlength=batch)
            ends = np.cumsum(sizes.astype(np.int64)).tolist()
        starts = [0, *ends[:-1]]
        return [items[s:e] + model_field for s, e in zip(starts, ends, strict=True)]
