"""What a request costs the gateway with every ngx_infer module on: the
table of issue 16, in one run.

    /usr/bin/python3 bench/cost.py                  # 5 rounds x 5 s, ~5 min
    /usr/bin/python3 bench/cost.py --quick          # 2 rounds x 2 s
    /usr/bin/python3 bench/cost.py --rounds 9 --only plain,all-zone
    INFER_MODULES_DIR=/tmp/mods /usr/bin/python3 bench/cost.py ...

wrk (-t1 -c32) runs on CPU 1; the gateways (one worker each), the static
backend nginx and redis-server run on CPU 0.  Two cases, each compared with
its own baseline, in interleaved rounds (the order rotates every round):

  chat: a 400-byte chat request (POST /v1/chat/completions) carrying an
        RS256 JWT; the backend answers a 258-byte JSON with usage.
    plain      proxy_pass http://pool; nothing of ngx_infer
    all-zone   route + auth (the JWT checked against an RSA 2048 key, iss
               and aud, the token cache on: its default) + ratelimit (one
               requests and one tokens limit per tenant, in a shared-memory
               zone) + metrics on; proxy_pass http://$infer_upstream
    all-redis  the same, the limits counted in Redis (timeout=1s, coalesce
               left at its default)

  sse:  the same request with "stream": true; the backend answers a chat
        stream (text/event-stream, 40 content chunks, [DONE]) of ~7.9 KB.
    plain-sse  proxy_pass, proxy_buffering off, the stream the backend
               sends when not asked for usage
    route-sse  the route module with infer_stream_include_usage on: the
               backend is asked for usage and sends the stream it sends
               then (each chunk with "usage":null, and a usage chunk); the
               module takes the usage and removes them, so the client gets
               the very bytes plain-sse's client gets (checked)

  sse-chunked: the same pair, plain-ssec and route-ssec, the backend
        streaming without Content-Length (chunked), as model servers do

Per run: req/s, p50, p99 and the gateway worker's CPU µs per request, from
/proc/PID/schedstat (ns) over the requests wrk completed.  Reported: the
medians over rounds, their ratio to the case's baseline, and the paired
ratio (median over rounds of the ratio of two runs seconds apart) with its
range, and min/min.  --base-modules DIR measures every config with
modules again with DIR's modules (NAME@base): before and after in one
run.  --perf and --callgrind profile one config instead (bench/README.md).
Checks (the run stops): a wrk error or non-2xx, a response of
another size than the preflight's, a replaced worker, [alert]/[emerg].
"""

import argparse
import datetime
import http.client
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "t"))

import run  # noqa: E402
from harness.nginx import Nginx, module_path  # noqa: E402
from harness.redis import RedisServer  # noqa: E402

ISSUER = "https://idp.bench.invalid"
AUDIENCE = "inference"
MODEL = run.MODEL
CHUNKS = 40

LUA = r"""
wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
local f = assert(io.open("%s", "rb"))
wrk.body = f:read("*a")
f:close()
function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRK_SUMMARY {"requests":%%.0f,"bytes":%%.0f,"errors":%%.0f}\n',
      summary.requests, summary.bytes,
      e.connect + e.read + e.write + e.status + e.timeout))
end
"""

GATEWAY = """
    upstream pool {{ server {backend}; keepalive 64;
                     keepalive_requests 1000000; }}
    {http}
    server {{
        listen 127.0.0.1:{{port}};
        access_log off;
        keepalive_requests 1000000;
        client_body_buffer_size 16k;
        client_max_body_size 64m;
        location / {{
            proxy_pass {target};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            {location}
        }}
    }}
"""

ALL_HTTP = (
    f"infer_model {MODEL} upstream=pool; "
    "infer_auth_jwt_key {key} kid=bench-rsa; "
    f"infer_auth_issuer {ISSUER}; infer_auth_audience {AUDIENCE}; "
    # never reached: nothing is refused (a refusal would look cheap)
    "infer_ratelimit_limit tenant_rph $infer_tenant requests=1000000000/h; "
    "infer_ratelimit_limit tenant_tph $infer_tenant "
    "tokens=100000000000/h; ")
ALL_LOCATION = ("infer_route on; infer_auth on; infer_ratelimit on; "
                "infer_metrics on;")
ALL_MODULES = ["route", "auth", "ratelimit", "metrics"]


