"""The TCP sockets a process listens on, read from /proc: for the tests
that check which ports a job opens (``python listeners.py PID`` prints
them)."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

Listener = tuple[str, int]  # (address, port)

_LISTEN = "0A"  # the state of a listening socket in /proc/net/tcp


def _address(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    # the kernel prints each 32-bit word in host (little-endian) order
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    addr = ipaddress.ip_address(words)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def listening(pid: int | str = "self") -> list[Listener]:
    """Where process ``pid`` listens for TCP connections: (address, port) of
    each listening socket among its open files, IPv4-mapped addresses as
    IPv4 ("::" and "0.0.0.0" are every interface)."""
    mine: set[str] = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            mine.add(target[len("socket:[") : -1])
    found: list[Listener] = []
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == _LISTEN and inode in mine:
                host, port = local.rsplit(":", 1)
                found.append((_address(host), int(port, 16)))
    return sorted(found)


def wildcard(address: str) -> bool:
    return ipaddress.ip_address(address).is_unspecified


def loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


if __name__ == "__main__":
    print(listening(sys.argv[1] if len(sys.argv) > 1 else "self"))
