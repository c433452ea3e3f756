"""A synthetic model version for benchmarks: random factors, a tiny ONNX encoder, real manifest.

No torch: the encoder is an embedding lookup with mean pooling written with `onnx.helper`, and
the tokenizer a word-level `tokenizers` model, so the version builds in seconds at any size and
loads through exactly the same path (`resolve_version`, manifest, hashes) as an exported one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bertrec.repository.artifacts import (
    ENCODER_ONNX,
    ITEM_TEXTS,
    TOKENIZER,
    FactorArrays,
    save_item_texts,
)

MODEL = "synthetic"
WORDS = [
    "quiet",
    "warm",
    "story",
    "lighthouse",
    "keeper",
    "letters",
    "sea",
    "fast",
    "thriller",
    "detective",
    "art",
    "thief",
    "europe",
    "cookbook",
    "simple",
    "vegetarian",
    "dishes",
    "busy",
    "weeknights",
    "science",
    "fiction",
    "colonists",
    "generation",
    "ship",
    "memoir",
    "jazz",
    "pianist",
    "new",
    "orleans",
    "sixties",
]


def build_synthetic_repo(root: Path, n_items: int, n_users: int, dim: int, seed: int = 0) -> Path:
    """Publish a synthetic version of `MODEL` under `root`; returns the repository folder."""
    from bertrec.repository.versions import publish_version

    repo = root / "repo"
    publish_version(repo, MODEL, lambda out: _write_version(out, n_items, n_users, dim, seed), 1)
    return repo


def _write_version(out: Path, n_items: int, n_users: int, dim: int, seed: int) -> None:
    from bertrec.export.verify import ParityFixture, run_onnx
    from bertrec.repository.manifest import (
        Dims,
        EncoderInfo,
        EncoderVariant,
        Manifest,
        Parity,
        Scoring,
        write_manifest,
    )
    from bertrec.text import TextTokenizer

    rng = np.random.default_rng(seed)
    per_user = 20
    rated = np.sort(rng.integers(0, n_items, size=(n_users, per_user)), axis=1)
    item_ids = np.array([f"i{i:08d}" for i in range(n_items)])
    random_factor_arrays(
        rng,
        user_ids=np.array([f"u{i:07d}" for i in range(n_users)]),
        item_ids=item_ids,
        rated_indptr=np.arange(n_users + 1) * per_user,
        rated_indices=rated.ravel(),
        dim=dim,
        global_mean=3.5,
    ).save(out)
    texts = [" ".join(rng.choice(WORDS, size=6)) for _ in range(n_items)]
    save_item_texts(out / ITEM_TEXTS, [str(i) for i in item_ids], texts)
    max_len = 32
    _write_tokenizer(out / TOKENIZER)
    (out / ENCODER_ONNX).write_bytes(_tiny_encoder(len(WORDS) + 4, dim, rng))
    tokenizer = TextTokenizer.from_file(out / TOKENIZER, max_len)
    batches = [["quiet sea"], ["jazz memoir of the sixties", "fast thriller"]]
    fixture = ParityFixture(max_len, batches, run_onnx(out / ENCODER_ONNX, tokenizer, batches))
    fixture.save(out)
    variant = EncoderVariant("fp32", ENCODER_ONNX, "fp32", Parity(0.0, 1.0, 1.0, 3))
    write_manifest(
        out,
        Manifest(
            model_name=MODEL,
            version=1,
            created_at="1970-01-01T00:00:00+00:00",
            base_encoder="synthetic",
            dims=Dims(dim, dim, max_len, n_users, n_items),
            scoring=Scoring(3.5, (1.0, 5.0)),
            encoder=EncoderInfo(
                ENCODER_ONNX,
                ("input_ids", "attention_mask", "token_type_ids"),
                "embedding",
                17,
                (variant,),
            ),
            training_metrics={"synthetic": 1},
        ),
    )


def _write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    vocab.update({w: i + 4 for i, w in enumerate(dict.fromkeys(WORDS))})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer.save(str(path))


def _tiny_encoder(vocab: int, dim: int, rng: np.random.Generator) -> bytes:
    """input_ids, attention_mask, token_type_ids -> mean of token embeddings (B, dim)."""
    from onnx import TensorProto, helper, numpy_helper

    table = rng.normal(0, 1, (vocab, dim)).astype(np.float32)
    value = helper.make_tensor_value_info
    inputs = [value(n, TensorProto.INT64, ["batch", "seq"])
              for n in ("input_ids", "attention_mask", "token_type_ids")]  # fmt: skip
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["tokens"]),
        helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask", "last"], ["mask3"]),
        helper.make_node("Mul", ["tokens", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "one"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask3", "one"], ["count"], keepdims=0),
        helper.make_node("Div", ["summed", "count"], ["embedding"]),
    ]
    initializers = [
        numpy_helper.from_array(table, "table"),
        numpy_helper.from_array(np.array([-1], np.int64), "last"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
    ]
    output = value("embedding", TensorProto.FLOAT, ["batch", dim])
    graph = helper.make_graph(nodes, "tiny_encoder", inputs, [output], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return bytes(model.SerializeToString())


def random_factor_arrays(
    rng: np.random.Generator,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    rated_indptr: np.ndarray,
    rated_indices: np.ndarray,
    dim: int,
    global_mean: float,
) -> FactorArrays:
    """Random but well-scaled factors and biases around given ids and rated-item lists."""
    scale = 1.0 / np.sqrt(dim)
    n_users, n_items = len(user_ids), len(item_ids)
    return FactorArrays(
        user_ids=user_ids,
        item_ids=item_ids,
        user_factors=rng.normal(0, scale, (n_users, dim)),
        item_factors=rng.normal(0, scale, (n_items, dim)),
        user_bias=rng.normal(0, 0.3, n_users),
        item_bias=rng.normal(0, 0.3, n_items),
        item_rank_bias=rng.normal(0, 0.1, n_items),
        text_to_user=rng.normal(0, scale, (dim, dim)),
        rated_indptr=rated_indptr,
        rated_indices=rated_indices,
        global_mean=global_mean,
    )
