"""Security benchmark: Recommend q/s and p99 over TLS with a bearer token vs plaintext.

    python -m bertrec.bench.security [--out bench/results/security.json] [--quick]

One bounded run on loopback (under three minutes; `--quick` under one):

1. A synthetic model version (`synthetic.py`, `--items` x 64 factors) in a temporary repository,
   and, made at run time with `cryptography`, a CA, a server certificate for 127.0.0.1 (EC
   P-256, what `openssl`/cert-manager issue by default) and a credentials file holding one
   token's hash.
2. Three `bertrec serve` processes with the same settings but the transport:
   - plaintext: no TLS, no auth file (the loopback default);
   - token: plaintext with `--auth-file` (what checking a token costs on its own);
   - tls+token: `--tls-cert/--tls-key` and `--auth-file` (the production setting).
3. A closed-loop generator (grpc.aio, one channel, pre-serialised requests for random known
   users, k=10), at each concurrency, every server in turn within each round, the servers'
   order rotating from round to round: a burst of noise from elsewhere hits all modes alike.

4. In this process, what one token check costs (`Authorizer.check` with a credentials file of
   1 and of 100 tokens: every stored hash is compared), timed in turns (`common.time_in_turns`):
   a number the shared machine's noise cannot hide the way it hides a few microseconds in q/s.

Per cell: q/s, p50/p99 (ms), errors, the server's CPU per answered call (user + system from
/proc, what TLS adds on the server) and the generator's (its own process time, what TLS adds on
the client; the generator shares the machine's cores with the servers). The JSON keeps every
round, the best round per cell, and the tls+token / plaintext ratios from the best and the
median rounds; the CPU flags that make TLS cheap (AES-NI, PCLMULQDQ, SHA) are recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bertrec.bench.common import (
    environment,
    loadavg,
    markdown_table,
    time_in_turns,
    write_json,
)
from bertrec.bench.server import closed_loop, process_cpu_s, recommend_payloads
from bertrec.bench.spawned import Spawned
from bertrec.bench.synthetic import MODEL, build_synthetic_repo

RECOMMEND_METHOD = "/bertrec.v1.RecommenderService/Recommend"
MODES = ("plaintext", "token", "tls+token")
TOKEN = "bench-" + "x" * 40  # a throwaway token for a throwaway server on loopback
SERVER_NAME = "127.0.0.1"


@dataclass(frozen=True)
class Cell:
    """One measurement: one server mode at one concurrency, in one round."""

    mode: str
    concurrency: int
    round: int
    qps: float
    p50_ms: float
    p99_ms: float
    calls: int
    errors: int
    server_cpu_us_per_call: float
    client_cpu_us_per_call: float


@dataclass(frozen=True)
class Target:
    """How the generator reaches one server."""

    mode: str
    address: str
    pid: int
    ca_pem: bytes | None  # set: TLS
    token: str | None  # set: send `authorization: Bearer <token>`


# ---------------------------------------------------------------------------- certificates


def write_credentials(folder: Path) -> tuple[bytes, Path, Path, Path]:
    """A CA, a server certificate for 127.0.0.1 and an auth file with TOKEN's hash.

    Returns (CA PEM, certificate path, key path, auth file path).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from bertrec.server.auth import hash_token

    now = datetime.datetime.now(datetime.UTC)

    def build(subject: str, issuer: str, public: Any, signer: Any, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(SERVER_NAME))])
            builder = builder.add_extension(san, critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = build("bench CA", "bench CA", ca_key.public_key(), ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build(SERVER_NAME, "bench CA", key.public_key(), ca_key, ca=False)
    pem = serialization.Encoding.PEM
    cert_path, key_path, auth_path = folder / "server.crt", folder / "server.key", folder / "auth"
    cert_path.write_bytes(cert.public_bytes(pem))
    key_path.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    auth_path.write_text(
        f'[[token]]\nname = "bench"\nsha256 = "{hash_token(TOKEN)}"\nroles = ["read"]\n'
    )
    return ca.public_bytes(pem), cert_path, key_path, auth_path


# -------------------------------------------------------------------------------- servers


def _serve(repo: Path, *flags: str) -> list[str]:
    return [
        sys.executable, "-m", "bertrec", "serve", "--model-repo", str(repo), "--model", MODEL,
        "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
        "--providers", "CPUExecutionProvider", "--poll-interval-s", "0", "--workers", "1", *flags,
    ]  # fmt: skip


def start_servers(
    repo: Path, folder: Path, args: argparse.Namespace
) -> tuple[dict[str, Spawned], dict[str, Target]]:
    """The three servers, started one at a time (loading competes for the CPUs)."""
    ca_pem, cert, key, auth = write_credentials(folder)
    common = ("--ranker-max-batch-size", str(args.batch),
              "--ranker-max-queue-delay-us", str(args.delay_us))  # fmt: skip
    flags = {
        "plaintext": common,
        "token": (*common, "--auth-file", str(auth)),
        "tls+token": (*common, "--auth-file", str(auth), "--tls-cert", str(cert),
                      "--tls-key", str(key)),
    }  # fmt: skip
    servers: dict[str, Spawned] = {}
    targets: dict[str, Target] = {}
    try:
        for mode in MODES:
            servers[mode] = spawned = Spawned(mode, _serve(repo, *flags[mode]), folder)
            spawned.wait_ready()
            targets[mode] = Target(
                mode, spawned.target, spawned.proc.pid,
                ca_pem if "tls" in mode else None, TOKEN if "token" in mode else None,
            )  # fmt: skip
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers, targets


# ---------------------------------------------------------------------------- load generator


async def run_load(
    target: Target, payloads: Sequence[bytes], concurrency: int, duration_s: float
) -> tuple[float, list[float], int]:
    """Closed loop: `concurrency` callers on one channel, each sending on each answer.

    Returns (elapsed seconds, latencies in seconds, error count).
    """
    import grpc

    if target.ca_pem is not None:
        credentials = grpc.ssl_channel_credentials(root_certificates=target.ca_pem)
        channel = grpc.aio.secure_channel(target.address, credentials)
    else:
        channel = grpc.aio.insecure_channel(target.address)
    metadata = (("authorization", f"Bearer {target.token}"),) if target.token else None
    async with channel:
        call = channel.unary_unary(RECOMMEND_METHOD)
        await channel.channel_ready()
        return await closed_loop([call], payloads, concurrency, duration_s, metadata)


def measure(
    target: Target, payloads: Sequence[bytes], concurrency: int, duration_s: float, round_: int
) -> Cell:
    """A short warm-up (its own channel: the handshake is not timed), then the timed load."""
    asyncio.run(run_load(target, payloads, concurrency, min(0.3, duration_s)))
    server_start, client_start = process_cpu_s(target.pid), time.process_time()
    elapsed, latencies, errors = asyncio.run(run_load(target, payloads, concurrency, duration_s))
    server_cpu, client_cpu = (
        process_cpu_s(target.pid) - server_start,
        (time.process_time() - client_start),
    )
    lat = np.sort(np.asarray(latencies)) * 1e3 if latencies else np.array([np.nan])
    calls = max(len(latencies), 1)
    return Cell(
        target.mode, concurrency, round_, len(latencies) / elapsed,
        float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), len(latencies), errors,
        server_cpu / calls * 1e6, client_cpu / calls * 1e6,
    )  # fmt: skip


def measure_all(
    targets: dict[str, Target], args: argparse.Namespace, concurrencies: list[int]
) -> list[Cell]:
    """Every cell of every round; within a round the modes take turns, in a rotating order."""
    payloads = recommend_payloads(args.users)
    cells = []
    for round_ in range(args.rounds):
        order = MODES[round_ % len(MODES) :] + MODES[: round_ % len(MODES)]
        for concurrency in concurrencies:
            for mode in order:
                cell = measure(targets[mode], payloads, concurrency, args.duration_s, round_)
                print(f"round {round_ + 1}: {cell}", file=sys.stderr, flush=True)
                cells.append(cell)
    return cells


# ------------------------------------------------------------------------------- reporting


def best_cells(cells: list[Cell]) -> list[Cell]:
    """The highest-throughput round of each (mode, concurrency), in MODES order."""
    best: dict[tuple[str, int], Cell] = {}
    for cell in cells:
        key = (cell.mode, cell.concurrency)
        if key not in best or cell.qps > best[key].qps:
            best[key] = cell
    return sorted(best.values(), key=lambda c: (c.concurrency, MODES.index(c.mode)))


def summary(cells: list[Cell]) -> dict[str, Any]:
    """tls+token and token vs plaintext at each concurrency: q/s and p99 ratios, CPU added."""
    out: dict[str, Any] = {}
    for concurrency in sorted({c.concurrency for c in cells}):
        runs = {m: [c for c in cells if c.mode == m and c.concurrency == concurrency]
                for m in MODES}  # fmt: skip
        at: dict[str, Any] = {}
        for stat, pick in (("best", max), ("median", statistics.median)):
            qps = {m: float(pick([c.qps for c in r])) for m, r in runs.items()}
            p99 = {m: float((min if stat == "best" else statistics.median)(
                [c.p99_ms for c in r])) for m, r in runs.items()}  # fmt: skip
            at[stat] = {f"{m}_vs_plaintext_qps": qps[m] / qps["plaintext"] for m in MODES[1:]} | {
                f"{m}_vs_plaintext_p99": p99[m] / p99["plaintext"] for m in MODES[1:]
            }
        cpu = {m: statistics.median([c.server_cpu_us_per_call for c in r])
               for m, r in runs.items()}  # fmt: skip
        at["server_cpu_us_added_per_call_median"] = {
            m: cpu[m] - cpu["plaintext"] for m in MODES[1:]
        }
        out[str(concurrency)] = at
    return out


def auth_check_us(folder: Path) -> dict[str, float]:
    """Microseconds per `Authorizer.check` of a valid token (best of turns), by file size."""
    from bertrec.server.auth import Authorizer, CredentialsFile, hash_token

    methods = {}
    for count in (1, 100):
        path = folder / f"auth-{count}.toml"
        path.write_text("".join(
            f'[[token]]\nname = "t{i}"\nsha256 = "{hash_token(f"{TOKEN}{i}")}"\n'
            'roles = ["read"]\n' for i in range(count)
        ))  # fmt: skip
        authorizer = Authorizer(CredentialsFile(path), "on")
        metadata = (("authorization", f"Bearer {TOKEN}{count - 1}"),)  # the last entry

        def check(a: Authorizer = authorizer, m: Any = metadata) -> object:
            return a.check(RECOMMEND_METHOD, m, {})

        methods[f"{count}_tokens"] = check
    timings = time_in_turns(methods, rounds=5, budget_s=3.0, turn_s=0.1)
    return {name: t.best_s * 1e6 for name, t in timings.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    env = environment()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bertrec-bench-security-") as tmp:
        root = Path(tmp)
        repo = build_synthetic_repo(root, args.items, args.users, args.dim)
        build_s = time.monotonic() - started
        servers, targets = start_servers(repo, root, args)
        try:
            cells = measure_all(targets, args, concurrencies)
        finally:
            for server in servers.values():
                server.stop()
        check_us = auth_check_us(root)
    best = best_cells(cells)
    table = markdown_table(
        ["mode", "concurrency", "q/s", "p50 ms", "p99 ms", "server CPU us/call",
         "client CPU us/call", "errors"],
        [[c.mode, c.concurrency, c.qps, c.p50_ms, c.p99_ms, c.server_cpu_us_per_call,
          c.client_cpu_us_per_call, c.errors] for c in best],
    )  # fmt: skip
    return {
        "environment": env,
        "settings": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "build_s": round(build_s, 2),
            "tls": "TLS 1.3 (grpc default), EC P-256 server certificate, no client certificate",
        },
        "best": [asdict(c) for c in best],
        "rounds": [asdict(c) for c in cells],
        "summary": summary(cells),
        "auth_check_us": check_us,
        "table": table,
        "total_s": round(time.monotonic() - started, 1),
        "loadavg_end": loadavg(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/security.json"))
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--concurrency", default="16,64")
    parser.add_argument("--duration-s", type=float, default=3.0, help="per cell and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64, help="ranker max batch size")
    parser.add_argument("--delay-us", type=int, default=200, help="ranker max queue delay")
    parser.add_argument("--quick", action="store_true", help="10k items, 1 round of 1 s")
    args = parser.parse_args(argv)
    if args.quick:
        args.items, args.rounds, args.duration_s = 10_000, 1, 1.0
    result = run(args)
    write_json(args.out, result)
    print(result["table"])
    print(json.dumps({"summary": result["summary"], "auth_check_us": result["auth_check_us"]},
                     indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
