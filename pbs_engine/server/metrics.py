"""Serving metrics for Prometheus, through prometheus-client: one registry per app, so several apps in one
process (tests, embedding) keep their own counts."""
from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pbs_engine.engine.outputs import RequestOutput

prometheus_client.disable_created_metrics()  # no *_created samples: vLLM's exposition has none either

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
DENSITY_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 0.99, 1.0)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST


class Metrics:
    """Counters and histograms of finished requests (recorded by the engine thread) and gauges of the engine's
    state (set from its stats when /metrics is scraped)."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.finished = Counter("pbs_requests_finished", "Requests finished, by finish reason.", ["finish_reason"],
                                registry=r)
        self.failed = Counter("pbs_requests_failed", "Requests failed by an engine error.", registry=r)
        self.rejected = Counter("pbs_requests_rejected", "Requests refused because the queue was full.", registry=r)
        self.prompt_tokens = Counter("pbs_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("pbs_generation_tokens", "Generated tokens of finished requests.",
                                         registry=r)
        self.ttft = Histogram("pbs_time_to_first_token_seconds", "Time from arrival to the first generated token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("pbs_time_per_output_token_seconds", "Mean time between generated tokens.",
                              buckets=TPOT_BUCKETS, registry=r)
        self.latency = Histogram("pbs_request_latency_seconds", "Time from arrival to the last token.",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.density = Histogram("pbs_prefill_density", "Share of causal attention blocks a request's prefill "
                                 "computed (PBS; 1 for dense).", buckets=DENSITY_BUCKETS, registry=r)
        self.kv_usage = Gauge("pbs_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use.", registry=r)
        self.kv_blocks = Gauge("pbs_kv_cache_blocks", "KV-cache blocks, by state.", ["state"], registry=r)
        self.running = Gauge("pbs_num_requests_running", "Requests decoding in the engine.", registry=r)
        self.waiting = Gauge("pbs_num_requests_waiting", "Admitted requests that have not produced a token yet.",
                             registry=r)
        self.prefill_pending = Gauge("pbs_num_prefill_tokens_pending", "Prompt tokens admitted and not computed yet.",
                                     registry=r)
        self.oldest_waiting = Gauge("pbs_oldest_waiting_request_seconds",
                                    "Age of the oldest request without a first token.", registry=r)
        self.preemptions = Counter("pbs_num_preemptions", "Requests preempted to free KV-cache blocks.",
                                   registry=r)
        self._preemptions_seen = 0

    def record(self, out: RequestOutput) -> None:
        m = out.metrics
        self.finished.labels(out.finish_reason or "abort").inc()
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.generation_tokens.inc(len(out.outputs[0].token_ids))
        if m.ttft is not None:
            self.ttft.observe(m.ttft)
        if m.time_per_output_token is not None:
            self.tpot.observe(m.time_per_output_token)
        if m.finished_time is not None:
            self.latency.observe(m.finished_time - m.arrival_time)
        if m.first_token_time is not None:
            self.density.observe(m.prefill_density)

    def render(self, stats: dict, waiting_http: int) -> bytes:
        """The exposition text; `stats` is the engine's, `waiting_http` counts admitted requests not yet started."""
        used = stats["kv_total_blocks"] - stats["kv_free_blocks"]
        self.kv_usage.set(used / max(1, stats["kv_total_blocks"]))
        self.kv_blocks.labels("used").set(used)
        self.kv_blocks.labels("free").set(stats["kv_free_blocks"])
        self.running.set(stats["num_running"])
        self.waiting.set(waiting_http)
        self.prefill_pending.set(stats["num_prefill_tokens_pending"])
        self.oldest_waiting.set(stats["oldest_waiting_s"])
        self.preemptions.inc(stats["num_preemptions"] - self._preemptions_seen)  # the engine counts; we follow
        self._preemptions_seen = stats["num_preemptions"]
        return prometheus_client.generate_latest(self.registry)
