"""What `apar serve` keeps watching while it serves: its own redis-server and a status record.

Redis holds only soft state, so a redis-server that dies (or hangs) is restarted on the same
port with the same password, and the replicas repopulate it with their next heartbeats. The
state file (0600: it holds the Redis password) also carries the replica counts Ray reports, so
`apar status` can tell a serving cluster from a dead one while Redis is down.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import redis

REDIS_CHECK_S = 1.0
RAY_CHECK_S = 2.0
HUNG_AFTER_S = 10.0  # a redis-server that answers no PING this long is killed and restarted
WORKER_DEPLOYMENT = "AparWorker"


def state_file(grpc_port: int) -> Path:
    """Where `apar serve` on `grpc_port` records its Redis URL, pid and replica counts."""
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or Path.home() / ".cache")
    return base / "apar" / f"serve-{grpc_port}.json"


def write_private(path: Path, data: dict[str, Any]) -> None:
    """Write JSON readable by this user only (the Redis URL in it carries the password)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def ray_replicas(app_name: str) -> dict[str, Any]:
    """The application's status and the worker replicas per state, as Ray Serve reports them."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return {"app_status": "NOT_FOUND", "replicas": {}}
    dep = app.deployments.get(WORKER_DEPLOYMENT)
    states = {str(k).rsplit(".", 1)[-1]: int(v) for k, v in (dep.replica_states if dep else {}).items()}
    return {"app_status": str(app.status).rsplit(".", 1)[-1], "replicas": states}


class Supervisor:
    """Called from `apar serve`'s main loop; restarts the redis-server it started, refreshes the
    state file. `log` prints one line per event."""

    def __init__(self, redis_server: Any, path: Path, record: dict[str, Any], app_name: str, log=print):
        self.redis_server, self.path, self.record, self.app_name = redis_server, path, dict(record), app_name
        self.log = log
        self.restarts = 0
        self._next_redis = self._next_ray = 0.0
        self._last_pong = time.monotonic()
        self._client = redis.Redis.from_url(
            record["redis_url"], socket_timeout=0.3, socket_connect_timeout=0.3
        )

    def tick(self) -> None:
        now = time.monotonic()
        if self.redis_server is not None and now >= self._next_redis:
            self._next_redis = now + REDIS_CHECK_S
            self._check_redis(now)
        if now >= self._next_ray:
            self._next_ray = now + RAY_CHECK_S
            try:
                self.record["ray"] = {**ray_replicas(self.app_name), "at": time.time()}
            except Exception as exc:  # the controller is busy or restarting: keep the last record
                self.record.setdefault("ray", {})["error"] = str(exc)[:200]
            write_private(self.path, self.record)

    def _check_redis(self, now: float) -> None:
        if self.redis_server.running:
            try:
                self._client.ping()
                self._last_pong = now
                return
            except redis.RedisError:
                if now - self._last_pong < HUNG_AFTER_S:
                    return
                why = f"answered no PING for {HUNG_AFTER_S:.0f}s"
        else:
            why = "exited"
        try:
            self.redis_server.restart()
        except Exception as exc:  # try again at the next check
            self.log(f"apar serve: redis-server {why}; restart failed: {exc}")
            return
        self.restarts += 1
        self._last_pong = time.monotonic()
        self.record["redis_restarts"] = self.restarts
        self.log(f"apar serve: redis-server {why}; restarted on port {self.redis_server.port}")

    def close(self) -> None:
        self._client.close()
