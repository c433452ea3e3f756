"""A real `redis-server` for tests: on a free loopback port, in its own folder, with the AOF
fsync'd before every reply (`--appendonly yes --appendfsync always --save ""`), started,
killed with SIGKILL and restarted from its AOF on the same folder and port.

    with redis_server(tmp_path) as server:
        store = open_store(server.url)
        server.kill()      # kill -9: only what is in the AOF survives
        server.start()     # same folder, same port: replays the AOF
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

READY_TIMEOUT_S = 30.0
DURABLE_ARGS = ("--appendonly", "yes", "--appendfsync", "always", "--save", "")


def need_redis_server() -> None:
    """Skip the calling test where redis-server is not installed; fail it instead under
    BERTREC_REQUIRE_TOOLCHAINS=1 (`make test`, CI), where a skip would hide a gap."""
    if shutil.which("redis-server") is not None:
        return
    reason = "redis-server is not installed (apt-get install redis-server)"
    if os.environ.get("BERTREC_REQUIRE_TOOLCHAINS", "") not in ("", "0"):
        pytest.fail(reason)
    pytest.skip(reason)


@dataclass
class RedisServer:
    """One redis-server process (or none, between `kill` and `start`) owning `folder`.

    Attributes:
        folder: its working folder; the AOF lives in `folder / "appendonlydir"`.
        args: redis-server settings after the defaults (later ones win).
    """

    folder: Path
    args: tuple[str, ...] = DURABLE_ARGS
    port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def aof_dir(self) -> Path:
        return self.folder / "appendonlydir"

    @property
    def log_path(self) -> Path:
        return self.folder / "redis.log"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=10.0)

    def start(self) -> None:
        """Start on `port` (a free one the first time), and return once PING answers (the
        AOF has been loaded)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        pick = self.port == 0  # a restart keeps its port: clients hold the URL
        for _ in range(5 if pick else 1):  # a free port can be taken before redis binds it
            if pick:
                self.port = _free_port()
            self.proc = self._spawn()
            if self._wait_ready():
                return
            self.proc = None
        raise AssertionError(f"redis-server did not start on port {self.port}:\n{self.log()}")

    def kill(self) -> None:
        """kill -9: no shutdown, no last fsync; only what was acknowledged is on disk."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10.0)
            except subprocess.TimeoutExpired:
                self.kill()
            self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def info(self, section: str) -> dict[str, Any]:
        with self.client() as client:
            return dict(client.info(section))

    def aof_bytes(self) -> bytes:
        """Every byte of every file in the AOF folder (base, increments, manifest)."""
        return b"".join(p.read_bytes() for p in sorted(self.aof_dir.glob("*")) if p.is_file())

    def _spawn(self) -> subprocess.Popen[bytes]:
        command = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.folder), "--logfile", str(self.log_path),
            "--daemonize", "no", *self.args,
        ]  # fmt: skip
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _wait_ready(self) -> bool:
        """True once PING answers; False if the process exited (its port was taken)."""
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        with redis.Redis(port=self.port, socket_timeout=1.0, socket_connect_timeout=1.0) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False
                try:
                    if c.ping():
                        return True
                except redis.exceptions.RedisError:  # not listening yet, or LOADING the AOF
                    pass
                time.sleep(0.02)
        self.kill()
        raise AssertionError(f"redis-server never answered PING:\n{self.log()}")


@contextmanager
def redis_server(folder: Path, *args: str) -> Iterator[RedisServer]:
    """A started durable redis-server in `folder` (`args` add or override settings), killed
    on the way out."""
    server = RedisServer(folder, (*DURABLE_ARGS, *args))
    server.start()
    try:
        yield server
    finally:
        server.kill()


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `condition()` until true; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
