"""The server's figures in Prometheus' text format (GET /metrics), from prometheus_client.

    tformer_requests_running / _waiting      requests in the batch, in the queue
    tformer_slots_busy / _total              KV-cache slots in use, and there are
    tformer_prompt_tokens_total              prompt tokens prefilled
    tformer_generation_tokens_total          tokens generated
    tformer_time_to_first_token_seconds      histogram: queued until the first token
    tformer_inter_token_latency_seconds      histogram: between a request's tokens
    tformer_requests_total{endpoint,status}  answered requests

Each server has its own registry, so several can live in one process (tests do).
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("tformer_requests_running", "Sequences being decoded", registry=r)
        self.waiting = Gauge("tformer_requests_waiting", "Sequences in the queue", registry=r)
        self.busy = Gauge("tformer_slots_busy", "KV-cache slots in use", registry=r)
        self.slots = Gauge("tformer_slots_total", "KV-cache slots", registry=r)
        self.prompt = Counter("tformer_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation = Counter("tformer_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "tformer_time_to_first_token_seconds",
            "From queued to the first token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "tformer_inter_token_latency_seconds",
            "Between one request's tokens",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "tformer_requests", "Answered requests", ["endpoint", "status"], registry=r
        )

    # what the scheduler reports, from its thread
    def load(self, running: int, waiting: int, slots: int) -> None:
        self.running.set(running)
        self.busy.set(running)
        self.waiting.set(waiting)
        self.slots.set(slots)

    def prompt_tokens(self, n: int) -> None:
        self.prompt.inc(n)

    def generated(self, n: int) -> None:
        self.generation.inc(n)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def answered(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)
