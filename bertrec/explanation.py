"""Typed explanations of ranking scores, shared by the server (server/explain.py) and the
Python client, like the other result types in `bertrec.results`."""

from __future__ import annotations

from dataclasses import dataclass

from bertrec.results import RankedItem


@dataclass(frozen=True)
class Contribution:
    """How much one of the user's rated items adds to a recommended item's score."""

    item_id: str
    contribution: float


@dataclass(frozen=True)
class Explanation:
    """An exact split of a ranking score, plus the rated items that pulled hardest.

    bias_part + collaborative_part + text_part == score (float32 rounding, |error| < 1e-4):
    bias_part = item_rank_bias[i], text_part = dot(u, item_text_factors[i]) (0 for versions
    without that array), collaborative_part = dot(u, item_factors[i]) - text_part.

    `contributions` (at most three, largest first) come from the ranking head's ridge
    regression: c_uj y_i^T W_u y_j over the user's rated items j. They are that regression's
    exact attribution; the served user vector was reached by a few conjugate-gradient steps,
    so their sum over all rated items, `contributions_total`, is close to but not exactly
    collaborative_part + text_part. None (and no contributions) for text queries and for
    versions exported without the attribution arrays.
    """

    bias_part: float
    collaborative_part: float
    text_part: float
    contributions: tuple[Contribution, ...] = ()
    contributions_total: float | None = None


@dataclass(frozen=True)
class ExplainedItem(RankedItem):
    """A ranked item with the explanation of its score (None when none was asked for)."""

    explanation: Explanation | None = None
