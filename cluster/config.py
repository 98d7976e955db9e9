"""The one APAR Serve config format (YAML), shared by `apar serve`, the tests and the Helm chart.

`cluster/default_config.yaml` is the single source of defaults: a user file is deep-merged over
it, then every key is type-checked here, so a typo fails at start-up with the key's path instead
of deep inside a Ray replica. `to_serve_deploy_dict` turns a config into the Ray Serve deploy
config (`serveConfigV2` in KubeRay) whose application builder `cluster.app:build_app` receives the
whole normalised config as `args`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from apar_worker.speculative import SpeculativeConfig
from apar_worker.types import BLOCK_SIZES, LINEAR_KERNELS, AparError
from cluster.redis_url import redis_url_problem

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent / "default_config.yaml"
APP_IMPORT_PATH = "cluster.app:build_app"
INGRESS_DEPLOYMENT = "AparIngress"
WORKER_DEPLOYMENT = "AparWorker"
ROUTER_CLASS = "cluster.router:AparRouter"
# Ray Serve's gRPC proxy registers these servicers; methods of both are served by AparIngress,
# which gets each request's raw bytes and decodes them itself (see cluster/grpc_service.py).
GRPC_SERVICER_FUNCTIONS = [f"cluster.grpc_service.add_{name}_service" for name in ("apar", "health")]


class ConfigError(ValueError):
    """The config file or an override is invalid; the message names the offending key."""


@dataclass
class EngineSection:
    device: str
    dtype: str
    block_size: int
    num_blocks: int | None
    kv_cache_memory_mb: int
    max_num_batched_tokens: int
    max_num_seqs: int
    enable_prefix_caching: bool
    max_model_len: int | None
    quantization: str | None
    linear_kernel: str
    cascade_attention: bool
    native_kernels: bool
    speculative: dict | None


@dataclass
class LimitsSection:
    max_tokens: int
    default_max_tokens: int
    max_prompt_chars: int
    max_branches: int
    max_timeout_s: float
    max_request_bytes: int


@dataclass
class WorkerSection:
    num_replicas: int
    autoscaling_config: dict | None
    max_ongoing_requests: int
    num_cpus: float
    num_gpus: float
    stream_interval_s: float


@dataclass
class IngressSection:
    num_replicas: int
    max_ongoing_requests: int
    num_cpus: float
    resume: bool


@dataclass
class GrpcSection:
    port: int
    request_timeout_s: float | None


@dataclass
class HttpSection:
    host: str
    port: int


@dataclass
class RedisSection:
    url: str | None
    namespace: str
    heartbeat_interval_s: float
    heartbeat_ttl_s: float
    progress_ttl_s: float
    affinity_ttl_s: float


@dataclass
class RouterSection:
    enabled: bool
    overload_queue_len: int
    overload_min_free_kv_fraction: float
    prefix_affinity_chars: int
    stats_period_s: float


@dataclass
class ServeAppConfig:
    app_name: str
    model: str
    engine: EngineSection
    limits: LimitsSection
    worker: WorkerSection
    ingress: IngressSection
    grpc: GrpcSection
    http: HttpSection
    redis: RedisSection
    router: RouterSection

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-serialisable); `load_config_dict` reads it back."""
        return dataclasses.asdict(self)

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `apar_worker.engine.EngineConfig`."""
        return {"model": self.model, **dataclasses.asdict(self.engine)}


# Flat CLI-style overrides -> config path. Any other override is "section__key" (or "key").
_ALIASES = {"replicas": ("worker", "num_replicas"), "grpc_port": ("grpc", "port")}
_ALIASES |= {"http_port": ("http", "port"), "redis_url": ("redis", "url")}


_LEAF_TYPES: dict[type, tuple[Any, str]] = {  # bools are not numbers here, ints are floats
    bool: (lambda v: isinstance(v, bool), "true/false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    dict: (lambda v: isinstance(v, dict), "a mapping"),
}


def _check(value: Any, tp: Any, path: str) -> Any:
    """Type-check one leaf value; ints are accepted where floats are expected."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
    if value is None:
        raise ConfigError(f"{path}: must not be null")
    if tp not in _LEAF_TYPES:
        raise ConfigError(f"{path}: unsupported type {tp}")  # pragma: no cover - schema bug
    ok, expected = _LEAF_TYPES[tp]
    if not ok(value):
        raise ConfigError(f"{path}: expected {expected}, got {value!r}")
    return float(value) if tp is float else value


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key (known: {', '.join(hints)})")
    kwargs = {}
    for name, tp in hints.items():
        key = f"{path}.{name}" if path else name
        if name not in data:
            raise ConfigError(f"{key}: missing")
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], key)
        else:
            kwargs[name] = _check(data[name], tp, key)
    return cls(**kwargs)


