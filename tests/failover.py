"""Signing load and metric sampling around Vault faults, shared by tests/test_vault_ha.py
and bench/failover.py.

A `SigningLoad` thread per sidecar sends requests back to back on one keep-alive
connection and checks every answer: a 200 whose token verifies with one of the secrets
written so far, nothing else. A `MetricsWatch` thread scrapes every sidecar's /metrics a
few times a second, so refresh gaps, errors and logins can be read afterwards.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from tests.support import signed_with

SAMPLE_EVERY = 0.1  # seconds between scrapes of one sidecar


@dataclass(eq=False)
class SigningLoad(threading.Thread):
    """Signing requests to one sidecar until stopped; a failure is anything but a 200
    with a token that verifies with a known secret."""

    api_url: str
    secrets: list[str] = field(repr=False)  # shared and appended to on rotation: newest last
    pause: float = 0.01  # between requests: a steady load, not a saturating one
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    first_seen: dict[int, float] = field(default_factory=dict)  # secret index -> monotonic
    _halt: threading.Event = field(default_factory=threading.Event, repr=False)

    def __post_init__(self) -> None:
        threading.Thread.__init__(self, daemon=True, name=f"load {self.api_url}")

    def run(self) -> None:
        url = urllib.parse.urlsplit(self.api_url)
        body = json.dumps({"userId": "u-failover"})
        headers = {"Content-Type": "application/json", "X-Sidecar-Request": "true"}
        conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
        while not self._halt.is_set():
            try:
                conn.request("POST", "/v1/token", body=body, headers=headers)
                response = conn.getresponse()
                payload = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                continue
            self._check(response.status, payload)
            self._halt.wait(self.pause)
        conn.close()

    def _check(self, status: int, payload: bytes) -> None:
        if status != 200:
            self.failures.append(f"{status} {payload[:200]!r}")
            return
        token = str(json.loads(payload).get("token", ""))
        for index in range(len(self.secrets) - 1, -1, -1):  # newest first: the common case
            if signed_with(token, self.secrets[index]):
                self.ok += 1
                self.first_seen.setdefault(index, time.monotonic())
                return
        self.failures.append(f"200 with a token no known secret verifies: {token[:40]}...")

    def stop(self) -> None:
        self._halt.set()
        self.join(15)


@dataclass(frozen=True)
class Sample:
    """One scrape of one sidecar (counters summed over their label sets)."""

    at: float  # monotonic
    refreshed: float  # reditus_sidecar_secret_refresh_total{result=~"changed|unchanged"}
    errors: float  # reditus_sidecar_secret_refresh_total{result="error"}
    last_success: float  # ..._secret_last_refresh_success_timestamp_seconds (wall clock)
    version: float  # reditus_sidecar_secret_version
    logins: float  # reditus_sidecar_vault_login_total, any result
    login_errors: float
    ready: float


def parse(text: str, at: float) -> Sample:
    values: dict[str, float] = {}

    def add(key: str, value: float) -> None:
        values[key] = values.get(key, 0.0) + value

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "reditus_sidecar_secret_refresh_total":
                add("errors" if s.labels.get("result") == "error" else "refreshed", s.value)
            elif s.name == "reditus_sidecar_vault_login_total":
                add("logins", s.value)
                if s.labels.get("result") == "error":
                    add("login_errors", s.value)
            elif s.name == "reditus_sidecar_secret_last_refresh_success_timestamp_seconds":
                add("last_success", s.value)
            elif s.name == "reditus_sidecar_secret_version":
                add("version", s.value)
            elif s.name == "reditus_sidecar_ready":
                add("ready", s.value)
    return Sample(
        at=at,
        refreshed=values.get("refreshed", 0.0),
        errors=values.get("errors", 0.0),
        last_success=values.get("last_success", 0.0),
        version=values.get("version", 0.0),
        logins=values.get("logins", 0.0),
        login_errors=values.get("login_errors", 0.0),
        ready=values.get("ready", 0.0),
    )


@dataclass(eq=False)
class MetricsWatch(threading.Thread):
    """Scrapes every sidecar's /metrics every SAMPLE_EVERY seconds."""

    metrics_urls: list[str]
    samples: list[list[Sample]] = field(default_factory=list)
    _halt: threading.Event = field(default_factory=threading.Event, repr=False)

    def __post_init__(self) -> None:
        threading.Thread.__init__(self, daemon=True, name="metrics watch")
        self.samples = [[] for _ in self.metrics_urls]
        for index in range(len(self.metrics_urls)):
            self._scrape(index)

    def _scrape(self, index: int) -> None:
        with contextlib.suppress(OSError):
            url = self.metrics_urls[index] + "/metrics"
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback
                text = response.read().decode()
            self.samples[index].append(parse(text, time.monotonic()))

    def run(self) -> None:
        while not self._halt.wait(SAMPLE_EVERY):
            for index in range(len(self.metrics_urls)):
                self._scrape(index)

    def latest(self, index: int) -> Sample:
        return self.samples[index][-1]

    def fresh(self, index: int) -> Sample:
        """A sample scraped now (not the sampler's last one)."""
        self._scrape(index)
        return self.latest(index)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


@dataclass(frozen=True)
class Gap:
    """One sidecar across one fault: its refresh gap, errors and the logins it cost."""

    seconds: float  # last successful refresh before the fault -> first one after it (wall)
    errors: float  # failed refreshes
    logins: float  # login attempts, any result


def gap(samples: list[Sample], start: float, end: float) -> Gap:
    """The refresh gap in the samples taken from `start` (the fault) to `end`: from the
    last success before the first failed refresh to the first success after the last one.
    0 s when no refresh failed (the fault fell between two reads)."""
    before = [s for s in samples if s.at < start]
    window = [s for s in samples if start <= s.at <= end]
    base = before[-1] if before else window[0]
    last = window[-1]
    failing = [
        (prev, s)
        for prev, s in zip([base, *window], window, strict=False)
        if s.errors > prev.errors
    ]
    if not failing:
        return Gap(0.0, 0.0, last.logins - base.logins)
    stalled_at = failing[0][0].last_success
    prev_error, final_error = failing[-1]
    if final_error.last_success > prev_error.last_success:  # failed, then read again in one scrape
        return Gap(
            final_error.last_success - stalled_at,
            last.errors - base.errors,
            last.logins - base.logins,
        )
    later = [s.last_success for s in window if s.at >= final_error.at]
    recovered = next((t for t in later if t > final_error.last_success), last.last_success)
    return Gap(recovered - stalled_at, last.errors - base.errors, last.logins - base.logins)
