"""`bertrec serve --workers N` reserves its port (`workers._reserve_port`): shareable by its own
workers (SO_REUSEPORT), refused while anything else holds it, and not refused by connections an
earlier server left in TIME_WAIT."""

from __future__ import annotations

import socket

import pytest

from bertrec.server.config import ConfigError
from bertrec.server.workers import _reserve_port


def time_wait_on_a_free_port() -> int:
    """A port whose listener (SO_REUSEADDR only, as a single grpc server binds) is closed and
    whose server side closed a connection first: that connection waits in TIME_WAIT."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = int(listener.getsockname()[1])
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server closes first: its side goes to TIME_WAIT
        client.recv(1)
        client.close()
    return port


def test_time_wait_of_an_earlier_server_does_not_hold_the_port() -> None:
    port = time_wait_on_a_free_port()
    reservation = _reserve_port("127.0.0.1", port)
    try:
        worker = socket.socket()  # a worker joins, as grpc binds with so_reuseport=1
        worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        worker.bind(("127.0.0.1", port))
        worker.listen()
        intruder = socket.socket()  # a server without SO_REUSEPORT is kept off
        intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with pytest.raises(OSError):
            intruder.bind(("127.0.0.1", port))
        intruder.close()
        worker.close()
    finally:
        reservation.close()


def test_a_port_another_server_holds_is_refused() -> None:
    first = _reserve_port("127.0.0.1", 0)
    port = int(first.getsockname()[1])
    try:
        with pytest.raises(ConfigError, match=r"cannot bind the health port to .* in use"):
            _reserve_port("127.0.0.1", port, "the health port")
    finally:
        first.close()
