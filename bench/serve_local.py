"""`apar serve` as a child process for the load benchmark: start, wait until it listens, Ctrl-C.

It runs exactly what a user runs (`python -m cluster.cli serve --config FILE`), with its own
redis-server and Ray instance, gRPC and HTTP bound to free loopback ports.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import ROOT, BenchError


class LocalServe:
    def __init__(
        self, config: dict[str, Any], log_path: Path, num_cpus: float = 2.0, timeout_s: float = 300.0
    ):
        from cluster.redis_server import free_port

        self.grpc_port, self.http_port = free_port(), free_port()
        self.config = {
            **config,
            "grpc": {"port": self.grpc_port},
            "http": {"host": "127.0.0.1", "port": self.http_port},
        }
        self.log_path, self.num_cpus, self.timeout_s = log_path, num_cpus, timeout_s
        self.proc: subprocess.Popen | None = None
        self.startup_s = 0.0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_address(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def __enter__(self) -> LocalServe:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path = self.log_path.with_suffix(".yaml")
        cfg_path.write_text(yaml.safe_dump(self.config))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.setdefault("PYTHONUNBUFFERED", "1")
        cmd = [sys.executable, "-m", "cluster.cli", "serve", "--config", str(cfg_path)]
        cmd += ["--num-cpus", str(self.num_cpus)]
        start = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, env=env
            )
        deadline = start + self.timeout_s
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            if "listening on grpc" in text:
                self.startup_s = time.monotonic() - start
                return self
            if self.proc.poll() is not None:
                raise BenchError(f"apar serve exited with {self.proc.returncode}: {text.strip()[-300:]}")
            time.sleep(0.5)
        self.stop()
        raise BenchError(f"apar serve did not come up in {self.timeout_s:.0f}s (log: {self.log_path})")

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Ctrl-C as a user would (apar serve shuts Ray and Redis down); kill only if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
