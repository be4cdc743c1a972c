"""Which address phones should use to reach this machine, read from the interfaces (no packet is sent).

The best guess is an address on the interface that carries the default route (the laptop's Wi-Fi or
Ethernet); container bridges, veth pairs and VPN tunnels come last, since phones cannot reach them.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import ifaddr

# Interface name prefixes of virtual networks a phone on the LAN cannot reach.
VIRTUAL_PREFIXES = ("docker", "br-", "veth", "virbr", "vmnet", "vboxnet", "tun", "tap", "wg", "tm", "lxc", "cni")


def default_route_interfaces(route_table: Path = Path("/proc/net/route")) -> set[str]:
    """Interfaces with a default route (Linux's routing table; empty elsewhere)."""
    try:
        lines = route_table.read_text().splitlines()[1:]
    except OSError:
        return set()
    return {fields[0] for fields in (line.split() for line in lines) if len(fields) > 1 and fields[1] == "00000000"}


def lan_addresses() -> list[str]:
    """Non-loopback IPv4 addresses of this machine, the likeliest to be reachable from a phone first."""
    defaults = default_route_interfaces()
    found: list[tuple[tuple, str]] = []
    for adapter in ifaddr.get_adapters():
        name = adapter.nice_name or adapter.name
        for ip in adapter.ips:
            if not ip.is_IPv4:
                continue
            addr = ipaddress.IPv4Address(ip.ip)
            if addr.is_loopback or addr.is_link_local:
                continue
            rank = (name not in defaults, name.startswith(VIRTUAL_PREFIXES), not addr.is_private, addr)
            found.append((rank, str(addr)))
    return [addr for _, addr in sorted(found)]


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def public_host(bind_host: str) -> str:
    """The host to put in URLs: the bound address itself, or for a wildcard bind the best LAN address."""
    if bind_host in ("0.0.0.0", "::", ""):
        lan = lan_addresses()
        return lan[0] if lan else "127.0.0.1"
    return bind_host
