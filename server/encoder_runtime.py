"""The text encoder under ONNX Runtime: tokenise, sort by length, run micro-batches, reorder.

Padding every text to the model's maximum length wastes most of the work on a realistic mix
of lengths. Here a request's texts are sorted by token count and cut into micro-batches, each
padded only to its own longest text. Where to cut is chosen to minimise the padded tokens plus
a fixed cost per session run (`run_cost_tokens`): one long review no longer makes 31 short
texts pay for its length, while texts of similar length still share a run. Tokenising
(`tokenize`) and running (`run`) are separate steps so that a dynamic batcher can tokenise off
the thread that owns the session.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bertrec.server.providers import make_session, session_provider
from bertrec.text import TextTokenizer, TokenBatch


@dataclass(frozen=True)
class EncoderInputs:
    """Tokenised texts, sorted by length and cut into micro-batches.

    `positions[i]` holds, for each row of `batches[i]`, the index of its text in the input.
    """

    batches: tuple[TokenBatch, ...]
    positions: tuple[np.ndarray, ...]
    count: int

    @property
    def tokens(self) -> int:
        """Token slots the session will compute, padding included."""
        return sum(b.input_ids.size for b in self.batches)


class EncoderRuntime:
    """An ONNX text encoder: texts in, float32 (len(texts), dim) vectors out, in input order.

    Args:
        onnx_path: the encoder graph (inputs named as `TokenBatch.as_feed`).
        tokenizer: the tokenizer exported with the graph (sets `max_length`).
        providers: from `choose_providers`.
        intra_op_threads: threads inside one operator (0: ONNX Runtime's default).
        inter_op_threads: threads across independent operators.
        max_batch: most texts per session run.
        run_cost_tokens: the fixed cost of one session run, in padded tokens' worth of work;
            a request is cut where that saves more padding than the extra run costs.
    Raises:
        ProviderError: the session cannot run on the requested provider.
        ValueError: max_batch < 1.
    """

    def __init__(
        self,
        onnx_path: Path | str,
        tokenizer: TextTokenizer,
        providers: Sequence[str],
        intra_op_threads: int = 0,
        inter_op_threads: int = 1,
        max_batch: int = 32,
        run_cost_tokens: int = 16,
    ) -> None:
        if max_batch < 1 or run_cost_tokens < 0:
            raise ValueError(f"need max_batch >= 1 and run_cost_tokens >= 0, got {max_batch}")
        self.max_batch = max_batch
        self.run_cost_tokens = run_cost_tokens
        self._tokenizer = tokenizer
        self._session = make_session(Path(onnx_path), providers, intra_op_threads, inter_op_threads)
        self.provider = session_provider(self._session)
        # The exporter may drop an input the graph does not use (token_type_ids, say).
        self._inputs = {i.name for i in self._session.get_inputs()}
        self._output = self._session.get_outputs()[0].name
        width = self._session.get_outputs()[0].shape[-1]
        if not isinstance(width, int):  # a symbolic output width: ask the graph
            probe = self.tokenize(["a"]).batches[0]
            width = int(self._session.run([self._output], self._feed(probe))[0].shape[1])
        self.dim: int = width

    @property
    def max_length(self) -> int:
        """Tokens per text after truncation."""
        return self._tokenizer.max_length

    def tokenize(self, texts: list[str]) -> EncoderInputs:
        """Tokenise once, then sort by token count and cut into padded micro-batches."""
        if not texts:
            return EncoderInputs((), (), 0)
        full = self._tokenizer(texts)
        lengths = full.attention_mask.sum(axis=1)
        order = np.argsort(lengths, kind="stable")
        batches, positions = [], []
        for start, end in cut_by_length(lengths[order], self.max_batch, self.run_cost_tokens):
            rows = order[start:end]
            width = max(int(lengths[rows].max()), 1)
            batches.append(
                TokenBatch(
                    np.ascontiguousarray(full.input_ids[rows, :width]),
                    np.ascontiguousarray(full.attention_mask[rows, :width]),
                    np.ascontiguousarray(full.token_type_ids[rows, :width]),
                )
            )
            positions.append(rows)
        return EncoderInputs(tuple(batches), tuple(positions), len(texts))

    def run(self, inputs: EncoderInputs) -> np.ndarray:
        """Run the session on every micro-batch; float32 (count, dim) in the input order."""
        out = np.empty((inputs.count, self.dim), dtype=np.float32)
        for batch, rows in zip(inputs.batches, inputs.positions, strict=True):
            (vectors,) = self._session.run([self._output], self._feed(batch))
            out[rows] = vectors
        return out

    def _feed(self, batch: TokenBatch) -> dict[str, np.ndarray]:
        return {name: a for name, a in batch.as_feed().items() if name in self._inputs}

    def encode(self, texts: list[str]) -> np.ndarray:
        """Vectors for `texts`, float32 (len(texts), dim), in the same order."""
        return self.run(self.tokenize(texts))


def cut_by_length(
    lengths: np.ndarray, max_batch: int, run_cost_tokens: int
) -> list[tuple[int, int]]:
    """Cut ascending `lengths` into runs [start, end) minimising padded tokens + run costs.

    A run of texts start..end-1 costs `run_cost_tokens + (end - start) * lengths[end - 1]`
    (padded to its longest, the last); dynamic programming over the cut points, O(n * max_batch).
    """
    n = len(lengths)
    best = np.zeros(n + 1)
    start_of = np.zeros(n + 1, dtype=np.int64)
    for end in range(1, n + 1):
        starts = np.arange(max(0, end - max_batch), end)
        costs = best[starts] + run_cost_tokens + (end - starts) * float(lengths[end - 1])
        i = int(np.argmin(costs))
        best[end], start_of[end] = costs[i], starts[i]
    cuts = []
    end = n
    while end > 0:
        cuts.append((int(start_of[end]), end))
        end = int(start_of[end])
    return cuts[::-1]
