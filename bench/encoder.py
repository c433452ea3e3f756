"""Text encoder benchmark: PyTorch eager against ONNX Runtime fp32 and INT8, in one run.

    python -m bertrec.bench.encoder [--quick] --out results/encoder.json

The model is the real all-MiniLM-L6-v2 behind a TextEncoder with a random projection to 64
dimensions, exported to ONNX in a temporary folder (legacy exporter) and quantised to dynamic
INT8 with per-channel weight scales. The texts mix lengths the way reviews do: 5 to 120 words,
long-tailed, drawn from real English words. Each method encodes the same texts in request
batches of 1, 8 and 32, tokenisation included:

- PyTorch eager pads every text to the maximum length (128), as a naive server would;
- ONNX Runtime (`EncoderRuntime`) sorts each request by length and cuts it into micro-batches
  padded only to their own longest text; fp32 is also shown padded to 128, to separate the
  runtime's gain from the padding's.

A method's time is the sum over requests of each request's best time over the rounds (see
`time_parts_in_turns`), so a burst of load from elsewhere on a shared machine spoils little.

Reported: sequences/s, speed-ups, and the cosine between INT8 and fp32 vectors, both for the
served 64-d embedding and for the 384-d pooled sentence embedding (a second export with an
identity projection).
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bertrec.bench.common import (
    environment,
    loadavg,
    markdown_table,
    time_parts_in_turns,
    write_json,
)
from bertrec.export.verify import measure_parity
from bertrec.server.encoder_runtime import EncoderRuntime
from bertrec.server.providers import CPU, make_session
from bertrec.text import TextTokenizer, TokenBatch

MAX_LENGTH = 128
DIM = 64
TORCH = "PyTorch eager, padded to 128"
ORT_PADDED = "ORT fp32, padded to 128"
ORT_FP32 = "ORT fp32, sorted + per-batch padding"
ORT_INT8 = "ORT INT8 per-channel, sorted + per-batch padding"
ORT_U8U8 = "ORT INT8 per-channel u8 weights, sorted + per-batch padding"


@dataclass(frozen=True)
class Plan:
    texts: int
    batches: tuple[int, ...]
    rounds: int
    extra_rows: bool  # also fp32 ORT with fixed padding, and INT8 with unsigned weights


FULL = Plan(192, (1, 8, 32), 3, True)
QUICK = Plan(24, (1, 32), 2, False)


def english_words(vocab: Path) -> list[str]:
    """Whole English words from the BERT vocabulary (no word pieces or special tokens)."""
    words = vocab.read_text(encoding="utf-8").split("\n")
    return [w for w in words if len(w) >= 2 and w.isascii() and w.isalpha()]


def review_texts(words: list[str], count: int, seed: int) -> list[str]:
    """Texts of 5..120 words, lengths log-normal around 20 (a long tail of long reviews)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(20), 0.8, count), 5, 120).astype(int)
    texts = []
    for n in lengths:
        chosen = [words[i] for i in rng.integers(0, len(words), n)]
        sentences = [" ".join(chosen[i : i + 12]) + "." for i in range(0, n, 12)]
        texts.append(" ".join(s.capitalize() for s in sentences))
    return texts


def padded(tokenizer: TextTokenizer, texts: list[str]) -> TokenBatch:
    """Tokens padded to MAX_LENGTH, whatever the batch holds."""
    batch = tokenizer(texts)
    extra = ((0, 0), (0, MAX_LENGTH - batch.input_ids.shape[1]))
    return TokenBatch(*(np.pad(a, extra) for a in batch.as_feed().values()))


def export(encoder: Any, tokenizer: TextTokenizer, folder: Path) -> tuple[Path, Path]:
    """fp32 and per-channel INT8 ONNX graphs of `encoder`, with the project's own exporter."""
    from bertrec.export.onnx_export import export_encoder
    from bertrec.export.quantize import quantize_int8

    fp32, int8 = folder / "encoder.onnx", folder / "encoder.int8.onnx"
    sample = tokenizer(["a padded sample batch of a few words", "two words"])
    export_encoder(encoder, sample, fp32)
    quantize_int8(fp32, int8)
    return fp32, int8


