"""The cluster's config format, the Ray Serve deploy dict, the committed gRPC stubs and the
gRPC <-> engine request conversion. Fast: no Ray cluster is started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from apar_worker.types import InvalidRequestError, SamplingParams
from cluster.app import build_app
from cluster.client import to_proto
from cluster.config import (
    GRPC_SERVICER_FUNCTIONS,
    ConfigError,
    default_config_dict,
    load_config,
    load_config_dict,
    to_serve_deploy_dict,
)
from cluster.ingress import GrpcError
from cluster.protocol import to_engine_request
from protos.apar.v1 import apar_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


def test_default_config_turns_into_a_valid_serve_deploy_config():
    cfg = load_config(None)
    deploy = to_serve_deploy_dict(cfg)
    schema = ServeDeploySchema.model_validate(deploy)
    assert schema.grpc_options.port == 50051
    assert schema.grpc_options.grpc_servicer_functions == GRPC_SERVICER_FUNCTIONS
    (app,) = schema.applications
    assert app.import_path == "cluster.app:build_app" and app.name == "apar"
    assert load_config_dict(app.args) == cfg  # the builder reads back exactly this config
    for path in GRPC_SERVICER_FUNCTIONS:  # the proxy imports these by path
        module, _, attr = path.rpartition(".")
        assert callable(getattr(__import__(module, fromlist=[attr]), attr))


def test_user_file_is_merged_over_defaults_and_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": "some-dir",
                "engine": {"kv_cache_memory_mb": 64},
                "worker": {
                    "autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3}
                },
                "grpc": {"port": 6000},
            }
        )
    )
    cfg = load_config(str(path))
    assert (
        cfg.engine.kv_cache_memory_mb == 64
        and cfg.engine.block_size == default_config_dict()["engine"]["block_size"]
    )
    worker = to_serve_deploy_dict(cfg)["applications"][0]["args"]["worker"]
    assert worker["autoscaling_config"]["max_replicas"] == 4
    app = build_app(to_serve_deploy_dict(cfg)["applications"][0]["args"])
    bound = app._bound_deployment.init_args[0]._bound_deployment
    assert bound._deployment_config.autoscaling_config.max_replicas == 4

    cfg = load_config(
        str(path), replicas=3, grpc_port=7000, redis_url="redis://:pw@r:6379/0", engine__dtype="bfloat16"
    )
    assert cfg.worker.num_replicas == 3 and cfg.worker.autoscaling_config is None  # explicit count wins
    assert cfg.grpc.port == 7000 and cfg.redis.url.endswith("@r:6379/0") and cfg.engine.dtype == "bfloat16"
    assert load_config(str(path), model=None).model == "some-dir"  # None = flag not given
    assert load_config(None, engine__quantization="int8").engine_kwargs()["quantization"] == "int8"


def test_build_app_applies_deployment_options():
    cfg = load_config(None, replicas=2, worker__num_cpus=0.5, redis_url="redis://127.0.0.1:1/0")
    ingress = build_app(cfg.to_dict())._bound_deployment
    worker = ingress.init_args[0]._bound_deployment
    assert ingress.name == "AparIngress" and worker.name == "AparWorker"
    assert worker.num_replicas == 2 and worker.ray_actor_options["num_cpus"] == 0.5
    router = worker._deployment_config.request_router_config
    assert router.request_router_class == "cluster.router:AparRouter"
    assert router.request_router_kwargs["redis"]["url"] == "redis://127.0.0.1:1/0"
    cfg = load_config(None, router__enabled=False)
    worker = build_app(cfg.to_dict())._bound_deployment.init_args[0]._bound_deployment
    assert "AparRouter" not in str(worker._deployment_config.request_router_config.request_router_class)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"engin": {}}, "engin: unknown key"),
        ({"engine": {"blocksize": 16}}, "engine.blocksize: unknown key"),
        ({"engine": {"block_size": "16"}}, "engine.block_size: expected an integer"),
        ({"engine": {"block_size": 0}}, "engine.block_size: value 0 out of range"),
        ({"engine": {"block_size": 12}}, "engine.block_size: value 12 out of range (one of 4, 8, 16, 32)"),
        ({"engine": {"enable_prefix_caching": "yes"}}, "engine.enable_prefix_caching: expected true/false"),
        ({"engine": {"device": "tpu"}}, "engine.device"),
        ({"engine": {"quantization": "int4"}}, "engine.quantization: 'int4' is not one of null, none, int8"),
        (
            {"engine": {"linear_kernel": "avx"}},
            "engine.linear_kernel: 'avx' is not one of auto, plain, onednn, native",
        ),
        ({"engine": []}, "engine: expected a mapping"),
        (
            {"engine": {"speculative": {"method": "eagle"}}},
            "engine.speculative: speculative method must be one of",
        ),
        (
            {"engine": {"speculative": {"num_speculative_tokens": 9}}},
            "engine.speculative: num_speculative_tokens",
        ),
        ({"engine": {"speculative": "ngram"}}, "engine.speculative: expected a mapping"),
        ({"model": ""}, "model: expected a non-empty string"),
        ({"worker": {"num_replicas": 0}}, "worker.num_replicas"),
        (
            {"worker": {"autoscaling_config": {"min_replicas": 5, "max_replicas": 2}}},
            "worker.autoscaling_config",
        ),
        ({"limits": {"default_max_tokens": 5000}}, "limits.default_max_tokens"),
        ({"grpc": {"port": 0}}, "grpc.port"),
        ({"redis": {"url": "localhost:6379"}}, "redis.url"),
        ({"redis": {"heartbeat_interval_s": 5, "heartbeat_ttl_s": 1}}, "redis.heartbeat_ttl_s"),
        ({"router": {"overload_min_free_kv_fraction": 1.5}}, "router.overload_min_free_kv_fraction"),
    ],
)
def test_invalid_config_names_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        load_config_dict(data)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(None, nosection__x=1)


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    """The stubs are committed; scripts/gen_protos.sh must have been run after any .proto edit."""
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", f"--python_out={tmp_path}",
           f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", "protos/apar/v1/apar.proto"]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    for name in ("apar_pb2.py", "apar_pb2_grpc.py", "apar_pb2.pyi"):
        fresh = (tmp_path / "protos" / "apar" / "v1" / name).read_text()
        assert fresh == (ROOT / "protos" / "apar" / "v1" / name).read_text(), (
            f"{name} is stale: run scripts/gen_protos.sh"
        )


LIMITS = load_config(
    None, limits__max_tokens=100, limits__default_max_tokens=10, limits__max_prompt_chars=50
).limits


def test_grpc_request_to_engine_request():
    msg = pb.GenerateRequest(
        messages=[
            pb.ChatMessage(role="system", content="be brief"),
            pb.ChatMessage(role="user", content="hi"),
        ],
        sampling=pb.SamplingParams(temperature=0.7, top_p=0.9, stop=["\n\n"]),
        fork=False,
        max_branches=4,
        session_id="s1",
        request_id="r1",
        speculative="ngram",
    )
    req = to_engine_request(msg, LIMITS, stream=True)
    assert req.speculative == "ngram"
    assert req.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert req.prompt is None and req.fork is False and req.max_branches == 4 and req.stream
    assert req.session_id == "s1" and req.request_id == "r1"
    assert req.sampling.max_tokens == 10  # the server default
    assert req.sampling.top_p == pytest.approx(0.9) and req.sampling.stop == ["\n\n"]
    assert req.sampling.seed is not None  # sampled requests get a seed so a retry replays them
    greedy = to_engine_request(pb.GenerateRequest(prompt="p", max_tokens=100), LIMITS, stream=False)
    assert greedy.sampling.seed is None and greedy.sampling.max_tokens == 100 and greedy.fork is True
    assert greedy.request_id and greedy.session_id is None
    # the CLI client's conversion is the inverse
    again = to_engine_request(to_proto(req), LIMITS, stream=True)
    assert (
        again.messages,
        again.sampling,
        again.fork,
        again.max_branches,
        again.request_id,
        again.speculative,
    ) == (
        req.messages,
        req.sampling,
        req.fork,
        req.max_branches,
        req.request_id,
        "ngram",
    )
    assert isinstance(again.sampling, SamplingParams)


@pytest.mark.parametrize(
    "msg, message",
    [
        (pb.GenerateRequest(), "prompt or messages is required"),
        (pb.GenerateRequest(prompt="x" * 51), "prompt too long: 51 characters, the limit is 50"),
        (pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="y" * 51)]), "prompt too long"),
        (pb.GenerateRequest(prompt="p", max_tokens=101), "over the server limit 100"),
        (pb.GenerateRequest(prompt="p", max_tokens=0), "max_tokens must be a positive integer"),
        (pb.GenerateRequest(prompt="p", max_depth=9), "max_depth"),
        (pb.GenerateRequest(prompt="p", timeout_s=float("nan")), "timeout_s must be a finite number"),
        (pb.GenerateRequest(prompt="p", request_id="x" * 200), "request_id"),
        (pb.GenerateRequest(prompt="p", session_id="a\nb"), "session_id"),
        (pb.GenerateRequest(prompt="p", speculative="eagle"), "speculative must be 'off' or one of ngram"),
        (pb.GenerateRequest(prompt="p", sampling=pb.SamplingParams(stop=["s"] * 17)), "at most 16"),
        (
            pb.GenerateRequest(prompt="p", sampling=pb.SamplingParams(repetition_penalty=0)),
            "repetition_penalty",
        ),
        (pb.GenerateRequest(prompt="p", sampling=pb.SamplingParams(temperature=float("inf"))), "temperature"),
    ],
)
def test_grpc_request_validation(msg, message):
    with pytest.raises(InvalidRequestError) as err:
        to_engine_request(msg, LIMITS, stream=False)
    assert message in str(err.value)


def test_grpc_error_survives_pickling():
    """Ray pickles exceptions from the ingress replica to the proxy; the code must survive."""
    import pickle

    err = pickle.loads(pickle.dumps(GrpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad top_p")))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and str(err) == "bad top_p"
