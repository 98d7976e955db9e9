"""Shared test fixtures.

`apar_cluster` is the ONE cluster start of the session: a real `apar serve` subprocess (local
Ray, Ray Serve's gRPC proxy, 2 worker replicas with a small KV pool) serving the shipped model,
with a real redis-server that the fixture owns (so tests can stop and restart it). Cluster tests
share it; it is started on first use and stopped (SIGINT, as a user would) at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from redis_fixtures import server, state  # noqa: F401  (fixtures of the cluster-state tests)

ROOT = Path(__file__).resolve().parents[1]
# The model the cluster tests serve; acceptance runs use the shipped one.
TEST_MODEL = os.environ.get("APAR_TEST_MODEL", "apar-tiny")


def apar_command() -> list[str]:
    """`apar` as installed by `pip install -e .`, else the same entry point via python -m."""
    exe = shutil.which("apar")
    return [exe] if exe else [sys.executable, "-m", "cluster.cli"]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def require_model(name: str = TEST_MODEL) -> str:
    """Fails (never skips) when the model to serve is missing: acceptance needs the real one."""
    from apar_worker.model_registry import resolve_model
    from apar_worker.types import ModelLoadError

    try:
        resolve_model(name)
    except ModelLoadError as exc:
        pytest.fail(f"cluster tests need the model {name!r}: {exc}")
    return name


def start_serve(args: list[str], log_path: Path, timeout_s: float = 300.0) -> subprocess.Popen:
    """Start `apar serve ARGS`, wait until it prints that it listens; its output goes to log_path."""
    log = open(log_path, "wb")  # noqa: SIM115 - the child writes it for its whole life
    proc = subprocess.Popen(
        [*apar_command(), "serve", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
        env=subprocess_env(),
        start_new_session=True,  # its own process group, like a command started in a terminal
    )
    log.close()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        if "listening on grpc" in text:
            return proc
        if proc.poll() is not None:
            text = log_path.read_text(errors="replace")  # re-read: it may have written more before exiting
            pytest.fail(f"apar serve exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.5)
    stop_serve(proc)
    pytest.fail(
        f"apar serve did not come up in {timeout_s:.0f}s:\n{log_path.read_text(errors='replace')[-3000:]}"
    )


def stop_serve(proc: subprocess.Popen, timeout_s: float = 90.0) -> int:
    """Ctrl-C as a terminal sends it (to the whole process group); kill only if it hangs."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return proc.returncode


@dataclass
class ServeCluster:
    """A running `apar serve` and handles on its Redis."""

    proc: subprocess.Popen
    grpc_port: int
    redis: object  # cluster.redis_server.RedisServer
    namespace: str
    model: str
    log_path: Path
    http_port: int = 0
    app: str = "apar"
    replicas: int = 2
    _state: object = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def redis_url(self) -> str:
        return self.redis.url

    @property
    def state(self):
        """cluster.state.SchedulerState on the cluster's Redis and namespace."""
        if self._state is None:
            from cluster.state import SchedulerState

            self._state = SchedulerState(self.redis_url, self.namespace, retry_after_s=0.2)
        return self._state

    def loads(self) -> dict:
        return self.state.replica_loads() or {}

    def wait_replicas(self, n: int | None = None, timeout_s: float = 60.0) -> dict:
        n = self.replicas if n is None else n
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            loads = self.loads()
            if len(loads) >= n:
                return loads
            time.sleep(0.2)
        raise TimeoutError(f"fewer than {n} replicas send heartbeats: {self.loads()}")

    def wait_kv_free(self, timeout_s: float = 30.0) -> dict:
        """Until every replica reports no running request and all KV blocks free (from heartbeats)."""
        deadline = time.monotonic() + timeout_s
        loads: dict = {}
        while time.monotonic() < deadline:
            loads = self.loads()
            if loads and all(
                x.free_blocks == x.total_blocks and x.running_requests == 0 and x.waiting_requests == 0
                for x in loads.values()
            ):
                return loads
            time.sleep(0.2)
        raise AssertionError(f"KV blocks not back in the pool after {timeout_s}s: {loads}")


def write_config(
    path: Path, model: str, grpc_port: int, http_port: int, namespace: str, replicas: int
) -> Path:
    """The test cluster's config: small KV pool, fractional CPUs, fast heartbeats, low limits."""
    cfg = {
        "model": model,
        # torch ops, not the native kernels: those decode this tiny model's 1000 tokens in about a
        # second, before a cancel or a replica kill reaches a request (kernels: test_native.py etc.)
        "engine": {"device": "cpu", "kv_cache_memory_mb": 32, "max_num_seqs": 64, "native_kernels": False},
        "limits": {"max_tokens": 1024, "default_max_tokens": 128, "max_prompt_chars": 16384},
        "worker": {"num_replicas": replicas, "num_cpus": 0.5, "max_ongoing_requests": 16},
        "ingress": {"num_replicas": 2, "num_cpus": 0.1},  # Cancel must reach the other one
        "grpc": {"port": grpc_port},
        "http": {"host": "127.0.0.1", "port": http_port},
        "redis": {"namespace": namespace, "heartbeat_interval_s": 0.3, "heartbeat_ttl_s": 1.5},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def apar_cluster(tmp_path_factory) -> ServeCluster:
    from cluster.redis_server import RedisServer, free_port

    model = require_model()
    tmp = tmp_path_factory.mktemp("apar-cluster")
    grpc_port, http_port = free_port(), free_port()
    namespace = "test"
    config = write_config(tmp / "config.yaml", model, grpc_port, http_port, namespace, replicas=2)
    redis = RedisServer()
    redis.start()
    log_path = tmp / "serve.log"
    try:
        proc = start_serve(["--config", str(config), "--redis-url", redis.url, "--num-cpus", "4"], log_path)
    except BaseException:
        redis.close()
        raise
    cluster = ServeCluster(
        proc=proc,
        grpc_port=grpc_port,
        redis=redis,
        namespace=namespace,
        model=model,
        log_path=log_path,
        http_port=http_port,
    )
    try:
        cluster.wait_replicas()
        yield cluster
    finally:
        stop_serve(proc)
        if cluster._state is not None:
            cluster._state.close()
        redis.close()
