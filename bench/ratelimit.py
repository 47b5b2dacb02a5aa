"""ngx_infer_ratelimit benchmark: what a limit costs a proxied request.

    /usr/bin/python3 bench/ratelimit.py               # 5 rounds of 4 s
    /usr/bin/python3 bench/ratelimit.py --quick       # 2 rounds of 2 s
    /usr/bin/python3 bench/ratelimit.py --tokens      # tokens, corrections
    /usr/bin/python3 bench/ratelimit.py --tokens --hot   # one key for all

wrk (one CPU) drives three gateways (the other CPU, one worker each, with
the backend and redis-server on that CPU too) in interleaved rounds:

  plain        proxy_pass to a fast static backend, no module
  local        the rate-limit module alone, one requests limit keyed by a
               header, counted in a shared-memory zone
  redis        the same limit counted in a redis-server on loopback

Each request carries one of 10,000 keys (X-Key: k1 ... k10000, in turn),
so Redis and the zone hold 10,000 live keys (10,000 requests per hour
per key: a key's bucket takes long enough to refill that it stays live
through the run, and no key comes near its limit, so nothing is refused;
a refusal would not reach the backend and would look cheap).  Reported per gateway: the median over rounds of req/s, p50, p99
and the gateway worker's CPU per request, their ratio to plain, Redis's
own CPU per request, and Redis commands per request from INFO
commandstats (EVALSHA is one; the script's own GET/SET/TIME are counted
by Redis apart and listed).  Loopback only.

--tokens: the requests are chat completions (POST, a JSON body naming a
model, max_tokens 64) through the route module too, and the limit is a
tokens limit: each answer's usage (11 tokens) corrects its reservation,
so Redis sees admissions and corrections.  The gateways are then plain,
redis-each (each request's correction sent at once: coalesce=off),
redis-alone (corrections coalesced, each admission its own call:
batch=off), redis (the defaults: corrections coalesced for 10 ms,
admissions that wait for the one in flight batched) and approx (the
limit approximate=100ms: each worker syncs its keys with Redis every
100 ms instead of asking it about each request).  --hot: every
request has the same key (one tenant), so corrections ride with the
admissions of that key instead of being summed per key.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "t"))

from run import (BACKEND, cpu_ns, cpu_sample, fail,  # noqa: E402
                 master_and_workers, pin, to_us)
from harness.nginx import Nginx  # noqa: E402
from harness.redis import RedisServer  # noqa: E402

KEYS = 10000

LUA = """
local i = 0
request = function()
   i = i %% %d + 1
   wrk.headers["X-Key"] = "k" .. i
   return wrk.format(METHOD, "/v1/x", nil, BODY)
end
function done(summary, latency, requests)
   io.write(string.format('WRK_SUMMARY {"requests":%%d,"status":%%d}\\n',
            summary.requests, summary.errors.status))
end
""" % KEYS

GATEWAY = """
    upstream pool {{ server {backend}; keepalive 64;
                     keepalive_requests 1000000; }}
    {http}
    server {{
        listen 127.0.0.1:{{port}};
        access_log off;
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://pool;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            {location}
        }}
    }}
"""

LIMIT = ("infer_ratelimit on; infer_ratelimit_limit bench $http_x_key "
         "requests=10000/h;")

CHAT = ('{"model":"bench-model","max_tokens":64,"messages":'
        '[{"role":"user","content":"Say hello."}]}')

# every key could take 10^11 tokens an hour: nothing is refused, one
# key for all (--hot) included
TOKENS = ("infer_route on; infer_ratelimit on; "
          "infer_ratelimit_limit bench $http_x_key tokens=100000000000/h;")
MODEL = "infer_model bench-model upstream=pool;"


def configs(redis_addr, tokens):
    if tokens:
        redis = f"infer_ratelimit_redis {redis_addr} timeout=1s"
        return [
            ("plain", [], "", ""),
            ("redis-each", ["route", "ratelimit"],
             f"{redis} coalesce=off; {MODEL}", TOKENS),
            ("redis-alone", ["route", "ratelimit"],
             f"{redis} batch=off; {MODEL}", TOKENS),
            ("redis", ["route", "ratelimit"], f"{redis}; {MODEL}", TOKENS),
            ("approx", ["route", "ratelimit"], f"{redis}; {MODEL}",
             TOKENS.replace("/h;", "/h approximate=100ms;")),
        ]
    return [
        ("plain", [], "", ""),
        ("local", ["ratelimit"], "infer_ratelimit_zone rl:16m;", LIMIT),
        ("redis-alone", ["ratelimit"],
         f"infer_ratelimit_redis {redis_addr} timeout=1s batch=off;", LIMIT),
        ("redis", ["ratelimit"],
         f"infer_ratelimit_redis {redis_addr} timeout=1s;", LIMIT),
    ]


def parse_wrk(text):
    """req/s, requests, p50 and p99 (None when wrk printed no such line),
    errors: the fields of wrk's report this bench needs."""
    def num(pattern):
        m = re.search(pattern, text, re.M)
        if not m:
            fail(f"no {pattern!r} in wrk output:\n{text}")
        return m

    out = {"rps": float(num(r"^Requests/sec:\s+([\d.]+)").group(1)),
           "requests": int(num(r"^\s+(\d+) requests in").group(1))}
    for p in ("50", "99"):
        m = re.search(r"^\s+%s%%\s+([\d.]+)(us|ms|s|m|h)\b" % p, text, re.M)
        out[f"p{p}_us"] = to_us(m.group(1), m.group(2)) if m else None
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), "
                       r"write (\d+), timeout (\d+)", text)
    status = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["errors"] = (sum(int(x) for x in errors.groups()) if errors else 0) \
        + (int(status.group(1)) if status else 0)
    return out


