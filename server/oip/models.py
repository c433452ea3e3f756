"""The two Open Inference Protocol models bertrec serves, as adapters over the `Recommender`.

- `<model>-encoder`: input `text` BYTES [-1] (UTF-8) -> output `embedding` FP32 [-1, dim],
  the same vectors as `EmbedText`.
- `<model>-ranker`: inputs `user_id` BYTES [-1] and optional `k` INT32 or INT64 [1]
  (default 10, capped at max_k) -> outputs `item_ids` BYTES [-1, k] and `scores` FP32 [-1, k],
  the same lists as `Recommend` (rated items excluded). A row with fewer than k candidates
  left is padded with empty ids and score -inf. With optional input `explain` INT32 or INT64
  [1] set to 1, also `bias_part`, `collaborative_part`, `text_part` and `contributions_total`
  FP32 [-1, k] (the native Explanation's fields; padding 0, and NaN for a total the version
  cannot attribute) and `top_contributors` BYTES [-1, k], each a JSON list of
  {"item_id", "contribution"} (padding: empty). Naming those outputs without `explain` is
  INVALID_ARGUMENT; naming no outputs returns the ones computed.

Both run through one public engine method each (`embed_text`, `recommend_users`), so they
share its validation, dynamic batchers and metrics with the native API: the ranker's users are
all queued before any is waited for, so they join one ranking batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from bertrec.results import Recommendations
from bertrec.server.engine import Call, Recommender
from bertrec.server.errors import InvalidArgument
from bertrec.server.oip.explain import (
    EXPLANATION_PARTS,
    TOP_CONTRIBUTORS,
    explanation_tensors,
)
from bertrec.server.oip.tensors import BYTES, FP32, INT32, INT64, Tensor
from bertrec.server.ranking import PAD_SCORE

PAD_ID = b""


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, accepted datatypes (first is advertised) and shape."""

    name: str
    datatypes: tuple[str, ...]
    shape: tuple[int, ...]  # -1: any size
    optional: bool = False


class V2Model(Protocol):
    """A model as the protocol sees it: tensors in, tensors out."""

    name: str
    inputs: tuple[TensorSpec, ...]

    def outputs(self, engine: Recommender) -> tuple[TensorSpec, ...]: ...

    def infer(
        self, engine: Recommender, inputs: dict[str, Tensor], call: Call
    ) -> dict[str, Tensor]: ...


class EncoderModel:
    """Texts -> encoder vectors in factor space."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.inputs = (TensorSpec("text", (BYTES,), (-1,)),)

    def outputs(self, engine: Recommender) -> tuple[TensorSpec, ...]:
        return (TensorSpec("embedding", (FP32,), (-1, engine.model.dim)),)

    def infer(
        self, engine: Recommender, inputs: dict[str, Tensor], call: Call
    ) -> dict[str, Tensor]:
        texts = _strings(inputs["text"])
        vectors = engine.embed_text(texts, call).vectors
        return {"embedding": Tensor("embedding", FP32, vectors.shape, vectors)}


class RankerModel:
    """User ids (and k) -> each user's top-k item ids and ranking scores."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.inputs = (
            TensorSpec("user_id", (BYTES,), (-1,)),
            TensorSpec("k", (INT32, INT64), (1,), optional=True),
            TensorSpec("explain", (INT32, INT64), (1,), optional=True),
        )

    def outputs(self, engine: Recommender) -> tuple[TensorSpec, ...]:
        return (
            TensorSpec("item_ids", (BYTES,), (-1, -1)),
            TensorSpec("scores", (FP32,), (-1, -1)),
            *(TensorSpec(name, (FP32,), (-1, -1)) for name in EXPLANATION_PARTS),
            TensorSpec(TOP_CONTRIBUTORS, (BYTES,), (-1, -1)),
        )

    def infer(
        self, engine: Recommender, inputs: dict[str, Tensor], call: Call
    ) -> dict[str, Tensor]:
        users = _strings(inputs["user_id"])
        limit = engine.config.ranker_max_batch_size
        if len(users) > limit:
            raise InvalidArgument(
                f"input 'user_id' has {len(users)} users, more than one ranking batch ({limit})"
            )
        # Absent or 0: the default, as on the native API (one rule: Recommender.resolve_k).
        k = engine.resolve_k(int(np.asarray(inputs["k"].data)[0]) if "k" in inputs else 0)
        explain = "explain" in inputs and bool(np.asarray(inputs["explain"].data)[0])
        ranked = engine.recommend_users(users, k, call, explain)
        ids = [[i.item_id.encode() for i in r.items] + [PAD_ID] * (k - len(r.items))
               for r in ranked]  # fmt: skip
        return {
            "item_ids": Tensor("item_ids", BYTES, (len(users), k), [i for row in ids for i in row]),
            "scores": Tensor("scores", FP32, (len(users), k), _scores(ranked, k)),
            **(explanation_tensors(ranked, k) if explain else {}),
        }


def _scores(ranked: Sequence[Recommendations], k: int) -> np.ndarray:
    scores = np.full((len(ranked), k), PAD_SCORE, dtype=np.float32)
    for row, result in enumerate(ranked):
        scores[row, : len(result.items)] = [i.score for i in result.items]
    return scores


def _strings(tensor: Tensor) -> list[str]:
    assert isinstance(tensor.data, list)  # BYTES, checked against the spec
    if not tensor.data:
        raise InvalidArgument(f"input {tensor.name!r} is empty")
    try:
        return [e.decode("utf-8") for e in tensor.data]
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"input {tensor.name!r} is not valid UTF-8: {exc}") from None
