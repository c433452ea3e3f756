"""The training output folder that `bertrec train` writes and `bertrec export` reads.

<out>/train_info.json   TrainInfo as JSON (names, dims, global mean, metrics, config)
<out>/encoder/          Hugging Face checkpoint of the fine-tuned BERT + tokenizer.json
<out>/encoder/projection.pt   state dict of TextEncoder.projection (factor model's P)
<out>/factors/          FactorArrays (.npy) + item_texts.jsonl
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bertrec.errors import ArtifactError
from bertrec.repository.artifacts import (
    ITEM_TEXTS,
    TOKENIZER,
    FactorArrays,
    load_item_texts,
    save_item_texts,
)

TRAIN_INFO = "train_info.json"
ENCODER_DIR = "encoder"
PROJECTION = "projection.pt"
FACTORS_DIR = "factors"


@dataclass
class TrainInfo:
    model_name: str
    base_encoder: str
    dim: int
    max_seq_len: int
    global_mean: float
    rating_range: tuple[float, float] = (1.0, 5.0)
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""

    def save(self, out: Path) -> None:
        (out / TRAIN_INFO).write_text(json.dumps(asdict(self), indent=2, default=str))

    @staticmethod
    def load(out: Path) -> TrainInfo:
        path = out / TRAIN_INFO
        if not path.is_file():
            raise ArtifactError(f"{out}: not a bertrec training output (no {TRAIN_INFO})")
        raw = json.loads(path.read_text())
        raw["rating_range"] = tuple(raw.get("rating_range", (1.0, 5.0)))
        return TrainInfo(**raw)


def save_encoder(out: Path, encoder: Any, tokenizer: Any) -> None:
    """Save a TextEncoder (torch) and its TextTokenizer under `<out>/encoder/`."""
    import torch

    enc_dir = out / ENCODER_DIR
    enc_dir.mkdir(parents=True, exist_ok=True)
    encoder.bert.save_pretrained(str(enc_dir))
    torch.save(encoder.projection.state_dict(), enc_dir / PROJECTION)
    tokenizer.save(enc_dir / TOKENIZER)


def load_encoder(out: Path, max_seq_len: int, dim: int) -> tuple[Any, Any]:
    """Load the fine-tuned TextEncoder (eval mode) and its TextTokenizer from `<out>/encoder/`."""
    import torch

    from bertrec.text import TextTokenizer
    from bertrec.train.encoder import TextEncoder, load_bert

    enc_dir = out / ENCODER_DIR
    bert, _, _ = load_bert(enc_dir)
    encoder = TextEncoder(bert, dim)
    encoder.projection.load_state_dict(torch.load(enc_dir / PROJECTION, weights_only=True))
    encoder.eval()
    tokenizer = TextTokenizer.from_file(enc_dir / TOKENIZER, max_length=max_seq_len)
    return encoder, tokenizer


def save_factors(out: Path, factors: FactorArrays, item_texts: list[str]) -> None:
    fdir = out / FACTORS_DIR
    fdir.mkdir(parents=True, exist_ok=True)
    factors.save(fdir)
    save_item_texts(fdir / ITEM_TEXTS, [str(i) for i in factors.item_ids], item_texts)


def load_factors(out: Path, global_mean: float) -> tuple[FactorArrays, list[str]]:
    fdir = out / FACTORS_DIR
    return FactorArrays.load(fdir, global_mean, mmap=False), load_item_texts(fdir / ITEM_TEXTS)