def _positive(cfg: ServeAppConfig) -> None:
    """Range checks that types alone cannot express."""
    # Over 50 lines on purpose: a flat table, one line per key, reads better than split parts.
    checks: list[tuple[str, bool]] = [
        ("engine.block_size", cfg.engine.block_size in BLOCK_SIZES),
        ("engine.num_blocks", cfg.engine.num_blocks is None or cfg.engine.num_blocks > 0),
        ("engine.kv_cache_memory_mb", cfg.engine.kv_cache_memory_mb > 0),
        ("engine.max_num_batched_tokens", cfg.engine.max_num_batched_tokens > 0),
        ("engine.max_num_seqs", cfg.engine.max_num_seqs > 0),
        ("engine.max_model_len", cfg.engine.max_model_len is None or cfg.engine.max_model_len > 0),
        ("limits.max_tokens", cfg.limits.max_tokens > 0),
        ("limits.default_max_tokens", 0 < cfg.limits.default_max_tokens <= cfg.limits.max_tokens),
        ("limits.max_prompt_chars", cfg.limits.max_prompt_chars > 0),
        ("limits.max_branches", cfg.limits.max_branches > 0),
        ("limits.max_timeout_s", cfg.limits.max_timeout_s > 0),
        ("limits.max_request_bytes", 1024 <= cfg.limits.max_request_bytes < 2**31),
        ("worker.num_replicas", cfg.worker.num_replicas > 0),
        ("worker.max_ongoing_requests", cfg.worker.max_ongoing_requests > 0),
        ("worker.num_cpus", cfg.worker.num_cpus >= 0),
        ("worker.num_gpus", cfg.worker.num_gpus >= 0),
        ("worker.stream_interval_s", cfg.worker.stream_interval_s >= 0),
        ("ingress.num_replicas", cfg.ingress.num_replicas > 0),
        ("ingress.max_ongoing_requests", cfg.ingress.max_ongoing_requests > 0),
        ("ingress.num_cpus", cfg.ingress.num_cpus >= 0),
        ("grpc.port", 0 < cfg.grpc.port < 65536),
        ("grpc.request_timeout_s", cfg.grpc.request_timeout_s is None or cfg.grpc.request_timeout_s > 0),
        ("http.port", 0 < cfg.http.port < 65536),
        ("redis.heartbeat_interval_s", cfg.redis.heartbeat_interval_s > 0),
        ("redis.heartbeat_ttl_s", cfg.redis.heartbeat_ttl_s > cfg.redis.heartbeat_interval_s),
        ("redis.progress_ttl_s", cfg.redis.progress_ttl_s > 0),
        ("redis.affinity_ttl_s", cfg.redis.affinity_ttl_s > 0),
        ("router.overload_queue_len", cfg.router.overload_queue_len > 0),
        ("router.overload_min_free_kv_fraction", 0 <= cfg.router.overload_min_free_kv_fraction < 1),
        ("router.prefix_affinity_chars", cfg.router.prefix_affinity_chars > 0),
        ("router.stats_period_s", cfg.router.stats_period_s > 0),
    ]
    for key, ok in checks:
        if not ok:
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            allowed = f" (one of {', '.join(map(str, BLOCK_SIZES))})" if key == "engine.block_size" else ""
            raise ConfigError(f"{key}: value {value!r} out of range{allowed}")
    problem = redis_url_problem(cfg.redis.url) if cfg.redis.url is not None else None
    if problem:
        raise ConfigError(f"redis.url: {problem}")
    if cfg.engine.device not in ("auto", "cpu", "cuda") and not cfg.engine.device.startswith("cuda:"):
        raise ConfigError(f"engine.device: expected auto, cpu or cuda[:N], got {cfg.engine.device!r}")
    for key, allowed in (("quantization", (None, "none", "int8")), ("linear_kernel", LINEAR_KERNELS)):
        if (value := getattr(cfg.engine, key)) not in allowed:
            raise ConfigError(
                f"engine.{key}: {value!r} is not one of {', '.join(a or 'null' for a in allowed)}"
            )
    try:
        SpeculativeConfig.parse(cfg.engine.speculative)
    except AparError as exc:
        raise ConfigError(f"engine.speculative: {exc}") from None
    if cfg.worker.autoscaling_config is not None:
        from ray.serve.config import AutoscalingConfig

        try:
            AutoscalingConfig(**cfg.worker.autoscaling_config)
        except Exception as exc:  # pydantic's ValidationError names the bad field
            msg = exc.errors()[0]["msg"] if hasattr(exc, "errors") else str(exc)
            raise ConfigError(f"worker.autoscaling_config: {msg}") from None


