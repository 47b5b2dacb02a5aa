-- wrk script for bench/run.py: POST a small OpenAI-style chat completion
-- request, and print an exact machine-readable summary at the end.
--
-- Only wrk.method/path/headers/body are set (no request()/response()
-- functions), so wrk keeps its fast path: one pre-built request, and
-- responses are parsed only as far as HTTP framing.

wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer bench-token"
wrk.body = '{"model":"bench-model","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello."}],"max_tokens":16,"stream":false}'

-- run.py reads this line (the text report is parsed too, and the two are
-- cross-checked).  Latencies are in microseconds.
function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRK_SUMMARY {"requests":%.0f,"bytes":%.0f,"duration_us":%.0f,' ..
      '"errors":{"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f},' ..
      '"latency_us":{"mean":%.3f,"max":%.0f,"p50":%.0f,"p90":%.0f,"p99":%.0f}}\n',
      summary.requests, summary.bytes, summary.duration,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency.max,
      latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