def redis_calls(client):
    return {k[len("cmdstat_"):]: v["calls"]
            for k, v in client.info("commandstats").items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=4)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokens", action="store_true")
    ap.add_argument("--hot", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.duration = 2, 2
    keys = 1 if args.hot else KEYS

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        fail("need 2 CPUs")
    server_cpu, client_cpu = {cpus[0]}, cpus[1]

    work = Path(tempfile.mkdtemp(prefix="infer-bench-rl-"))
    lua = work / "keys.lua"
    lua.write_text(
        LUA.replace("%d" % KEYS, str(keys), 1).replace(
            "METHOD", '"POST"' if args.tokens else '"GET"').replace(
            "BODY", "'%s'" % CHAT if args.tokens else "nil"))
    started = []
    try:
        mine = os.sched_getaffinity(0)
        os.sched_setaffinity(0, server_cpu)
        try:
            redis = RedisServer(work / "redis").start()
            started.append(redis)
            backend = Nginx(work / "backend", http=BACKEND, modules=[],
                            workers=1, error_level="warn").start()
            started.append(backend)
            gws = {}
            for name, mods, http, loc in configs(redis.addr, args.tokens):
                gws[name] = Nginx(work / name, http=GATEWAY.format(
                    backend=backend.addr, http=http, location=loc),
                    modules=mods, workers=1, error_level="warn").start()
                started.append(gws[name])
        finally:
            os.sched_setaffinity(0, mine)
        for n in started:
            pin(n.proc.pid, server_cpu)
        for n in gws.values():
            for pid in master_and_workers(n):
                pin(pid, server_cpu)

        client = redis.client()
        runs = {name: [] for name in gws}
        for rnd in range(args.rounds + 1):       # round 0 warms up
            for name, n in gws.items():
                worker = n.worker_pids()[0]
                c0 = cpu_sample([worker])
                r0 = cpu_ns(redis.proc.pid)
                k0 = redis_calls(client)
                out = subprocess.run(
                    ["taskset", "-c", str(client_cpu), "wrk", "-t1",
                     f"-c{args.connections}", f"-d{args.duration}s",
                     "--latency", "-s", str(lua), n.url + "/",
                     "-H", "Content-Type: application/json"],
                    capture_output=True, text=True, timeout=120).stdout
                c1 = cpu_sample([worker])
                r1 = cpu_ns(redis.proc.pid)
                k1 = redis_calls(client)
                w = parse_wrk(out)
                if w["errors"]:
                    fail(f"{name}: errors in wrk output:\n{out}")
                if n.worker_pids() != [worker]:
                    fail(f"{name}: the worker was replaced")
                if rnd == 0:
                    continue
                reqs = w["requests"]
                runs[name].append({
                    "rps": w["rps"], "p50": w["p50_us"], "p99": w["p99_us"],
                    "cpu_us": (c1["ns"] - c0["ns"]) / 1e3 / reqs,
                    "redis_cpu_us": (r1 - r0) / 1e3 / reqs,
                    "cmds": {k: (k1.get(k, 0) - k0.get(k, 0)) / reqs
                             for k in k1 if k1.get(k, 0) != k0.get(k, 0)},
                })
        for n in started:
            if hasattr(n, "log_problems") and n.log_problems():
                fail("nginx error log:\n" + "\n".join(n.log_problems()))

        def median(vals):
            vals = [v for v in vals if v is not None]
            return statistics.median(vals) if vals else float("nan")

        med = {name: {k: median(r[k] for r in rs)
                      for k in ("rps", "p50", "p99", "cpu_us",
                                "redis_cpu_us")}
               for name, rs in runs.items()}
        base = med["plain"]
        print(f"rate-limit bench: {args.rounds} rounds x {args.duration}s, "
              f"{args.connections} connections, {keys} distinct keys, "
              f"{'a tokens' if args.tokens else 'a requests'} limit, "
              "1 worker per gateway")
        print(f"{'gateway':10} {'req/s':>9} {'ratio':>6} {'p50 us':>8} "
              f"{'p99 us':>8} {'cpu us/req':>10} {'ratio':>6} "
              f"{'redis cpu us/req':>16}")
        for name, m in med.items():
            print(f"{name:10} {m['rps']:9.0f} {m['rps'] / base['rps']:6.2f} "
                  f"{m['p50']:8.0f} {m['p99']:8.0f} {m['cpu_us']:10.1f} "
                  f"{m['cpu_us'] / base['cpu_us']:6.2f} "
                  f"{m['redis_cpu_us']:16.1f}")
        for name in runs:
            if name == "plain" or name == "local":
                continue
            cmds = runs[name][-1]["cmds"]
            print(f"redis commands per request (last round, {name}): "
                  + ", ".join(f"{k}={v:.3f}"
                              for k, v in sorted(cmds.items())))
        print(f"live keys in redis: {client.dbsize()}")
    finally:
        for n in reversed(started):
            n.stop()


if __name__ == "__main__":
    main()
