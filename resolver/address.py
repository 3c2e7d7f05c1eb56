"""Listen addresses (`HOST:PORT`, `[V6]:PORT`): parsed in one place, for the blueprint, gRPC and webhooks."""

from __future__ import annotations

import socket
from typing import NamedTuple


class Address(NamedTuple):
    """A parsed listen address; `host` never carries IPv6 brackets."""

    host: str
    port: int

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def with_port(self, port: int) -> Address:
        return Address(self.host, port)

    def __str__(self) -> str:
        """The address as gRPC's add_*_port and the blueprint spell it (brackets around an IPv6 host)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """`HOST:PORT` or `[V6]:PORT` -> Address; ValueError naming the text if it is neither (port 0..65535)."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return Address(host, int(port))