def sse_chunk(i, last, usage_null):
    delta = ('{"role":"assistant","content":""}' if i == 0
             else '{"content":" word%d"}' % i)
    c = ('{"id":"chatcmpl-bench","object":"chat.completion.chunk",'
         '"created":1700000000,"model":"%s","choices":[{"index":0,'
         '"delta":%s,"logprobs":null,"finish_reason":%s}]'
         % (MODEL, delta, '"stop"' if last else "null"))
    if usage_null:
        c += ',"usage":null'
    return "data: " + c + "}\n\n"


def sse_stream(with_usage):
    """The stream a backend sends without usage asked, or with it."""
    out = [sse_chunk(i, i == CHUNKS - 1, with_usage) for i in range(CHUNKS)]
    if with_usage:
        out.append('data: {"id":"chatcmpl-bench","object":'
                   '"chat.completion.chunk","created":1700000000,"model":'
                   '"%s","choices":[],"usage":{"prompt_tokens":57,'
                   '"completion_tokens":%d,"total_tokens":%d}}\n\n'
                   % (MODEL, CHUNKS, 57 + CHUNKS))
    out.append("data: [DONE]\n\n")
    return "".join(out)


def nginx_quote(text):
    assert "\\" not in text and "'" not in text and "$" not in text
    return "'" + text.replace("\n", "\\n") + "'"


def nginx_return(name, text):
    """set and return lines that answer text: a parameter of nginx's
    configuration is at most 4 KB, so the text goes in parts."""
    parts = [text[i:i + 3000] for i in range(0, len(text), 3000)]
    sets = " ".join(f"set ${name}{i} {nginx_quote(p)};"
                    for i, p in enumerate(parts))
    return sets + ' return 200 "' + "".join(
        f"${name}{i}" for i in range(len(parts))) + '";'


BACKEND = """
    server {
        listen 127.0.0.1:{port};
        access_log off;
        keepalive_requests 1000000;
        location / { default_type application/json; return 200 %s; }
        location /sse/ { default_type text/event-stream; %s }
        location /sse-usage/ { default_type text/event-stream; %s }
        # as a model server streams, without Content-Length: chunked, as
        # a sub_filter that never matches makes nginx send it
        location /ssec/ { default_type text/event-stream; %s
                          sub_filter_types text/event-stream;
                          sub_filter "@@never@@" ""; }
        location /ssec-usage/ { default_type text/event-stream; %s
                                sub_filter_types text/event-stream;
                                sub_filter "@@never@@" ""; }
    }
""" % (nginx_quote(run.BACKEND_BODY), nginx_return("p", sse_stream(False)),
       nginx_return("u", sse_stream(True)),
       nginx_return("p", sse_stream(False)),
       nginx_return("u", sse_stream(True)))


def configs(key, redis_addr):
    http = ALL_HTTP.replace("{key}", str(key))
    sse = "proxy_buffering off;"
    return {
        "chat": [
            ("plain", [], "", "http://pool", ""),
            ("all-zone", ALL_MODULES, http + "infer_ratelimit_zone rl:16m;",
             "http://$infer_upstream", ALL_LOCATION),
            ("all-redis", ALL_MODULES,
             http + f"infer_ratelimit_redis {redis_addr} timeout=1s;",
             "http://$infer_upstream", ALL_LOCATION),
        ],
        "sse": [
            ("plain-sse", [], "", "http://pool/sse/", sse),
            ("route-sse", ["route"], f"infer_model {MODEL} upstream=pool;",
             "http://$infer_upstream/sse-usage/",
             "infer_route on; infer_stream_include_usage on; " + sse),
        ],
        "sse-chunked": [
            ("plain-ssec", [], "", "http://pool/ssec/", sse),
            ("route-ssec", ["route"], f"infer_model {MODEL} upstream=pool;",
             "http://$infer_upstream/ssec-usage/",
             "infer_route on; infer_stream_include_usage on; " + sse),
        ],
    }


def raw_exchange(addr, auth, body):
    """One keep-alive POST: (status, headers, decoded body, raw size)."""
    host, port = addr.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    c.request("POST", "/v1/chat/completions", body,
              {"Content-Type": "application/json",
               "Authorization": "Bearer " + auth})
    r = c.getresponse()
    data = r.read()
    c.close()
    # the raw size, read the way wrk reads it
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\n"
           b"Content-Type: application/json\r\nAuthorization: Bearer %s\r\n"
           b"Content-Length: %d\r\n\r\n" % (addr.encode(), auth.encode(),
                                             len(body))) + body
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(req)
    raw = b""
    while True:
        part = s.recv(65536)
        if not part:
            break
        raw += part
        head, sep, rest = raw.partition(b"\r\n\r\n")
        if not sep:
            continue
        m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        if m and len(rest) >= int(m.group(1)):
            break
        if not m and rest.endswith(b"0\r\n\r\n"):
            break
    s.close()
    return r.status, dict(r.getheaders()), data, len(raw)


