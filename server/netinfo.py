"""Which address phones should use to reach this machine, read from the interfaces (no packet is sent)."""

from __future__ import annotations

import ipaddress

import ifaddr


def lan_addresses() -> list[str]:
    """Non-loopback IPv4 addresses of this machine, private ranges first (the ones phones on the LAN can reach)."""
    found: list[ipaddress.IPv4Address] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if not ip.is_IPv4:
                continue
            addr = ipaddress.IPv4Address(ip.ip)
            if addr.is_loopback or addr.is_link_local:
                continue
            found.append(addr)
    found.sort(key=lambda a: (not a.is_private, a))
    return [str(a) for a in found]


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
