"""The suite runs with the network blocked, in this process and in the processes tests start."""

import socket
import subprocess
import sys

import pytest


def test_connections_off_the_machine_fail_in_tests():
    with pytest.raises(OSError, match="network access attempted"):
        socket.create_connection(("8.8.8.8", 53), timeout=1)
    with pytest.raises(OSError, match="network access attempted"):
        socket.getaddrinfo("huggingface.co", 443)


def test_subprocesses_are_blocked_too():
    code = (
        "import socket\ntry:\n    socket.create_connection(('1.1.1.1', 80), timeout=1)\n"
        "except OSError as e:\n    print(e)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "network access attempted" in out


def test_loopback_stays_open():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname(), timeout=1)
    assert client.getpeername() == server.getsockname()
    client.close()
    server.close()
