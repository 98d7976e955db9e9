"""`apar bench autoscale`: Ray Serve autoscaling of the worker deployment under a stepped load.

Starts Redis, a local Ray instance and the APAR application in this process (the same app that
`apar serve` deploys, from the same config format) with autoscaling on from 1 replica. Closed-loop
gRPC clients on 127.0.0.1 step the load up, then stop. A monitor samples `serve.status()` for the
worker's replica states. Reports replica count over time, time to scale up and back down, and
failed requests (must be 0). Bounded: fixed phases, per-request timeout, capped downscale wait.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, ROOT, BenchError, machine, mixed_prompts, pyplot, table, write_json


def autoscaling_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "min_replicas": 1,
        "initial_replicas": 1,
        "max_replicas": args.max_replicas,
        "target_ongoing_requests": args.target_ongoing,
        "upscale_delay_s": args.upscale_delay,
        "downscale_delay_s": args.downscale_delay,
        "metrics_interval_s": 0.5,
        "look_back_period_s": 3.0,
    }


def app_config(args: argparse.Namespace, grpc_port: int, http_port: int, redis_url: str) -> dict[str, Any]:
    """Fractional CPUs so that max_replicas fit on a 2-core machine next to the proxies."""
    return {
        "model": args.model,
        "engine": {"device": "cpu", "kv_cache_memory_mb": 32, "max_num_seqs": 64},
        "worker": {
            "autoscaling_config": autoscaling_config(args),
            "num_cpus": 0.5,
            "max_ongoing_requests": 8,
        },
        "ingress": {"num_cpus": 0.1},
        "grpc": {"port": grpc_port},
        "http": {"host": "127.0.0.1", "port": http_port},
        "redis": {"url": redis_url, "namespace": "bench-autoscale", "heartbeat_interval_s": 0.5},
    }


def parse_phases(text: str) -> list[tuple[int, float]]:
    """'1x10,3x20,6x30' -> [(clients, seconds), ...]."""
    try:
        phases = [(int(c), float(s)) for c, s in (p.split("x") for p in text.split(",") if p.strip())]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--phases wants CLIENTSxSECONDS,... got {text!r}") from None
    if not phases or any(c < 0 or c > 32 or s <= 0 or s > 300 for c, s in phases):
        raise argparse.ArgumentTypeError("--phases: 0..32 clients for (0, 300] s each")
    return phases


class Monitor(threading.Thread):
    """Samples the worker deployment's replica states every `period_s` from serve.status()."""

    def __init__(self, app: str, deployment: str, t0: float, period_s: float = 0.5):
        super().__init__(daemon=True, name="autoscale-monitor")
        self.app, self.deployment, self.t0, self.period_s = app, deployment, t0, period_s
        self.samples: list[dict[str, Any]] = []
        self.stop_event = threading.Event()

    def sample(self) -> dict[str, Any]:
        from ray import serve

        dep = serve.status().applications[self.app].deployments[self.deployment]
        states = {str(getattr(k, "value", k)): v for k, v in dep.replica_states.items()}
        return {
            "t": round(time.monotonic() - self.t0, 2),
            "running": states.get("RUNNING", 0),
            "total": sum(states.values()),
            "states": states,
        }

    def run(self) -> None:
        while not self.stop_event.wait(self.period_s):
            try:
                self.samples.append(self.sample())
            except Exception as exc:  # a status hiccup must not end the run
                self.samples.append({"t": round(time.monotonic() - self.t0, 2), "error": str(exc)[:200]})


class Clients:
    """Closed-loop clients (each sends its next request when the previous one ends)."""

    def __init__(self, address: str, prompts, max_tokens: int, timeout_s: float, t0: float):
        import grpc

        from protos.apar.v1 import apar_pb2_grpc as pb_grpc

        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.AparServiceStub(self.channel)
        self.prompts, self.max_tokens, self.timeout_s, self.t0 = prompts, max_tokens, timeout_s, t0
        self.lock = threading.Lock()
        self.done: list[dict[str, Any]] = []
        self.threads: list[tuple[threading.Thread, threading.Event]] = []
        self.count = 0

    def _loop(self, stop: threading.Event) -> None:
        import grpc

        from protos.apar.v1 import apar_pb2 as pb

        while not stop.is_set():
            with self.lock:
                i = self.count
                self.count += 1
            p = self.prompts[i % len(self.prompts)]
            msg = pb.GenerateRequest(
                messages=[pb.ChatMessage(role="user", content=p.text)], max_tokens=self.max_tokens
            )
            start = time.monotonic()
            rec: dict[str, Any] = {"t": round(start - self.t0, 2)}
            try:
                resp = self.stub.Generate(msg, timeout=self.timeout_s)
                rec.update(ok=True, replica=resp.replica_id, tokens=resp.usage.completion_tokens)
            except grpc.RpcError as exc:
                rec.update(ok=False, error=f"{exc.code().name}: {exc.details()}")
            rec["latency_s"] = round(time.monotonic() - start, 3)
            with self.lock:
                self.done.append(rec)

    def set_clients(self, n: int) -> None:
        while len(self.threads) < n:
            ev = threading.Event()
            th = threading.Thread(target=self._loop, args=(ev,), daemon=True)
            th.start()
            self.threads.append((th, ev))
        while len(self.threads) > n:
            th, ev = self.threads.pop()
            ev.set()

    def drain(self, timeout_s: float) -> None:
        """Stop all clients and wait for their in-flight requests (they count too)."""
        stopping = list(self.threads)
        self.set_clients(0)
        deadline = time.monotonic() + timeout_s
        for th, _ in stopping:
            th.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self.channel.close()


