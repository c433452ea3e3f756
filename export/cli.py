"""`bertrec export` and `bertrec verify` subcommands.

torch and onnx are imported only when `export` runs; `verify` needs neither.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bertrec.cli import positive_int
from bertrec.repository.manifest import EncoderVariant, Parity, read_manifest
from bertrec.repository.versions import resolve_version


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export = sub.add_parser(
        "export",
        help="export a training output to ONNX as a new model version",
        description="Export a `bertrec train` output into <repo>/<model>/<version>/ "
        "(ONNX encoder checked against PyTorch, factor arrays, tokenizer, manifest).",
    )
    export.add_argument(
        "--trained", type=Path, required=True, metavar="DIR", help="training output folder"
    )
    _add_location(export, "version number (default: the next free one)")
    export.add_argument(
        "--int8",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also write the INT8 (per-channel dynamic) encoder (default: on)",
    )
    export.add_argument(
        "--optimize",
        action="store_true",
        help="also write ORT's fused fp32 graph (kept if it passes parity)",
    )
    export.add_argument(
        "--max-seq-len",
        type=positive_int,
        default=None,
        metavar="N",
        help="tokens per text (default: the training setting)",
    )
    export.set_defaults(func=_run_export)

    verify = sub.add_parser(
        "verify",
        help="re-check a model version's file hashes and ONNX parity",
        description="Check every file against manifest.json and, with onnxruntime installed, "
        "each encoder graph against the PyTorch outputs stored at export.",
    )
    _add_location(verify, "version number (default: the newest)")
    verify.set_defaults(func=_run_verify)


def _add_location(parser: argparse.ArgumentParser, version_help: str) -> None:
    parser.add_argument(
        "--repo", type=Path, required=True, metavar="DIR", help="model repository folder"
    )
    parser.add_argument("--model", required=True, metavar="NAME", help="model name")
    parser.add_argument(
        "--version",
        type=positive_int,
        default=None,
        metavar="N",
        help=version_help,
    )


def _run_export(args: argparse.Namespace) -> int:
    from bertrec.export.onnx_export import export_model

    path = export_model(
        args.trained,
        args.repo,
        args.model,
        version=args.version,
        int8=args.int8,
        optimize=args.optimize,
        max_seq_len=args.max_seq_len,
    )
    manifest = read_manifest(path)
    print(f"published {path}")
    for variant in manifest.encoder.variants:
        print(_parity_line(variant, variant.parity))
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    from bertrec.export.verify import verify_version

    report = verify_version(resolve_version(args.repo, args.model, args.version))
    manifest = report.manifest
    status = "OK" if report.ok else "FAILED"
    print(
        f"{report.version_dir}: {status} ({manifest.model_name} v{manifest.version}, "
        f"{report.files_checked} of {len(manifest.files)} files verified)"
    )
    for variant, measured in report.parity:
        print(_parity_line(variant, measured))
    for note in report.notes:
        print(f"  note: {note}")
    for problem in report.problems:
        print(f"  problem: {problem}")
    return 0 if report.ok else 1


def _parity_line(variant: EncoderVariant, parity: Parity) -> str:
    return (
        f"  {variant.name:<15} {variant.file:<18} max abs err {parity.max_abs_err:.2e}  "
        f"cosine mean {parity.cos_mean:.5f} min {parity.cos_min:.5f}  ({parity.n_texts} texts)"
    )
