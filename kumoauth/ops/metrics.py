"""
Prometheus metrics (SPEC §9), with ``prometheus_client`` served by
``twisted.web`` at ``/metrics`` on ``[metrics] endpoint``.

Each server has its own :class:`Metrics` (its own registry), carried over
reloads, so counters never reset while the process lives.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.web import resource
from twisted.web.server import Request

#: Checker latency buckets, seconds: from an in-memory dict to a slow LDAP.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.connections = Gauge(
            "kumoauth_open_connections",
            "Open connections",
            registry=r,
            multiprocess_mode="livesum",  # with [server] workers: summed over live ones
        )
        self.connections_total = Counter(
            "kumoauth_connections", "Connections accepted", ["listener"], registry=r
        )
        self.connections_rejected = Counter(
            "kumoauth_connections_rejected",
            "Connections refused with 421 by a limit",
            ["reason"],
            registry=r,
        )
        self.auth_attempts = Counter(
            "kumoauth_auth_attempts",
            "AUTH attempts by mechanism and result",
            ["mechanism", "result"],
            registry=r,
        )
        self.checker_latency = Histogram(
            "kumoauth_checker_latency_seconds",
            "Time the checker took to answer",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.backend_requests = Counter(
            "kumoauth_auth_backend_requests",
            "Questions to the credential store by backend and answer (ok, denied, error)",
            ["backend", "result"],
            registry=r,
        )
        self.backend_latency = Histogram(
            "kumoauth_auth_backend_latency_seconds",
            "Time the credential store took to answer",
            ["backend"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_lookups = Counter(
            "kumoauth_auth_cache_lookups",
            "Verified-credential cache lookups by result (hit, negative_hit, miss)",
            ["result"],
            registry=r,
        )
        self.sender_binding = Counter(
            "kumoauth_sender_binding",
            "Sender-binding decisions by where (envelope, header) and result "
            "(allowed, refused, error)",
            ["where", "result"],
            registry=r,
        )
        self.limit_exceeded = Counter(
            "kumoauth_limit_exceeded",
            "MAIL or RCPT refused by a [limits] sending limit, by kind and user",
            ["kind", "user"],
            registry=r,
        )
        self.throttle_hits = Counter(
            "kumoauth_throttle_hits",
            "AUTH attempts refused by a throttle",
            ["reason"],
            registry=r,
        )
        self.messages_spooled = Counter(
            "kumoauth_messages_spooled", "Messages made durable", registry=r
        )
        self.bytes_spooled = Counter(
            "kumoauth_spooled_bytes", "Bytes of messages made durable", registry=r
        )
        self.spool_errors = Counter(
            "kumoauth_spool_errors", "Messages that could not be spooled (451)", registry=r
        )
        self.tls_handshakes = Counter(
            "kumoauth_tls_handshakes", "TLS handshakes completed", registry=r
        )
        self.tls_failures = Counter(
            "kumoauth_tls_handshake_failures", "TLS handshakes that failed", registry=r
        )
        self.reloads = Counter(
            "kumoauth_reloads", "Configuration reloads (SIGHUP)", ["result"], registry=r
        )
        self.queue_messages = Gauge(
            "kumoauth_queue_messages",
            "Messages in the queue by state (queued, deferred, held)",
            ["state"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.queue_oldest = Gauge(
            "kumoauth_queue_oldest_seconds",
            "Age of the oldest message in the queue by state",
            ["state"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.relay_attempts = Counter(
            "kumoauth_relay_attempts",
            "Delivery attempts to the upstream by result (delivered, deferred, bounced)",
            ["result"],
            registry=r,
        )
        self.relay_latency = Histogram(
            "kumoauth_relay_latency_seconds",
            "Time one message took to hand to the upstream (connect included)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )


class MetricsResource(resource.Resource):
    """
    ``GET /metrics`` in the Prometheus text format.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


def site_root(metrics: Metrics) -> resource.Resource:
    root = resource.Resource()
    root.putChild(b"metrics", MetricsResource(metrics.registry))
    return root


def multiprocess_site_root(path: str) -> resource.Resource:
    """
    ``/metrics`` summed over the worker processes that write to *path*.
    """
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    root = resource.Resource()
    root.putChild(b"metrics", MetricsResource(registry))
    return root
