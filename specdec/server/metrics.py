"""Prometheus metrics of one server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from specdec.engine import Engine


class Metrics:
    """Prometheus metrics on a registry of this server's own (two servers in one process do not collide)."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.running = Gauge("specdec_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("specdec_requests_waiting", "Requests queued for admission", registry=r)
        self.kv_used = Gauge("specdec_kv_blocks_used", "Target KV pool blocks in use", registry=r)
        self.kv_free = Gauge("specdec_kv_blocks_free", "Target KV pool blocks free", registry=r)
        self.acceptance = Gauge("specdec_acceptance_rate", "Accepted / proposed draft tokens so far", registry=r)
        self.position = Gauge("specdec_position_acceptance", "P(position i accepted | positions < i accepted)",
                              ["position"], registry=r)
        self.k = Gauge("specdec_num_draft_tokens", "k of the last decode step", registry=r)
        self.proposed = Counter("specdec_draft_tokens_proposed", "Draft tokens offered to the target", registry=r)
        self.accepted = Counter("specdec_draft_tokens_accepted", "Draft tokens the target kept", registry=r)
        self.generated = Counter("specdec_generation_tokens", "Tokens emitted", registry=r)
        self.prompt = Counter("specdec_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.steps = Counter("specdec_engine_steps", "Engine steps (one target forward each)", registry=r)
        self.preemptions = Gauge("specdec_preemptions", "Sequences preempted so far", registry=r)
        self.finished = Counter("specdec_requests_finished", "Requests ended", ["finish_reason"], registry=r)
        self.tokens_per_forward = Histogram(
            "specdec_tokens_per_target_forward", "Tokens a request emitted per target forward",
            buckets=(1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 17), registry=r)
        latency = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.ttft = Histogram("specdec_time_to_first_token_seconds", "Arrival to first token", buckets=latency,
                              registry=r)
        self.itl = Histogram("specdec_inter_token_latency_seconds", "Time per output token after the first",
                             buckets=latency, registry=r)
        self._seen = (0, 0)

    def gauges(self, engine: Engine) -> None:
        """Engine thread: the engine's state now."""
        self.running.set(engine.num_running)
        self.waiting.set(engine.num_waiting)
        self.kv_used.set(engine.pool.num_used)
        self.kv_free.set(engine.pool.num_free)
        self.preemptions.set(engine.num_preemptions)

    def after_step(self, engine: Engine) -> None:
        """Engine thread, after each step: the gauges, and the step's figures once."""
        self.gauges(engine)
        info = engine.last_step
        if info is None:
            return
        self.steps.inc()
        self.generated.inc(sum(info.emitted))
        for n in info.emitted:
            self.tokens_per_forward.observe(n)
        if not info.prefill:
            self.k.set(info.k)
        stats = engine.stats
        proposed, accepted = stats.proposed - self._seen[0], stats.accepted - self._seen[1]
        self._seen = (stats.proposed, stats.accepted)
        self.proposed.inc(proposed)
        self.accepted.inc(accepted)
        if stats.proposed:
            self.acceptance.set(stats.acceptance_rate)
            for i, rate in enumerate(stats.per_position_acceptance):
                self.position.labels(position=str(i)).set(rate)
