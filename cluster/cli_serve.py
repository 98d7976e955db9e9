"""`apar serve`: local Ray + Redis + the APAR application (`apar status` is cluster/cli_status.py).

`apar serve` starts everything in this process's care and tears it down on Ctrl-C/SIGTERM:
a redis-server (unless --redis-url/$APAR_REDIS_URL names one), a local Ray instance sized for a
laptop (no dashboard), then Ray Serve with the gRPC proxy and the application built from the
same config that Helm renders into serveConfigV2. Everything listens on --host, loopback by
default, Ray's own ports included (cluster/loopback.py). It writes a small state file so that
`apar status` can find the Redis it started.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import secrets
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from apar_worker.cli_generate import fail
from apar_worker.types import LINEAR_KERNELS
from cluster.config import ConfigError, ServeAppConfig, load_config, to_serve_deploy_dict
from cluster.loopback import listen_on
from cluster.redis_url import redact_url
from cluster.supervisor import Supervisor, state_file, write_private

__all__ = ["register", "run_serve", "state_file"]

_REPO_ROOT = Path(__file__).resolve().parent.parent


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the APAR Serve cluster locally (Ray Serve + gRPC + Redis)")
    p.add_argument(
        "--config", default=None, metavar="FILE", help="YAML config (see cluster/default_config.yaml)"
    )
    p.add_argument(
        "--model", default=None, metavar="NAME|DIR", help="shipped model name or HF model directory"
    )
    p.add_argument(
        "--replicas", type=int, default=None, metavar="N", help="worker replicas (turns autoscaling off)"
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        metavar="ADDR",
        help="address gRPC and the HTTP proxy listen on (default 127.0.0.1: loopback only, Ray's own "
        "ports too); 0.0.0.0 or a LAN address serves other machines",
    )
    p.add_argument("--grpc-port", type=int, default=None, metavar="PORT", help="gRPC port (default 50051)")
    p.add_argument(
        "--http-port", type=int, default=None, metavar="PORT", help="Ray Serve HTTP proxy port (default 8000)"
    )
    p.add_argument(
        "--redis-url",
        default=None,
        metavar="URL",
        help="use this Redis (default: $APAR_REDIS_URL, else start one)",
    )
    _engine_arguments(p)
    p.add_argument(
        "--num-cpus",
        type=float,
        default=None,
        metavar="N",
        help="logical CPUs of the local Ray (default: all, at least what the replicas need)",
    )
    p.set_defaults(func=run_serve)


def _engine_arguments(p: argparse.ArgumentParser) -> None:
    """Flags that override the config's engine section (every worker replica's engine)."""
    p.add_argument(
        "--quantization",
        choices=["none", "int8"],
        default=None,
        help="weights of the worker engines: int8 = weight-only int8 linear layers (default: the config's, fp32)",
    )
    p.add_argument(
        "--linear-kernel",
        choices=LINEAR_KERNELS,
        default=None,
        help="linear layers of the worker engines: auto packs float32 CPU weights for the C++ kernel (else oneDNN) "
        "and int8 ones as AMX tiles, else with bfloat16 rows (AVX512_BF16); native: int8 with float32 rows; "
        "amx: float32 (bf16 hi+lo) and int8 on AMX tiles; bf16: int8 with bfloat16 rows; plain: no packing",
    )
    p.add_argument(
        "--speculative-config",
        default=None,
        metavar="JSON",
        help='speculative decoding for every request, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\'',
    )


def _load(args: argparse.Namespace) -> ServeAppConfig:
    return load_config(
        args.config,
        model=args.model,
        replicas=args.replicas,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        http__host=args.host,  # local mode: --host, not the config's (0.0.0.0 for pods)
        redis_url=args.redis_url or os.environ.get("APAR_REDIS_URL") or None,
        engine__quantization=args.quantization,
        engine__linear_kernel=args.linear_kernel,
        engine__speculative=_json_arg("--speculative-config", args.speculative_config),
    )


def _json_arg(flag: str, value: str | None) -> dict | None:
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag}: not valid JSON ({exc})") from None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _ray_cpus(cfg: ServeAppConfig, requested: float | None) -> int:
    """Logical CPUs for the local Ray: enough for every replica the config asks for.

    Ray CPUs are scheduling tokens; on a small machine a second replica would otherwise wait
    forever for a free CPU instead of sharing the cores.
    """
    replicas = cfg.worker.num_replicas
    if cfg.worker.autoscaling_config is not None:
        replicas = int(cfg.worker.autoscaling_config.get("max_replicas", 1))
    needed = math.ceil(replicas * cfg.worker.num_cpus + cfg.ingress.num_replicas * cfg.ingress.num_cpus)
    return max(math.ceil(requested) if requested else os.cpu_count() or 1, needed, 1)


def _grpc_message_limit(cfg: ServeAppConfig) -> None:
    """Ray Serve's gRPC proxy accepts messages up to 2 GiB unless told otherwise (an env var it
    reads at import, inherited by the proxy from this process): cap it near limits.max_request_bytes.

    Responses share the limit, so it never goes under gRPC's usual 4 MiB; the ingress checks the
    exact limit itself.
    """
    os.environ["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] = str(max(cfg.limits.max_request_bytes, 4 * 2**20))


# Ray starts its worker processes (every replica) at nice 15 so its own daemons stay responsive;
# in local mode the replicas are the workload, and at 15 any process at 0 (the gRPC client, Ray's
# daemons, Redis) took their CPUs at once: 16 x 128 tokens gave 387-484 tok/s at 15, 431-560 at 0
# in adjacent runs. A user's own RAY_worker_niceness wins.
WORKER_NICENESS = "0"


def _start_ray(num_cpus: int, host: str) -> None:
    runtime_env = listen_on(host)  # before Ray starts: it reads the environment once
    os.environ.setdefault("RAY_worker_niceness", WORKER_NICENESS)
    import ray

    # Replicas are separate processes: they must import cluster/, protos/ and apar_worker/ even
    # when the project is run from a checkout without `pip install -e .`.
    path = os.environ.get("PYTHONPATH", "")
    if str(_REPO_ROOT) not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO_ROOT), path) if p)
    kwargs: dict[str, Any] = {
        "num_cpus": num_cpus,
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "log_to_driver": os.environ.get("APAR_RAY_LOGS", "0") == "1",
        "namespace": "apar",
        "runtime_env": runtime_env,
    }
    try:
        ray.init(**kwargs)
    except Exception as exc:
        # Ray gives its raylet a fixed 30 s to register; a busy machine can miss that once.
        if "timed out during startup" not in str(exc):
            raise
        print("apar serve: Ray start-up timed out; retrying once", flush=True)
        ray.shutdown()
        ray.init(**kwargs)


def _deploy(cfg: ServeAppConfig) -> None:
    """Start Ray Serve and the application exactly as serveConfigV2 describes them."""
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from cluster.app import build_app

    deploy = to_serve_deploy_dict(cfg)
    app = deploy["applications"][0]
    serve.start(
        http_options=HTTPOptions(**deploy["http_options"]),
        grpc_options=gRPCOptions(**deploy["grpc_options"]),
        proxy_location=deploy["proxy_location"],
    )
    serve.run(build_app(app["args"]), name=app["name"], route_prefix=app["route_prefix"], blocking=False)


def _checked_config(args: argparse.Namespace) -> ServeAppConfig | str:
    """The config `apar serve` runs with, or why it cannot start (model, flags, ports)."""
    try:
        cfg = _load(args)
        from apar_worker.model_registry import resolve_model
        from apar_worker.types import ModelLoadError

        try:
            resolve_model(cfg.model)
        except ModelLoadError as exc:
            return str(exc)
    except ConfigError as exc:
        return str(exc)
    if args.num_cpus is not None and args.num_cpus <= 0:
        return "--num-cpus must be positive"
    for name, port in (("gRPC", cfg.grpc.port), ("HTTP", cfg.http.port)):
        if not _port_free(port):
            return f"{name} port {port} is already in use (another apar serve?); pick another with --{name.lower()}-port"
    return cfg


def run_serve(args: argparse.Namespace) -> int:
    cfg = _checked_config(args)
    if isinstance(cfg, str):
        return fail(cfg)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    from cluster.redis_server import RedisServerError

    redis_server = None
    state = None
    supervisor = None
    try:
        try:
            redis_server = _start_redis(cfg)
        except RedisServerError as exc:
            return fail(str(exc))
        _grpc_message_limit(cfg)
        _start_ray(_ray_cpus(cfg, args.num_cpus), args.host)
        if stop.is_set():
            return 0
        print(f"apar serve: deploying {cfg.model} on {cfg.worker.num_replicas} replica(s) ...", flush=True)
        _deploy(cfg)
        _wait_running(cfg.app_name, stop)
        if stop.is_set():
            return 0
        metrics_url = _metrics_url()
        state = state_file(cfg.grpc.port)
        record = {"pid": os.getpid(), "redis_url": cfg.redis.url, "namespace": cfg.redis.namespace}
        write_private(state, {**record, "metrics_url": metrics_url})
        supervisor = Supervisor(redis_server, state, {**record, "metrics_url": metrics_url}, cfg.app_name,
                                log=lambda line: print(line, flush=True))  # fmt: skip
        print(f"apar serve: Prometheus metrics at {metrics_url}", flush=True)
        where = _hostport(args.host, cfg.grpc.port)
        print(f"apar serve: listening on grpc {where} (apar.v1.AparService, health, reflection); Ctrl-C stops",
              flush=True)  # fmt: skip
        while not stop.wait(0.5):
            supervisor.tick()
        print("apar serve: stopping ...", flush=True)
        return 0
    except Exception as exc:  # deploy failures (e.g. a replica that cannot load the model)
        return fail(f"serve failed: {_short_error(exc)}")
    finally:
        if supervisor is not None:
            supervisor.close()
        _shutdown(redis_server, state)


def _start_redis(cfg: ServeAppConfig):
    """The embedded redis-server unless the config names a Redis; sets cfg.redis.url."""
    from cluster.redis_server import RedisServer

    server = None
    if cfg.redis.url is None:
        # A password per run: any local process could otherwise read or forge routing keys.
        server = RedisServer(password=secrets.token_hex(16))
        cfg.redis.url = server.start()
    started = " (started) with a per-run password" if server else ""
    print(f"apar serve: redis {redact_url(cfg.redis.url)}{started}", flush=True)
    return server


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _metrics_url() -> str:
    """Ray's per-node Prometheus endpoint (APAR's metrics are exported there as `ray_apar_*`)."""
    import ray

    node = next(n for n in ray.nodes() if n.get("Alive"))
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def _wait_running(app_name: str, stop: threading.Event, timeout_s: float = 600.0) -> None:
    """Block until the application is RUNNING; raise if it fails to deploy."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while not stop.is_set() and time.monotonic() < deadline:
        app = serve.status().applications.get(app_name)
        status = str(getattr(app, "status", "")) if app else ""
        if status.endswith("RUNNING"):
            return
        if status.endswith("DEPLOY_FAILED"):
            raise RuntimeError(f"application {app_name} failed to deploy: {app.message}")
        stop.wait(0.5)
    if not stop.is_set():
        raise RuntimeError(f"application {app_name} not running after {timeout_s:.0f}s")


def _short_error(exc: BaseException) -> str:
    """Ray task errors are a header plus a traceback: keep the header and the real cause (last line)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1].strip()}"


def _shutdown(redis_server: Any, state: Path | None) -> None:
    import ray

    # A second Ctrl-C during shutdown should not leave a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if ray.is_initialized():
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
    if redis_server is not None:
        redis_server.close()
    if state is not None:
        state.unlink(missing_ok=True)