def _merge(base: dict, over: dict) -> dict:
    """Deep merge like Helm values: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "autoscaling_config":
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def default_config_dict() -> dict[str, Any]:
    return copy.deepcopy(_default_config())


@functools.cache
def _default_config() -> dict[str, Any]:
    """cluster/default_config.yaml; `model` and the engine section from EngineConfig (stated once)."""
    from apar_worker.engine import EngineConfig

    with open(DEFAULT_CONFIG_PATH, encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    engine = EngineConfig()
    cfg.setdefault("model", engine.model)
    keys = [f.name for f in dataclasses.fields(EngineSection)]
    cfg["engine"] = {**{k: getattr(engine, k) for k in keys}, **(cfg.get("engine") or {})}
    return cfg


def default(section: str, key: str) -> Any:
    """One value of cluster/default_config.yaml: code defaults (router thresholds, Redis
    namespace and TTLs) are read from there, so the file and the code never disagree."""
    return copy.deepcopy(_default_config()[section][key])


def load_config_dict(data: dict[str, Any] | None, **overrides: Any) -> ServeAppConfig:
    """Validate a (partial) config mapping merged over the defaults, then apply overrides."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    merged = _merge(default_config_dict(), data or {})
    for name, value in overrides.items():
        if value is None:
            continue  # an unset CLI flag
        section, key = _ALIASES.get(name) or (name.split("__", 1) if "__" in name else ("", name))
        if section:
            if not isinstance(merged.get(section), dict):
                raise ConfigError(f"{section}: unknown section in override {name!r}")
            merged[section][key] = value
        else:
            merged[key] = value
        if name == "replicas":  # an explicit replica count switches autoscaling off
            merged["worker"]["autoscaling_config"] = None
    cfg = _build(ServeAppConfig, merged, "")
    _positive(cfg)
    return cfg


def load_config(path: str | None, **overrides: Any) -> ServeAppConfig:
    """Read a YAML file (None: defaults only), validate it, apply CLI-style overrides.

    Overrides: model=, replicas=, grpc_port=, http_port=, redis_url=, or SECTION__KEY=
    (e.g. engine__kv_cache_memory_mb=64); None values are ignored.
    """
    data = None
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}".replace("\n", " ")) from None
    return load_config_dict(data, **overrides)


def router_kwargs(cfg: ServeAppConfig) -> dict[str, Any]:
    """Keyword arguments of `cluster.router:AparRouter.initialize_state`."""
    kwargs = dataclasses.asdict(cfg.router)
    del kwargs["enabled"], kwargs["stats_period_s"]
    return {"redis": dataclasses.asdict(cfg.redis), **kwargs}


def deployment_options(cfg: ServeAppConfig) -> dict[str, dict[str, Any]]:
    """Ray Serve `.options(...)` of both deployments, applied in `cluster.app.build_app`."""
    worker: dict[str, Any] = {
        "max_ongoing_requests": cfg.worker.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": cfg.worker.num_cpus, "num_gpus": cfg.worker.num_gpus},
        # Replicas finish their in-flight generations before they stop.
        "graceful_shutdown_timeout_s": 20.0,
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 30.0,
    }
    if cfg.worker.autoscaling_config is not None:
        worker["autoscaling_config"] = dict(cfg.worker.autoscaling_config)
    else:
        worker["num_replicas"] = cfg.worker.num_replicas
    if cfg.router.enabled:
        worker["request_router_config"] = {
            "request_router_class": ROUTER_CLASS,
            "request_router_kwargs": router_kwargs(cfg),
            "request_routing_stats_period_s": cfg.router.stats_period_s,
            "request_routing_stats_timeout_s": max(1.0, cfg.router.stats_period_s * 2),
        }
    ingress = {
        "num_replicas": cfg.ingress.num_replicas,
        "max_ongoing_requests": cfg.ingress.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": cfg.ingress.num_cpus},
    }
    return {WORKER_DEPLOYMENT: worker, INGRESS_DEPLOYMENT: ingress}


def to_serve_deploy_dict(cfg: ServeAppConfig) -> dict[str, Any]:
    """The Ray Serve deploy config (`ServeDeploySchema`, KubeRay `serveConfigV2`) for `cfg`."""
    grpc_options: dict[str, Any] = {
        "port": cfg.grpc.port,
        "grpc_servicer_functions": list(GRPC_SERVICER_FUNCTIONS),
    }
    if cfg.grpc.request_timeout_s is not None:
        grpc_options["request_timeout_s"] = cfg.grpc.request_timeout_s
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.http.host, "port": cfg.http.port},
        "grpc_options": grpc_options,
        "applications": [
            {"name": cfg.app_name, "route_prefix": "/", "import_path": APP_IMPORT_PATH, "args": cfg.to_dict()}
        ],
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m cluster.config [FILE]`: validate and print the serve deploy config as JSON."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = load_config(argv[0] if argv else None)
    except ConfigError as exc:
        return print(f"apar: error: {exc}", file=sys.stderr) or 2
    print(json.dumps(to_serve_deploy_dict(cfg), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
