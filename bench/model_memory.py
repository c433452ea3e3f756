"""Memory of one loaded model version: RSS/PSS and the heap copies of the item factors.

    python -m bertrec.bench.model_memory [--items 100000 1000000] [--dim 64]
        [--label after] [--out bench/results/model_memory.json]

For each catalogue size, a synthetic version (`bench.synthetic`, 1,000 users) is published to a
temporary repository and loaded by `load_model` in a fresh process, twice. Once plain, for /proc
memory (VmRSS, RssAnon, RssFile and Pss from smaps_rollup) before the load, after it and after
the server's warm-up (`Model.warm_up` with the default batch sizes and iterations). Once under
tracemalloc, restricted to numpy's allocation domain, to count how many item-factor matrices the
loaded version keeps on the heap (memory-mapped arrays are not heap allocations, so the mmap
itself counts 0), and the traced peak of everything during the load, in matrices. The result is
merged into `--out` under `--label`, so a before/after pair lives in one file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

NUMPY_TRACE_DOMAIN = 389047  # numpy registers its array buffers with tracemalloc under this
SMAPS_FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File")
STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def memory_kib() -> dict[str, int]:
    """This process's memory now, in KiB: /proc/self/status and smaps_rollup lines."""
    out: dict[str, int] = {}
    for name, fields in (("status", STATUS_FIELDS), ("smaps_rollup", SMAPS_FIELDS)):
        for line in Path(f"/proc/self/{name}").read_text().splitlines():
            key = line.split(":")[0]
            if key in fields:
                out[key] = int(line.split()[1])
    return out


def numpy_heap_bytes() -> tuple[int, int]:
    """Bytes of numpy array buffers traced now, and the traced peak of everything so far."""
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.DomainFilter(inclusive=True, domain=NUMPY_TRACE_DOMAIN)]
    )
    return sum(t.size for t in snapshot.traces), tracemalloc.get_traced_memory()[1]


def measure(repo: Path, traced: bool) -> dict[str, Any]:
    """Load the version in this process and report its memory (one JSON-able dict)."""
    from bertrec.bench.synthetic import MODEL
    from bertrec.server.config import ServerConfig
    from bertrec.server.model import load_model

    config = ServerConfig(model_repo=repo, model=MODEL, ranker_threads=1, intra_op_threads=1)
    if traced:
        tracemalloc.start()
    before = memory_kib()
    model = load_model(config)
    matrix = model.arrays.item_factors.nbytes
    if traced:
        held, peak = numpy_heap_bytes()
        tracemalloc.stop()
        return {
            "item_factors_bytes": matrix,
            "numpy_heap_bytes": held,
            "heap_copies_held": round(held / matrix, 2),
            "traced_peak_all_over_matrix": round(peak / matrix, 2),
        }
    loaded = memory_kib()
    # The server's own warm-up: full batches, repeated, so ONNX Runtime's arenas reach their
    # steady size (an arena grows again on a graph's second full batch).
    c = config
    model.warm_up(c.warmup_iterations, c.ranker_max_batch_size, c.encoder_max_batch_size)
    return {"before_load_kib": before, "loaded_kib": loaded, "warm_kib": memory_kib()}


def run_size(n_items: int, dim: int) -> dict[str, Any]:
    """Build one synthetic version and measure it in two fresh processes."""
    from bertrec.bench.synthetic import build_synthetic_repo

    with tempfile.TemporaryDirectory(prefix="bertrec-model-memory-") as tmp:
        repo = build_synthetic_repo(Path(tmp), n_items=n_items, n_users=1000, dim=dim)
        result: dict[str, Any] = {"n_items": n_items, "dim": dim}
        for flag in ("--measure", "--measure-traced"):
            command = [sys.executable, "-m", "bertrec.bench.model_memory", flag, str(repo)]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            result.update(json.loads(done.stdout.strip().splitlines()[-1]))
    loaded, before = result["loaded_kib"], result["before_load_kib"]
    result["version_kib"] = {k: loaded[k] - before[k] for k in ("VmRSS", "RssAnon", "Pss")}
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--label", default="after")
    parser.add_argument("--out", type=Path, default=Path("bench/results/model_memory.json"))
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--measure-traced", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure or args.measure_traced:
        print(json.dumps(measure(args.measure or args.measure_traced, bool(args.measure_traced))))
        return
    from bertrec.bench.common import environment

    runs = [run_size(n, args.dim) for n in args.items]
    for run in runs:
        print(json.dumps(run))
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results[args.label] = {"environment": environment(), "runs": runs}
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
