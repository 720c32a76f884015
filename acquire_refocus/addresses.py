"""ZeroMQ endpoint checks shared by the config, the daemon's sockets and the clients (no ZeroMQ import: the config
uses them). ZeroMQ accepts a TCP port out of range and then binds a random port or never connects, so the port is
checked here."""

from __future__ import annotations

import ipaddress

SCHEMES = ("tcp", "ipc", "inproc")


def address_problem(address: str, bind: bool = True) -> str:
    """What is wrong with a ZeroMQ endpoint, or "" when it can be used; to bind, a TCP port may also be "*" (any
    free port, which the daemon logs)."""
    scheme, separator, rest = address.partition("://")
    if not separator or scheme not in SCHEMES or not rest:
        return f"not a ZeroMQ address ({', '.join(s + '://' for s in SCHEMES)})"
    if scheme == "tcp":
        host, separator, port = rest.rpartition(":")
        if not separator:
            return "no port (tcp://HOST:PORT)"
        if not host:
            return "no host before the port"
        if not (port.isdigit() and 0 < int(port) < 65536) and not (bind and port == "*"):
            return f"port {port!r} is not a number from 1 to 65535"
    return ""


def is_loopback(address: str) -> bool:
    """True for endpoints only this machine can reach: ipc:// and inproc://, tcp on 127.0.0.0/8, ::1 or localhost.
    A wildcard (*, 0.0.0.0) or a network interface is not."""
    scheme, _, rest = address.partition("://")
    if scheme != "tcp":
        return scheme in ("ipc", "inproc")
    host = rest.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # an interface name or a host name: reachable from the network
        return False
