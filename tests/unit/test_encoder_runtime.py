"""EncoderRuntime against the same ONNX session run on one text at a time; provider choice."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from bertrec.errors import BertrecError
from bertrec.server import providers
from bertrec.server.encoder_runtime import EncoderRuntime, cut_by_length
from bertrec.server.providers import CPU, CUDA, ProviderError, make_session
from bertrec.text import TextTokenizer

DIM = 16
MAX_LENGTH = 24
TEXTS = [
    "a long review that goes on and on about the plot, the acting and the music " * 3,
    "short",
    "a medium length sentence about a film",
    "",
    "two words",
    "another medium sentence, with punctuation; and more words here",
    "x",
]


@pytest.fixture(scope="module")
def encoder_onnx(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT as a TextEncoder (projection to DIM), exported as `bertrec export` does."""
    import torch

    from bertrec.export.onnx_export import export_encoder
    from bertrec.train.encoder import TextEncoder, load_bert

    torch.manual_seed(0)
    bert, _, _ = load_bert(tiny_bert_dir)
    sample = tokenizer_for(tiny_bert_dir)(["a padded sample batch", "of two"])
    path = tmp_path_factory.mktemp("encoder") / "encoder.onnx"
    export_encoder(TextEncoder(bert, DIM).eval(), sample, path)
    return path


def tokenizer_for(model_dir: Path) -> TextTokenizer:
    return TextTokenizer.from_file(model_dir / "tokenizer.json", MAX_LENGTH)


@pytest.fixture(scope="module")
def runtime(encoder_onnx: Path, tiny_bert_dir: Path) -> EncoderRuntime:
    return EncoderRuntime(encoder_onnx, tokenizer_for(tiny_bert_dir), [CPU], 1, 1, max_batch=3)


def one_at_a_time(encoder_onnx: Path, tokenizer: TextTokenizer, texts: list[str]) -> np.ndarray:
    session = make_session(encoder_onnx, [CPU])
    return np.vstack([session.run(["embedding"], tokenizer([t]).as_feed())[0] for t in texts])


def test_encode_matches_single_texts_in_input_order(
    runtime: EncoderRuntime, encoder_onnx: Path, tiny_bert_dir: Path
) -> None:
    got = runtime.encode(TEXTS)
    want = one_at_a_time(encoder_onnx, tokenizer_for(tiny_bert_dir), TEXTS)
    assert got.shape == (len(TEXTS), DIM) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_micro_batches_are_sorted_and_padded_to_their_longest(runtime: EncoderRuntime) -> None:
    inputs = runtime.tokenize(TEXTS)
    assert all(len(b.input_ids) <= runtime.max_batch for b in inputs.batches)
    assert sorted(np.concatenate(inputs.positions).tolist()) == list(range(len(TEXTS)))
    longest = [int(b.attention_mask.sum(axis=1).max()) for b in inputs.batches]
    assert [b.input_ids.shape[1] for b in inputs.batches] == longest
    assert longest == sorted(longest) and longest[-1] == MAX_LENGTH  # truncated
    assert inputs.tokens < len(TEXTS) * MAX_LENGTH


def test_cut_by_length() -> None:
    lengths = np.array([3, 3, 4, 10, 10, 11, 40, 120])
    assert cut_by_length(lengths, 32, 16) == [(0, 3), (3, 6), (6, 7), (7, 8)]
    assert cut_by_length(lengths, 3, 10**6) == [(0, 3), (3, 6), (6, 8)]  # fewest runs
    assert cut_by_length(lengths, 32, 0) == [(0, 2), (2, 3), (3, 5), (5, 6), (6, 7), (7, 8)]
    assert cut_by_length(np.array([7] * 5), 2, 16) == [(0, 1), (1, 3), (3, 5)]
    assert cut_by_length(np.array([], dtype=np.int64), 4, 16) == []


