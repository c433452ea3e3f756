"""ONNX Runtime discovery: which execution providers exist, and sessions that say where they run.

`onnxruntime` is imported lazily, so `bertrec` can be imported (and its CLI print help) without
it. Both the `onnxruntime` and the `onnxruntime-gpu` wheels install the module `onnxruntime`;
the GPU wheel lists CUDA as available even on a machine without a GPU and then silently runs
on the CPU, so the provider a session really uses is read back from the session itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from bertrec.errors import BertrecError

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_ALIASES = {"cpu": CPU, "cuda": CUDA}


class ProviderError(BertrecError):
    """ONNX Runtime is missing, or cannot run on the requested execution provider."""


def onnxruntime() -> ModuleType:
    """The `onnxruntime` module. Raises ProviderError naming the extra to install."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ProviderError(
            "ONNX Runtime is not installed: install `bertrec[cpu]` (CPU) or `bertrec[gpu]` (CUDA)"
        ) from exc
    return ort


def available_providers() -> list[str]:
    """Execution providers the installed ONNX Runtime build offers, best first."""
    return list(onnxruntime().get_available_providers())


def choose_providers(preferred: str | Sequence[str] = "auto") -> list[str]:
    """The providers to create sessions with, in order of preference.

    Args:
        preferred: "auto" (CUDA when the build offers it, then CPU), "cpu", "cuda" (CUDA only,
            no CPU fallback), or a sequence of provider names or aliases ("cpu", "cuda") tried in
            order; names the build does not offer are skipped.
    Returns:
        Provider names for `make_session`.
    Raises:
        ProviderError: ONNX Runtime is missing, "cuda" was asked for and the build has no CUDA,
            or none of the listed providers is offered.

    When the first listed provider is not offered, the fallback is logged as a warning.
    """
    available = available_providers()
    if isinstance(preferred, str):
        choice = preferred.strip().lower()
        if choice == "auto":
            return [CUDA, CPU] if CUDA in available else [CPU]
        if choice not in _ALIASES:
            raise ProviderError(f"unknown provider choice {preferred!r}: use auto, cpu or cuda")
        return _only(_ALIASES[choice], available)
    wanted = [_ALIASES.get(name.strip().lower(), name.strip()) for name in preferred]
    chosen = [name for name in dict.fromkeys(wanted) if name in available]
    if not chosen:
        raise ProviderError(
            f"none of the providers {list(preferred)} is available (this ONNX Runtime offers "
            f"{', '.join(available)}); install `bertrec[gpu]` for CUDA"
        )
    if chosen[0] != wanted[0]:
        log.warning("%s is not available here; falling back to %s", wanted[0], chosen[0])
    return chosen


def _only(provider: str, available: list[str]) -> list[str]:
    if provider not in available:
        hint = " (install `bertrec[gpu]` instead of `bertrec[cpu]`)" if provider == CUDA else ""
        raise ProviderError(f"{provider} is not available in this ONNX Runtime build{hint}")
    return [provider]


def make_session(
    model: str | Path | bytes,
    providers: Sequence[str],
    intra_op_threads: int = 0,
    inter_op_threads: int = 1,
    parallel: bool = False,
) -> InferenceSession:
    """An inference session with every graph optimisation on, checked to run where asked.

    Args:
        model: path to an ONNX file, or the serialised model.
        providers: from `choose_providers`; the first is the one wanted.
        intra_op_threads: threads inside one operator (0: ONNX Runtime's default, one per core).
        inter_op_threads: threads running independent operators (used when `parallel`).
        parallel: run independent branches of the graph concurrently.
    Returns:
        The session; `session_provider(session)` tells where it runs.
    Raises:
        ProviderError: the session fell back to the CPU although the CPU was not among
            `providers` (onnxruntime-gpu does that without raising when CUDA cannot start).
    """
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    if parallel:
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    source = str(model) if isinstance(model, Path) else model
    session = ort.InferenceSession(source, options, providers=list(providers))
    used = session_provider(session)
    if used != providers[0]:
        if CPU not in providers:
            raise ProviderError(
                f"ONNX Runtime could not start {providers[0]} and fell back to {used} "
                "(see its log above); ask for the CPU explicitly or fix the driver/CUDA install"
            )
        log.warning("ONNX Runtime runs on %s, not the preferred %s", used, providers[0])
    return session


def session_provider(session: InferenceSession) -> str:
    """The execution provider a session actually runs on."""
    return str(session.get_providers()[0])
