"""Helpers for the scheduler's cluster tests: a fork-prone random-weight model, a real Ray Serve
application (2 worker replicas, AparRouter on) with its own real redis-server, and a gRPC client
built from the generated stubs."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from cluster.redis_server import RedisServer, free_port
from cluster.state import SchedulerState
from protos.apar.v1 import apar_pb2 as pb
from protos.apar.v1 import apar_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]


def make_fork_model(out_dir: Path, fork_scale: float = 3.0) -> Path:
    """Random llama + word-level tokenizer whose [Fork] logit is scaled up, so requests fork."""
    sys.path.insert(0, str(Path(__file__).parent))
    from engine_utils import make_model, make_tokenizer

    model, tok = make_model("llama", seed=1), make_tokenizer()
    with torch.no_grad():
        fork = tok.convert_tokens_to_ids("[Fork]")
        model.lm_head.weight[fork] *= fork_scale
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def words(seed: int, n: int) -> str:
    """A deterministic prompt of `n` vocabulary words (the test tokenizer is word-level)."""
    return " ".join(f"w{(seed * 31 + i * 7) % 240 + 3}" for i in range(n))


@dataclass
class Cluster:
    app: str
    grpc_port: int
    redis: RedisServer
    state: SchedulerState
    channel: grpc.Channel = field(repr=False)

    @property
    def stub(self) -> pb_grpc.AparServiceStub:
        return pb_grpc.AparServiceStub(self.channel)

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return [("application", self.app)]

    def generate(
        self, prompt: str, max_tokens: int, session_id: str = "", request_id: str = "", timeout: float = 120
    ):
        req = pb.GenerateRequest(
            prompt=prompt, max_tokens=max_tokens, session_id=session_id, request_id=request_id
        )
        return self.stub.Generate(req, metadata=self.metadata, timeout=timeout)

    def stream(self, prompt: str, max_tokens: int, request_id: str = "", timeout: float = 120):
        req = pb.GenerateRequest(prompt=prompt, max_tokens=max_tokens, request_id=request_id)
        return self.stub.GenerateStream(req, metadata=self.metadata, timeout=timeout)

    def wait_replicas(self, n: int, timeout_s: float = 60) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            loads = self.state.replica_loads() or {}
            if len(loads) >= n:
                return loads
            time.sleep(0.2)
        raise TimeoutError(f"fewer than {n} replicas sent heartbeats: {self.state.replica_loads()}")


def start_cluster(model_dir: Path, app: str, replicas: int = 2, heartbeat_s: float = 0.3) -> Cluster:
    """Ray (local), Serve with the gRPC proxy, the APAR app with `replicas` workers, own Redis."""
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from cluster.app import build_app
    from cluster.config import GRPC_SERVICER_FUNCTIONS, load_config_dict

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    redis_srv = RedisServer()
    redis_srv.start()
    grpc_port = free_port()
    if not ray.is_initialized():
        ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False, namespace="apar-tests")
    serve.start(
        http_options={"host": "127.0.0.1", "port": free_port()},
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS),
    )
    cfg = load_config_dict(
        {
            "app_name": app,
            "model": str(model_dir),
            "engine": {"device": "cpu", "kv_cache_memory_mb": 16, "max_num_seqs": 64},
            "worker": {"num_replicas": replicas, "num_cpus": 1.0, "max_ongoing_requests": 16},
            "ingress": {"num_cpus": 0.1},
            "redis": {
                "url": redis_srv.url,
                "namespace": app,
                "heartbeat_interval_s": heartbeat_s,
                "heartbeat_ttl_s": heartbeat_s * 4,
            },
            "router": {"overload_queue_len": 8},
        }
    )
    serve.run(build_app(cfg.to_dict()), name=app, route_prefix=f"/{app}")
    state = SchedulerState(redis_srv.url, namespace=app, retry_after_s=0.2)
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    # Serve's gRPC proxy may read its port a moment after serve.start; a gRPC deadline bounds this.
    grpc.channel_ready_future(channel).result(timeout=60)
    cl = Cluster(app=app, grpc_port=grpc_port, redis=redis_srv, state=state, channel=channel)
    cl.wait_replicas(replicas)
    return cl


def stop_cluster(cl: Cluster) -> None:
    from ray import serve

    cl.channel.close()
    try:
        serve.delete(cl.app)
    finally:
        cl.state.close()
        cl.redis.close()