def quantize_u8_weights(fp32: Path, target: Path) -> Path:
    """Per-channel INT8 with unsigned weights (u8u8): CPUs without VNNI can saturate the
    16-bit sums of the signed-weight (u8s8) kernel; this variant shows what that costs."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # the quantiser's advice to pre-process
    quantize_dynamic(
        fp32,
        target,
        per_channel=True,
        weight_type=QuantType.QUInt8,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return target


def torch_method(encoder: Any, tokenizer: TextTokenizer) -> Callable[[list[str]], np.ndarray]:
    import torch

    def encode(texts: list[str]) -> np.ndarray:
        batch = padded(tokenizer, texts)
        with torch.inference_mode():
            tensors = [torch.from_numpy(a) for a in batch.as_feed().values()]
            return encoder(*tensors).numpy()

    return encode


def ort_padded_method(
    path: Path, tokenizer: TextTokenizer, threads: int
) -> Callable[[list[str]], np.ndarray]:
    session = make_session(path, [CPU], intra_op_threads=threads)

    def encode(texts: list[str]) -> np.ndarray:
        return np.asarray(session.run(None, padded(tokenizer, texts).as_feed())[0])

    return encode


def measure(plan: Plan, threads: int, seed: int) -> dict[str, Any]:
    import torch

    from bertrec.train.encoder import TextEncoder, default_encoder_path, load_bert

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model_dir = default_encoder_path()
    tokenizer = TextTokenizer.from_file(model_dir / "tokenizer.json", MAX_LENGTH)
    texts = review_texts(english_words(model_dir / "vocab.txt"), plan.texts, seed)
    bert, _, _ = load_bert(None)  # eager attention: the graph ORT fuses best
    encoder = TextEncoder(bert, DIM).eval()
    # PyTorch's own default attention (sdpa) is its fastest: the baseline gets it.
    baseline = TextEncoder(_sdpa_bert(model_dir), DIM).eval()
    baseline.projection.load_state_dict(encoder.projection.state_dict())
    pooled = TextEncoder(bert, encoder.hidden_size).eval()  # identity projection: pooled output
    with torch.no_grad():
        pooled.projection.weight.copy_(torch.eye(encoder.hidden_size))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.monotonic()
        graphs = export_graphs(encoder, tokenizer, Path(tmp) / "served", plan.extra_rows)
        export_s = time.monotonic() - start
        methods: dict[str, Callable[[list[str]], np.ndarray]] = {
            TORCH: torch_method(baseline, tokenizer)
        }
        if plan.extra_rows:
            methods[ORT_PADDED] = ort_padded_method(graphs[ORT_FP32], tokenizer, threads)
        for name, path in graphs.items():
            methods[name] = EncoderRuntime(path, tokenizer, [CPU], threads, 1).encode
        served = {name: encode_all(fn, texts) for name, fn in methods.items()}
        cells = time_methods(methods, texts, plan)
        pooled_graphs = export_graphs(pooled, tokenizer, Path(tmp) / "pooled", plan.extra_rows)
        pooled_out = {
            name: encode_all(EncoderRuntime(path, tokenizer, [CPU], threads).encode, texts)
            for name, path in pooled_graphs.items()
        }
    tokens = tokenizer.lengths(texts)
    return {
        "cells": cells,
        "cosine_vs_fp32": {
            f"served embedding ({DIM}-d)": _cosine_stats(served),
            f"pooled embedding ({encoder.hidden_size}-d)": _cosine_stats(pooled_out),
        },
        "fp32_vs_torch_max_abs": float(np.abs(served[ORT_FP32] - served[TORCH]).max()),
        "export_and_quantize_s": export_s,
        "texts": {"count": len(texts), "tokens_mean": float(np.mean(tokens)),
                  "tokens_median": float(np.median(tokens)), "tokens_max": max(tokens)},
    }  # fmt: skip


def export_graphs(
    encoder: Any, tokenizer: TextTokenizer, folder: Path, u8: bool
) -> dict[str, Path]:
    folder.mkdir()
    fp32, int8 = export(encoder, tokenizer, folder)
    graphs = {ORT_FP32: fp32, ORT_INT8: int8}
    if u8:
        graphs[ORT_U8U8] = quantize_u8_weights(fp32, folder / "encoder.u8u8.onnx")
    return graphs


def encode_all(encode: Callable[[list[str]], np.ndarray], texts: list[str]) -> np.ndarray:
    return np.vstack([encode(texts[i : i + 32]) for i in range(0, len(texts), 32)])


def time_methods(
    methods: dict[str, Callable[[list[str]], np.ndarray]], texts: list[str], plan: Plan
) -> list[dict[str, Any]]:
    cells = []
    for batch in plan.batches:
        requests = [texts[i : i + batch] for i in range(0, len(texts), batch)]
        runs = {name: functools.partial(_one_request, fn, requests)
                for name, fn in methods.items()}  # fmt: skip
        timings = time_parts_in_turns(runs, len(requests), plan.rounds)
        for name, t in timings.items():
            cells.append({"method": name, "batch": batch, "timing": t,
                          "sequences_per_s": len(texts) / t.best_s})  # fmt: skip
        print(f"done batch {batch}", flush=True)
    return cells


def _one_request(
    encode: Callable[[list[str]], np.ndarray], requests: list[list[str]], i: int
) -> np.ndarray:
    return encode(requests[i])


def _cosine_stats(outputs: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Mean and min cosine of each INT8 variant's vectors against fp32's."""
    stats = {}
    for name in (ORT_INT8, ORT_U8U8):
        if name in outputs:
            parity = measure_parity(outputs[name], outputs[ORT_FP32])
            stats[name] = {"mean": parity.cos_mean, "min": parity.cos_min}
    return stats


