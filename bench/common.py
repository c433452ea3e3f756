"""Shared benchmark helpers: interleaved timing, a memory bandwidth probe, JSON and tables.

The benchmark machines are small and shared, so timings are the best of many calls, taken in
turns spread over the run (a burst of noise from elsewhere then hits every method, not one).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS")


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one method: best and median over the timed calls."""

    best_s: float
    median_s: float
    calls: int


def time_in_turns(
    methods: Mapping[str, Callable[[], object]],
    rounds: int,
    budget_s: float,
    turn_s: float = 0.3,
    pause_s: float = 0.1,
    warmup: bool = True,
) -> dict[str, Timing]:
    """Time each method in turn, `rounds` times over or until `budget_s` has passed.

    A turn calls one method repeatedly for about `turn_s` (at least once, after one untimed
    warm-up call unless `warmup` is False). Turns start after a `pause_s` sleep: the previous
    library's worker threads keep spinning for a while after its call (OpenBLAS up to ~0.1 s)
    and would otherwise slow whichever method comes next. The best time over all turns is the
    number to compare.
    """
    samples: dict[str, list[float]] = {name: [] for name in methods}
    deadline = time.monotonic() + budget_s
    for round_ in range(rounds):
        if round_ > 0 and time.monotonic() > deadline:
            break
        for name, fn in methods.items():
            time.sleep(pause_s)
            if warmup:
                fn()
            turn_end = time.monotonic() + turn_s
            while True:
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
                if time.monotonic() > turn_end:
                    break
    return {name: Timing(min(s), statistics.median(s), len(s)) for name, s in samples.items()}


def time_parts_in_turns(
    methods: Mapping[str, Callable[[int], object]],
    parts: int,
    rounds: int,
    pause_s: float = 0.1,
) -> dict[str, Timing]:
    """Time a workload made of `parts` independent calls, `fn(0)` .. `fn(parts - 1)`.

    Each round gives every method a turn (after `pause_s`, see `time_in_turns`) in which each
    part is timed once. A method's best time is the sum over parts of each part's best: a burst
    of noise from elsewhere then spoils one part of one round, not a whole pass. The median is
    the median whole pass.
    """
    best: dict[str, list[float]] = {name: [float("inf")] * parts for name in methods}
    passes: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            time.sleep(pause_s)
            fn(0)  # warm-up: the previous method's threads may still be spinning
            total = 0.0
            for part in range(parts):
                start = time.perf_counter()
                fn(part)
                took = time.perf_counter() - start
                best[name][part] = min(best[name][part], took)
                total += took
            passes[name].append(total)
    return {
        name: Timing(sum(best[name]), statistics.median(passes[name]), len(passes[name]))
        for name in methods
    }


def memory_read_bandwidth(
    size_bytes: int = 1 << 30, repeats: int = 5, threads: int = 2
) -> dict[str, float]:
    """Read bandwidth in GB/s (1e9 bytes) of a few streaming kernels over one large array.

    Returns GB/s per kernel plus "best": the machine's read bandwidth as used in reports.
    Kernels: single-threaded numpy sum, BLAS matrix-vector products (threaded by the BLAS),
    and `threads` Python threads each summing a slice (numpy releases the GIL).
    """
    data = np.ones(size_bytes // 4, dtype=np.float32)  # written once: pages are resident
    wide = data.reshape(1024, -1)
    tall = data.reshape(-1, 1024)
    ones_wide = np.ones(1024, dtype=np.float32)
    pool = ThreadPoolExecutor(threads)
    chunks = np.array_split(data, threads)
    kernels: dict[str, Callable[[], object]] = {
        "numpy_sum_1thread": data.sum,
        "blas_gemv_t": lambda: ones_wide @ wide,
        "blas_gemv_n": lambda: tall @ ones_wide,
        f"numpy_sum_{threads}threads": lambda: list(pool.map(np.sum, chunks)),
    }
    try:
        timings = time_in_turns(kernels, rounds=repeats, budget_s=30.0, turn_s=0.0)
    finally:
        pool.shutdown()
    result = {name: data.nbytes / t.best_s / 1e9 for name, t in timings.items()}
    result["best"] = max(result.values())
    return result


class ReadProbe:
    """One streaming read of a large array (a BLAS vector-matrix product, the fastest kernel
    of `memory_read_bandwidth` here), to time next to a memory-bound method under the same
    conditions."""

    def __init__(self, size_bytes: int) -> None:
        self._data = np.ones((1024, max(size_bytes // 4096, 1)), dtype=np.float32)
        self._ones = np.ones(1024, dtype=np.float32)
        self.nbytes = self._data.nbytes

    def __call__(self) -> object:
        return self._ones @ self._data


def environment() -> dict[str, Any]:
    """What the numbers were measured on: CPU, threads, library versions, BLAS settings."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas_env": {name: os.environ.get(name) for name in BLAS_ENV},
        "loadavg_start": loadavg(),
        "cpu_flags": cpu_flags(),
    }
    # Versions from package metadata: importing torch just to read one would cost seconds and
    # load a second threading runtime into the process being measured.
    for name, distributions in _LIBRARIES.items():
        info[name] = next(filter(None, map(_installed_version, distributions)), None)
    return info


# CPU features that change a benchmark's numbers: the SIMD that numpy, ONNX Runtime and faiss
# use (int8 gains ~2x only with VNNI), and the instructions TLS's ciphers and hashes use.
CPU_FLAGS = (
    "sse4_2", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "aes", "pclmulqdq",
    "sha_ni", "vaes", "vpclmulqdq",
)  # fmt: skip


def cpu_flags() -> list[str]:
    """Which of `CPU_FLAGS` this CPU has (from /proc/cpuinfo; [] where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [f for f in CPU_FLAGS if f in present]
    except OSError:
        pass
    return []


_LIBRARIES = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss"),
    "torch": ("torch",),
}


def _installed_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load averages, rounded (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def proc_memory_kib(pid: int, field: str = "VmRSS") -> int | None:
    """A memory line of /proc/<pid>/status, in KiB (VmRSS: resident now, VmHWM: peak so far);
    None when the process has no such line (a zombie has none).

    Raises:
        OSError: the process is gone (or this is not Linux).
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats are shown with 3 significant digits."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write results as indented JSON, creating the folder; dataclasses become dicts."""

    def default(value: object) -> object:
        if isinstance(value, Timing):
            return asdict(value)
        if isinstance(value, np.generic):
            return value.item()
        raise TypeError(f"cannot write {type(value).__name__} as JSON")

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=default) + "\n")
