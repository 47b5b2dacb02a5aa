-- wrk script for bench/run.py: POST an OpenAI-style chat completion
-- request, and print an exact machine-readable summary at the end.
--
-- The body is the small one below, or the contents of the file named by
-- the environment variable BENCH_BODY_FILE (run.py writes each body of a
-- run into its work directory and sets it; every run sets it, "small"
-- included).  The file is read once, when wrk loads the script.
--
-- Only wrk.method/path/headers/body are set (no request()/response()
-- functions), so wrk keeps its fast path: one pre-built request, and
-- responses are parsed only as far as HTTP framing.

wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer bench-token"
wrk.body = '{"model":"llama-3-8b","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello."}],"max_tokens":16,"stream":false}'

local body_file = os.getenv("BENCH_BODY_FILE")
if body_file and body_file ~= "" then
   local f = assert(io.open(body_file, "rb"))
   wrk.body = f:read("*a")
   f:close()
end

-- run.py reads this line (the text report is parsed too, and the two are
-- cross-checked).  Latencies are in microseconds; body_bytes is the size
-- of the body sent, which run.py checks against the file it wrote.
function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRK_SUMMARY {"requests":%.0f,"bytes":%.0f,"duration_us":%.0f,"body_bytes":%d,' ..
      '"errors":{"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f},' ..
      '"latency_us":{"mean":%.3f,"max":%.0f,"p50":%.0f,"p90":%.0f,"p99":%.0f}}\n',
      summary.requests, summary.bytes, summary.duration, #wrk.body,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency.max,
      latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
