"""cluster.load_reporter: heartbeats and the request records a replica writes while it decodes."""

from __future__ import annotations

import asyncio

from redis_fixtures import stats

from apar_worker.types import BranchEvent, BranchInfo, RequestOutput
from cluster.load_reporter import LoadReporter


def test_load_reporter_heartbeat_and_request_records(state):
    # The thread's own beats are far apart: the test beats directly where it needs one.
    rep = LoadReporter(state, lambda: stats(free=40, total=100, waiting=1), replica_id="rep-1", interval_s=60)
    rep.start()
    try:
        assert state.replica_loads()["rep-1"].free_blocks == 40

        async def stream():  # one list per engine step, as AsyncEngine.generate_steps yields
            yield [BranchEvent("q1", 0, None, [1, 2], created=True)]
            yield [BranchEvent("q1", 1, 0, [3], created=True)]
            rep.beat()  # a heartbeat flushes progress meanwhile
            yield [BranchEvent("q1", 1, 0, [4], finish_reason="stop"), BranchEvent("q1", 0, None, [5])]
            yield [
                BranchEvent("q1", 0, None, [], finish_reason="stop"),
                RequestOutput(
                    "q1",
                    "text",
                    [BranchInfo(0, None, "a", 3, "stop"), BranchInfo(1, 0, "b", 2, "stop")],
                    "stop",
                    prompt_tokens=4,
                    num_tokens=5,
                    steps=3,
                    cached_tokens=0,
                ),
            ]

        from apar_worker.types import GenerateRequest

        req = GenerateRequest(prompt="hello " * 100, request_id="q1", session_id="sx")
        seen_mid: list[dict] = []

        async def run():
            out = []
            async for item in rep.track(req, stream()):
                out.append(item)
                if len(out) == 2:
                    rep.beat()
                    seen_mid.append(state.progress("q1"))
                    assert state.owner("q1") == "rep-1"
                    assert state.replica_loads()["rep-1"].inflight == 1
            return out

        items = asyncio.run(run())
        assert [len(b) for b in items] == [1, 1, 2, 2] and isinstance(items[-1][-1], RequestOutput)
        assert seen_mid[0]["state"] == "running" and seen_mid[0]["tree"]["0"]["tokens"] == [1, 2]
        prog = state.progress("q1")
        assert (
            prog["state"] == "stop"
            and prog["tree"]["1"]["tokens"] == [3, 4]
            and prog["tree"]["1"]["parent"] == 0
        )
        assert state.ran_on("q1") == {"0": {"rep-1"}, "1": {"rep-1"}}
        assert state.owner("q1") is None and state.session_replica("sx") == "rep-1"
    finally:
        rep.stop()
    assert "rep-1" not in state.replica_loads()
