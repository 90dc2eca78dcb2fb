"""Prometheus collectors, on a registry of the app's own (no module globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        # prometheus_client also writes a `<name>_created` gauge (a creation timestamp) for every
        # labelled counter and histogram child in the text format: series nobody queries, and names
        # that are not the metrics documented. Off (a process-wide switch of the library).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gateway_requests", "Requests by ensemble and HTTP status.", ["ensemble", "status"], registry=r
        )
        self.request_latency = Histogram(
            "gateway_request_latency_seconds",
            "Whole-request latency.",
            ["ensemble"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.member_latency = Histogram(
            "gateway_member_latency_seconds",
            "Latency of successful member calls.",
            ["member"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.member_errors = Counter(
            "gateway_member_errors",
            "Failed member calls by error type.",
            ["member", "error_type"],
            registry=r,
        )
        self.ranker_latency = Histogram(
            "gateway_ranker_latency_seconds",
            "Ranking latency.",
            ["ranker"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.fuser_latency = Histogram(
            "gateway_fuser_latency_seconds",
            "Fusion latency.",
            ["fuser"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.model_errors = Counter(
            "gateway_model_errors",
            "Router, ranker or fuser failures (stage route, rank, fuse).",
            ["stage", "model"],
            registry=r,
        )
        self.router_latency = Histogram(
            "gateway_router_latency_seconds",
            "Routing latency (the router's scores for one source).",
            ["router"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.member_calls = Counter(
            "gateway_member_calls",
            "Member calls made (a member's samples each count), by ensemble.",
            ["ensemble"],
            registry=r,
        )
        self.calls_saved = Counter(
            "gateway_member_calls_saved",
            "Member calls not made, by why: routed, cascade_not_needed, cap.",
            ["ensemble", "reason"],
            registry=r,
        )
        self.ranked_first = Counter(
            "gateway_member_ranked_first",
            "Times a member's candidate ranked first.",
            ["ensemble", "member"],
            registry=r,
        )
        self.selected = Counter(
            "gateway_member_selected",
            "Times a member's candidate was selected for fusion.",
            ["ensemble", "member"],
            registry=r,
        )
        self.candidates = Counter(
            "gateway_member_candidates",
            "Candidates a member contributed (the denominator of win rate and selection share).",
            ["ensemble", "member"],
            registry=r,
        )
        self.member_available = Gauge(
            "gateway_member_available",
            "0 when a member could not be prepared (e.g. its adapter failed to load); see /ready.",
            ["member"],
            registry=r,
        )
        self.circuit_state = Gauge(
            "gateway_member_circuit_state",
            "A member's circuit: 0 closed (called), 1 half-open (probed), 2 open (skipped).",
            ["member"],
            registry=r,
        )
        self.circuit_opened = Counter(
            "gateway_member_circuit_opened", "Times a member's circuit opened.", ["member"], registry=r
        )
        self.member_healthy = Gauge(
            "gateway_member_healthy", "1 when the member's last active health check passed.", ["member"], registry=r
        )
        self.retries = Counter(
            "gateway_member_retries", "Member calls retried after a connection error or a 5xx.", ["member"], registry=r
        )
        self.degraded = Counter(
            "gateway_degraded",
            "Answers given without ranking or fusion because the ranker or fuser failed.",
            ["ensemble", "reason"],
            registry=r,
        )
        self.votes = Counter(
            "gateway_votes",
            "Majority votes by outcome: unanimous, majority (more than half), plurality, tie.",
            ["ensemble", "outcome"],
            registry=r,
        )
        self.fusion_skipped = Counter(
            "gateway_fusion_skipped",
            "Requests answered with the top candidate without fusion (adaptive fusion).",
            ["ensemble", "reason"],
            registry=r,
        )
        self.shed = Counter(
            "gateway_shed", "Requests refused with 429 because the gateway was full.", ["reason"], registry=r
        )
        self.queue_depth = Gauge("gateway_queue_depth", "Requests waiting for a slot.", registry=r)
        # Per-key limits (service/limits): `key` is a name from auth.keys, `unnamed`, or `anonymous`.
        self.key_requests = Counter(
            "gateway_key_requests", "Ensemble requests admitted past the per-key limits, by key.", ["key"], registry=r
        )
        self.key_limited = Counter(
            "gateway_key_rate_limited",
            "Requests refused with 429 by a per-key limit (requests_per_minute, tokens_per_minute, concurrent).",
            ["key", "limit"],
            registry=r,
        )
        self.key_tokens = Counter(
            "gateway_key_member_tokens", "Member tokens (prompt and completion) spent for a key.", ["key"], registry=r
        )
        self.key_in_flight = Gauge(
            "gateway_key_requests_in_flight", "Requests in progress by key.", ["key"], registry=r
        )
        self.limits_store_up = Gauge(
            "gateway_limits_store_up",
            "1 while the shared store of per-key counts (Redis) answers; 0 while this replica counts alone.",
            registry=r,
        )
        self.limits_store_errors = Counter(
            "gateway_limits_store_errors", "Calls to the per-key limits' store (Redis) that failed.", registry=r
        )
        self.server_restarts = Counter(
            "gateway_server_restarts", "Launched vLLM servers restarted after they died.", ["server"], registry=r
        )
        self.in_flight = Gauge("gateway_requests_in_flight", "Requests being served.", registry=r)
        self.ready = Gauge("gateway_ready", "1 when the gateway is ready to serve.", registry=r)
        # The store of answers (service/store): written off the request path.
        self.store_written = Counter("gateway_store_records_written", "Answer records written.", registry=r)
        self.store_dropped = Counter(
            "gateway_store_records_dropped",
            "Answer records dropped: queue_full, db_error, timeout, shutdown.",
            ["reason"],
            registry=r,
        )
        self.store_queue_depth = Gauge("gateway_store_queue_depth", "Answer records waiting to be written.", registry=r)
        self.feedback = Counter(
            "gateway_feedback_received", "Feedback accepted, by ensemble.", ["ensemble"], registry=r
        )
