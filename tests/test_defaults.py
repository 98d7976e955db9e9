"""Every default is stated once: code defaults come from cluster/default_config.yaml."""

from __future__ import annotations

import dataclasses

from apar_worker.engine import EngineConfig
from cluster.config import default_config_dict
from cluster.redis_url import redact_url, redis_url_problem
from cluster.router import AparRouter, Thresholds
from cluster.state import PREFIX_CHUNK_CHARS, SchedulerState


def test_router_and_redis_defaults_are_the_yaml_ones():
    yaml_cfg = default_config_dict()
    t = Thresholds()
    assert t.max_waiting == yaml_cfg["router"]["overload_queue_len"]
    assert t.min_free_kv_fraction == yaml_cfg["router"]["overload_min_free_kv_fraction"]
    assert PREFIX_CHUNK_CHARS == yaml_cfg["router"]["prefix_affinity_chars"]
    st = SchedulerState("redis://127.0.0.1:1/0")
    assert st.prefix == f"apar:{yaml_cfg['redis']['namespace']}:"
    assert st.heartbeat_ttl_ms == int(yaml_cfg["redis"]["heartbeat_ttl_s"] * 1000)
    assert st.affinity_ttl_s == int(yaml_cfg["redis"]["affinity_ttl_s"])
    st.close()
    router = AparRouter.__new__(AparRouter)  # initialize_state only: no Ray
    router.initialize_state(redis={"url": None})
    assert router._thresholds == t and router._chunk_chars == PREFIX_CHUNK_CHARS


def test_engine_defaults_come_from_engine_config():
    """The cluster's engine section and model are EngineConfig's defaults, not a second copy."""
    import yaml

    from cluster.config import DEFAULT_CONFIG_PATH, EngineSection, load_config_dict

    raw = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    assert raw["engine"] == {} and "model" not in raw  # stated once, in apar_worker/engine.py
    engine = dataclasses.asdict(EngineConfig())
    cfg = load_config_dict(None)
    assert cfg.model == engine["model"]
    assert dataclasses.asdict(cfg.engine) == {
        f.name: engine[f.name] for f in dataclasses.fields(EngineSection)
    }
    assert load_config_dict({"engine": {"block_size": 32}}).engine.block_size == 32


def test_redis_url_helpers():
    assert redis_url_problem("rediss://h:1/0") is None and redis_url_problem("unix:///tmp/r.sock") is None
    assert "expected redis://" in redis_url_problem("http://h")
    assert redact_url("redis://:pw@h:1/0") == "redis://***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"
