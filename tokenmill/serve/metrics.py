"""Prometheus metrics named after vLLM's (``vllm:`` -> ``tokenmill:``), so existing dashboards carry over; every
series is labelled with ``model_name``. One registry per server (tests start several in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0, 160.0, 640.0)
ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        self.running = Gauge("tokenmill:num_requests_running", "Requests in the engine's running batch.", labels,
                             registry=r)
        self.waiting = Gauge("tokenmill:num_requests_waiting", "Requests waiting to be admitted.", labels, registry=r)
        self.kv_usage = Gauge("tokenmill:kv_cache_usage_perc", "KV cache usage, 1 = full.", labels, registry=r)
        self.prompt_tokens = Counter("tokenmill:prompt_tokens", "Prefill tokens processed.", labels, registry=r)
        self.generation_tokens = Counter("tokenmill:generation_tokens", "Generated tokens.", labels, registry=r)
        self.preemptions = Counter("tokenmill:num_preemptions", "Preemptions.", labels, registry=r)
        self.prefix_queries = Counter("tokenmill:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      labels, registry=r)
        self.prefix_hits = Counter("tokenmill:prefix_cache_hits", "Prompt tokens found in the prefix cache.", labels,
                                   registry=r)
        self.success = Counter("tokenmill:request_success", "Finished requests.", labels + ["finished_reason"],
                               registry=r)
        self.ttft = Histogram("tokenmill:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("tokenmill:inter_token_latency_seconds", "Time between tokens of a request.", labels,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("tokenmill:e2e_request_latency_seconds", "Request latency, arrival to last token.",
                             labels, buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("tokenmill:request_queue_time_seconds", "Arrival to first scheduled step.",
                                    labels, buckets=LATENCY_BUCKETS, registry=r)
        self.iteration_tokens = Histogram("tokenmill:iteration_tokens_total", "Tokens scheduled per engine step.",
                                          labels, buckets=ITERATION_BUCKETS, registry=r)
        for m in (self.running, self.waiting, self.kv_usage, self.prompt_tokens, self.generation_tokens,
                  self.preemptions, self.prefix_queries, self.prefix_hits):
            m.labels(model_name)  # the series exist (at 0) from the start
        for reason in ("stop", "length", "abort"):
            self.success.labels(model_name, reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)
