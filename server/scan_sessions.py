"""ONNX Runtime sessions for the catalogue scans, drawing their buffers from one process arena.

Why: a scan's (rows, n_items) float32 score buffer is the biggest thing a worker holds besides
the catalogue (1M items x 64 rows: 256 MB). With each session's own arena (ONNX Runtime's
default) every scan session kept *two* such buffers after warm-up: the arena grows in powers
of two and, once a run of another batch size (or the memory pattern of a repeated one) has
left a small chunk inside the first region, the next full-size buffer no longer fits there and
a second region is mapped. Measured at 1M x 64 (/proc RssAnon after warm-up): the Ranker's
session 512 MB for one 256 MB buffer, the cosine twin's another 512 MB.

Here every scan session allocates from one arena registered with the ONNX Runtime environment,
extended by exactly what is asked (`kSameAsRequested`) and without memory patterns, so a
buffer freed by one run (of any session, any batch size) is what the next run reuses: the
Ranker and its cosine twin together hold one 260 MB buffer at 1M x 64 when their runs do not
overlap, and two when they do, at the same speed (a scan is bound by reading the catalogue).
"""

from __future__ import annotations

import threading
from typing import Any

from bertrec.server.providers import CPU, onnxruntime

_registered = False
_lock = threading.Lock()

# OrtArenaCfg(max_mem, arena_extend_strategy, initial_chunk_size_bytes,
# max_dead_bytes_per_chunk): no limit, kSameAsRequested (1), defaults for the rest.
ARENA_SETTINGS = (0, 1, -1, -1)


def _shared_arena(ort: Any) -> None:
    """Register the process-wide CPU arena once (ONNX Runtime keeps it for the process)."""
    global _registered
    with _lock:
        if _registered:
            return
        memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                   ort.OrtMemType.DEFAULT)  # fmt: skip
        ort.create_and_register_allocator(memory, ort.OrtArenaCfg(*ARENA_SETTINGS))
        _registered = True


def scan_session(
    model: bytes,
    threads: int,
    spinning: bool = True,
    shared: dict[str, Any] | None = None,
    packed: dict[str, Any] | None = None,
) -> Any:
    """A CPU session for a scan graph, with every graph optimisation, on the shared arena.

    Args:
        model: the serialised graph.
        threads: intra-op threads (0: one per core).
        spinning: whether idle intra-op threads spin (ONNX Runtime's default) or sleep.
        shared: initializers of `model` to read in place instead (name -> OrtValue over a
            memory-mapped array, which the caller keeps alive as long as the session). The
            session then packs no weights: a packed copy would be private to each process,
            where the mapped pages are shared by every worker.
        packed: the arrays of initializers `model` declares as external data (name ->
            OrtValue, kept alive by the caller), which ONNX Runtime packs once into a private
            copy: a product then skips packing its operand on every run. The graph carries
            no copy of them (`external_placeholder`).
    """
    ort = onnxruntime()
    _shared_arena(ort)
    options = ort.SessionOptions()
    for name, value in (shared or {}).items():
        options.add_initializer(name, value)
    if shared:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if packed:
        options.add_external_initializers(list(packed), list(packed.values()))
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_mem_pattern = False  # a pattern's block would not fit the freed buffer
    options.add_session_config_entry("session.use_env_allocators", "1")
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=[CPU])


def external_placeholder(name: str, shape: tuple[int, ...]) -> Any:
    """A float32 initializer whose data the session is given in memory (`scan_session`'s
    `packed`), so a serialised graph stays a few hundred bytes whatever the catalogue: the
    file it names is never read, and does not exist."""
    from onnx import TensorProto

    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape)
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=f"bertrec-in-memory-{name}")
    return tensor