def _start_cluster(cfg_dict: dict[str, Any], num_cpus: float):
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    from cluster.app import build_app
    from cluster.config import load_config_dict, to_serve_deploy_dict

    # Replica processes import cluster/, protos/ and apar_worker/ from this checkout.
    path = os.environ.get("PYTHONPATH", "")
    if str(ROOT) not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), path) if p)
    cfg = load_config_dict(cfg_dict)
    deploy = to_serve_deploy_dict(cfg)
    app = deploy["applications"][0]
    ray.init(
        address="local",
        num_cpus=int(num_cpus),
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
        namespace="apar-bench",
    )
    serve.start(
        http_options=HTTPOptions(**deploy["http_options"]),
        grpc_options=gRPCOptions(**deploy["grpc_options"]),
        proxy_location=deploy["proxy_location"],
    )
    serve.run(build_app(app["args"]), name=app["name"], route_prefix=app["route_prefix"], blocking=False)
    return cfg


def _wait_running(app: str, timeout_s: float = 300.0) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = serve.status().applications.get(app)
        status = str(getattr(st, "status", ""))
        if status.endswith("RUNNING"):
            return
        if status.endswith("DEPLOY_FAILED"):
            raise BenchError(
                f"application failed to deploy: {st.message.splitlines()[0] if st.message else ''}"
            )
        time.sleep(0.5)
    raise BenchError(f"application not running after {timeout_s:.0f}s")


