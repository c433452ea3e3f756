"""The shared feedback store: Redis with an append-only file fsync'd before every reply, the
store several replicas or worker processes use to see the same feedback.

Layout, under a key prefix (`bertrec:feedback`, or `?prefix=` in the URL):

- `{prefix}:log`: a sorted set holding every record (events and tombstones), scored by its
  seq; a member is `"<seq>|<json>"`. `read_since` is one ZRANGEBYSCORE.
- `{prefix}:seq`: the counter seqs come from (INCR: a seq is never reused, even after a forget).
- `{prefix}:keys`: (user, idempotency key) -> seq, the duplicate check (`scoped_key`).
- `{prefix}:user:<user_id>`: seq -> idempotency key of each of the user's events, what a
  forget deletes.
- `{prefix}:tombstones`: seq -> salted user hash; `{prefix}:salt`: the store's salt.

Why a sorted set and not a stream: XDEL only flags a stream entry as deleted inside its
listpack, and the RDB preamble of an AOF rewrite (`aof-use-rdb-preamble yes`, the default)
saves listpacks whole, so a forgotten user's events stay readable in the rewritten AOF
(measured with redis 7.0: the deleted entries' bytes were in `appendonly.aof.*.base.rdb`).
ZREM and HDEL remove the bytes, and a rewrite writes only what is left.

Atomicity: each append and each forget is ONE Lua script. Redis runs a script without
interleaving other clients, but does not roll one back: a command failing halfway would
leave the first half written. So a script checks the type of every key it will write before
its first write (the only way its commands can fail), and nothing of a batch is written when
it refuses; the events themselves are validated by the server before they get here.

Durability: with `appendonly yes` and `appendfsync always`, Redis writes and fsyncs the AOF
in `beforeSleep`, before it sends any reply of that event loop iteration: redis
src/server.c, beforeSleep: "Write the AOF buffer on disk, must be done before
handleClientsWithPendingWrites, in case of appendfsync=always", and src/aof.c,
flushAppendOnlyFile: "we are required to write the AOF before replying to the client". An
answered script is therefore on disk, and a script's writes reach the AOF as one
MULTI/EXEC that a truncated tail drops whole on load. One fsync covers every client served
in that iteration, so concurrent callers get group commit from Redis itself; the connection
pool (64) keeps them from queueing on one socket. The store refuses a Redis configured
otherwise (and warns when CONFIG is forbidden, as on managed Redis, where the operator must
vouch for it).

Forgetting: the script deletes the user's events and keys; the AOF, though, still holds the
commands that wrote them until it is rewritten, so every forget asks for BGREWRITEAOF (and
asks again when a rewrite that started before the forget is running). The deleted events
leave the disk when that rewrite finishes (`aof_rewrite_in_progress:0` in INFO persistence).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeout
from redis.retry import Retry

from bertrec.feedback.events import (
    Appended,
    Erased,
    FeedbackEvent,
    FeedbackKind,
    Forgotten,
    Record,
    StoredEvent,
)
from bertrec.feedback.store import CommitObserver, StoreError, salted_hash, scoped_key

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "bertrec:feedback"
FORGET_KIND = "forget"  # the kind of a tombstone record
POOL_SIZE = 64  # connections: concurrent callers share Redis's fsync, not one socket
SOCKET_TIMEOUT_S = 30.0  # a call with no `timeout_s` of its own gives up after this
REWRITE_POLL_S = 0.2  # how often to look whether a running AOF rewrite has finished
# Newer redis-py (checked: 8.1) reads one reply with its own timeout; with an older one a
# call's `timeout_s` falls back to the connection's socket timeout.
_READ_TIMEOUT = "timeout" in inspect.signature(redis.Connection.read_response).parameters

# Every script's KEYS start with these, in this order; the rest are users' index hashes.
_KEY_TYPES = "{'zset', 'string', 'hash', 'hash'}"  # log, seq, keys, tombstones
_CHECK_TYPES = f"""
local expected = {_KEY_TYPES}
for i = 1, #KEYS do
  local found = redis.call('TYPE', KEYS[i]).ok
  local want = expected[i] or 'hash'
  if found ~= 'none' and found ~= want then
    return redis.error_reply('feedback store: key ' .. KEYS[i] .. ' holds a ' .. found
      .. ' where a ' .. want .. ' belongs; nothing was written')
  end
