"""`fedagent dev` checks its ports the way its servers bind them: a port whose last connection
is still in TIME_WAIT (a stack stopped a moment ago) is free to them, so a second run right
after the first starts; a port something listens on is still refused."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from cli.devstack import DevStack, StackError, free_port_block


def _leave_in_time_wait(port: int) -> None:
    """Serve one real loopback connection on `port` and close it from the server's side first,
    as a stopped API does: the server's socket stays in TIME_WAIT on `port`."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        listener.bind(("127.0.0.1", port))
        listener.listen()
        client = socket.create_connection(("127.0.0.1", port))
        served, _ = listener.accept()
        served.close()  # the server closes first: its end goes through TIME_WAIT
        assert client.recv(1) == b""  # the client saw the close ...
        client.close()  # ... and answers it
    with socket.socket() as plain:  # the kernel keeps the port: a plain bind is refused
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))


def test_dev_starts_again_on_ports_left_in_time_wait_by_the_last_run(tmp_path: Path) -> None:
    base, temporal = free_port_block(1), free_port_block(2)
    _leave_in_time_wait(base)
    stack = DevStack(
        ["solo"], tmp_path, base_port=base, temporal_port=temporal, ui_port=temporal + 1
    )
    stack.check_ports()  # raises StackError("... already in use ...") when it refuses


def test_dev_still_refuses_a_port_something_listens_on(tmp_path: Path) -> None:
    base, temporal = free_port_block(1), free_port_block(2)
    stack = DevStack(
        ["solo"], tmp_path, base_port=base, temporal_port=temporal, ui_port=temporal + 1
    )
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", base))
        taken.listen()
        with pytest.raises(StackError, match=f"port {base} for the API of solo"):
            stack.check_ports()
