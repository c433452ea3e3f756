"""The v2 ranker's optional explanation outputs, built from explained `Recommendations`.

Kept apart from models.py so the adapter stays a list of tensors: one FP32 [users, k] tensor
per numeric field of `bertrec.explanation.Explanation`, and the top contributors as one JSON
document per item (BYTES), since a ragged list of (id, value) pairs has no v2 tensor shape.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from bertrec.explanation import ExplainedItem, Explanation
from bertrec.results import Recommendations
from bertrec.server.oip.tensors import BYTES, FP32, Tensor

EXPLANATION_PARTS = ("bias_part", "collaborative_part", "text_part", "contributions_total")
TOP_CONTRIBUTORS = "top_contributors"
EXPLANATION_OUTPUTS = (*EXPLANATION_PARTS, TOP_CONTRIBUTORS)


def explanation_tensors(ranked: Sequence[Recommendations], k: int) -> dict[str, Tensor]:
    """The explanation outputs of `ranked` (explained items), each (len(ranked), k)."""
    shape = (len(ranked), k)
    parts = {name: np.zeros(shape, np.float32) for name in EXPLANATION_PARTS}
    parts["contributions_total"][:] = np.nan
    top = [[b""] * k for _ in ranked]
    for row, result in enumerate(ranked):
        for col, item in enumerate(result.items):
            e = _explanation(item)
            parts["bias_part"][row, col] = e.bias_part
            parts["collaborative_part"][row, col] = e.collaborative_part
            parts["text_part"][row, col] = e.text_part
            if e.contributions_total is not None:
                parts["contributions_total"][row, col] = e.contributions_total
            pairs = [{"item_id": c.item_id, "contribution": c.contribution}
                     for c in e.contributions]  # fmt: skip
            top[row][col] = json.dumps(pairs).encode()
    tensors = {name: Tensor(name, FP32, shape, data) for name, data in parts.items()}
    flat = [element for row in top for element in row]
    tensors[TOP_CONTRIBUTORS] = Tensor(TOP_CONTRIBUTORS, BYTES, shape, flat)
    return tensors


def _explanation(item: object) -> Explanation:
    assert isinstance(item, ExplainedItem) and item.explanation is not None
    return item.explanation
