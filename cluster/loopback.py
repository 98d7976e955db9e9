"""Where `apar serve` listens: loopback only by default, `--host` for other machines.

Ray Serve 2.x binds its gRPC server to `[::]:PORT` (every interface, IPv4 and IPv6) and has no
option for the host. `apar serve` sets `APAR_GRPC_HOST` and installs `bind_grpc_host` as Ray's
`worker_process_setup_hook`, so in every Ray worker process, the proxy's included, the address
Serve asks for is rewritten to that host before the server binds it (and the replicas'
inter-deployment gRPC servers too, when the host is loopback). `listen_on` also keeps Ray's own
ports on loopback when the host is loopback.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from typing import Any

GRPC_HOST_ENV = "APAR_GRPC_HOST"
RAY_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
SETUP_HOOK = "cluster.loopback.bind_grpc_host"


def grpc_address(address: str, host: str) -> str:
    """`[::]:PORT` (Serve's address) on `host` instead; IPv6 hosts in brackets."""
    port = address.rsplit(":", 1)[1]
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def bind_grpc_host() -> None:
    """Ray worker setup hook: when `APAR_GRPC_HOST` is set, Serve's public gRPC server binds
    it; when it is loopback, so does each replica's inter-deployment gRPC server (`[::]:0`)."""
    host = os.environ.get(GRPC_HOST_ENV)
    if not host:
        return
    from ray._common import tls_utils
    from ray.serve._private import default_impl

    add_grpc_address = default_impl.add_grpc_address
    if getattr(add_grpc_address, "_apar_host", None) == host:
        return  # already patched in this process

    def on_host(grpc_server: Any, server_address: str) -> None:
        add_grpc_address(grpc_server, grpc_address(server_address, host))

    on_host._apar_host = host  # type: ignore[attr-defined]
    default_impl.add_grpc_address = on_host
    if not is_loopback(host):
        return
    add_port = tls_utils.add_port_to_grpc_server

    def add_port_on_host(server: Any, address: str) -> int:
        if address.startswith("[::]:"):  # every interface: this node's loopback is enough
            address = grpc_address(address, host)
        return add_port(server, address)

    tls_utils.add_port_to_grpc_server = add_port_on_host  # modules that import it later
    replica = sys.modules.get("ray.serve._private.replica")
    if replica is not None:  # ... and the replica module if it came first
        replica.add_port_to_grpc_server = add_port_on_host


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen_on(host: str) -> dict[str, Any]:
    """Call before Ray starts: gRPC on `host`, and Ray's own ports on loopback when `host` is.

    With `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` Ray runs as a single-machine node on 127.0.0.1
    (its mode on laptops), so GCS, raylet, workers, agents and metrics bind loopback too.
    Returns the `runtime_env` for `ray.init` that installs the gRPC hook in every worker.
    """
    os.environ[GRPC_HOST_ENV] = host
    if is_loopback(host):
        os.environ[RAY_LOCAL_ONLY_ENV] = "0"
        if "ray" in sys.modules:  # read at import: this process may have imported Ray already
            from ray._private import ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = False
    return {"worker_process_setup_hook": SETUP_HOOK, "env_vars": {GRPC_HOST_ENV: host}}
