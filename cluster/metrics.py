"""Prometheus metrics of a worker replica, exported through Ray's metrics agent.

Ray exposes every `ray.util.metrics` metric on each node's Prometheus endpoint (the `ray_` prefix
is added by Ray), next to Ray Serve's own request metrics, so one scrape config covers the
cluster. Per-request figures are recorded when a request finishes; engine-wide gauges are
sampled by the worker's periodic `observe_engine`.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

from apar_worker.types import EngineStats, RequestOutput

_LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
_TPOT_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]


class WorkerMetrics:
    """All metrics of one worker replica; tags carry the replica id and the model."""

    def __init__(self, replica_id: str, model: str):
        # Over 50 lines on purpose: the declaration of every metric, one after the other.
        keys = ("replica", "model")
        self._tags = {"replica": replica_id, "model": model}
        self.requests = Counter(
            "apar_requests_total", "Finished requests by finish reason", tag_keys=(*keys, "finish_reason")
        )
        self.branches = Counter(
            "apar_branches_total", "Branches decoded (root branches included)", tag_keys=keys
        )
        self.forks = Counter("apar_forks_total", "Child branches created by [Fork]", tag_keys=keys)
        self.tokens = Counter(
            "apar_generated_tokens_total", "Tokens generated over all branches", tag_keys=keys
        )
        self.prompt_tokens = Counter(
            "apar_prompt_tokens_total", "Prompt tokens of finished requests", tag_keys=keys
        )
        self.cached_tokens = Counter(
            "apar_cached_prompt_tokens_total", "Prompt tokens served from the prefix cache", tag_keys=keys
        )
        self.steps = Counter("apar_engine_steps_total", "Engine forward passes", tag_keys=keys)
        self.spec_drafts = Counter(
            "apar_spec_draft_tokens_total", "Speculative draft tokens fed (finished requests)", tag_keys=keys
        )
        self.spec_accepted = Counter(
            "apar_spec_accepted_tokens_total", "Speculative draft tokens accepted", tag_keys=keys
        )
        self.preemptions = Counter("apar_preemptions_total", "Requests preempted for KV space", tag_keys=keys)
        self.kv_usage = Gauge("apar_kv_cache_usage_ratio", "Fraction of KV blocks in use", tag_keys=keys)
        self.kv_free = Gauge("apar_kv_free_blocks", "Free KV blocks", tag_keys=keys)
        self.prefix_hit_rate = Gauge("apar_prefix_cache_hit_rate", "Prefix cache hit rate", tag_keys=keys)
        self.running = Gauge("apar_running_requests", "Requests being decoded", tag_keys=keys)
        self.waiting = Gauge("apar_waiting_requests", "Requests waiting for admission", tag_keys=keys)
        self.running_branches = Gauge("apar_running_branches", "Branches being decoded", tag_keys=keys)
        self.ttft = Histogram(
            "apar_time_to_first_token_seconds",
            "Time to first token",
            boundaries=_LATENCY_BOUNDARIES,
            tag_keys=keys,
        )
        self.tpot = Histogram(
            "apar_time_per_output_token_seconds",
            "Decode time per generated token after the first (all branches counted)",
            boundaries=_TPOT_BOUNDARIES,
            tag_keys=keys,
        )
        self.latency = Histogram(
            "apar_request_latency_seconds",
            "End-to-end latency on the replica",
            boundaries=_LATENCY_BOUNDARIES,
            tag_keys=keys,
        )
        for m in (
            self.requests,
            self.branches,
            self.forks,
            self.tokens,
            self.prompt_tokens,
            self.cached_tokens,
        ):
            m.set_default_tags(self._tags)
        for m in (self.steps, self.spec_drafts, self.spec_accepted, self.preemptions):
            m.set_default_tags(self._tags)
        for m in (self.kv_usage, self.kv_free, self.prefix_hit_rate):
            m.set_default_tags(self._tags)
        for m in (self.running, self.waiting, self.running_branches, self.ttft, self.tpot, self.latency):
            m.set_default_tags(self._tags)
        self._last_steps = 0
        self._last_preemptions = 0

    def observe_request(self, out: RequestOutput) -> None:
        """Called once per finished request (any finish reason)."""
        self.requests.inc(1, tags={"finish_reason": out.finish_reason})
        self.branches.inc(len(out.branches))
        if len(out.branches) > 1:
            self.forks.inc(len(out.branches) - 1)
        if out.num_tokens:
            self.tokens.inc(out.num_tokens)
        if out.prompt_tokens:
            self.prompt_tokens.inc(out.prompt_tokens)
        if out.cached_tokens:
            self.cached_tokens.inc(out.cached_tokens)
        drafted = sum(b.spec_drafted for b in out.branches)
        if drafted:
            self.spec_drafts.inc(drafted)
            accepted = sum(b.spec_accepted for b in out.branches)
            if accepted:
                self.spec_accepted.inc(accepted)
        self.latency.observe(out.latency_s)
        if out.ttft_s is not None:
            self.ttft.observe(out.ttft_s)
            if out.num_tokens > 1:
                self.tpot.observe(max(0.0, out.latency_s - out.ttft_s) / (out.num_tokens - 1))

    def observe_engine(self, stats: EngineStats) -> None:
        """Sample engine-wide gauges; counters advance by the delta since the last sample."""
        if stats.total_blocks:
            self.kv_usage.set(1.0 - stats.free_blocks / stats.total_blocks)
        self.kv_free.set(stats.free_blocks)
        self.prefix_hit_rate.set(stats.prefix_hit_rate)
        self.running.set(stats.running_requests)
        self.waiting.set(stats.waiting_requests)
        self.running_branches.set(stats.running_branches)
        if stats.steps > self._last_steps:
            self.steps.inc(stats.steps - self._last_steps)
        if stats.num_preemptions > self._last_preemptions:
            self.preemptions.inc(stats.num_preemptions - self._last_preemptions)
        self._last_steps = stats.steps
        self._last_preemptions = stats.num_preemptions
