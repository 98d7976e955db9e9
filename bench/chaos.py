"""`apar bench chaos`: Poisson load while worker replicas are SIGKILLed and Redis restarts.

One `apar serve` on loopback (2 worker replicas, its own supervised Redis) takes a bounded
Poisson stream of GenerateStream requests; a random worker replica is SIGKILLed every 30-60 s
(never the last live one) and the redis-server is killed once halfway (`apar serve` restarts
it). Every stream is checked against its own final answer, branch by branch: tokens streamed
beyond the final's count are duplicated, tokens missing are lost, and the streamed text must
equal the final text. Then the recovery time, kill -> next new token, of one request killed at
75 % of its tokens, resumed (the default) and replayed (`ingress.resume: false`, a second
cluster; `--no-replay-baseline` skips it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, BenchError, machine, mixed_prompts, summarize, table
from bench.serve_local import LocalServe


def serve_config(model: str, resume: bool) -> dict[str, Any]:
    return {
        "model": model,
        "engine": {"device": "cpu", "kv_cache_memory_mb": 64, "max_num_seqs": 64},
        "worker": {"num_replicas": 2, "num_cpus": 0.5, "max_ongoing_requests": 64},
        "ingress": {"num_cpus": 0.1, "resume": resume},
        "redis": {"heartbeat_interval_s": 0.3, "heartbeat_ttl_s": 1.5},
    }


def cluster_state(srv: LocalServe):
    """SchedulerState on the cluster's own Redis (URL and password from `apar serve`'s state file)."""
    from cluster.state import SchedulerState
    from cluster.supervisor import state_file

    rec = json.loads(state_file(srv.grpc_port).read_text())
    return SchedulerState(rec["redis_url"], rec["namespace"], retry_after_s=0.2)


def stream_one(stub, prompt, max_tokens: int, timeout_s: float, request_id: str = "") -> dict[str, Any]:
    """One GenerateStream; per branch: tokens and text streamed, against the final answer."""
    import grpc

    from protos.apar.v1 import apar_pb2 as pb

    msg = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=prompt.text)], max_tokens=max_tokens,
                             request_id=request_id)  # fmt: skip
    tokens: dict[int, int] = {}
    text: dict[int, str] = {}
    times: list[float] = []
    try:
        for item in stub.GenerateStream(msg, timeout=timeout_s):
            if item.HasField("final"):
                final = item.final
                lost = sum(max(0, b.num_tokens - tokens.get(b.id, 0)) for b in final.branches)
                dup = sum(max(0, tokens.get(b.id, 0) - b.num_tokens) for b in final.branches)
                text_ok = all(text.get(b.id, "") == b.text for b in final.branches)
                return {"ok": True, "lost": lost, "duplicated": dup, "text_ok": text_ok, "times": times,
                        "replicas": list(final.replica_ids), "tokens": sum(tokens.values())}  # fmt: skip
            for ev in item.events:
                tokens[ev.branch_id] = tokens.get(ev.branch_id, 0) + ev.num_new_tokens
                text[ev.branch_id] = text.get(ev.branch_id, "") + ev.delta_text
                if ev.num_new_tokens:
                    times.append(time.monotonic())
        return {"ok": False, "error": "no final answer", "times": times}
    except grpc.RpcError as exc:
        return {"ok": False, "error": f"{exc.code().name}: {exc.details()}"[:200], "times": times}


def _kill_replica(state, rng: random.Random) -> str | None:
    """SIGKILL one live worker replica, never the last one; returns its id."""
    loads = state.replica_loads() or {}
    if len(loads) < 2:
        return None
    victim = rng.choice(sorted(loads))
    try:
        os.kill(loads[victim].pid, signal.SIGKILL)
    except ProcessLookupError:
        return None
    return victim


def _kill_redis(srv: LocalServe) -> bool:
    port = json.loads(_state_file(srv).read_text())["redis_url"].rsplit(":", 1)[1].split("/")[0]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes()
        except OSError:
            continue
        if b"redis-server" in text and f"127.0.0.1:{port}".encode() in text:  # retitled by redis
            os.kill(int(cmdline.parent.name), signal.SIGKILL)
            return True
    return False


def _state_file(srv: LocalServe) -> Path:
    from cluster.supervisor import state_file

    return state_file(srv.grpc_port)


def chaos_run(srv: LocalServe, args, prompts) -> dict[str, Any]:
    """The load with kills; returns counts and the per-kill events."""
    import grpc

    from protos.apar.v1 import apar_pb2_grpc as pb_grpc

    rng = random.Random(args.seed)
    state = cluster_state(srv)
    channel = grpc.insecure_channel(srv.address)
    stub = pb_grpc.AparServiceStub(channel)
    kills: list[dict[str, Any]] = []
    stop = threading.Event()

    def killer() -> None:
        lo, hi = args.kill_every
        next_kill, redis_at, redis_done = rng.uniform(lo, hi), args.duration / 2, False
        t0 = time.monotonic()
        while not stop.wait(0.2):
            now = time.monotonic() - t0
            if not redis_done and now >= redis_at:
                redis_done = _kill_redis(srv)
                if redis_done:
                    kills.append({"at_s": round(now, 1), "what": "redis-server", "t": time.monotonic()})
            if now >= next_kill:
                victim = _kill_replica(state, rng)
                if victim:
                    kills.append({"at_s": round(now, 1), "what": victim, "t": time.monotonic()})
                next_kill = now + rng.uniform(lo, hi)

    from bench.load import run_rate  # the same bounded open-loop Poisson arrivals as `apar bench load`

    threading.Thread(target=killer, daemon=True, name="chaos-killer").start()
    try:
        target = lambda p, n: stream_one(stub, p, n, args.timeout)  # noqa: E731
        results, _ = run_rate(target, prompts, args.rate, args.duration, args.max_requests, args.max_tokens)
    finally:
        stop.set()
        channel.close()
        state.close()
    ok = [r for r in results if r["ok"]]
    replica_kills = [k for k in kills if k["what"] != "redis-server"]
    return {
        "requests_sent": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if not r["ok"]})[:5],
        "lost_tokens": sum(r["lost"] for r in ok),
        "duplicated_tokens": sum(r["duplicated"] for r in ok),
        "text_mismatches": sum(not r["text_ok"] for r in ok),
        "failed_over_requests": sum(len(r["replicas"]) > 1 for r in ok),
        "replica_kills": len(replica_kills),
        "redis_restarts": sum(k["what"] == "redis-server" for k in kills),
        "kills": [{k: v for k, v in x.items() if k != "t"} for x in kills],
        "recovery_s": summarize(_gaps_after_kills(results, replica_kills)),
    }


def _gaps_after_kills(results: list[dict[str, Any]], kills: list[dict[str, Any]]) -> list[float]:
    """Per kill and failed-over request: kill -> that request's next new token."""
    gaps = []
    for r in results:
        if not r["ok"] or len(r["replicas"]) < 2:
            continue
        for k in kills:
            after = [t for t in r["times"] if t > k["t"]]
            before = [t for t in r["times"] if t <= k["t"]]
            if after and before:
                gaps.append(after[0] - k["t"])
    return gaps


