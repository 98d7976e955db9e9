"""A real redis-server per test module and a SchedulerState per test, for the cluster-state tests.

Import the fixtures into a test module (`from redis_fixtures import server, state`).
"""

from __future__ import annotations

import pytest
import redis

from apar_worker.types import EngineStats
from cluster.redis_server import RedisServer
from cluster.state import SchedulerState


@pytest.fixture(scope="module")
def server():
    with RedisServer() as srv:
        yield srv


@pytest.fixture
def state(server, request):
    if not server.running:
        server.start()
    st = SchedulerState(
        server.url, namespace=f"t-{request.node.name}", heartbeat_ttl_s=3.0, retry_after_s=0.2
    )
    st.clear_namespace()
    yield st
    st.clear_namespace()
    st.close()


def raw(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url, decode_responses=True)


def stats(free: int = 90, total: int = 100, waiting: int = 0, running: int = 1) -> EngineStats:
    return EngineStats(
        running_requests=running,
        waiting_requests=waiting,
        running_branches=running,
        free_blocks=free,
        total_blocks=total,
        prefix_hit_rate=0.0,
        steps=0,
        num_preemptions=0,
        generated_tokens=0,
    )
