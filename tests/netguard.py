"""Run a script under a network guard: ``python netguard.py SCRIPT ARGS...``.

Every name lookup or connection that leaves the machine (anything but loopback and Unix sockets) is
refused and appended to the file named by ``NETGUARD_LOG``, so a test can assert that none was tried,
including attempts made from library threads whose exceptions are swallowed.
"""

from __future__ import annotations

import os
import runpy
import socket
import sys
from typing import Any

LOCAL = {"localhost", "127.0.0.1", "::1", None}
LOG = os.environ["NETGUARD_LOG"]


def _refuse(what: str, target: Any) -> None:
    with open(LOG, "a") as f:
        f.write(f"{what} {target!r}\n")
    raise OSError(f"netguard: {what} {target!r} refused")


_getaddrinfo, _connect, _connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex


def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
    if host not in LOCAL:
        _refuse("getaddrinfo", host)
    return _getaddrinfo(host, *args, **kwargs)


def _outside(sock: socket.socket, address: Any) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOCAL


def connect(self: socket.socket, address: Any) -> None:
    if _outside(self, address):
        _refuse("connect", address)
    return _connect(self, address)


def connect_ex(self: socket.socket, address: Any) -> int:
    if _outside(self, address):
        _refuse("connect_ex", address)
    return _connect_ex(self, address)


socket.getaddrinfo = getaddrinfo
socket.socket.connect = connect  # type: ignore[method-assign]
socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]

if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