end
"""
# ARGV: the number of events, then per event its key, the KEYS index of its user's hash and
# its JSON. Returns per event its seq, or 0 for a key the store already holds.
_APPEND = f"""{_CHECK_TYPES}
local seqs = {{}}
for i = 1, tonumber(ARGV[1]) do
  local key, user, body = ARGV[3 * i - 1], KEYS[tonumber(ARGV[3 * i])], ARGV[3 * i + 1]
  if redis.call('HEXISTS', KEYS[3], key) == 1 then
    seqs[i] = 0
  else
    local seq = redis.call('INCR', KEYS[2])
    redis.call('ZADD', KEYS[1], seq, string.format('%d', seq) .. '|' .. body)
    redis.call('HSET', KEYS[3], key, seq)
    redis.call('HSET', user, seq, key)
    seqs[i] = seq
  end
end
return seqs
"""
# KEYS[5]: the user's hash. ARGV: the tombstone's JSON, the user hash. Returns {deleted, seq}.
_FORGET = f"""{_CHECK_TYPES}
local owned = redis.call('HGETALL', KEYS[5])
for i = 1, #owned, 2 do
  redis.call('ZREMRANGEBYSCORE', KEYS[1], owned[i], owned[i])
  redis.call('HDEL', KEYS[3], owned[i + 1])
