"""Acceptance 6: `apar serve` -> `apar generate --server` -> Ctrl-C, as a user runs them.

`apar serve` is started exactly as the README says (it starts its own redis-server); the client
is the `apar generate` command; SIGINT must stop everything (Ray, the gRPC port, Redis) and exit
0. Bad flags and configs exit 2 with one line on stderr before anything starts.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from conftest import apar_command, require_model, start_serve, stop_serve, subprocess_env

from cluster.cli_serve import state_file
from cluster.redis_server import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _apar(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*apar_command(), *args], capture_output=True, text=True, timeout=timeout, env=subprocess_env()
    )


@dataclass
class TtyRun:
    returncode: int
    output: str


def _apar_on_tty(*args: str, timeout: float = 120) -> TtyRun:
    """Run `apar ARGS` with stdout/stderr on a pseudo-terminal, as in an interactive shell."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([*apar_command(), *args], stdout=slave, stderr=slave, stdin=subprocess.DEVNULL,
                            env=subprocess_env(), close_fds=True)  # fmt: skip
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    rc = proc.wait(timeout=30)
    return TtyRun(rc, b"".join(chunks).decode(errors="replace"))


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_serve_generate_ctrl_c(tmp_path):
    model = require_model()
    grpc_port, http_port = free_port(), free_port()
    env_url = os.environ.pop("APAR_REDIS_URL", None)  # the README flow: serve starts its own Redis
    try:
        proc = start_serve(
            [
                "--model",
                model,
                "--replicas",
                "1",
                "--grpc-port",
                str(grpc_port),
                "--http-port",
                str(http_port),
            ],
            tmp_path / "serve.log",
        )
    finally:
        if env_url is not None:
            os.environ["APAR_REDIS_URL"] = env_url
    try:
        log = (tmp_path / "serve.log").read_text()
        assert f"127.0.0.1:{grpc_port}" in log and "(started)" in log
        redis_url = json.loads(state_file(grpc_port).read_text())["redis_url"]

        out = _apar("generate", "--server", f"127.0.0.1:{grpc_port}", "--prompt", "What are some tips for staying healthy?",
                    "--max-tokens", "96", "--json")  # fmt: skip
        assert out.returncode == 0, out.stderr
        answer = json.loads(out.stdout)
        assert answer["text"] and answer["branches"] and answer["finish_reason"] in ("stop", "length")
        assert 0 < answer["num_tokens"] <= 96 and answer["replica_id"]

        plain = _apar(
            "generate", "--server", f"127.0.0.1:{grpc_port}", "--prompt", "Hello!", "--max-tokens", "8"
        )
        assert plain.returncode == 0 and plain.stdout.strip(), plain.stderr

        bad = _apar(
            "generate", "--server", f"127.0.0.1:{grpc_port}", "--prompt", "Hello!", "--max-tokens", "99999"
        )
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "INVALID_ARGUMENT" in bad.stderr

        live = _apar_on_tty("generate", "--server", f"127.0.0.1:{grpc_port}", "--prompt", "What are some tips?",
                            "--max-tokens", "48")  # fmt: skip
        assert live.returncode == 0, live.output
        assert "root |" in live.output, "a terminal shows the branches live"
        assert "\x1b[" in live.output  # cursor moves of the live view

        status = _apar("status", "--grpc-port", str(grpc_port))
        assert status.returncode == 0, status.stderr
        assert ": ok" in status.stdout and "1 worker replica(s)" in status.stdout
        _check_redis_is_private_and_supervised(grpc_port, redis_url, tmp_path / "serve.log")
        assert _replica_niceness() == {0}, "local mode runs its replicas at nice 0, not Ray's 15"
    finally:
        started = time.monotonic()
        rc = stop_serve(proc)
    assert rc == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert time.monotonic() - started < 60
    assert "stopping" in (tmp_path / "serve.log").read_text()
    assert not _port_open(grpc_port), "the gRPC proxy must be gone"
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(redis_url, socket_connect_timeout=1).ping()  # its redis-server stopped too
    assert not state_file(grpc_port).exists()
    down = _apar("generate", "--server", f"127.0.0.1:{grpc_port}", "--prompt", "Hello!")
    assert down.returncode == 1 and "unavailable" in down.stderr


