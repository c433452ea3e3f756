"""What to send: the RPC mix and realistic, pre-serialised requests built from model ids/texts.

Inputs come from, in order of preference:
1. the model version folder (`--model-repo/--model/--version`): `user_ids.npy`, `item_ids.npy`
   and `item_texts.jsonl` (the exact ids and texts the served model knows);
2. otherwise the server: `GetModelInfo` gives the request limits, and item ids are discovered
   from `RecommendForText` answers to the texts given; users cannot be listed by the API, so
   they must be given with `--user-ids` (comma list or `@file`, one id per line).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bertrec.errors import BertrecError
from bertrec.repository.artifacts import ITEM_IDS, ITEM_TEXTS, USER_IDS, load_item_texts

SERVICE = "/bertrec.v1.RecommenderService/"
# Mix keys (CLI spelling) -> gRPC method names.
METHODS = {
    "recommend": "Recommend",
    "recommend_for_text": "RecommendForText",
    "similar_items": "SimilarItems",
    "score_items": "ScoreItems",
    "embed_text": "EmbedText",
}
DEFAULT_TEXTS = (
    "a gentle comedy about friends on a road trip",
    "space battles with robots and a rebel pilot",
    "a detective story set in a rainy city",
    "a cookbook of quick family dinners",
)
POOL_SIZE = 1024  # distinct requests per RPC; each call picks one at random


@dataclass(frozen=True)
class Limits:
    """Request limits of the server (GetModelInfo), used to keep generated requests valid."""

    max_k: int = 50
    max_item_ids: int = 20
    max_texts: int = 12
    max_text_bytes: int = 400


@dataclass(frozen=True)
class Inputs:
    """Ids and texts the requests are drawn from, and where they came from."""

    user_ids: tuple[str, ...]
    item_ids: tuple[str, ...]
    texts: tuple[str, ...]
    source: str
    limits: Limits = field(default_factory=Limits)


def parse_mix(spec: str) -> dict[str, float]:
    """`recommend=8,similar_items=1` -> normalised weights (zero weights dropped).

    Raises:
        BertrecError: an unknown RPC, a negative or non-numeric weight, or all weights zero.
    """
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in METHODS:
            raise BertrecError(f"--mix: unknown RPC {name!r} (known: {', '.join(METHODS)})")
        try:
            weight = float(value) if value else 1.0
        except ValueError:
            raise BertrecError(f"--mix: weight of {name} is not a number: {value!r}") from None
        if weight < 0:
            raise BertrecError(f"--mix: weight of {name} is negative: {weight}")
        if weight > 0:
            weights[name] = weight
    total = sum(weights.values())
    if total <= 0:
        raise BertrecError(f"--mix: no RPC with a positive weight in {spec!r}")
    return {name: w / total for name, w in weights.items()}


def parse_id_list(value: str | None) -> tuple[str, ...]:
    """A comma list, or `@path` to a file with one entry per line (blank lines skipped)."""
    if not value:
        return ()
    if value.startswith("@"):
        lines = Path(value[1:]).read_text().splitlines()
        return tuple(line.strip() for line in lines if line.strip())
    return tuple(v.strip() for v in value.split(",") if v.strip())


def inputs_from_version(version_dir: Path, limits: Limits) -> Inputs:
    """Users, items and item texts of one exported model version."""
    users = np.load(version_dir / USER_IDS, allow_pickle=False)
    items = np.load(version_dir / ITEM_IDS, allow_pickle=False)
    texts_file = version_dir / ITEM_TEXTS
    texts = [str(t) for t in load_item_texts(texts_file)] if texts_file.exists() else []
    return Inputs(
        user_ids=tuple(str(u) for u in users),
        item_ids=tuple(str(i) for i in items),
        texts=tuple(t for t in texts if t) or DEFAULT_TEXTS,
        source=f"model version folder {version_dir}",
        limits=limits,
    )


def check_inputs(inputs: Inputs, mix: Mapping[str, float]) -> None:
    """Fail early, naming the flag, when the mix needs ids that were not found."""
    needs_users = {"recommend", "score_items"} & set(mix)
    needs_items = {"similar_items", "score_items"} & set(mix)
    if needs_users and not inputs.user_ids:
        raise BertrecError(
            f"{', '.join(sorted(needs_users))} in --mix need user ids: give --model-repo/--model "
            "or --user-ids (the server's API cannot list users)"
        )
    if needs_items and not inputs.item_ids:
        raise BertrecError(
            f"{', '.join(sorted(needs_items))} in --mix need item ids: give --model-repo/--model "
            "or --item-ids"
        )


def _clip_text(text: str, max_bytes: int) -> str:
    return text.encode()[:max_bytes].decode(errors="ignore") or "a story"


def build_pools(
    inputs: Inputs, mix: Mapping[str, float], k: int, seed: int, size: int = POOL_SIZE
) -> dict[str, list[bytes]]:
    """Serialised requests per RPC in the mix, drawn uniformly from the inputs."""
    from bertrec.v1 import recommender_pb2 as pb

    rng = np.random.default_rng(seed)
    lim = inputs.limits
    k = max(1, min(k, lim.max_k))

    def pick(values: Sequence[str], n: int = 1) -> list[str]:
        rows = rng.choice(len(values), size=min(n, len(values)), replace=False)
        return [values[int(r)] for r in rows]

    def text() -> str:
        return _clip_text(pick(inputs.texts)[0], lim.max_text_bytes)

    def make(name: str) -> bytes:
        if name == "recommend":
            msg: object = pb.RecommendRequest(user_id=pick(inputs.user_ids)[0], k=k)
        elif name == "recommend_for_text":
            msg = pb.RecommendForTextRequest(text=text(), k=k)
        elif name == "similar_items":
            msg = pb.SimilarItemsRequest(item_id=pick(inputs.item_ids)[0], k=k)
        elif name == "score_items":
            n = min(10, lim.max_item_ids)
            msg = pb.ScoreItemsRequest(user_id=pick(inputs.user_ids)[0],
                                       item_ids=pick(inputs.item_ids, n))  # fmt: skip
        else:
            count = int(rng.integers(1, min(4, lim.max_texts) + 1))
            msg = pb.EmbedTextRequest(texts=[text() for _ in range(count)])
        return msg.SerializeToString()  # type: ignore[attr-defined]

    return {name: [make(name) for _ in range(size)] for name in mix}
