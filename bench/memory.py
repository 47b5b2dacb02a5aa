"""ngx_infer_route memory benchmark: what a long stream whose usage chunk
is removed, and large rewritten bodies, cost the gateway worker in memory.

Each case runs plain proxy_pass (nginx without ngx_infer) and the route
module side by side, one gateway each with one worker, in interleaved
rounds (the order rotates), and reports the growth of the worker's
resident memory over the run: its peak (VmHWM, reset before each run by
writing 5 to /proc/PID/clear_refs) less its RSS just before.

1. stream: one streamed chat answer of --stream-mb MB (content chunks of
   about 4 KB, a "pad" field from the simulator's x-sim-pad-bytes), read
   as fast as it comes; the route gateway has infer_stream_include_usage
   on and the client does not ask for usage, so every chunk goes through
   the filter that removes the usage chunk and "usage": null.
2. bodies: --clients concurrent POSTs of --body-mb MB (spilled to a temp
   file at client_body_buffer_size 16k) naming an alias, so that the
   route gateway rewrites each body for the backend (the model id); the
   backend (the simulator) holds each request --stall-ms before it answers,
   as a model would, so that the 20 are in the gateway at once.

Before the runs that count, one warm-up run per gateway and case: the
route module keeps a scratch buffer per worker for the scan, as large as
the largest body scanned, and that is counted once, in the warm-up.  Each
stream runs on a fresh worker (the gateway is reloaded first): memory an
earlier stream freed in small pieces stays resident in the heap, and the
next stream would reuse it without any growth to see.

    /usr/bin/python3 bench/memory.py                 # 3 rounds, ~1 min
    /usr/bin/python3 bench/memory.py --rounds 5 --stream-mb 100
    INFER_MODULES_DIR=/elsewhere/modules /usr/bin/python3 bench/memory.py

Checks: every answer is 200 and complete (the stream ends with
data: [DONE] and, through the route gateway, carries no usage), and no
error log has an [alert], an [emerg] or a worker that exited on a signal.
"""

import argparse
import http.client
import json
import re
import statistics
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench_run  # noqa: E402, F401  (puts t/ on sys.path)

from harness.nginx import Nginx  # noqa: E402
from harness.simproc import SimProcess  # noqa: E402

MODEL = "llama-3-8b"
PAD = 4000

GATEWAY = """
    upstream pool {{ server {backend}; keepalive 32; }}
    {http}
    server {{
        listen 127.0.0.1:{{port}};
        access_log off;
        client_body_buffer_size 16k;
        client_max_body_size 256m;
        location / {{
            proxy_pass {target};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            {location}
        }}
    }}
"""

ROUTE_HTTP = f"infer_model {MODEL} upstream=pool alias=llama3;"
ROUTE_LOCATION = "infer_route on; infer_stream_include_usage on;"


def kb(pid, field):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def gateway(work, name, backend, route):
    n = Nginx(work / name, workers=1, error_level="warn",
              modules=["route"] if route else [],
              http=GATEWAY.format(
                  backend=backend,
                  http=ROUTE_HTTP if route else "",
                  target="http://$infer_upstream" if route
                  else "http://pool",
                  location=ROUTE_LOCATION if route else ""))
    return n.start()


def stream_once(gw, mb, route):
    tokens = max(1, mb * 1000 * 1000 // (PAD + 200))
    body = json.dumps({"model": MODEL, "stream": True, "max_tokens": tokens,
                       "messages": [{"role": "user", "content": "hi"}]})
    c = http.client.HTTPConnection(gw.host, gw.port, timeout=300)
    c.request("POST", "/v1/chat/completions", body,
              {"content-type": "application/json",
               "x-sim-pad-bytes": str(PAD),
               "x-sim-completion-tokens": str(tokens)})
    r = c.getresponse()
    total, tail = 0, b""
    while True:
        chunk = r.read(1 << 16)
        if not chunk:
            break
        total += len(chunk)
        tail = (tail + chunk)[-4096:]
    c.close()
    if r.status != 200 or not tail.endswith(b"data: [DONE]\n\n"):
        raise RuntimeError(f"stream: {r.status}, ends {tail[-80:]!r}")
    if route and re.search(rb'"usage": ?\{', tail):
        raise RuntimeError("stream: the usage chunk reached the client")
    return total


def bodies_once(gw, mb, clients, payload, stall):
    errors = []

    def one():
        try:
            c = http.client.HTTPConnection(gw.host, gw.port, timeout=300)
            c.request("POST", "/v1/chat/completions", payload,
                      {"content-type": "application/json",
                       "x-sim-stall-ms": str(stall)})
            r = c.getresponse()
            r.read()
            if r.status != 200:
                errors.append(r.status)
            c.close()
        except OSError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=one) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"bodies: {errors[:3]}")
    return clients * len(payload)


