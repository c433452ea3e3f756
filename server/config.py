"""Server configuration: one frozen dataclass, built from flags > BERTREC_* env > TOML > defaults.

Every setting is a field of `ServerConfig` (units in the names); its help text lives in the
field's metadata, so the `serve` flags, the environment variables (`BERTREC_<FIELD>`) and the
TOML keys (`<field> = value`, top level or under `[server]`) are all derived from this one
place. Values are validated when the config is built; a bad value raises `ConfigError` naming
the setting, the value and where it came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bertrec.errors import BertrecError
from bertrec.feedback.store import REDIS_SCHEMES, SQLITE_SCHEME
from bertrec.server.environment import unknown_variables_problem
from bertrec.server.providers import CPU, CUDA
from bertrec.server.thread_placement import THREAD_SCHEDULING
from bertrec.server.version_policy import PolicyError, VersionPolicy

ENV_PREFIX = "BERTREC_"
CONFIG_ENV = "BERTREC_CONFIG"
DEFAULT_PROVIDERS = (CUDA, CPU)
MODEL_CONTROLS = ("none", "poll", "explicit")
REFLECTION_MODES = ("on", "off", "auth")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
AUTO_WORKERS = 0  # `workers`: one per usable CPU, resolved when `bertrec serve` starts
# Words a setting accepts besides its type's values (flags, BERTREC_* and TOML alike).
_WORDS: dict[str, dict[str, Any]] = {"workers": {"auto": AUTO_WORKERS}}


class ConfigError(BertrecError):
    """An invalid server setting (flag, BERTREC_* variable or config file); exits with code 2."""


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServerConfig:
    """All settings of one `bertrec serve` process. Construct with `load_config` or directly."""

    model_repo: Path = field(metadata={"help": "model repository folder"})
    model: str = field(metadata={"help": "model name (folder under the repository)"})
    version: int | None = _opt(
        None, "serve only this model version (the same as version_policy 'specific N')"
    )
    version_policy: str = _opt(
        "latest",
        "versions kept loaded: latest, 'latest K' (the newest serves; the others answer calls "
        "that name them) or 'specific N[,M]'",
    )
    model_control: str = _opt(
        "poll",
        "none: serve the versions found at start; poll: also pick up new versions every "
        "poll_interval_s; explicit: poll, and accept the admin model-repository RPCs (load, "
        "rollback, unload)",
    )
    poll_interval_s: float = _opt(
        10.0, "seconds between scans of the repository for new versions (0 = never)"
    )
    host: str = _opt(
        "127.0.0.1",
        "address to bind the gRPC and metrics servers to (0.0.0.0: every interface; without "
        "TLS the server then warns that its calls cross the network in clear)",
    )
    grpc_port: int = _opt(50051, "gRPC port; 0 picks a free port (printed at start)")
    metrics_port: int = _opt(9090, "Prometheus /metrics HTTP port; 0 picks a free port")
    grpc_max_workers: int = _opt(
        128,
        "gRPC handler threads for unary calls (raised to max_concurrent_rpcs + 8 if lower, so "
        "an admitted call never waits for a thread and a refusal is answered at once)",
    )
    max_concurrent_rpcs: int = _opt(
        1024, "unary calls admitted at once; more get RESOURCE_EXHAUSTED (counted)"
    )
    max_streaming_rpcs: int = _opt(
        64,
        "streaming calls (health Watch, reflection) open at once, on their own threads; "
        "more get RESOURCE_EXHAUSTED",
    )
    max_request_bytes: int = _opt(
        4 * 1024 * 1024, "largest serialized request (grpc.max_receive_message_length)"
    )
    max_inflight_request_bytes: int = _opt(
        256 * 1024 * 1024,
        "serialized request bytes of all unary calls in flight; a call that would pass it gets "
        "RESOURCE_EXHAUSTED",
    )
    http_timeout_s: float = _opt(
        5.0, "metrics/health HTTP: how long a connection may stay silent before it is closed"
    )
    ranker_max_batch_size: int = _opt(
        64, "most ranking queries (Recommend, RecommendForText, SimilarItems) run as one batch"
    )
    ranker_max_queue_delay_us: int = _opt(200, "longest a ranking query waits for a batch")
    encoder_max_batch_size: int = _opt(32, "most texts encoded as one batch")
    encoder_max_queue_delay_us: int = _opt(2000, "longest a text waits for a batch")
    ranker_max_queue_size: int = _opt(1024, "queued ranking queries before RESOURCE_EXHAUSTED")
    encoder_max_queue_size: int = _opt(256, "queued texts before RESOURCE_EXHAUSTED")
    max_k: int = _opt(1000, "largest k a caller may ask for")
    max_item_ids: int = _opt(1000, "largest id list in one request")
    max_texts: int = _opt(64, "most texts in one EmbedText request")
    max_text_bytes: int = _opt(16384, "largest text, in UTF-8 bytes")
    request_timeout_s: float = _opt(30.0, "deadline for calls that set none")
    grace_period_s: float = _opt(10.0, "how long in-flight calls may finish at shutdown")
    providers: tuple[str, ...] = _opt(
        DEFAULT_PROVIDERS, "ONNX Runtime providers in order of preference (comma-separated)"
    )
    intra_op_threads: int = _opt(0, "encoder ONNX Runtime intra-op threads (0 = its default)")
    inter_op_threads: int = _opt(1, "encoder ONNX Runtime inter-op threads")
    ranker_threads: int = _opt(
        1,
        "threads per ranking batch (0 = one per CPU); 1 leaves the other cores to the gRPC "
        "handlers, and ONNX Runtime's extra threads spin between runs",
    )
    ranker_precision: str = _opt(
        "fp32",
        "ranking scan: fp32, or int8 (a quarter of the bytes per query, answers identical to "
        "fp32 by a proven error bound and exact re-scoring; ~2.3x the resident bytes per item)",
    )
    encoder_variant: str = _opt(
        "auto", "encoder graph: auto (int8 if export cosine >= 0.99, else fp32), fp32, int8"
    )
    warmup_iterations: int = _opt(3, "warm-up batches per model part before SERVING")
    workers: int = _opt(
        AUTO_WORKERS,
        "server processes sharing the gRPC port (so_reuseport) and the memory-mapped arrays, "
        "with one metrics endpoint; 1: this process serves alone; 0 or auto: one per usable "
        "CPU (the CPUs this process may run on, capped by its cgroup CPU quota, e.g. a "
        "Kubernetes CPU limit)",
    )
    pin_workers: str = _opt(
        "auto",
        "with workers >= 2, run each worker on CPUs of its own: auto (one worker per CPU, when "
        "this process's CPUs are its own: no cgroup quota below its CPU affinity), on (a block "
        "of CPUs each, or one each round robin), off. One interpreter's threads passing the "
        "GIL between cores cost about twice the CPU per call of the same threads on one core",
    )
    thread_scheduling: str = _opt(
        "batch",
        "Linux scheduling policy of every server thread: batch (SCHED_BATCH: a woken thread "
        "waits for the running one instead of preempting it, which here would only find the "
        "GIL held) or normal (SCHED_OTHER); same CPU share either way",
    )
    max_batch_users: int = _opt(1024, "most user ids in one RecommendBatch call")
    max_stream_users: int = _opt(100_000, "most user ids in one StreamRecommendations call")
    feedback_store: str = _opt(
        "",
        "feedback store URL: sqlite://PATH (embedded; sqlite:///abs/path.db) or "
        "redis://[:password@]host:port/db (shared by replicas); empty: no store, and "
        "RecordFeedback/ForgetUser answer FAILED_PRECONDITION",
    )
    max_feedback_events: int = _opt(1000, "most events in one RecordFeedback call")
    feedback_max_clock_skew_s: float = _opt(
        300.0, "how far ahead of the server's clock an event's occurred_at may be"
    )
    tls_cert: str = _opt(
        "", "PEM server certificate (chain): serve gRPC over TLS; re-read on change"
    )
    tls_key: str = _opt("", "PEM private key of tls_cert; re-read on change")
    tls_client_ca: str = _opt(
        "", "PEM CA bundle: require client certificates it signed (mTLS); re-read on change"
    )
    metrics_tls: bool = _opt(False, "serve /metrics, /healthz and /readyz over TLS too (tls_cert)")
    health_port: int | None = _opt(
        None,
        "also serve grpc.health.v1 alone, in plaintext, on this port (for probes that cannot "
        "do TLS, e.g. kubelet gRPC probes); unset: no such port",
    )
    auth_file: str = _opt(
        "",
        "TOML file of token hashes and mTLS identities with their roles (read, feedback, "
        "admin); re-read on change; empty: no authentication",
    )
    reflection: str = _opt(
        "on", "server reflection: on (open), off (not served) or auth (needs a valid credential)"
    )
    log_format: str = _opt("text", "log lines as text or json (one object per line)")
    log_level: str = _opt("info", "least severe level logged: debug, info, warning, error")
    access_log: bool = _opt(
        False, "log one line per call: method, code, duration, peer, request id (never payloads)"
    )
    otlp_endpoint: str = _opt(
        "",
        "OpenTelemetry collector for traces (OTLP/gRPC, e.g. http://127.0.0.1:4317); empty: "
        "tracing off",
    )
    feedback_poll_interval_s: float = _opt(
        0.05,
        "seconds between reads of the feedback store for records that other replicas or "
        "processes wrote (bounds how stale their users' answers are here)",
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            problem = _problem(f.name, value)
            if problem:
                raise ConfigError(f"{f.name}={_quote(value)}: {problem}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key go together: set both or neither")
        if (self.tls_client_ca or self.metrics_tls) and not self.tls_cert:
            raise ConfigError("tls_client_ca and metrics_tls need tls_cert and tls_key")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def grpc_address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def policy(self) -> VersionPolicy:
        """The version policy: `version`, when set, is `specific <version>`."""
        if self.version is not None:
            return VersionPolicy.specific(self.version)
        return VersionPolicy.parse(self.version_policy)

    @property
    def poll_s(self) -> float:
        """Seconds between repository scans; 0 when model_control is "none"."""
        return 0.0 if self.model_control == "none" else self.poll_interval_s


def _policy_problem(value: str) -> str | None:
    try:
        VersionPolicy.parse(value)
    except PolicyError as exc:
        return str(exc)
    return None


def _file_problem(path: str) -> str | None:
    return None if not path or Path(path).is_file() else "no such file"


def _store_problem(url: str) -> str | None:
    if not url or url.startswith((SQLITE_SCHEME, *REDIS_SCHEMES)):
        return None
    return "must be empty, sqlite://PATH or redis://host:port/db"


def _at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be >= {low}"


def _port(v: int) -> str | None:
    return None if 0 <= v <= 65535 else "must be a port number 0..65535 (0 = pick a free one)"


_RULES: dict[str, Callable[[Any], str | None]] = {
    "model_repo": lambda v: None if Path(v).is_dir() else "no such directory",
    "model": lambda v: None if str(v).strip() and "/" not in str(v) else "must be a folder name",
    "version": lambda v: None if v is None or v >= 1 else "must be >= 1",
    "version_policy": _policy_problem,
    "model_control": lambda v: None if v in MODEL_CONTROLS else f"must be one of {MODEL_CONTROLS}",
    "poll_interval_s": _at_least(0),
    "host": lambda v: None if str(v).strip() else "must not be empty",
    "grpc_port": _port,
    "metrics_port": _port,
    "grpc_max_workers": _at_least(1),
    "max_concurrent_rpcs": _at_least(1),
    "max_streaming_rpcs": _at_least(1),
    "max_request_bytes": _at_least(1024),
    "max_inflight_request_bytes": _at_least(1024),
    "http_timeout_s": lambda v: None if v > 0 else "must be > 0",
    "ranker_max_batch_size": _at_least(1),
    "ranker_max_queue_delay_us": _at_least(0),
    "encoder_max_batch_size": _at_least(1),
    "encoder_max_queue_delay_us": _at_least(0),
    "ranker_max_queue_size": _at_least(1),
    "encoder_max_queue_size": _at_least(1),
    "max_k": _at_least(1),
    "max_item_ids": _at_least(1),
    "max_texts": _at_least(1),
    "max_text_bytes": _at_least(1),
    "request_timeout_s": lambda v: None if v > 0 else "must be > 0",
    "grace_period_s": _at_least(0),
    "providers": lambda v: None if len(v) > 0 and all(v) else "must name at least one provider",
    "intra_op_threads": _at_least(0),
    "inter_op_threads": _at_least(0),
    "ranker_threads": _at_least(0),
    "warmup_iterations": _at_least(0),
    "workers": _at_least(0),
    "ranker_precision": lambda v: None if v in ("fp32", "int8") else "must be fp32 or int8",
    "pin_workers": lambda v: None if v in ("auto", "on", "off") else "must be auto, on or off",
    "thread_scheduling": lambda v: None if v in THREAD_SCHEDULING else "must be batch or normal",
    "max_batch_users": _at_least(1),
    "max_stream_users": _at_least(1),
    "encoder_variant": lambda v: None if str(v).strip() else "must not be empty",
    "feedback_store": _store_problem,
    "max_feedback_events": _at_least(1),
    "feedback_max_clock_skew_s": _at_least(0),
    "feedback_poll_interval_s": lambda v: None if v > 0 else "must be > 0",
    "tls_cert": lambda v: _file_problem(v),
    "tls_key": lambda v: _file_problem(v),
    "tls_client_ca": lambda v: _file_problem(v),
    "auth_file": lambda v: _file_problem(v),
    "health_port": lambda v: None if v is None else _port(v),
    "reflection": lambda v: None if v in REFLECTION_MODES else f"must be one of {REFLECTION_MODES}",
    "log_format": lambda v: None if v in LOG_FORMATS else f"must be one of {LOG_FORMATS}",
    "log_level": lambda v: None if v in LOG_LEVELS else f"must be one of {LOG_LEVELS}",
}


def _problem(name: str, value: Any) -> str | None:
    rule = _RULES.get(name)
    return rule(value) if rule else None


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(ServerConfig)


def _coerce(name: str, value: Any, source: str) -> Any:
    """Convert a flag/env string or TOML value to the field's type, or raise ConfigError."""
    hint = _hints()[name]
    try:
        if value is None:
            return None
        if isinstance(value, str) and value.strip().lower() in _WORDS.get(name, {}):
            return _WORDS[name][value.strip().lower()]
        if hint == int | None and isinstance(value, str) and not value.strip():
            return None  # e.g. BERTREC_VERSION="" from a templated manifest: the default (newest)
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE + _FALSE:
                return text in _TRUE
            raise ValueError(value)
        if hint in (int, int | None):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        if hint is Path:
            return Path(value).expanduser()
        if hint == tuple[str, ...]:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(s).strip() for s in items if str(s).strip())
        return str(value)
    except (TypeError, ValueError):
        kind = getattr(hint, "__name__", str(hint))
        raise ConfigError(f"{name}={value!r} (from {source}): expected {kind}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    table = raw.get("server", raw)
    names = {f.name for f in dataclasses.fields(ServerConfig)}
    unknown = sorted(set(table) - names - {"server"})
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s): {', '.join(unknown)}")
    return {k: v for k, v in table.items() if k in names}