def _sdpa_bert(model_dir: Path) -> Any:
    from transformers import AutoModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModel.from_pretrained(str(model_dir), attn_implementation="sdpa")


def summarise(result: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    speed = {(c["method"], c["batch"]): c["sequences_per_s"] for c in result["cells"]}
    rows = []
    for c in result["cells"]:
        torch_speed = speed[(TORCH, c["batch"])]
        fp32_speed = speed[(ORT_FP32, c["batch"])]
        c["vs_torch"] = c["sequences_per_s"] / torch_speed
        c["vs_ort_fp32"] = c["sequences_per_s"] / fp32_speed
        rows.append([c["method"], c["batch"], c["sequences_per_s"],
                     f"{c['vs_torch']:.2f}x", f"{c['vs_ort_fp32']:.2f}x"])  # fmt: skip
    table = markdown_table(["method", "batch", "sequences/s", "vs torch", "vs ORT fp32"], rows)
    cos = next(v for k, v in result["cosine_vs_fp32"].items() if k.startswith("pooled"))[ORT_INT8]
    batches = sorted({c["batch"] for c in result["cells"]})
    fp32_gain = min(speed[(ORT_FP32, b)] / speed[(TORCH, b)] for b in batches)
    int8_gain = min(speed[(ORT_INT8, b)] / speed[(ORT_FP32, b)] for b in batches)
    targets = {
        "ORT fp32 >= 1.4x torch eager (every batch)": {"value": fp32_gain, "met": fp32_gain >= 1.4},
        "INT8 >= 2x ORT fp32 (every batch)": {"value": int8_gain, "met": int8_gain >= 2.0},
        "INT8 pooled cosine vs fp32 >= 0.99 (mean)": {
            "value": cos["mean"],
            "met": cos["mean"] >= 0.99,
        },
    }
    return table, targets


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run (< 60 s)")
    parser.add_argument("--out", type=Path, default=Path("results/encoder.json"))
    parser.add_argument("--threads", type=int, default=2, help="torch and ORT intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    started = time.monotonic()
    env = environment()
    print(f"environment: {env}", flush=True)
    result = measure(plan, args.threads, args.seed)
    table, targets = summarise(result)
    texts = result["texts"]
    print(f"\n{texts['count']} texts, tokens mean {texts['tokens_mean']:.0f}, "
          f"median {texts['tokens_median']:.0f}, max {texts['tokens_max']}; "
          f"{args.threads} threads\n")  # fmt: skip
    print(table)
    print(f"\nORT fp32 vs torch max |diff| {result['fp32_vs_torch_max_abs']:.2e}; cosine vs fp32:")
    for output, variants in result["cosine_vs_fp32"].items():
        for name, c in variants.items():
            print(f"  {output}, {name}: mean {c['mean']:.4f}, min {c['min']:.4f}")
    print("targets:", {name: t["met"] for name, t in targets.items()})
    env["loadavg_end"] = loadavg()
    write_json(
        args.out,
        {"benchmark": "encoder", "quick": args.quick, "threads": args.threads,
         "environment": env, **result, "targets": targets,
         "wall_s": time.monotonic() - started},
    )  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
