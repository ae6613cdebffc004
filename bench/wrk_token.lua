-- wrk script: POST a signing request with the headers the sidecar requires, and print
-- one machine-readable summary line (latencies in microseconds) for bench/common.py.
wrk.method = "POST"
wrk.body = '{"userId":"u-123"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Sidecar-Request"] = "true"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH %d %d %d %d %d %d\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