end
redis.call('DEL', KEYS[5])
local seq = redis.call('INCR', KEYS[2])
redis.call('ZADD', KEYS[1], seq, string.format('%d', seq) .. '|' .. ARGV[1])
redis.call('HSET', KEYS[4], seq, ARGV[2])
return {{#owned / 2, seq}}
"""
# KEYS[1]: the log, KEYS[2]: the user's hash. Returns the user's log members.
_USER_EVENTS = """
local out = {}
for _, seq in ipairs(redis.call('HKEYS', KEYS[2])) do
  local found = redis.call('ZRANGEBYSCORE', KEYS[1], seq, seq)
  if found[1] then out[#out + 1] = found[1] end
end
return out
"""


@dataclass(frozen=True)
class _Script:
    source: str
    sha: str  # what EVALSHA names it by


def _script(source: str) -> _Script:
    return _Script(source, hashlib.sha1(source.encode()).hexdigest())


_APPEND_SCRIPT, _FORGET_SCRIPT = _script(_APPEND), _script(_FORGET)


class RedisStore:
    """A `FeedbackStore` in Redis (`redis://[user:password@]host:port/db[?prefix=...]`, also
    `rediss://` and `unix://`; redis-py's URL options such as `socket_timeout` apply)."""

    def __init__(self, url: str, observer: CommitObserver) -> None:
        connect_url, prefix = _split_prefix(url)
        self.url = _display_url(connect_url, prefix)
        self._observer = observer
        self._keys = _Keys(prefix)
        try:
            self._pool = redis.BlockingConnectionPool.from_url(
                connect_url,
                max_connections=POOL_SIZE,
                decode_responses=True,
                socket_timeout=SOCKET_TIMEOUT_S,
                socket_connect_timeout=SOCKET_TIMEOUT_S,
                retry=Retry(NoBackoff(), 0),  # a retried script could run twice
            )
            self._client = redis.Redis(connection_pool=self._pool)
            self._user_events = self._client.register_script(_USER_EVENTS)
            self._check_durable()
            self._client.setnx(self._keys.salt, secrets.token_hex(16))
            self._salt = str(self._client.get(self._keys.salt))
        except (RedisError, ValueError) as exc:
            raise StoreError(f"feedback store {self.url}: cannot open: {exc}") from exc
        self._rewriter = _AofRewriter(self._client, self.url)

    # -- writes (one script each: atomic, fsync'd before the reply) -------------------------

    def append(self, events: Sequence[FeedbackEvent], timeout_s: float | None = None) -> Appended:
        if not events:
            return Appended(())
        users = list(dict.fromkeys(e.user_id for e in events))
        slot = {user: 5 + i for i, user in enumerate(users)}  # their place in KEYS (1-based)
        args: list[str | int] = [len(events)]
        now = time.time()
        for e in events:
            args += [scoped_key(e.user_id, e.key), slot[e.user_id], _event_json(e, now)]
        keys = [*self._keys.common, *map(self._keys.user, users)]
        started = time.perf_counter()
        seqs = self._eval(_APPEND_SCRIPT, keys, args, timeout_s)
        self._observer.committed(time.perf_counter() - started, len(events), 1)
        return Appended(tuple(int(s) or None for s in seqs))

    def forget(self, user_id: str, timeout_s: float | None = None) -> Erased:
        user_hash = self.user_hash(user_id)
        tombstone = json.dumps({"kind": FORGET_KIND, "user_hash": user_hash})
        keys = [*self._keys.common, self._keys.user(user_id)]
        started = time.perf_counter()
        deleted, seq = self._eval(_FORGET_SCRIPT, keys, [tombstone, user_hash], timeout_s)
        self._observer.committed(time.perf_counter() - started, 0, 1)
        self._rewriter.request()
        return Erased(int(deleted), Forgotten(int(seq), user_hash))

    def _eval(
        self, script: _Script, keys: list[str], args: list[str | int], timeout_s: float | None
    ) -> Any:
        """EVALSHA on a pooled connection, reading the reply within `timeout_s` (loading the
        script first where this Redis has not seen it: NOSCRIPT means nothing ran)."""
        read: dict[str, float] = {}
        if timeout_s is not None and _READ_TIMEOUT:
            read["timeout"] = max(timeout_s, 0.001)
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            conn = self._pool.get_connection()
            try:
                try:
                    conn.send_command(*command)
                    return conn.read_response(**read)
                except NoScriptError:
                    conn.send_command("SCRIPT", "LOAD", script.source)
                    conn.read_response(**read)
                    conn.send_command(*command)
                    return conn.read_response(**read)
            finally:
                self._pool.release(conn)
        except RedisTimeout:
            raise StoreError(
                f"feedback store {self.url}: no answer within {timeout_s or SOCKET_TIMEOUT_S:g} s"
                " (the write may still land; retrying with the same keys is safe)"
            ) from None
        except RedisError as exc:
            raise StoreError(f"feedback store {self.url}: write failed: {exc}") from exc

    # -- reads ------------------------------------------------------------------------------

    def read_since(self, cursor: int, limit: int = 10_000) -> list[Record]:
        members = self._read(
            lambda: self._client.zrangebyscore(
                self._keys.log, f"({cursor}", "+inf", start=0, num=limit
            )
        )
        return [_record(m) for m in members]

    def user_events(self, user_id: str) -> list[StoredEvent]:
        keys = [self._keys.log, self._keys.user(user_id)]
        members = self._read(lambda: self._user_events(keys))
        records = sorted(map(_record, members), key=lambda r: r.seq)
        return [r for r in records if isinstance(r, StoredEvent)]

    def tombstones(self) -> list[Forgotten]:
        found = self._read(lambda: self._client.hgetall(self._keys.tombstones))
        return sorted((Forgotten(int(seq), h) for seq, h in found.items()), key=lambda t: t.seq)

    def user_hash(self, user_id: str) -> str:
        return salted_hash(self._salt, user_id)

    def _read(self, call: Any) -> Any:
        try:
            return call()
        except RedisError as exc:
            raise StoreError(f"feedback store {self.url}: read failed: {exc}") from exc

    # -- life cycle -------------------------------------------------------------------------

    def close(self) -> None:
        self._rewriter.close()
        self._pool.disconnect()

    def _check_durable(self) -> None:
        """Refuse a Redis that would answer before the write is on disk."""
        try:
            config = self._client.config_get("append*")
        except ResponseError as exc:  # CONFIG renamed away or not permitted (managed Redis)
            log.warning(
                "feedback store %s: cannot read the AOF settings (%s); acknowledged events "
                "are durable only with `appendonly yes` and `appendfsync always`",
                self.url, exc,
            )  # fmt: skip
            return
        appendonly, fsync = config.get("appendonly"), config.get("appendfsync")
        if appendonly != "yes" or fsync != "always":
            raise StoreError(
                f"feedback store {self.url}: Redis runs with appendonly {appendonly} and "
                f"appendfsync {fsync}; an acknowledged event is durable only with "
                "`appendonly yes` and `appendfsync always` (set them in redis.conf, or with "
                "CONFIG SET and CONFIG REWRITE)"
            )


class _Keys:
    """The store's key names under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.log, self.seq = f"{prefix}:log", f"{prefix}:seq"
        self.keys, self.tombstones = f"{prefix}:keys", f"{prefix}:tombstones"
        self.salt = f"{prefix}:salt"
        self.common = [self.log, self.seq, self.keys, self.tombstones]  # the order _KEY_TYPES

    def user(self, user_id: str) -> str:
        return f"{self.prefix}:user:{user_id}"


class _AofRewriter:
    """Asks Redis for an AOF rewrite after each forget, from one background thread, so the
    deleted events leave the disk without the forget waiting for the rewrite."""

    def __init__(self, client: redis.Redis, url: str) -> None:
        self._client = client
        self._url = url
        self._wanted = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def request(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="feedback-aof-rewrite", daemon=True
                )
                self._thread.start()
        self._wanted.set()

    def close(self) -> None:
        self._closed.set()
        self._wanted.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _loop(self) -> None:
        while True:
            self._wanted.wait()
            if self._closed.is_set():
                return
            self._wanted.clear()
            self._rewrite()

    def _rewrite(self) -> None:
        """BGREWRITEAOF; when one is already running it started before the forget and still
        holds the user, so wait for it to end and ask again."""
        while not self._closed.is_set():
            try:
                self._client.bgrewriteaof()
                return
            except ResponseError as exc:
                if "already in progress" not in str(exc):
                    log.warning("feedback store %s: no AOF rewrite: %s", self._url, exc)
                    return
                log.info("feedback store %s: AOF rewrite running; asking again after", self._url)
            except RedisError as exc:
                log.warning("feedback store %s: no AOF rewrite: %s", self._url, exc)
                return
            self._wait_for_running_rewrite()

    def _wait_for_running_rewrite(self) -> None:
        while not self._closed.wait(REWRITE_POLL_S):
            try:
                if not int(self._client.info("persistence")["aof_rewrite_in_progress"]):
                    return
            except (RedisError, KeyError, ValueError):
                return


def _split_prefix(url: str) -> tuple[str, str]:
    """The URL redis-py connects to (without `prefix`) and the key prefix."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefixes = [value for name, value in query if name == "prefix"]
    prefix = prefixes[-1] if prefixes else DEFAULT_PREFIX
    if not prefix:
        raise StoreError(f"feedback store {url!r}: empty ?prefix=")
    rest = urlencode([(name, value) for name, value in query if name != "prefix"])
    return urlunsplit(parts._replace(query=rest)), prefix


def _display_url(url: str, prefix: str) -> str:
    """The URL without user name and password (it goes to logs and metric labels)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    shown = urlunsplit((parts.scheme, host, parts.path, "", ""))
    return shown if prefix == DEFAULT_PREFIX else f"{shown}?prefix={prefix}"


def _event_json(event: FeedbackEvent, recorded_at: float) -> str:
    return json.dumps(
        {
            "user": event.user_id, "item": event.item_id, "kind": event.kind.value,
            "rating": event.rating, "occurred_at": event.occurred_at, "key": event.key,
            "recorded_at": recorded_at,
        },
        separators=(",", ":"),
    )  # fmt: skip


def _record(member: str) -> Record:
    seq, _, body = member.partition("|")
    fields = json.loads(body)
    if fields["kind"] == FORGET_KIND:
        return Forgotten(int(seq), str(fields["user_hash"]))
    event = FeedbackEvent(
        str(fields["user"]), str(fields["item"]), FeedbackKind(fields["kind"]),
        float(fields["rating"]), float(fields["occurred_at"]), str(fields["key"]),
    )  # fmt: skip
    return StoredEvent(int(seq), event)
