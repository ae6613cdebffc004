"""The metric families as a scrape sees them: every fixed label value present from the start
(dashboards see zeros, not gaps), the documented latency buckets, build info and readiness."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from sidecar.metrics import Metrics


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_every_fixed_label_value_is_a_zero_from_the_start(registry: CollectorRegistry) -> None:
    Metrics(registry, ["a", "b"], "1.2.3")
    reasons = [
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
    ]
    for reason in reasons:
        assert value(registry, "reditus_sidecar_token_errors_total", reason=reason) == 0
    for method in ("token", "approle", "kubernetes", "jwt"):
        for result in ("success", "error"):
            assert (
                value(registry, "reditus_sidecar_vault_login_total", method=method, result=result)
                == 0
            )
    for result in ("success", "error"):
        assert value(registry, "reditus_sidecar_vault_token_renewal_total", result=result) == 0
    for listener in ("signing", "signing_unix", "ops"):
        for family in ("refused", "evicted"):
            name = f"reditus_sidecar_http_connections_{family}_total"
            assert value(registry, name, listener=listener) == 0
        assert value(registry, "reditus_sidecar_http_protocol_errors_total", listener=listener) == 0
    for product in ("a", "b"):
        assert value(registry, "reditus_sidecar_tokens_issued_total", product=product) == 0
        for gauge in (
            "reditus_sidecar_secret_version",
            "reditus_sidecar_secret_last_refresh_success_timestamp_seconds",
            "reditus_sidecar_secret_loaded_timestamp_seconds",
        ):
            assert value(registry, gauge, product=product) == 0
        for result in ("changed", "unchanged", "error"):
            name = "reditus_sidecar_secret_refresh_total"
            assert value(registry, name, product=product, result=result) == 0
    for endpoint in ("token", "other"):
        name = "reditus_sidecar_request_duration_seconds_count"
        assert value(registry, name, endpoint=endpoint) == 0
    assert value(registry, "reditus_sidecar_build_info", version="1.2.3") == 1


def bucket_bounds(registry: CollectorRegistry, histogram: str, label: str = "") -> list[str]:
    """The `le` values a scrape shows for one histogram (and one label value, if given)."""
    Metrics(registry, ["a"], "v")
    return [
        line.split('le="')[1].split('"')[0]
        for line in generate_latest(registry).decode().splitlines()
        if line.startswith(f"{histogram}_bucket") and label in line
    ]


def test_latency_buckets_are_the_documented_ones(registry: CollectorRegistry) -> None:
    """100 us to 1 s: a token takes microseconds, a slow answer shows in the upper buckets."""
    les = bucket_bounds(registry, "reditus_sidecar_request_duration_seconds", 'endpoint="token"')
    assert les == [
        "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05",
        "0.1", "0.25", "0.5", "1.0", "+Inf",
    ]  # fmt: skip


def test_transit_batch_buckets_are_powers_of_two_up_to_the_batch_cap(
    registry: CollectorRegistry,
) -> None:
    """One bucket per doubling, up to 256 (a batch call carries at most 64 inputs, and one of
    256 or more would show in +Inf)."""
    les = bucket_bounds(registry, "reditus_sidecar_transit_batch_size")
    assert les == [*(f"{2**n:.1f}" for n in range(9)), "+Inf"]


def test_ready_is_computed_at_scrape_time(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry, ["a"], "v")
    state = [False]
    metrics.track_readiness(lambda: state[0])
    assert value(registry, "reditus_sidecar_ready") == 0
    state[0] = True
    assert value(registry, "reditus_sidecar_ready") == 1