def profile(args, cases, scripts, client_cpu):
    """perf record of one config's worker under wrk: where the time
    goes."""
    for case, gws in cases.items():
        for name, n in gws:
            if name != args.perf:
                continue
            wrk = ["taskset", "-c", str(client_cpu), "wrk", "-t1",
                   f"-c{args.connections}", "-s", str(scripts[case]),
                   n.url]
            subprocess.run(wrk + ["-d1s"], capture_output=True, timeout=60)
            perf = subprocess.Popen(
                ["perf", "record", "--call-graph", args.perf_call_graph,
                 "-F", "4999", "-o", args.perf_data,
                 "-p", str(n.worker_pids()[0])],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            out = subprocess.run(wrk + [f"-d{args.duration}s"],
                                 capture_output=True, text=True,
                                 timeout=args.duration + 60).stdout
            perf.send_signal(2)
            perf.wait(timeout=60)
            print(out)
            rep = subprocess.run(
                ["perf", "report", "-i", args.perf_data, "--no-children",
                 "--sort", "dso,symbol", "-g", "none", "--stdio"],
                capture_output=True, text=True, timeout=300).stdout
            print("\n".join(l for l in rep.splitlines()
                            if l.strip() and not l.startswith("#"))[:6000])
            # the system calls per request (strace slows the worker: only
            # the counts mean something)
            st = subprocess.Popen(
                ["strace", "-c", "-p", str(n.worker_pids()[0])],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(0.5)
            out = subprocess.run(wrk + ["-d2s"], capture_output=True,
                                 text=True, timeout=60).stdout
            st.send_signal(2)
            err = st.communicate(timeout=60)[1]
            reqs = json.loads(re.search(r"^WRK_SUMMARY (.*)$", out,
                                        re.M).group(1))["requests"]
            print(f"system calls per request ({reqs} requests, strace -c):")
            for line in err.splitlines():
                f = line.split()
                if len(f) >= 5 and f[3].isdigit():
                    print(f"  {f[-1]:16} {int(f[3]) / reqs:7.2f}")
            return
    run.fail(f"--perf {args.perf}: no such config")


def measure(args, name, n, rnd, script, client_cpu, cpus, backend, redis,
            size, chunked):
    """One wrk run against gateway n: its figures."""
    worker = n.worker_pids()[0]
    c0 = run.cpu_sample([worker])
    st0 = run.cpu_times()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    bk0 = run.cpu_ns(backend.worker_pids()[0])
    rd0 = run.cpu_ns(redis.proc.pid)
    out = subprocess.run(
        ["taskset", "-c", str(client_cpu), "wrk", "-t1",
         f"-c{args.connections}", f"-d{1 if rnd == 0 else args.duration}s",
         "--latency", "-s", str(script), n.url],
        capture_output=True, text=True, timeout=args.duration + 60).stdout
    c1 = run.cpu_sample([worker])
    st1 = run.cpu_times()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    bk1 = run.cpu_ns(backend.worker_pids()[0])
    rd1 = run.cpu_ns(redis.proc.pid)
    m = re.search(r"^WRK_SUMMARY (.*)$", out, re.M)
    if not m:
        run.fail(f"{name}: no summary from wrk:\n{out}")
    s = json.loads(m.group(1))
    if s["errors"] or "Non-2xx" in out:
        run.fail(f"{name}: errors in wrk's output:\n{out}")
    if n.worker_pids() != [worker]:
        run.fail(f"{name}: the worker was replaced")
    reqs = s["requests"]
    per = s["bytes"] / reqs
    # a chunked answer's framing follows the reads (proxy_buffering off):
    # a little slack for it
    if abs(per - size) > 0.02 * size or (not chunked
                                         and s["bytes"] != reqs * size):
        run.fail(f"{name}: {per:.1f} bytes per response, {size} expected")
    try:
        w = run.parse_wrk(out)
    except run.BenchError:
        # a stalled run can lack wrk's p99 line: its CPU still counts
        w = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)",
                                    out).group(1)),
             "p50_us": None, "p99_us": None}
    tck = os.sysconf("SC_CLK_TCK")
    secs = sum(st1[c]["total"] - st0[c]["total"] for c in cpus[:2]) / 2 / tck
    # the time of the two CPUs that was not ours: the worker, wrk, the
    # backend and redis
    ours = (c1["ticks"] - c0["ticks"]) / tck \
        + (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) \
        + (bk1 - bk0) / 1e9 + (rd1 - rd0) / 1e9
    busy = sum(st1[c]["proc"] - st0[c]["proc"] + st1[c]["steal"]
               - st0[c]["steal"] for c in cpus[:2]) / tck
    other = max(0.0, busy - ours) / max(secs, 1e-9)
    r = {"round": rnd, "rps": w["rps"], "p50": w["p50_us"],
         "p99": w["p99_us"], "requests": reqs,
         "cpu_us": (c1["ns"] - c0["ns"]) / 1e3 / reqs,
         "backend_us": (bk1 - bk0) / 1e3 / reqs,
         "redis_us": (rd1 - rd0) / 1e3 / reqs,
         "other_load": other}
    print(f"round {rnd} {name:14} {r['rps']:9.0f} req/s "
          f"{r['cpu_us']:6.2f} CPU µs/req  other load {other * 100:4.1f} %",
          flush=True)
    return r


