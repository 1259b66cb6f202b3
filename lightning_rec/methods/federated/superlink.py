"""Where the SuperLink is: its ``host:port`` and the commands that start it and the SuperNodes.

Below both :mod:`~lightning_rec.methods.federated.federation` (which checks
``federation.superlink`` with the other options) and :mod:`~lightning_rec.methods.federated.deploy`
(which submits to it), so neither imports the other.
"""

from __future__ import annotations

from lightning_rec.errors import ConfigError


def parse_address(address: str, option: str) -> tuple[str, int]:
    """``(host, port)`` of ``host:port`` (IPv6 in brackets); a one-line ConfigError naming ``option`` otherwise."""
    host, _, port = address.strip().rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{option}={address}: expected host:port (e.g. 127.0.0.1:8000)")
    return host.strip("[]"), int(port)


def commands(superlink: str, num_devices: int) -> list[str]:
    """The commands that start a SuperLink and the SuperNodes for ``num_devices`` devices (one machine)."""
    host, port = parse_address(superlink, "federation.superlink")
    lines = [f"flower-superlink --insecure --port {port} --disable-runtime-dependency-installation"]
    lines += [f"flower-supernode --insecure --superlink {host}:{port} --port {9094 + d} "
              f"--node-config \"partition-id={d} num-partitions={num_devices}\"" for d in range(num_devices)]
    return lines
