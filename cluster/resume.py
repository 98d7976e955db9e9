"""Failover for the ingress: continue a request whose worker replica died, without duplicate output.

Resume (the default): the retry carries the branch tree the client has seen so far (each
branch's tokens, parent, fork position, finish; `StreamDeduper.progress`), and the new replica
prefills it as context and decodes on from there (`apar_worker.resume`), so nothing is decoded
twice. Replay (`ingress.resume: false`, or nothing sent yet): the request runs again from
scratch; greedy decoding (and sampling with a fixed seed, which the ingress sets for every
sampled request) gives the same tokens again. Either way `StreamDeduper` forwards only what the
client has not seen: per branch, the tokens and text past what was already sent; `created` and
the finish event once. A replay that diverges from what was sent raises `ReplayMismatchError`
instead of sending inconsistent output.

Before a retry the dead replica (the request's owner in Redis) is marked dead, so every router
stops choosing it at once instead of waiting for its heartbeat to expire.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from apar_worker.types import BranchEvent, RequestOutput, ResumedBranch
from cluster.state import SchedulerState

log = logging.getLogger("apar.resume")


class ReplayMismatchError(RuntimeError):
    """A retried request produced different tokens than those already streamed."""


def is_replica_failure(exc: BaseException) -> bool:
    """True for errors that mean the replica (not the request) failed: worth a retry elsewhere."""
    try:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    if isinstance(exc, RayTaskError) and isinstance(getattr(exc, "cause", None), RayActorError):
        return True
    return isinstance(exc, ActorDiedError | ActorUnavailableError | RayActorError)


class StreamDeduper:
    """Forwards each branch's events once across attempts of the same request."""

    def __init__(self) -> None:
        self.sent_ids: dict[int, list[int]] = {}  # branch -> token ids already forwarded
        self.sent_chars: dict[int, int] = {}  # branch -> characters of delta_text forwarded
        self.finished: set[int] = set()
        self.announced: set[int] = set()  # branches whose `created` event was forwarded
        self.tree: dict[int, tuple[int | None, int | None]] = {}  # branch -> (parent, fork index)
        self.finish: dict[int, str] = {}
        self._seen_ids: dict[int, int] = {}  # this attempt: tokens received so far per branch
        self._seen_chars: dict[int, int] = {}

    def new_attempt(self, resumed: bool = False) -> None:
        """A resumed attempt starts where the client is; a replay starts from nothing."""
        self._seen_ids = {b: len(ids) for b, ids in self.sent_ids.items()} if resumed else {}
        self._seen_chars = dict(self.sent_chars) if resumed else {}

    def progress(self) -> list[ResumedBranch] | None:
        """The branch tree the client has seen, for a resumed retry; None if there is nothing to
        resume (no token yet, a gap in the tree, or every branch already ended)."""
        if not self.sent_ids.get(0):
            return None
        ids = sorted(self.tree)
        if ids != list(range(len(ids))) or all(b in self.finish for b in ids):
            return None
        return [
            ResumedBranch(
                b, self.tree[b][0], self.tree[b][1], list(self.sent_ids.get(b, [])), self.finish.get(b)
            )
            for b in ids
        ]

    def filter(self, ev: BranchEvent) -> BranchEvent | None:
        """The part of `ev` the client has not received yet, or None if nothing is new."""
        b = ev.branch_id
        sent = self.sent_ids.setdefault(b, [])
        r = self._seen_ids.get(b, 0)
        ids = list(ev.new_token_ids)
        skip = max(0, min(len(sent) - r, len(ids)))
        if ids[:skip] != sent[r : r + skip]:
            raise ReplayMismatchError(f"branch {b}: retried tokens differ from the ones already streamed")
        self._seen_ids[b] = r + len(ids)
        rc = self._seen_chars.get(b, 0)
        text = ev.delta_text
        cskip = max(0, min(self.sent_chars.get(b, 0) - rc, len(text)))
        self._seen_chars[b] = rc + len(text)
        new_ids, new_text = ids[skip:], text[cskip:]
        created = ev.created and b not in self.announced
        if b not in self.tree:  # a child is announced right after its parent's [Fork] event
            parent = ev.parent_id
            fork_index = len(self.sent_ids.get(parent, [])) - 1 if parent is not None else None
            self.tree[b] = (parent, fork_index)
        finish = ev.finish_reason if b not in self.finished else None
        if not new_ids and not new_text and not created and finish is None:
            return None
        sent.extend(new_ids)
        self.sent_chars[b] = self.sent_chars.get(b, 0) + len(new_text)
        if finish is not None:
            self.finished.add(b)
            self.finish[b] = finish
        if created:
            self.announced.add(b)
        return dataclasses.replace(
            ev, new_token_ids=new_ids, delta_text=new_text, created=created, finish_reason=finish
        )


async def generate_with_failover(
    start: Callable[[int, list[ResumedBranch] | None], AsyncIterator[Any]],
    *,
    request_id: str | None = None,
    state: SchedulerState | None = None,
    max_attempts: int = 3,
    resume: bool = True,
    is_retryable: Callable[[BaseException], bool] = is_replica_failure,
) -> AsyncIterator[list[BranchEvent | RequestOutput] | Any]:
    """Run `start(attempt, resume_tree)` (a worker stream) and retry it on replica failure,
    resuming from what was sent when `resume` and there is something to resume.

    The worker stream yields lists of items (one engine step's BranchEvents, the last list
    ending with the RequestOutput); each list comes out with its events deduplicated, and
    is dropped when nothing in it is new. Other items (the replica id) are passed through.
    Non-retryable errors, and the last failure, propagate.
    """
    dedup = StreamDeduper()
    for attempt in range(max_attempts):
        tree = dedup.progress() if resume and attempt > 0 else None
        dedup.new_attempt(resumed=tree is not None)
        if attempt > 0:
            log.warning("request %s: %s on another replica", request_id, "resumed" if tree else "replayed")
        try:
            async for item in start(attempt, tree):
                if not isinstance(item, list):
                    yield item
                    continue
                kept = (dedup.filter(e) if isinstance(e, BranchEvent) else e for e in item)
                out = [x for x in kept if x is not None]
                if out:
                    yield out
            return
        except Exception as exc:
            if attempt + 1 >= max_attempts or not is_retryable(exc):
                raise
            log.warning(
                "request %s: replica failed (%s); retrying (attempt %d)", request_id, exc, attempt + 2
            )
            if state is not None and request_id:
                owner = await asyncio.to_thread(state.owner, request_id)
                if owner:
                    await asyncio.to_thread(state.mark_dead, owner)
