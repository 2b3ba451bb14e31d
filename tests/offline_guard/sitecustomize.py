"""Offline guard, loaded by every Python process the tests start (kernels too).

The test suite puts this folder on PYTHONPATH, so Python imports it at
start-up. Any attempt to resolve a remote host or open a non-local socket
raises, and is written to COURSE_OFFLINE_LOG so the test that caused it
fails even when a library swallows the exception and falls back quietly.
"""

import ipaddress
import os
import socket


class NetworkAccessBlocked(OSError):
    pass


def _is_local(host) -> bool:
    if host in (None, "", "localhost"):
        return True
    try:
        ip = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


def _block(what: str):
    log = os.environ.get("COURSE_OFFLINE_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()} {what}\n")
    raise NetworkAccessBlocked(f"network access blocked by the course's offline guard: {what}")


_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def _guarded_connect(self, address):
    if self.family != getattr(socket, "AF_UNIX", None) and not _is_local(address[0]):
        _block(f"connect to {address!r}")
    return _connect(self, address)


def _guarded_connect_ex(self, address):
    if self.family != getattr(socket, "AF_UNIX", None) and not _is_local(address[0]):
        _block(f"connect to {address!r}")
    return _connect_ex(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
    if not _is_local(host.decode() if isinstance(host, bytes) else host):
        _block(f"name lookup of {host!r}")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex
socket.getaddrinfo = _guarded_getaddrinfo