def first_time(samples: list[dict[str, Any]], after: float, pred) -> float | None:
    for s in samples:
        if "error" not in s and s["t"] >= after and pred(s):
            return s["t"]
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from apar_worker.model_registry import resolve_model
    from apar_worker.types import ModelLoadError
    from cluster.config import WORKER_DEPLOYMENT
    from cluster.redis_server import RedisServer, free_port

    try:
        args.model = str(resolve_model(args.model))
    except ModelLoadError as exc:
        raise BenchError(str(exc)) from None
    prompts = mixed_prompts(args.prompts, 64, seed=1)
    redis = RedisServer()
    redis_url = redis.start()
    grpc_port = free_port()
    monitor = clients = None
    try:
        cfg = _start_cluster(app_config(args, grpc_port, free_port(), redis_url), args.num_cpus)
        print("deploying the APAR application with autoscaling (1 replica to start) ...", flush=True)
        _wait_running(cfg.app_name)
        t0 = time.monotonic()
        monitor = Monitor(cfg.app_name, WORKER_DEPLOYMENT, t0)
        monitor.samples.append(monitor.sample())
        monitor.start()
        clients = Clients(f"127.0.0.1:{grpc_port}", prompts, args.max_tokens, args.timeout, t0)
        phases: list[dict[str, Any]] = []
        from tqdm import tqdm

        total = sum(s for _, s in args.phases)
        with tqdm(total=round(total), desc="autoscale load", unit="s") as bar:
            for n, secs in args.phases:
                phases.append({"clients": n, "start": round(time.monotonic() - t0, 2), "seconds": secs})
                clients.set_clients(n)
                end = time.monotonic() + secs
                while time.monotonic() < end:
                    time.sleep(min(1.0, max(0.0, end - time.monotonic())))
                    last = monitor.samples[-1]
                    bar.set_postfix(
                        clients=n, replicas=last.get("running"), done=len(clients.done), refresh=False
                    )
                    bar.n = min(total, round(time.monotonic() - t0))
                    bar.refresh()
        clients.drain(args.timeout)
        load_end = round(time.monotonic() - t0, 2)
        print(
            f"load stopped at {load_end:.0f}s; waiting up to {args.downscale_wait:.0f}s for scale-down ...",
            flush=True,
        )
        deadline = time.monotonic() + args.downscale_wait
        while time.monotonic() < deadline:
            last = monitor.samples[-1]
            if "error" not in last and last["total"] <= 1 and last["t"] > load_end:
                break
            time.sleep(0.5)
        time.sleep(2.0)  # a few samples at the final count for the plot
    finally:
        if monitor is not None:
            monitor.stop_event.set()
        if clients is not None:
            clients.set_clients(0)
            clients.close()
        if ray.is_initialized():
            try:
                from ray import serve

                serve.shutdown()
            finally:
                ray.shutdown()
        redis.close()
    samples = monitor.samples
    heavy = next((p["start"] for p in phases if p["clients"] > 1), phases[0]["start"])
    peak = max(s.get("running", 0) for s in samples)
    up_start = first_time(samples, heavy, lambda s: s["total"] > 1)
    up_running = first_time(samples, heavy, lambda s: s["running"] > 1)
    up_peak = first_time(samples, heavy, lambda s: s["running"] >= peak) if peak > 1 else None
    down = first_time(samples, load_end, lambda s: s["total"] <= 1 and s["running"] == 1)
    failed = [d for d in clients.done if not d["ok"]]
    return {
        "benchmark": "autoscale",
        "machine": machine(),
        "settings": {
            "model": Path(args.model).name,
            "autoscaling_config": autoscaling_config(args),
            "worker_num_cpus": 0.5,
            "phases": [{"clients": c, "seconds": s} for c, s in args.phases],
            "max_tokens": args.max_tokens,
        },
        "phases": phases,
        "load_end_s": load_end,
        "peak_running_replicas": peak,
        "scale_up_decision_s": None if up_start is None else round(up_start - heavy, 2),
        "scale_up_running_s": None if up_running is None else round(up_running - heavy, 2),
        "scale_up_to_peak_s": None if up_peak is None else round(up_peak - heavy, 2),
        "scale_down_s": None if down is None else round(down - load_end, 2),
        "requests": len(clients.done),
        "failed_requests": len(failed),
        "errors": sorted({d["error"] for d in failed})[:5],
        "replicas_used": sorted({d["replica"] for d in clients.done if d.get("ok")}),
        "timeline": samples,
        "request_log": clients.done,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    tl = [s for s in result["timeline"] if "error" not in s]
    ax.step(
        [s["t"] for s in tl],
        [s["running"] for s in tl],
        where="post",
        label="running replicas",
        lw=2,
        color="tab:blue",
    )
    ax.step(
        [s["t"] for s in tl],
        [s["total"] for s in tl],
        where="post",
        label="all replicas (incl. starting/stopping)",
        ls="--",
    )
    ax.set_xlabel("time (s)")
    ax.set_ylabel("worker replicas")
    ax.set_ylim(0, max(s["total"] for s in tl) + 1)
    ax2 = ax.twinx()
    xs, ys = [], []
    for p in result["phases"]:
        xs += [p["start"], p["start"] + p["seconds"]]
        ys += [p["clients"], p["clients"]]
    xs += [result["load_end_s"], tl[-1]["t"]]
    ys += [0, 0]
    ax2.plot(xs, ys, color="tab:green", alpha=0.5, label="concurrent clients")
    ax2.set_ylabel("concurrent clients")
    ok = [d for d in result["request_log"] if d.get("ok")]
    ax.set_title(
        f"Autoscaling: {len(ok)}/{result['requests']} requests ok, {result['failed_requests']} failed; "
        f"up {result['scale_up_running_s']}s, down {result['scale_down_s']}s"
    )
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(r: dict[str, Any]) -> None:
    rows = [
        ["peak running replicas", r["peak_running_replicas"]],
        ["scale-up decision after heavy load (s)", r["scale_up_decision_s"]],
        ["second replica running after (s)", r["scale_up_running_s"]],
        ["peak replicas running after (s)", r["scale_up_to_peak_s"]],
        ["back to 1 replica after load stop (s)", r["scale_down_s"]],
        ["requests sent", r["requests"]],
        ["failed requests", r["failed_requests"]],
        ["replicas that served requests", len(r["replicas_used"])],
    ]
    print(table(["autoscaling", "value"], rows))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="apar-smol")
    p.add_argument("--phases", type=parse_phases, default=parse_phases("1x15,3x20,6x35"), metavar="CxS,...",
                   help="closed-loop clients x seconds per phase (default 1x15,3x20,6x35)")  # fmt: skip
    p.add_argument("--max-replicas", type=int, default=3)
    p.add_argument("--target-ongoing", type=float, default=2.0, help="target_ongoing_requests per replica")
    p.add_argument("--upscale-delay", type=float, default=3.0, metavar="S")
    p.add_argument("--downscale-delay", type=float, default=10.0, metavar="S")
    p.add_argument(
        "--downscale-wait", type=float, default=90.0, metavar="S", help="cap on the wait after load"
    )
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--timeout", type=float, default=120.0, metavar="S", help="per-request timeout")
    p.add_argument("--num-cpus", type=float, default=4.0, help="logical CPUs of the Ray instance")
    p.add_argument("--prompts", default=None, metavar="FILE.jsonl")
    p.add_argument("--json", default=str(RESULTS_DIR / "autoscale.json"), metavar="OUT")
    p.add_argument("--plot", default=str(RESULTS_DIR / "autoscale.png"), metavar="OUT.png")


def main(args: argparse.Namespace) -> int:
    if not 2 <= args.max_replicas <= 4:
        raise BenchError("--max-replicas must be 2..4 on this machine")
    if args.target_ongoing <= 0 or args.max_tokens < 1 or args.timeout <= 0:
        raise BenchError("--target-ongoing, --max-tokens and --timeout must be positive")
    result = run(args)
    print()
    print_summary(result)
    if args.json:
        print(f"wrote {write_json(args.json, result)}")
    if args.plot:
        plot(result, Path(args.plot))
        print(f"wrote {args.plot}")
    return 0 if result["failed_requests"] == 0 else 1