def recovery_at_75(srv: LocalServe, args) -> dict[str, Any]:
    """One long request, its replica SIGKILLed at 75 % of its tokens: kill -> the first new token
    from another replica (the killed one's last steps may still be on their way)."""
    import uuid

    import grpc

    from bench.common import Prompt
    from protos.apar.v1 import apar_pb2 as pb
    from protos.apar.v1 import apar_pb2_grpc as pb_grpc

    state = cluster_state(srv)
    channel = grpc.insecure_channel(srv.address)
    stub = pb_grpc.AparServiceStub(channel)
    rid, n = f"chaos-{uuid.uuid4().hex[:8]}", args.recovery_tokens
    msg = pb.GenerateRequest(prompt=Prompt("r", "unstructured", "Tell me a long story.").text, max_tokens=n,
                             sampling=pb.SamplingParams(ignore_eos=True), fork=False, request_id=rid)  # fmt: skip
    seen, at_kill, t_kill, t_next, killed = 0, 0, None, None, None
    try:
        for item in stub.GenerateStream(msg, timeout=args.timeout):
            if item.HasField("final"):
                break
            new = sum(ev.num_new_tokens for ev in item.events)
            seen += new
            # a token made by another replica: tokens the killed one sent before it died are still in flight
            if (
                t_kill is not None
                and t_next is None
                and any(ev.num_new_tokens and ev.replica_id != killed for ev in item.events)
            ):
                t_next = time.monotonic()
            if t_kill is None and seen >= 0.75 * n:
                owner = state.owner(rid)
                loads = state.replica_loads() or {}
                if owner in loads:
                    os.kill(loads[owner].pid, signal.SIGKILL)
                    t_kill, killed, at_kill = time.monotonic(), owner, seen
    finally:
        channel.close()
        state.close()
    if t_kill is None or t_next is None:
        raise BenchError("the recovery run did not kill its replica or got no token after the kill")
    return {
        "tokens": n,
        "killed_at_tokens": at_kill,
        "replica": killed,
        "kill_to_next_token_s": t_next - t_kill,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from apar_worker.model_registry import resolve_model
    from apar_worker.types import ModelLoadError

    try:
        model = str(resolve_model(args.model))
    except ModelLoadError as exc:
        raise BenchError(str(exc)) from None
    prompts = mixed_prompts(args.prompts, 64, seed=args.seed)
    log_dir = RESULTS_DIR / "tmp"
    out: dict[str, Any] = {"benchmark": "chaos", "machine": machine(), "settings": {
        "model": args.model, "duration_s": args.duration, "rate": args.rate, "max_tokens": args.max_tokens,
        "kill_every_s": list(args.kill_every), "worker_replicas": 2, "recovery_tokens": args.recovery_tokens,
    }}  # fmt: skip
    print(f"starting apar serve ({args.model}, 2 worker replicas, resume on) ...", flush=True)
    with LocalServe(serve_config(model, resume=True), log_dir / "chaos-serve.log", args.num_cpus) as srv:
        stream_one(_stub(srv), prompts[0], 8, args.timeout)  # warm-up
        _wait_two_replicas(srv)
        print(f"chaos: {args.duration:.0f}s of Poisson load at {args.rate} req/s with kills ...", flush=True)
        out["chaos"] = chaos_run(srv, args, prompts)
        _wait_two_replicas(srv)
        out["recovery"] = {"resume": recovery_at_75(srv, args)}
    if not args.no_replay_baseline:
        print("starting apar serve with ingress.resume: false (replay) ...", flush=True)
        with LocalServe(
            serve_config(model, resume=False), log_dir / "chaos-replay.log", args.num_cpus
        ) as srv:
            stream_one(_stub(srv), prompts[0], 8, args.timeout)
            _wait_two_replicas(srv)
            out["recovery"]["replay"] = recovery_at_75(srv, args)
        rec = out["recovery"]
        rec["resume_vs_replay"] = (
            rec["resume"]["kill_to_next_token_s"] / rec["replay"]["kill_to_next_token_s"]
        )
    return out


def _stub(srv: LocalServe):
    import grpc

    from protos.apar.v1 import apar_pb2_grpc as pb_grpc

    return pb_grpc.AparServiceStub(grpc.insecure_channel(srv.address))


def _wait_two_replicas(srv: LocalServe, timeout_s: float = 180.0, settle_s: float = 4.0) -> None:
    """Ray replaces killed replicas; the recovery run needs two live ones again: Ray reports two
    RUNNING and two heartbeat, for longer than a dead replica's heartbeat outlives it."""
    state = cluster_state(srv)
    deadline, since = time.monotonic() + timeout_s, None
    try:
        while time.monotonic() < deadline:
            ray = (json.loads(_state_file(srv).read_text()).get("ray") or {}).get("replicas", {})
            ok = ray.get("RUNNING", 0) >= 2 and len(state.replica_loads() or {}) >= 2
            since = (since or time.monotonic()) if ok else None
            if since is not None and time.monotonic() - since >= settle_s:
                return
            time.sleep(0.5)
    finally:
        state.close()


def print_report(result: dict[str, Any]) -> None:
    c = result["chaos"]
    rows = [[k, c[k]] for k in ("requests_sent", "completed", "failed", "lost_tokens", "duplicated_tokens",
                                "text_mismatches", "failed_over_requests", "replica_kills", "redis_restarts")]  # fmt: skip
    rec = c["recovery_s"]
    rows.append(
        ["recovery after a kill, s (p50 / p99, failed-over requests)", f"{rec['p50']:.2f} / {rec['p99']:.2f}"]
    )
    print(table(["chaos", "value"], rows))
    for e in c["errors"]:
        print(f"error: {e}")
    r = result["recovery"]
    line = f"kill at 75 % of {r['resume']['tokens']} tokens -> next new token: resume {r['resume']['kill_to_next_token_s']:.2f}s"
    if "replay" in r:
        line += f", replay {r['replay']['kill_to_next_token_s']:.2f}s (resume/replay {r['resume_vs_replay']:.2f}x)"
    print(line)


def _kill_every(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--kill-every wants LO,HI seconds, got {text!r}") from None
    if not 0 < lo <= hi:
        raise argparse.ArgumentTypeError("--kill-every needs 0 < LO <= HI")
    return lo, hi


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, default=300.0, metavar="S", help="seconds of load (default 300)")
    p.add_argument(
        "--rate", type=float, default=1.0, metavar="R", help="Poisson arrivals per second (default 1)"
    )
    p.add_argument("--max-requests", type=int, default=400, metavar="N", help="cap on requests sent")
    p.add_argument("--max-tokens", type=int, default=64, metavar="N")
    p.add_argument("--kill-every", type=_kill_every, default=(30.0, 60.0), metavar="LO,HI",
                   help="seconds between replica kills, uniform (default 30,60)")  # fmt: skip
    p.add_argument(
        "--recovery-tokens", type=int, default=160, metavar="N", help="length of the 75 %% kill request"
    )
    p.add_argument(
        "--no-replay-baseline", action="store_true", help="skip the replay cluster (CI short form)"
    )
    p.add_argument("--timeout", type=float, default=300.0, metavar="S", help="per-request timeout")
    p.add_argument("--model", default="apar-smol")
    p.add_argument("--num-cpus", type=float, default=4.0, help="CPUs Ray may use for apar serve")
    p.add_argument("--prompts", default=None, metavar="FILE.jsonl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=str(RESULTS_DIR / "chaos.json"), metavar="OUT")


def main(args: argparse.Namespace) -> int:
    from bench.common import write_json

    if not 0 < args.duration <= 3600 or not 0 < args.rate <= 50 or not 1 <= args.max_requests <= 5000:
        raise BenchError("--duration must be in (0, 3600], --rate in (0, 50], --max-requests in [1, 5000]")
    if args.max_tokens < 1 or args.recovery_tokens < 8:
        raise BenchError("--max-tokens must be positive and --recovery-tokens at least 8")
    result = run(args)
    if args.json:  # first: the figures survive a report bug
        print(f"wrote {write_json(args.json, result)}")
    print()
    print_report(result)
    c = result["chaos"]
    return 0 if c["failed"] == c["lost_tokens"] == c["duplicated_tokens"] == c["text_mismatches"] == 0 else 1
