import os
import socket
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# No test reaches the network: this process and every Python process a test starts (through PYTHONPATH) load
# tests/_netblock/sitecustomize.py, which refuses any connection or name lookup off the loopback interface.
_NETBLOCK = str(Path(__file__).parent / "_netblock")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_NETBLOCK, os.environ.get("PYTHONPATH")) if p)
sys.path.insert(0, _NETBLOCK)
import sitecustomize  # noqa: E402,F401  (the copy above, if the interpreter loaded another one first)

if getattr(socket.socket.connect, "__module__", "") != "sitecustomize":
    import importlib.util

    _spec = importlib.util.spec_from_file_location("_diffdistill_netblock", Path(_NETBLOCK) / "sitecustomize.py")
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
torch.set_num_threads(1)  # tiny models: one thread avoids oversubscription on 2 cores


@pytest.fixture
def no_network(monkeypatch):
    """Fail any attempt to open a connection, loopback included (the whole suite already blocks the rest)."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DIFFDISTILL_CACHE", str(tmp_path_factory.mktemp("cache")))