def load_config(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> ServerConfig:
    """Build and validate the config. Precedence: flags > env > file > defaults.

    Args:
        flags: field name -> value for flags the user actually gave (absent = not given).
        env: the environment (default `os.environ`, read now, not at import).
        config_file: a TOML file; default `$BERTREC_CONFIG` if set.

    Raises:
        ConfigError: a missing required setting, an unknown file key or an invalid value.
    """
    flags = dict(flags or {})
    env = os.environ if env is None else env
    names = [CONFIG_ENV, *(ENV_PREFIX + f.name.upper() for f in dataclasses.fields(ServerConfig))]
    if unknown := unknown_variables_problem(env, names):
        raise ConfigError(unknown)
    if config_file is None and env.get(CONFIG_ENV):
        config_file = Path(env[CONFIG_ENV])
    env_values = {
        f.name: env[ENV_PREFIX + f.name.upper()]
        for f in dataclasses.fields(ServerConfig)
        if ENV_PREFIX + f.name.upper() in env
    }
    file_values = _read_toml(config_file) if config_file else {}
    # (where a value came from, for messages; the values), highest precedence first.
    layers: list[tuple[Callable[[str], str], Mapping[str, Any]]] = [
        (lambda n: "--" + n.replace("_", "-"), flags),
        (lambda n: ENV_PREFIX + n.upper(), env_values),
        (lambda n: str(config_file), file_values),
    ]
    values: dict[str, Any] = {}
    for f in dataclasses.fields(ServerConfig):
        for where, layer in layers:
            if f.name in layer:
                source = where(f.name)
                value = _coerce(f.name, layer[f.name], source)
                problem = _problem(f.name, value)
                if problem:
                    raise ConfigError(f"{f.name}={_quote(value)} (from {source}): {problem}")
                values[f.name] = value
                break
    for name in ("model_repo", "model"):
        if name not in values:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{name} is required ({flag}, {ENV_PREFIX}{name.upper()} or file)")
    return ServerConfig(**values)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per config field; flags not given stay absent from the parsed namespace."""
    parser.add_argument("--config", type=Path, default=None, help="TOML config file")
    for f in dataclasses.fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.default is not dataclasses.MISSING:
            help_text += f" (default: {_show(f.default)})"
        if _hints()[f.name] is bool:  # `--access-log` alone means true; `--access-log false`
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=help_text,
                                nargs="?", const="true", metavar="BOOL")  # fmt: skip
        else:
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=help_text)


def flags_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the user gave as flags (strings, coerced by `load_config`)."""
    names = {f.name for f in dataclasses.fields(ServerConfig)}
    return {k: v for k, v in vars(args).items() if k in names}


def _quote(value: Any) -> str:
    """A value as error messages show it: its repr, but paths plain (not `PosixPath(...)`)
    and a URL's credentials hidden (a mistyped store URL must not print its password)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str) and "://" in value and "@" in value:
        scheme, rest = value.split("://", 1)
        return repr(f"{scheme}://***@{rest.rsplit('@', 1)[1]}")
    return repr(value)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(value)
    return "none" if value is None else str(value).replace("%", "%%")
