"""`apar status`: worker replicas, their load and Redis health; a request's owner and progress.

Per-replica load comes from the replicas' Redis heartbeats. When Redis is down the local
`apar serve`'s state file still says what Ray reports (application status, replicas per state,
refreshed every 2 s), so a serving cluster with a restarting Redis is told apart from a dead one.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from apar_worker.cli_generate import fail
from cluster.config import load_config
from cluster.redis_url import redact_url
from cluster.supervisor import state_file

RAY_RECORD_FRESH_S = 15.0


def register(sub: Any) -> None:
    s = sub.add_parser("status", help="show worker replicas, their load and Redis health")
    s.add_argument(
        "--redis-url", default=None, metavar="URL", help="default: $APAR_REDIS_URL or the local `apar serve`"
    )
    s.add_argument(
        "--grpc-port", type=int, default=50051, metavar="PORT", help="port of the local `apar serve`"
    )
    s.add_argument("--namespace", default=None, help="Redis key namespace (default: the config's)")
    s.add_argument(
        "--request", default=None, metavar="ID", help="also show this request's owner and progress"
    )
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=run_status)


def _recorded(grpc_port: int) -> dict[str, Any] | None:
    path = state_file(grpc_port)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def ray_view(recorded: dict[str, Any] | None) -> dict[str, Any] | None:
    """What Ray reported to the local `apar serve` lately, or None (no record, or a stale one)."""
    ray = (recorded or {}).get("ray") or {}
    if "at" not in ray or time.time() - ray["at"] > RAY_RECORD_FRESH_S:
        return None
    return {
        "app_status": ray["app_status"],
        "replicas": ray["replicas"],
        "age_s": round(time.time() - ray["at"], 1),
    }


def run_status(args: argparse.Namespace) -> int:
    from cluster.state import SchedulerState

    url, namespace = args.redis_url or os.environ.get("APAR_REDIS_URL"), args.namespace
    recorded = _recorded(args.grpc_port)
    if not url:
        if recorded is None:
            return fail(f"no --redis-url given and no local `apar serve` on gRPC port {args.grpc_port}")
        url, namespace = recorded["redis_url"], namespace or recorded.get("namespace")
    namespace = namespace or load_config(None).redis.namespace
    try:
        st = SchedulerState(url, namespace)
    except ValueError as exc:
        return fail(str(exc))
    healthy = st.ping()
    loads = (st.replica_loads() or {}) if healthy else {}
    request = st.request_status(args.request) if healthy and args.request else None
    st.close()
    ray = ray_view(recorded) if recorded and recorded.get("redis_url") == url else None
    serving = ray is not None and ray["app_status"] == "RUNNING" and ray["replicas"].get("RUNNING", 0) > 0
    rc = 0 if healthy or serving else 1
    shown = redact_url(url)
    if args.json:
        data = {"redis": {"url": shown, "healthy": healthy}, "replicas": [vars(x) for x in loads.values()]}
        data["ray"] = ray
        if args.request:
            data["request"] = request
        print(json.dumps(data))
        return rc
    print(f"redis {shown}: {'ok' if healthy else 'UNREACHABLE'}")
    if healthy:
        print(f"{len(loads)} worker replica(s)")
    elif ray is not None:
        running = ray["replicas"].get("RUNNING", 0)
        print(
            f"{running} worker replica(s) running, from Ray {ray['age_s']}s ago (application {ray['app_status']}); "
            "their load needs Redis, which `apar serve` restarts; routing is degraded until then"
        )
    else:
        print("0 worker replica(s) known: no heartbeats without Redis and no recent record from Ray")
    for rid, load in sorted(loads.items()):
        print(
            f"  {rid}  pid {load.pid}  running {load.running_requests}  waiting {load.waiting_requests}  "
            f"branches {load.running_branches}  free KV {load.free_blocks}/{load.total_blocks}"
        )
    if args.request:
        print(format_request_status(args.request, request))
    return rc


def format_request_status(request_id: str, status: dict[str, Any] | None) -> str:
    """`apar status --request ID`: who owns the request and how far each branch got."""
    if status is None:
        return f"request {request_id}: no record (unknown, or finished more than its TTL ago)"
    owner = f"owned by {status['owner']}" if status["owner"] else "not owned (finished)"
    lines = [f"request {request_id}: {status['state']} on {status['replica']}, {owner}"]
    for bid, b in status["branches"].items():
        parent = "root" if b["parent"] is None else f"child of {b['parent']}"
        where = ", ".join(b["ran_on"]) or "?"
        lines.append(
            f"  branch {bid} ({parent}): {b['tokens']} tokens, {b['finish'] or 'running'}, ran on {where}"
        )
    return "\n".join(lines)