def callgrind_run(n, count, case_body, token, out):
    """nginx n under callgrind for count requests on one connection: the
    worker's instructions by function."""
    out.mkdir()
    vg = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--trace-children=yes",
         f"--callgrind-out-file={out}/cg.%p", run.NGINX_BIN,
         "-p", str(n.workdir), "-c", str(n.conf_path),
         "-e", str(n.error_log)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection((n.host, n.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    run.fail("nginx under valgrind did not start")
                time.sleep(0.5)
        kids = Path(f"/proc/{vg.pid}/task/{vg.pid}/children")
        worker = int(kids.read_text().split()[0])
        c = http.client.HTTPConnection(n.host, n.port, timeout=60)
        for _ in range(count):
            c.request("POST", "/v1/chat/completions", case_body,
                      {"Content-Type": "application/json",
                       "Authorization": "Bearer " + token})
            r = c.getresponse()
            r.read()
            if r.status != 200:
                run.fail(f"status {r.status}")
        c.close()
    finally:
        vg.terminate()
        vg.wait(timeout=60)
    ann = subprocess.run(
        ["callgrind_annotate", "--inclusive=no", "--threshold=100",
         str(out / f"cg.{worker}")],
        capture_output=True, text=True, timeout=300).stdout
    fns = {}
    for line in ann.splitlines():
        m = re.match(r"^\s*([\d,]+)(?: \([ \d.]+%\))?\s+(\S.*)$", line)
        if m:
            fns[m.group(2)] = int(m.group(1).replace(",", ""))
    return fns


def callgrind(args, cases, bodies, token, work):
    """The worker's instructions per request, by function: two runs of
    200 and 200 + --requests requests, the difference over --requests, so
    that starting and stopping cancel out."""
    for case, gws in cases.items():
        for name, n in gws:
            if name != args.callgrind:
                continue
            n.stop()
            a = callgrind_run(n, 200, bodies[case], token, work / "cg-a")
            b = callgrind_run(n, 200 + args.requests, bodies[case], token,
                              work / "cg-b")
            per = {k: (b.get(k, 0) - a.get(k, 0)) / args.requests
                   for k in set(a) | set(b)}
            total = [k for k in per if "PROGRAM TOTALS" in k][0]
            print(f"{name}: {per.pop(total):,.0f} instructions per request "
                  f"in the worker ({args.requests} requests, one "
                  "connection); by function, per request:")
            for k, v in sorted(per.items(), key=lambda kv: -kv[1]):
                if v >= 50:
                    print(f"  {v:9,.0f}  {k[:110]}")
            return
    run.fail(f"--callgrind {args.callgrind}: no such config")


def median(v):
    return statistics.median(v) if v else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--only", default="",
                    help="configs to run (each case's baseline is always "
                         "run)")
    ap.add_argument("--retries", type=int, default=10,
                    help="a case's round is redone when others took more "
                         "than 5 %% of a CPU, this many times in all")
    ap.add_argument("--base-modules", metavar="DIR",
                    help="also measure every config with modules with "
                         "the modules of DIR, as NAME@base: before and "
                         "after in one run")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out", default=str(BENCH / "results" / "cost.json"))
    ap.add_argument("--perf", metavar="CONFIG",
                    help="instead of the rounds: perf record -g on that "
                         "config's worker during one wrk run of --duration "
                         "seconds, then perf report --no-children")
    ap.add_argument("--callgrind", metavar="CONFIG",
                    help="instead of the rounds: that config's gateway "
                         "again under valgrind --tool=callgrind, "
                         "--requests requests one after the other on one "
                         "connection, and the worker's instructions per "
                         "request by function (deterministic, unlike time "
                         "on a shared machine)")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--perf-call-graph", default="fp",
                    help="perf record --call-graph (fp; dwarf, to see "
                         "who calls libc and nginx)")
    ap.add_argument("--perf-data", default="perf.data",
                    help="where --perf writes (default %(default)s)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.duration = 2, 2

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        run.fail("need 2 CPUs")
    server_cpu, client_cpu = {cpus[0]}, cpus[1]

    work = Path(tempfile.mkdtemp(prefix="ngx_infer_bench_cost."))
    rsa_key = rsa.generate_private_key(65537, 2048)
    (work / "rsa2048.pem").write_bytes(rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM,
        serialization.PublicFormat.SubjectPublicKeyInfo))
    now = int(time.time())
    token = jwt.encode({"sub": "bench-user", "tenant": "bench",
                        "plan": "pro", "iss": ISSUER, "aud": AUDIENCE,
                        "iat": now, "exp": now + 24 * 3600},
                       rsa_key, algorithm="RS256",
                       headers={"kid": "bench-rsa"})
    chat = run.chat_body(400)
    stream = chat[:-1] + b', "stream": true}'
    stream = run.chat_body(400 - (len(stream) - len(chat)))[:-1] \
        + b', "stream": true}'
    assert len(chat) == 400 and len(stream) == 400
    bodies = {"chat": chat, "sse": stream, "sse-chunked": stream}
    scripts = {}
    for case, body in bodies.items():
        (work / f"{case}.json").write_bytes(body)
        scripts[case] = work / f"{case}.lua"
        scripts[case].write_text(LUA % (token, work / f"{case}.json"))

    # the modules measured are a copy: a rebuild during the run would
    # change the code under the workers
    mods = work / "modules"
    mods.mkdir()
    for m in ALL_MODULES:
        shutil.copy(module_path(m), mods)
    sha = {m: __import__("hashlib").sha256(
        (mods / module_path(m).name).read_bytes()).hexdigest()[:12]
        for m in ALL_MODULES}

    base_mods = None
    if args.base_modules:
        base_mods = work / "base-modules"
        base_mods.mkdir()
        for m in ALL_MODULES:
            shutil.copy(Path(args.base_modules) / module_path(m).name,
                        base_mods)
            sha[m + "@base"] = __import__("hashlib").sha256(
                (base_mods / module_path(m).name).read_bytes()
            ).hexdigest()[:12]

    only = set(x for x in args.only.split(",") if x)
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
            cases = {}
            for case, cfgs in configs(work / "rsa2048.pem",
                                      redis.addr).items():
                cfgs = [c for i, c in enumerate(cfgs)
                        if i == 0 or not only or c[0] in only]
                if len(cfgs) < 2:
                    continue
                if base_mods:
                    cfgs = cfgs + [(name + "@base", *rest)
                                   for name, *rest in cfgs[1:]]
                cases[case] = []
                for name, modules, conf, target, loc in cfgs:
                    d = base_mods if name.endswith("@base") else mods
                    n = Nginx(work / name, http=GATEWAY.format(
                        backend=backend.addr, http=conf, target=target,
                        location=loc),
                        main="\n".join(f"load_module "
                                       f"{d / module_path(m).name};"
                                       for m in modules),
                        modules=[], workers=1, error_level="warn")
                    ok, out = n.check_config()
                    if not ok:
                        run.fail(f"{name}: nginx -t:\n{out}")
                    cases[case].append((name, n.start()))
                    started.append(n)
        finally:
            os.sched_setaffinity(0, mine)
        for n in started:
            pids = [n.proc.pid]
            if isinstance(n, Nginx):
                pids = run.master_and_workers(n)
            for pid in pids:
                run.pin(pid, server_cpu)

        # preflight: 200, the expected body, the stream stripped to the
        # very bytes plain-sse's client gets
        size = {}
        chunked = set()
        for case, gws in cases.items():
            first = None
            for name, n in gws:
                status, headers, data, raw = raw_exchange(
                    n.addr, token, bodies[case])
                if status != 200:
                    run.fail(f"{name}: status {status}: {data[:300]!r}")
                if first is None:
                    first = data
                elif data != first:
                    run.fail(f"{name}: another answer than {gws[0][0]}'s:"
                             f"\n{data[:600]!r}\n{first[:600]!r}")
                size[name] = raw
                if headers.get("Transfer-Encoding") == "chunked":
                    chunked.add(name)
                print(f"preflight {name}: 200, {len(data)} bytes of body, "
                      f"{raw} bytes in all", flush=True)

        if args.perf:
            profile(args, cases, scripts, client_cpu)
            return

        if args.callgrind:
            callgrind(args, cases, bodies, token, work)
            return

        runs = {name: [] for gws in cases.values() for name, _ in gws}
        load0 = os.getloadavg()
        t0 = datetime.datetime.now(datetime.timezone.utc)
        retries = args.retries
        for rnd in range(args.rounds + 1):          # round 0 warms up
            for case, gws in cases.items():
                k = rnd % len(gws)
                order = gws[k:] + gws[:k]
                while True:
                    got = [measure(args, name, n, rnd, scripts[case],
                                   client_cpu, cpus, backend, redis,
                                   size[name], name in chunked)
                           for name, n in order]
                    noisy = max(r["other_load"] for r in got)
                    if rnd == 0 or noisy <= 0.05 or retries == 0:
                        break
                    retries -= 1
                    print(f"round {rnd} {case}: other load "
                          f"{noisy * 100:.0f} % of a CPU: redone",
                          flush=True)
                    time.sleep(3)
                if rnd:
                    for (name, _), r in zip(order, got):
                        runs[name].append(r)
        for n in started:
            if isinstance(n, Nginx) and n.log_problems():
                run.fail("nginx error log:\n" + "\n".join(n.log_problems()))
        load1 = os.getloadavg()
        t1 = datetime.datetime.now(datetime.timezone.utc)

        print(f"\nbench/cost.py: {args.rounds} rounds x {args.duration} s, "
              f"-c{args.connections}, {t0:%Y-%m-%d %H:%M}-{t1:%H:%M} UTC, "
              f"loadavg {load0[0]:.2f} -> {load1[0]:.2f}; modules "
              + " ".join(f"{m}={h}" for m, h in sha.items()))
        result = {"date": f"{t0:%Y-%m-%d %H:%M}-{t1:%H:%M} UTC",
                  "loadavg": [load0, load1], "sha256": sha,
                  "args": vars(args), "runs": runs, "cases": {}}
        for case, gws in cases.items():
            base = gws[0][0]
            print(f"\n{case}:\n  {'config':14} {'req/s':>9} {'p50 µs':>8} "
                  f"{'p99 µs':>7}  CPU µs/req (min-max)     ratio  paired "
                  "(range)      min/min  other load max")
            for name, _ in gws:
                rs = runs[name]
                med = {k: median([r[k] for r in rs if r[k] is not None])
                       for k in ("rps", "p50", "p99", "cpu_us")}
                cpu = [r["cpu_us"] for r in rs]
                bcpu = {r["round"]: r["cpu_us"] for r in runs[base]}
                paired = [r["cpu_us"] / bcpu[r["round"]] for r in rs]
                ratio = med["cpu_us"] / median(
                    [r["cpu_us"] for r in runs[base]])
                # others' load only ever adds: the least of each is the
                # least disturbed
                mins = min(cpu) / min(r["cpu_us"] for r in runs[base])
                print(f"  {name:14} {med['rps']:9.0f} {med['p50']:8.0f}"
                      f" {med['p99']:7.0f}  {med['cpu_us']:6.2f} "
                      f"({min(cpu):.2f}-{max(cpu):.2f})  {ratio:9.2f}  "
                      f"{median(paired):5.2f} ({min(paired):.2f}-"
                      f"{max(paired):.2f})  {mins:7.2f}  "
                      f"{max(r['other_load'] for r in rs) * 100:5.1f} %")
                result["cases"].setdefault(case, {})[name] = {
                    **med, "cpu_min": min(cpu), "cpu_max": max(cpu),
                    "ratio": ratio, "paired": median(paired),
                    "min_ratio": mins,
                    "paired_range": [min(paired), max(paired)]}
        Path(args.out).parent.mkdir(exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    finally:
        for n in reversed(started):
            n.stop()
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def terminated(signum, frame):
    sys.exit(f"bench/cost.py: signal {signum}")


if __name__ == "__main__":
    import signal
    signal.signal(signal.SIGTERM, terminated)
    try:
        main()
    except run.BenchError as e:
        sys.exit(f"bench/cost.py: {e}")
