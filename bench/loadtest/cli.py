"""`bertrec loadtest`: drive a bertrec server with a closed or open loop, sweep, find max rate."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bertrec.bench.loadtest.verdict import DEFAULT_MAX_ERROR_RATE
from bertrec.cli import DEFAULT_TARGET
from bertrec.client.cli_security import add_flags as add_security_flags


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `loadtest` subcommand (grpc, numpy and matplotlib load only when it runs)."""
    p = sub.add_parser(
        "loadtest",
        help="load-test a running server (closed/open loop, sweeps, max rate under an SLO)",
        description=(
            "Send a weighted mix of RPCs to a bertrec server and report throughput, latency "
            "percentiles (from the intended send time in the open loop) and errors by status. "
            "Requests use the model's own user ids, item ids and item texts: read from the "
            "version folder when --model-repo/--model are given, otherwise from --user-ids/"
            "--item-ids/--texts, with the server's limits (GetModelInfo) and, when no item ids "
            "are given, items discovered from RecommendForText answers. Exit status: 0 when "
            "every step met the thresholds (--max-error-rate, --max-p99-ms), 1 when one did "
            "not (the reasons are printed), 2 for bad flags or a server that cannot be reached."
        ),
    )
    p.add_argument("--target", default=DEFAULT_TARGET, help="host:port (default %(default)s)")
    p.add_argument("--mix", default="recommend=1",
                   help="RPC weights, e.g. recommend=8,recommend_for_text=1,similar_items=1,"
                        "score_items=1,embed_text=0 (default %(default)s)")  # fmt: skip
    load = p.add_argument_group("load shape (one of)")
    load.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="closed loop with N callers (default 16 when no rate is given)",
    )
    load.add_argument(
        "--rate",
        type=float,
        default=None,
        help="open loop: Poisson arrivals at this many requests/s",
    )
    load.add_argument("--sweep-concurrency", default=None, help="closed-loop steps, e.g. 1,4,16")
    load.add_argument("--sweep-rates", default=None, help="open-loop steps (req/s), e.g. 100,200")
    load.add_argument(
        "--find-max-rate",
        action="store_true",
        help="search the highest open-loop rate whose p99 meets --p99-slo-ms",
    )
    bounds = p.add_argument_group("bounds (per step)")
    bounds.add_argument("--duration-s", type=float, default=10.0, help="measured seconds")
    bounds.add_argument(
        "--warmup-s",
        type=float,
        default=2.0,
        help="seconds sent before measuring, then discarded (default 2)",
    )
    bounds.add_argument(
        "--max-requests",
        type=int,
        default=None,
        help="stop a step after this many measured requests",
    )
    bounds.add_argument("--deadline-ms", type=float, default=5000.0, help="per-call deadline")
    verdict = p.add_argument_group("pass/fail (the exit status)")
    verdict.add_argument(
        "--max-error-rate",
        type=float,
        default=DEFAULT_MAX_ERROR_RATE,
        help="error share a passing step may have; also the max-rate search's (default "
        "%(default)s)",
    )
    verdict.add_argument(
        "--max-p99-ms",
        type=float,
        default=None,
        help="p99 of OK calls a passing step may have (default: not checked)",
    )
    search = p.add_argument_group("max-rate search")
    search.add_argument("--p99-slo-ms", type=float, default=50.0, help="default %(default)s")
    search.add_argument("--start-rate", type=float, default=50.0, help="first rate tried")
    search.add_argument("--search-steps", type=int, default=10, help="at most this many steps")
    inputs = p.add_argument_group("request inputs")
    inputs.add_argument(
        "--ready-timeout-s",
        type=float,
        default=10.0,
        help="wait this long for a server that is up but still loading to report SERVING "
        "(one that cannot be reached fails at once; default %(default)s)",
    )
    inputs.add_argument("--model-repo", type=Path, default=None)
    inputs.add_argument("--model", default=None)
    inputs.add_argument("--version", type=int, default=None, help="default: newest")
    inputs.add_argument("--user-ids", default=None, help="comma list or @file (one per line)")
    inputs.add_argument("--item-ids", default=None, help="comma list or @file")
    inputs.add_argument("--texts", default=None, help="@file, one text per line")
    inputs.add_argument("--k", type=int, default=10, help="k of ranking requests")
    out = p.add_argument_group("output and generator")
    out.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    out.add_argument(
        "--plots",
        type=Path,
        default=None,
        help="folder for PNG plots, needs matplotlib (default: the --out file's folder, "
        "skipped with a note when matplotlib is missing)",
    )
    out.add_argument("--channels", type=int, default=1, help="gRPC connections (default 1)")
    out.add_argument(
        "--max-in-flight",
        type=int,
        default=4096,
        help="open loop: cap on outstanding calls; waits count as latency",
    )
    out.add_argument("--seed", type=int, default=0)
    add_security_flags(p)
    out.add_argument("--quiet", action="store_true", help="no live progress line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Resolve inputs, run the requested steps, print tables, write JSON and plots, judge.

    Returns:
        0 when every step met the thresholds, 1 when one did not.
    """
    from bertrec.bench.common import write_json
    from bertrec.bench.loadtest.recorder import summarize
    from bertrec.bench.loadtest.report import build_report, step_table, sweep_table
    from bertrec.bench.loadtest.runner import LoadSpec, StepResult, run_step
    from bertrec.bench.loadtest.search import SearchResult, Slo, find_max_rate
    from bertrec.bench.loadtest.verdict import EXIT_FAILED, Thresholds, judge, judge_search
    from bertrec.bench.loadtest.workload import build_pools, check_inputs, parse_mix
    from bertrec.client.cli_security import from_args as security_from_args

    _check_args(args)
    plots = _plots_folder(args)
    mix = parse_mix(args.mix)
    security = security_from_args(args)
    inputs = resolve_inputs(args, security)
    check_inputs(inputs, mix)
    pools = build_pools(inputs, mix, args.k, args.seed)
    print(f"bertrec loadtest: {args.target}, inputs from {inputs.source} "
          f"({len(inputs.user_ids)} users, {len(inputs.item_ids)} items, "
          f"{len(inputs.texts)} texts)", file=sys.stderr)  # fmt: skip
    base = LoadSpec(target=args.target, mix=mix, duration_s=args.duration_s,
                    warmup_s=args.warmup_s, max_requests=args.max_requests,
                    deadline_s=args.deadline_ms / 1000, max_in_flight=args.max_in_flight,
                    channels=args.channels, seed=args.seed, progress=not args.quiet,
                    security=security)  # fmt: skip
    steps: list[StepResult] = []

    def step(concurrency: int | None = None, rate: float | None = None) -> StepResult:
        from dataclasses import replace

        result = run_step(replace(base, concurrency=concurrency, rate_rps=rate), pools)
        steps.append(result)
        print("\n" + step_table(result) + "\n", flush=True)
        return result

    slo = Slo(args.p99_slo_ms, args.max_error_rate)
    search: SearchResult | None = None
    if args.find_max_rate:
        search = find_max_rate(lambda r: _summary(step(rate=r), summarize), slo,
                               args.start_rate, args.search_steps)  # fmt: skip
    elif args.sweep_concurrency or args.sweep_rates:
        for value in _sweep_values(args):
            step(**value)
    elif args.rate is not None:
        step(rate=args.rate)
    else:
        step(concurrency=args.concurrency or 16)
    if len(steps) > 1:
        print(sweep_table(steps))
    if search is not None:
        state = "converged" if search.converged else "NOT converged (raise --search-steps)"
        print(f"\nmax rate with p99 <= {slo.p99_ms:g} ms and errors <= "
              f"{slo.max_error_rate:.2%}: {search.best_rate_rps:.1f} req/s ({state}; "
              f"{len(search.tried)} steps)")  # fmt: skip
    if search is not None:
        verdict = judge_search(search.best_rate_rps, len(search.tried),
                               Thresholds(slo.max_error_rate, slo.p99_ms))  # fmt: skip
    else:
        thresholds = Thresholds(args.max_error_rate, args.max_p99_ms)
        verdict = judge([(s.spec.label, summarize(s.calls, s.window_s)) for s in steps],
                        thresholds)  # fmt: skip
    report = build_report(args.target, mix, inputs.source, steps, search, slo, verdict)
    if args.out is not None:
        write_json(args.out, report)
        print(f"report: {args.out}", file=sys.stderr)
    if plots is not None:
        from bertrec.bench.loadtest.plots import write_plots

        slo_line = slo.p99_ms if args.find_max_rate else None
        for path in write_plots(steps, plots, slo_line):
            print(f"plot: {path}", file=sys.stderr)
    print("\n".join(verdict.lines()), flush=True)
    return 0 if verdict.passed else EXIT_FAILED


def _plots_folder(args: argparse.Namespace) -> Path | None:
    """Where plots go, or None. Asked for with --plots, matplotlib is required (checked before
    any load is sent); implied by --out, its absence only skips them, with a note."""
    from bertrec.errors import BertrecError

    folder: Path | None = args.plots or (args.out.parent if args.out is not None else None)
    if folder is None:
        return None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        install = "pip install 'bertrec[loadtest]'"
        if args.plots is not None:
            raise BertrecError(f"--plots needs matplotlib ({install})") from None
        print(f"bertrec loadtest: note: plots skipped, matplotlib is not installed ({install}); "
              "the JSON report is complete without them", file=sys.stderr)  # fmt: skip
        return None
    return folder


def _summary(result: Any, summarize: Any) -> Any:
    return summarize(result.calls, result.window_s)


def _sweep_values(args: argparse.Namespace) -> list[dict[str, Any]]:
    from bertrec.bench.loadtest.search import parse_steps

    if args.sweep_concurrency:
        values = parse_steps(args.sweep_concurrency, int)
        return [{"concurrency": int(v)} for v in values]
    return [{"rate": v} for v in parse_steps(args.sweep_rates, float)]


def _check_args(args: argparse.Namespace) -> None:
    from bertrec.errors import BertrecError

    shapes = [args.rate is not None, args.concurrency is not None, bool(args.sweep_concurrency),
              bool(args.sweep_rates), args.find_max_rate]  # fmt: skip
    if sum(shapes) > 1:
        raise BertrecError("give at most one of --concurrency, --rate, --sweep-concurrency, "
                           "--sweep-rates and --find-max-rate")  # fmt: skip
    for name in ("duration_s", "deadline_ms", "channels", "max_in_flight", "ready_timeout_s"):
        if getattr(args, name) <= 0:
            raise BertrecError(f"--{name.replace('_', '-')} must be positive")
    if args.warmup_s < 0 or (args.max_requests is not None and args.max_requests <= 0):
        raise BertrecError("--warmup-s must be >= 0 and --max-requests > 0")
    if not 0 <= args.max_error_rate <= 1:
        raise BertrecError("--max-error-rate must be between 0 and 1")
    if args.max_p99_ms is not None and args.max_p99_ms <= 0:
        raise BertrecError("--max-p99-ms must be positive")
    if (args.model_repo is None) != (args.model is None):
        raise BertrecError("give --model-repo and --model together")
    try:
        _sweep_values(args) if (args.sweep_concurrency or args.sweep_rates) else None
    except ValueError as exc:
        raise BertrecError(f"--sweep-*: {exc}") from None


def resolve_inputs(args: argparse.Namespace, security: Any = None) -> Any:
    """Inputs from the version folder if given, else from flags plus what the server tells
    (asked with `security`, a `ClientSecurity`: TLS and the token; None for plaintext)."""
    from bertrec.bench.loadtest.preflight import wait_until_serving
    from bertrec.bench.loadtest.workload import (
        DEFAULT_TEXTS,
        Inputs,
        Limits,
        inputs_from_version,
        parse_id_list,
    )  # fmt: skip
    from bertrec.client import RecommenderClient
    from bertrec.errors import BertrecError

    try:
        kwargs = security.client_kwargs() if security is not None else {}
        with RecommenderClient(args.target, timeout_s=5.0, **kwargs) as client:
            wait_until_serving(client, args.target, args.ready_timeout_s)
            info = client.model_info()
            limits = Limits(info.max_k, info.max_item_ids, info.max_texts, info.max_text_bytes)
            if args.model_repo is not None:
                from bertrec.repository.versions import resolve_version

                folder = resolve_version(args.model_repo, args.model, args.version)
                if (info.model.name, str(info.model.version)) != (args.model, folder.name):
                    print(f"bertrec loadtest: warning: server serves {info.model.name} "
                          f"v{info.model.version}, inputs read from {folder}",
                          file=sys.stderr)  # fmt: skip
                return inputs_from_version(folder, limits)
            texts = parse_id_list(args.texts) or DEFAULT_TEXTS
            items = parse_id_list(args.item_ids)
            source = "--user-ids/--item-ids/--texts flags and GetModelInfo limits"
            if not items:
                found = {i for t in texts for i in client.recommend_for_text(
                    t[: limits.max_text_bytes], k=limits.max_k).item_ids}  # fmt: skip
                items = tuple(sorted(found))
                source += "; item ids discovered from RecommendForText answers"
            return Inputs(parse_id_list(args.user_ids), items, texts, source, limits)
    except Exception as exc:  # the client raises its own error type for any gRPC failure
        if isinstance(exc, BertrecError):
            raise
        raise BertrecError(f"cannot query {args.target}: {exc}") from exc