def measure(gw, fn):
    pid = gw.worker_pids()[0]
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = kb(pid, "VmRSS")
    fn()
    if gw.worker_pids() != [pid]:
        raise RuntimeError(f"{gw.workdir.name}: the worker was replaced")
    return (kb(pid, "VmHWM") - before) / 1024.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stream-mb", type=int, default=100)
    ap.add_argument("--body-mb", type=int, default=15)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--stall-ms", type=int, default=2000)
    ap.add_argument("--only", default="stream,bodies")
    args = ap.parse_args()
    cases = args.only.split(",")

    work = Path(tempfile.mkdtemp(prefix="ngx_infer_memory."))
    sim = SimProcess(MODEL, "mem-a", work / "sim", ttft_ms=0, tpot_ms=0,
                     max_tokens_cap=10 ** 6, max_concurrency=64).start()
    gws = {}
    try:
        for case in cases:
            addr = sim.addr
            gws[case] = {"plain": gateway(work, case + "-plain", addr, False),
                         "route": gateway(work, case + "-route", addr, True)}

        filler = "y" * (args.body_mb * 1024 * 1024)
        payload = json.dumps({"model": "llama3", "messages": [
            {"role": "user", "content": filler}]}).encode()

        def one_run(case, name):
            gw = gws[case][name]
            if case == "stream":
                # a fresh worker: what an earlier stream freed stays in
                # its heap and would hide the growth of the next one
                gw.reload()
                return measure(gw, lambda: stream_once(gw, args.stream_mb,
                                                       name == "route"))
            return measure(gw, lambda: bodies_once(gw, args.body_mb,
                                                   args.clients, payload,
                                                   args.stall_ms))

        results = {c: {"plain": [], "route": []} for c in cases}
        warm = {c: {n: one_run(c, n) for n in ("plain", "route")}
                for c in cases}
        for i in range(args.rounds):
            for case in cases:
                order = ["plain", "route"][::1 if i % 2 == 0 else -1]
                for name in order:
                    mb = one_run(case, name)
                    results[case][name].append(mb)
                    print(f"round {i + 1} {case:6} {name:5} "
                          f"+{mb:8.1f} MB", flush=True)

        print()
        print(f"worker peak RSS growth per run, MB (median of {args.rounds};"
              " warm-up in brackets)")
        what = {"stream": f"one {args.stream_mb} MB stream, usage removed",
                "bodies": f"{args.clients} x {args.body_mb} MB bodies, "
                          f"rewritten (alias), spilled"}
        for case in cases:
            p = statistics.median(results[case]["plain"])
            r = statistics.median(results[case]["route"])
            print(f"  {what[case]}:")
            for name, v in (("plain proxy_pass", p), ("route", r)):
                key = name.split()[0]
                runs = ", ".join(f"{x:.1f}" for x in results[case][key])
                print(f"    {name:16}  +{v:8.1f}  [{warm[case][key]:.1f}]"
                      f"   runs {runs}")
            print(f"    route - plain     {r - p:+8.1f}")

        problems = []
        for pair in gws.values():
            for gw in pair.values():
                problems += gw.log_problems()
        if problems:
            print("\n".join(problems))
            return 1
        return 0
    finally:
        for pair in gws.values():
            for gw in pair.values():
                gw.stop()
        sim.stop()


if __name__ == "__main__":
    sys.exit(main())
