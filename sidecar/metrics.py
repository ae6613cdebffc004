"""Metric definitions, created on an injected registry (tests build a fresh one each time).

Label values come from small fixed sets and are pre-initialised, so dashboards see
zeros instead of gaps. No label ever carries a user id, a token or a secret.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: `reason` values of reditus_sidecar_token_errors_total: the API error codes.
ERROR_REASONS = (
    "not_found",
    "method_not_allowed",
    "caller_not_allowed",
    "missing_request_header",
    "browser_origin",
    "host_not_allowed",
    "unsupported_media_type",
    "too_large",
    "request_timeout",
    "invalid_json",
    "invalid_request",
    "unknown_product",
    "secret_unavailable",
    "audit_unavailable",
    "internal",
)
ENDPOINTS = ("token", "other")
#: `listener` values: the signing TCP listener, the signing unix socket, the ops listener.
LISTENERS = ("signing", "signing_unix", "ops")
REFRESH_RESULTS = ("changed", "unchanged", "error")
LOGIN_METHODS = ("token", "approle", "kubernetes", "jwt", "cert")
RESULTS = ("success", "error")
#: `reason` values of reditus_sidecar_audit_errors_total: records lost (`exit`: still queued
#: when the process stopped and the target did not take them in time)
AUDIT_ERRORS = ("write", "queue_full", "exit")

# Signing on loopback takes tens of microseconds; the low buckets resolve that.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
# Items per transit batch_input call (powers of two up to the coalescer's cap and above).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Every metric the sidecar exports."""

    def __init__(self, registry: CollectorRegistry, products: Iterable[str], version: str) -> None:
        self.registry = registry
        self.tokens_issued = Counter(
            "reditus_sidecar_tokens_issued",
            "Tokens signed, by product.",
            ["product"],
            registry=registry,
        )
        self.token_errors = Counter(
            "reditus_sidecar_token_errors",
            "Signing requests refused or failed, by error code.",
            ["reason"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "reditus_sidecar_request_duration_seconds",
            "Time to answer a signing-listener request.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.secret_version = Gauge(
            "reditus_sidecar_secret_version",
            "Version of the secret in use (KV version; for files, a load count from 1).",
            ["product"],
            registry=registry,
        )
        self.secret_last_success = Gauge(
            "reditus_sidecar_secret_last_refresh_success_timestamp_seconds",
            "Unix time of the last successful secret read.",
            ["product"],
            registry=registry,
        )
        self.secret_loaded = Gauge(
            "reditus_sidecar_secret_loaded_timestamp_seconds",
            "Unix time the secret in use was loaded (changes at each rotation).",
            ["product"],
            registry=registry,
        )
        self.secret_refresh = Counter(
            "reditus_sidecar_secret_refresh",
            "Secret reads, by result.",
            ["product", "result"],
            registry=registry,
        )
        self.vault_login = Counter(
            "reditus_sidecar_vault_login",
            "Vault logins, by auth method and result.",
            ["method", "result"],
            registry=registry,
        )
        self.vault_token_renewal = Counter(
            "reditus_sidecar_vault_token_renewal",
            "Vault token renewals, by result.",
            ["result"],
            registry=registry,
        )
        self.vault_token_expiry = Gauge(
            "reditus_sidecar_vault_token_expiry_timestamp_seconds",
            "Unix time the current Vault token expires (0: no expiry or no token).",
            registry=registry,
        )
        self.vault_client_cert_reload = Counter(
            "reditus_sidecar_vault_client_cert_reload",
            "Loads of a changed VAULT_CLIENT_CERT/KEY pair, by result (error: the previous "
            "pair stays in use).",
            ["result"],
            registry=registry,
        )
        self.vault_client_cert_expiry = Gauge(
            "reditus_sidecar_vault_client_cert_expiry_timestamp_seconds",
            "Unix time the client certificate in use expires (0: no client certificate).",
            registry=registry,
        )
        self.ready = Gauge(
            "reditus_sidecar_ready",
            "1 when every product has a usable secret, else 0.",
            registry=registry,
        )
        self.requests_in_flight = Gauge(
            "reditus_sidecar_requests_in_flight",
            "Signing requests being handled now (a SIGTERM drain waits for them).",
            registry=registry,
        )
        self.http_connections = Gauge(
            "reditus_sidecar_http_connections",
            "Open connections, by listener.",
            ["listener"],
            registry=registry,
        )
        self.http_connections_refused = Counter(
            "reditus_sidecar_http_connections_refused",
            "New connections closed at once: the listener was full and none could make room.",
            ["listener"],
            registry=registry,
        )
        self.http_connections_evicted = Counter(
            "reditus_sidecar_http_connections_evicted",
            "Connections not in a request closed to admit a new one (listener full).",
            ["listener"],
            registry=registry,
        )
        self.http_protocol_errors = Counter(
            "reditus_sidecar_http_protocol_errors",
            "Requests refused before routing: malformed HTTP, headers over the limits, Expect.",
            ["listener"],
            registry=registry,
        )
        self.audit_records = Counter(
            "reditus_sidecar_audit_records",
            "Issuance audit records written.",
            registry=registry,
        )
        self.audit_errors = Counter(
            "reditus_sidecar_audit_errors",
            "Issuance audit records not written: the target failed, or the queue was full.",
            ["reason"],
            registry=registry,
        )
        self.build_info = Gauge(
            "reditus_sidecar_build_info",
            "Always 1; the version label says which build runs.",
            ["version"],
            registry=registry,
        )
        # --- transit mode (REDITUS_SIDECAR_SECRET_SOURCE=transit) ---
        self.transit_batch_size = Histogram(
            "reditus_sidecar_transit_batch_size",
            "Signing inputs per transit HMAC call (concurrent tokens are coalesced).",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.transit_call_duration = Histogram(
            "reditus_sidecar_transit_call_duration_seconds",
            "Round trip of one transit HMAC call to Vault.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.transit_calls = Counter(
            "reditus_sidecar_transit_calls",
            "Transit HMAC calls, by result (an error opens the breaker: signing answers 503).",
            ["result"],
            registry=registry,
        )
        for result in RESULTS:
            self.transit_calls.labels(result=result)
        self.build_info.labels(version=version).set(1)
        for reason in ERROR_REASONS:
            self.token_errors.labels(reason=reason)
        for reason in AUDIT_ERRORS:
            self.audit_errors.labels(reason=reason)
        for endpoint in ENDPOINTS:
            self.request_duration.labels(endpoint=endpoint)
        for method in LOGIN_METHODS:
            for result in RESULTS:
                self.vault_login.labels(method=method, result=result)
        for result in RESULTS:
            self.vault_token_renewal.labels(result=result)
            self.vault_client_cert_reload.labels(result=result)
        for listener in LISTENERS:
            self.http_connections_refused.labels(listener=listener)
            self.http_connections_evicted.labels(listener=listener)
            self.http_protocol_errors.labels(listener=listener)
        for product in products:
            self.tokens_issued.labels(product=product)
            self.secret_version.labels(product=product)
            self.secret_last_success.labels(product=product)
            self.secret_loaded.labels(product=product)
            for result in REFRESH_RESULTS:
                self.secret_refresh.labels(product=product, result=result)

    def track_readiness(self, is_ready: Callable[[], bool]) -> None:
        """Compute the ready gauge at scrape time: staleness changes with the clock."""
        self.ready.set_function(lambda: 1.0 if is_ready() else 0.0)