def _replica_niceness() -> set[int]:
    """Niceness of the worker replicas started by an `apar serve` (their environment carries
    the RAY_worker_niceness it set); replicas of other clusters are left out."""
    out = set()
    for proc in Path("/proc").iterdir():
        try:
            if b"AparWorker" not in (proc / "cmdline").read_bytes():
                continue
            if b"RAY_worker_niceness=0" not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            out.add(os.getpriority(os.PRIO_PROCESS, int(proc.name)))
        except (OSError, ValueError):
            continue
    return out


def _redis_pid(port: int) -> int:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes()
        except OSError:
            continue
        # redis-server retitles itself "redis-server 127.0.0.1:PORT"
        if b"redis-server" in text and f"127.0.0.1:{port}".encode() in text:
            return int(cmdline.parent.name)
    raise AssertionError(f"no redis-server on port {port}")


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"not within {timeout_s}s: {what}")


def _check_redis_is_private_and_supervised(grpc_port: int, redis_url: str, log: Path) -> None:
    """Issue 18 #6 and #8: a password per run in a 0600 file; a dead or hung Redis is restarted,
    and `apar status` reads the replicas from Ray while Redis is down."""
    path = state_file(grpc_port)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    assert "@" in redis_url, "the embedded Redis has a password"
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=port, socket_timeout=2).get("apar:anything")
    assert redis_url.split("@")[0].split(":")[-1] not in log.read_text(), "the password is never logged"

    os.kill(_redis_pid(port), signal.SIGKILL)
    _wait(lambda: "redis-server exited; restarted" in log.read_text(), 20, "restart after SIGKILL")
    _wait(lambda: _apar("status", "--grpc-port", str(grpc_port)).stdout.count(": ok") == 1, 30, "status ok")

    hung = _redis_pid(port)
    os.kill(hung, signal.SIGSTOP)
    try:
        down = _apar("status", "--grpc-port", str(grpc_port))
        assert "UNREACHABLE" in down.stdout and "1 worker replica(s) running, from Ray" in down.stdout, (
            down.stdout
        )
        assert down.returncode == 0, "the cluster is serving: status must not say it is dead"
        _wait(lambda: "answered no PING" in log.read_text(), 30, "restart of a hung redis-server")
    finally:
        try:
            os.kill(hung, signal.SIGCONT)
        except ProcessLookupError:
            pass
    out = _apar("generate", "--server", f"127.0.0.1:{grpc_port}", "--prompt", "Hello!", "--max-tokens", "8")
    assert out.returncode == 0, out.stderr
    _wait(lambda: ": ok" in _apar("status", "--grpc-port", str(grpc_port)).stdout, 30, "status ok again")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--replicas", "0"], "worker.num_replicas"),
        (["--grpc-port", "70000"], "grpc.port"),
        (["--model", "no-such-model"], "no-such-model"),
        (["--redis-url", "http://x"], "redis.url"),
        (["--config", "/nonexistent.yaml"], "cannot read config file"),
    ],
)
def test_serve_bad_input_exits_2_with_one_line(args, needle):
    out = _apar("serve", *args, timeout=60)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and needle in out.stderr, out.stderr


def test_serve_refuses_a_busy_port():
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _apar("serve", "--model", require_model(), "--grpc-port", str(port), timeout=60)
    assert (
        out.returncode == 2 and out.stderr.count("\n") == 1 and f"port {port} is already in use" in out.stderr
    )


def test_serve_bad_config_file(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("engine:\n  block_size: sixteen\n")
    out = _apar("serve", "--config", str(cfg), timeout=60)
    assert (
        out.returncode == 2
        and out.stderr.strip() == "apar: error: engine.block_size: expected an integer, got 'sixteen'"
    )
    cfg.write_text("engine: [1, 2\n")
    out = _apar("serve", "--config", str(cfg), timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "not valid YAML" in out.stderr
