"""Prometheus metrics of one server, in a registry of its own (several servers can share a process).

lorafleet_requests_total{route,status,model}          every HTTP request, errors included
lorafleet_prompt_tokens_total{model}                   prompt tokens of finished generations
lorafleet_generation_tokens_total{model}               generated tokens
lorafleet_time_to_first_token_seconds{model}           histogram, from request arrival to the first text
lorafleet_e2e_request_latency_seconds{model}           histogram, from arrival to the last token
lorafleet_rejected_requests_total{reason}              queue_full (429) / shutting_down (503)
lorafleet_queue_depth, lorafleet_running_requests, lorafleet_loaded_adapters
vllm:num_requests_waiting, vllm:num_requests_running   the same gauges under vLLM's names, so dashboards and
                                                       autoscaling rules work with either engine
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class ServerMetrics:
    def __init__(self, stats: Callable[[], object]):
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.requests = Counter(
            "lorafleet_requests",
            "HTTP requests by route, status and model.",
            ["route", "status", "model"],
            registry=reg,
        )
        self.prompt_tokens = Counter("lorafleet_prompt_tokens", "Prompt tokens processed.", ["model"], registry=reg)
        self.generation_tokens = Counter("lorafleet_generation_tokens", "Tokens generated.", ["model"], registry=reg)
        self.time_to_first_token = Histogram(
            "lorafleet_time_to_first_token_seconds",
            "Seconds from request arrival to its first generated text.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.e2e_latency = Histogram(
            "lorafleet_e2e_request_latency_seconds",
            "Seconds from request arrival to its last token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.rejected = Counter(
            "lorafleet_rejected_requests", "Requests refused before running.", ["reason"], registry=reg
        )
        gauges = {
            "lorafleet_queue_depth": ("Requests waiting for a batch slot.", lambda: stats().waiting),
            "lorafleet_running_requests": ("Requests in the running batch.", lambda: stats().running),
            "lorafleet_loaded_adapters": ("Adapters loaded on the base model.", lambda: stats().adapters),
            "vllm:num_requests_waiting": ("Requests waiting (vLLM's name).", lambda: stats().waiting),
            "vllm:num_requests_running": ("Requests running (vLLM's name).", lambda: stats().running),
        }
        for name, (help_text, read) in gauges.items():
            Gauge(name, help_text, registry=reg).set_function(read)

    def render(self) -> bytes:
        return generate_latest(self.registry)
