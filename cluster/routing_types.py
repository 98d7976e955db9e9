"""What routing reads: a request's keys (id, session, prompt-prefix hashes) and replica loads.

Prefix hashes are chained over fixed-size character chunks of a canonical prompt text, so two
prompts that share a prefix share the first hashes, and the longest shared prefix is found with
one MGET (docs/design.md, "Cluster").
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from cluster.config import default

PREFIX_CHUNK_CHARS: int = default("router", "prefix_affinity_chars")  # prefix-affinity granularity
MAX_PREFIX_CHUNKS = 64  # longer prompts are matched on their first 64 chunks


@dataclass
class ReplicaLoad:
    """What a replica publishes on every heartbeat."""

    replica_id: str
    pid: int
    node_id: str = ""
    running_requests: int = 0
    waiting_requests: int = 0
    running_branches: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    inflight: int = 0  # requests accepted by the replica and not finished (its own count)
    ts: float = field(default_factory=time.time)

    @property
    def free_kv_fraction(self) -> float:
        return self.free_blocks / self.total_blocks if self.total_blocks else 1.0

    @property
    def queue_len(self) -> int:
        return max(self.inflight, self.running_requests + self.waiting_requests)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> ReplicaLoad:
        data = json.loads(raw)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class RouteInfo:
    """Everything the router needs for one request, read in one round trip."""

    owner: str | None = None
    session_replica: str | None = None
    prefix_replica: str | None = None
    prefix_chunks: int = 0  # how many prefix chunks of the prompt matched
    loads: dict[str, ReplicaLoad] = field(default_factory=dict)  # live heartbeats only
    dead: set[str] = field(default_factory=set)


def canonical_prompt(
    prompt: str | None, messages: Sequence[dict[str, Any]] | None, token_ids: Sequence[int] | None
) -> str:
    """A text whose prefixes match when prompts share a prefix (turn 2 extends turn 1)."""
    if messages is not None:
        return "".join(f"{m.get('role', '')}\x1f{m.get('content', '')}\x1e" for m in messages)
    if token_ids is not None:
        return "".join(f"{int(t)}," for t in token_ids)
    return prompt or ""


def prefix_hashes(text: str, chunk_chars: int = PREFIX_CHUNK_CHARS) -> list[str]:
    """Hashes of the prompt's prefixes at every `chunk_chars` boundary, shortest first.

    Chained, so the longest prefix two prompts share is found with one MGET.
    """
    h = hashlib.blake2b(digest_size=12)
    out: list[str] = []
    n = min(len(text) // chunk_chars, MAX_PREFIX_CHUNKS)
    for i in range(n):
        h.update(text[i * chunk_chars : (i + 1) * chunk_chars].encode("utf-8", "surrogatepass"))
        out.append(h.copy().hexdigest())
    return out


@dataclass
class RoutingKeys:
    """The fields of a request that routing looks at."""

    request_id: str | None = None
    session_id: str | None = None
    prefix_hashes: list[str] = field(default_factory=list)


def routing_keys(obj: Any, chunk_chars: int = PREFIX_CHUNK_CHARS) -> RoutingKeys | None:
    """Routing keys of a call argument: a GenerateRequest, a dict or any object with the fields.

    Reads `request_id`, `session_id` and either `prefix_hashes` (precomputed) or the prompt
    (`prompt` / `messages` / `prompt_token_ids`). None when the object carries none of them.
    """

    def get(name: str) -> Any:
        return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)

    rid, sid = get("request_id"), get("session_id")
    hashes = get("prefix_hashes")
    if hashes is None:
        prompt, messages, ids = get("prompt"), get("messages"), get("prompt_token_ids")
        hashes = (
            prefix_hashes(canonical_prompt(prompt, messages, ids), chunk_chars)
            if (prompt or messages or ids)
            else []
        )
    if rid is None and sid is None and not hashes:
        return None
    return RoutingKeys(
        request_id=str(rid) if rid else None, session_id=str(sid) if sid else None, prefix_hashes=list(hashes)
    )
