"""Serving metrics in the Prometheus text exposition format (version 0.0.4), written without a client library."""
from __future__ import annotations

import bisect
import threading
from collections import Counter

from pbs_engine.engine.outputs import RequestOutput

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, count in zip([*map(_number, self.buckets), "+Inf"], self.counts):
            total += count
            out.append(f'{name}_bucket{{le="{bound}"}} {total}')
        return out + [f"{name}_sum {_number(self.sum)}", f"{name}_count {total}"]


class Metrics:
    """Counters and histograms of finished requests; the engine thread records, /metrics renders."""

    def __init__(self):
        self._lock = threading.Lock()
        self.finished: Counter[str] = Counter()  # by finish reason
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.failed = 0  # engine errors
        self.rejected = 0  # queue full
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)

    def record(self, out: RequestOutput) -> None:
        m = out.metrics
        with self._lock:
            self.finished[out.finish_reason or "abort"] += 1
            self.prompt_tokens += len(out.prompt_token_ids)
            self.generation_tokens += len(out.outputs[0].token_ids)
            if m.ttft is not None:
                self.ttft.observe(m.ttft)
            if m.time_per_output_token is not None:
                self.tpot.observe(m.time_per_output_token)
            if m.finished_time is not None:
                self.latency.observe(m.finished_time - m.arrival_time)

    def render(self, stats: dict, waiting_http: int) -> str:
        """The exposition text; `stats` is the engine's, `waiting_http` counts admitted requests not yet started."""
        used = stats["kv_total_blocks"] - stats["kv_free_blocks"]
        with self._lock:
            families = [
                ("pbs_requests_finished_total", "counter", "Requests finished, by finish reason.",
                 [f'pbs_requests_finished_total{{finish_reason="{r}"}} {n}' for r, n in sorted(self.finished.items())]),
                ("pbs_requests_failed_total", "counter", "Requests failed by an engine error.",
                 [f"pbs_requests_failed_total {self.failed}"]),
                ("pbs_requests_rejected_total", "counter", "Requests refused because the queue was full.",
                 [f"pbs_requests_rejected_total {self.rejected}"]),
                ("pbs_prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
                 [f"pbs_prompt_tokens_total {self.prompt_tokens}"]),
                ("pbs_generation_tokens_total", "counter", "Generated tokens of finished requests.",
                 [f"pbs_generation_tokens_total {self.generation_tokens}"]),
                ("pbs_time_to_first_token_seconds", "histogram", "Time from arrival to the first generated token.",
                 self.ttft.lines("pbs_time_to_first_token_seconds")),
                ("pbs_time_per_output_token_seconds", "histogram", "Mean time between generated tokens.",
                 self.tpot.lines("pbs_time_per_output_token_seconds")),
                ("pbs_request_latency_seconds", "histogram", "Time from arrival to the last token.",
                 self.latency.lines("pbs_request_latency_seconds")),
            ]
        families += [
            ("pbs_kv_cache_usage_ratio", "gauge", "Fraction of KV-cache blocks in use.",
             [f"pbs_kv_cache_usage_ratio {_number(used / max(1, stats['kv_total_blocks']))}"]),
            ("pbs_kv_cache_blocks", "gauge", "KV-cache blocks, by state.",
             [f'pbs_kv_cache_blocks{{state="used"}} {used}',
              f'pbs_kv_cache_blocks{{state="free"}} {stats["kv_free_blocks"]}']),
            ("pbs_num_requests_running", "gauge", "Requests decoding in the engine.",
             [f"pbs_num_requests_running {stats['num_running']}"]),
            ("pbs_num_requests_waiting", "gauge", "Admitted requests that have not produced a token yet.",
             [f"pbs_num_requests_waiting {waiting_http}"]),
            ("pbs_num_preemptions_total", "counter", "Requests preempted to free KV-cache blocks.",
             [f"pbs_num_preemptions_total {stats['num_preemptions']}"]),
        ]
        lines = []
        for name, kind, help_text, samples in families:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]
        return "\n".join(lines) + "\n"


def _number(x: float) -> str:
    return repr(float(x))
