"""A tiny random-weight BERT checkpoint for tests and smoke runs (seconds, not minutes).

It reuses the pretrained package's vocabulary and tokenizer, so token ids are realistic.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from bertrec.train.encoder import default_encoder_path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def make_tiny_bert(out_dir: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Write a random-weight BERT (hidden 32, 2 layers) to `out_dir`; returns the path."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    source = default_encoder_path()
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=512,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    BertModel(config).save_pretrained(str(out_dir))
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, out_dir / name)
    return out_dir