def test_tokenize_then_run_equals_encode(runtime: EncoderRuntime) -> None:
    texts = TEXTS[::-1]
    np.testing.assert_array_equal(runtime.run(runtime.tokenize(texts)), runtime.encode(texts))


def test_empty_and_single(runtime: EncoderRuntime) -> None:
    assert runtime.encode([]).shape == (0, DIM)
    assert runtime.encode(["just one"]).shape == (1, DIM)


def test_describes_itself(runtime: EncoderRuntime) -> None:
    assert runtime.provider == CPU
    assert runtime.dim == DIM
    assert runtime.max_length == MAX_LENGTH


def test_rejects_bad_batch_size(encoder_onnx: Path, tiny_bert_dir: Path) -> None:
    with pytest.raises(ValueError, match="max_batch"):
        EncoderRuntime(encoder_onnx, tokenizer_for(tiny_bert_dir), [CPU], max_batch=0)
    with pytest.raises(ValueError, match="run_cost_tokens"):
        EncoderRuntime(encoder_onnx, tokenizer_for(tiny_bert_dir), [CPU], run_cost_tokens=-1)


class FakeSession:
    """Stands in for an InferenceSession that fell back to the CPU."""

    def __init__(self, model: object, options: object, providers: list[str]) -> None:
        self.providers = providers

    def get_providers(self) -> list[str]:
        return [CPU]


def fake_onnxruntime(available: list[str]) -> SimpleNamespace:
    return SimpleNamespace(
        get_available_providers=lambda: available,
        SessionOptions=SimpleNamespace,
        GraphOptimizationLevel=SimpleNamespace(ORT_ENABLE_ALL="all"),
        ExecutionMode=SimpleNamespace(ORT_PARALLEL="parallel"),
        InferenceSession=FakeSession,
    )


@pytest.mark.parametrize(
    ("available", "preferred", "chosen"),
    [
        ([CPU], "auto", [CPU]),
        ([CUDA, CPU], "auto", [CUDA, CPU]),
        ([CUDA, CPU], "cpu", [CPU]),
        ([CUDA, CPU], "CUDA", [CUDA]),
        ([CPU], [CUDA, CPU], [CPU]),
        ([CPU], ("cuda", "cpu", "cpu"), [CPU]),
        (["TensorrtExecutionProvider", CUDA, CPU], [CUDA, CPU], [CUDA, CPU]),
    ],
)
def test_choose_providers(
    monkeypatch: pytest.MonkeyPatch, available: list[str], preferred: Any, chosen: list[str]
) -> None:
    monkeypatch.setattr(providers, "onnxruntime", lambda: fake_onnxruntime(available))
    assert providers.choose_providers(preferred) == chosen


@pytest.mark.parametrize("preferred", ["cuda", [CUDA], ["cuda"], "tpu"])
def test_choose_providers_refuses_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, preferred: Any
) -> None:
    monkeypatch.setattr(providers, "onnxruntime", lambda: fake_onnxruntime([CPU]))
    with pytest.raises(ProviderError):
        providers.choose_providers(preferred)


def test_missing_onnxruntime_names_the_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes the import fail
    with pytest.raises(ProviderError, match=r"bertrec\[cpu\].*bertrec\[gpu\]"):
        providers.choose_providers()
    assert issubclass(ProviderError, BertrecError)


def test_make_session_notices_a_silent_cpu_fallback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(providers, "onnxruntime", lambda: fake_onnxruntime([CUDA, CPU]))
    with pytest.raises(ProviderError, match="fell back"):
        providers.make_session(b"model", [CUDA])
    session = providers.make_session(b"model", [CUDA, CPU])
    assert providers.session_provider(session) == CPU
    assert "not the preferred" in caplog.text


def test_make_session_on_the_real_runtime(encoder_onnx: Path) -> None:
    session = providers.make_session(encoder_onnx, [CPU], intra_op_threads=1)
    assert providers.session_provider(session) == CPU
