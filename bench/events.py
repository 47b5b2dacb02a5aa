"""ngx_infer usage events benchmark: what one event costs the gateway.

    /usr/bin/python3 bench/events.py                  # 5 rounds of 4 s
    /usr/bin/python3 bench/events.py --rounds 5 --duration 3
    /usr/bin/python3 bench/events.py --quick          # 2 rounds of 2 s
    /usr/bin/python3 bench/events.py --no-memory      # without the Redis
                                                      # stop (SIGSTOP) check

wrk (one CPU) drives three gateways (the other CPU, one worker each, with
the backend and redis-server on that CPU too) in interleaved rounds.  The
gateways are the same configuration but for the location's
infer_usage_events and the stream's batch=:

  off      route module on, infer_ratelimit_redis and
           infer_usage_events_stream configured, infer_usage_events off
  on       the same, infer_usage_events on (batch=64, the default)
  on-b1    the same, infer_usage_events on, batch=1

Each is the route module in front of bench/run.py's fast static backend
(POST of chat.lua's small body, proxy_pass http://$infer_upstream), with
the metrics module loaded for infer_usage_events_total (/metrics) and
stub_status (/status), read between runs only.  Per gateway and run: req/s,
p50, p99, the gateway worker's CPU per request (ns from
/proc/PID/schedstat; the tick count of /proc/PID/stat is printed as a
cross-check), the worker's read/write system calls per request
(/proc/PID/io), Redis's CPU per event (its main thread's schedstat) and
Redis calls per request (INFO commandstats).  Paired per round: on - off
in CPU µs per request, the cost of one event.

Every event must be in the stream: per run, the requests the gateway
created (stub_status, exact, including those wrk cut off at its end),
the events written (infer_usage_events_total), the stream's length (the
key is deleted before each run, so MAXLEN's trimming does not apply) and
the XADD calls must all be equal, and no event dropped or failed; the run
fails otherwise.

Then the memory check (--no-memory skips it): two more gateways, events
on with queue=256k and queue=1m, Redis's default timeout (50 ms).  Under
load, redis-server is stopped (SIGSTOP) for --stop seconds and resumed:
the worker's anonymous RSS must grow by at most twice the queue (the
buffer, and as many bytes again sent and not answered) plus a slack, the
requests must not fail, and the events lost must be counted as dropped.

Exits non-zero when any check fails.  Results: printed, and
bench/results/events.json.
"""

import argparse
import datetime
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "t"))

from run import (BACKEND, CLK_TCK, NOISY, BenchError, cpu_ns,  # noqa: E402
                 cpu_ticks, cpu_times, fail, fmt_lat, git_describe,
                 lua_request, parse_wrk, pin,
                 preflight, raw_response_size, tool_version)
from harness.nginx import NGINX_BIN, Nginx, module_path  # noqa: E402
from harness.redis import RedisServer  # noqa: E402

MODEL = POOL = "llama-3-8b"
SCRIPT = "chat.lua"
MODS = ["route", "ratelimit", "metrics"]

GATEWAY = """
    upstream {pool} {{
        server {backend};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    infer_model {model} upstream={pool};
    infer_ratelimit_redis {redis} {redis_opts};
    infer_usage_events_stream {key} {stream_opts};
    infer_metrics_zone m 1m;
    server {{
        listen 127.0.0.1:{{port}};
        access_log off;
        keepalive_requests 1000000;
        client_body_buffer_size 16k;
        location / {{
            proxy_pass http://$infer_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            infer_route on;
            infer_usage_events {events};
            {location}
        }}
        location = /metrics {{
            infer_usage_events off;
            infer_metrics_export;
        }}
        location = /status {{
            infer_usage_events off;
            stub_status;
        }}
    }}
"""

# name, infer_usage_events, the stream's parameters, the Redis
# connection's (timeout=1s: a reply late on a saturated CPU must not reset
# the connection and drop events in a run that measures their cost), more
# of the location.
#
# The event carries request_id and trace_id.  Without infer_trace, and
# when the client sends neither X-Request-Id nor traceparent (as here),
# the event is what makes them: two RAND_bytes() calls (nginx's
# $request_id and $infer_trace_id).  With infer_trace on they are made for
# every request anyway, events or not: trace-on - trace-off is the
# event's own cost.
TRACE = "infer_trace on;"
CONFIGS = [
    ("off", "off", "batch=64", "timeout=1s", ""),
    ("on", "on", "batch=64", "timeout=1s", ""),
    ("on-b1", "on", "batch=1", "timeout=1s", ""),
    ("trace-off", "off", "batch=64", "timeout=1s", TRACE),
    ("trace-on", "on", "batch=64", "timeout=1s", TRACE),
]

# the events' cost, paired per round: (config, its baseline)
PAIRS = [("on", "off"), ("on-b1", "off"), ("on-b1", "on"),
         ("trace-on", "trace-off")]

# the memory check: Redis's default timeout, the queue as configured
MEMORY = [
    ("mem-256k", "on", "queue=256k", "", ""),
    ("mem-1m", "on", "queue=1m", "", ""),
]

# what the memory check allows beyond 2 x queue: malloc's own growth,
# hiredis's callback per event sent, its reader
SLACK = 256 * 1024


class Gateway:
    def __init__(self, name, nginx, key, queue):
        self.name = name
        self.n = nginx
        self.key = key
        self.queue = queue
        self.own = 0            # our requests to /status and /metrics

    def get(self, path):
        self.own += 1
        with urllib.request.urlopen(self.n.url + path, timeout=10) as r:
            return r.read().decode()

    def requests(self):
        """stub_status's request count (this request included)."""
        m = re.search(r"^\s*\d+\s+\d+\s+(\d+)\s*$", self.get("/status"),
                      re.M)
        if not m:
            fail(f"{self.name}: no request count in /status")
        return int(m.group(1))

    def outcomes(self):
        """infer_usage_events_total by outcome."""
        out = {"written": 0, "dropped": 0, "failed": 0}
        for line in self.get("/metrics").splitlines():
            m = re.match(r'infer_usage_events_total\{outcome="(\w+)"\}\s+'
                         r'([\d.e+]+)$', line)
            if m:
                out[m.group(1)] = int(float(m.group(2)))
        return out

    def worker(self):
        pids = self.n.worker_pids()
        if len(pids) != 1:
            fail(f"{self.name}: {len(pids)} workers, not 1")
        return pids[0]


def proc_io(pid):
    """syscr, syscw of pid (/proc/PID/io)."""
    out = {}
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = int(v)
    return out["syscr"], out["syscw"]


def proc_status(pid):
    """RssAnon, VmRSS, VmHWM of pid, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("RssAnon", "VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    return out


def redis_calls(client):
    return {k[len("cmdstat_"):]: v["calls"]
            for k, v in client.info("commandstats").items()}


def size(text):
    m = re.fullmatch(r"(\d+)([kKmM]?)", text)
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1 << 20}[
        m.group(2).lower()]


class Bench:
    def __init__(self, args, workdir, configs=CONFIGS):
        self.args = args
        self.configs = configs
        self.work = Path(workdir)
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            fail(f"need 2 CPUs (one for wrk, one for nginx), have {cpus}")
        self.server_cpus = {cpus[0]}
        self.client_cpu = cpus[1]
        self.started = []
        self.gateways = {}
        self.modules = {}
        self.module_sha256 = {}
        self.redis = None
        self.backend = None

    def _start(self, n):
        """Started with the server CPU as our affinity, which nginx's master
        and workers (and redis-server) inherit at fork."""
        mine = os.sched_getaffinity(0)
        os.sched_setaffinity(0, self.server_cpus)
        try:
            n.start()
        finally:
            os.sched_setaffinity(0, mine)
        self.started.append(n)
        pids = [n.proc.pid] + (n.worker_pids() if isinstance(n, Nginx)
                               else [])
        for pid in pids:
            pin(pid, self.server_cpus)
            if os.sched_getaffinity(pid) != self.server_cpus:
                fail(f"could not pin pid {pid} to {self.server_cpus}")
        return n

    def snapshot_modules(self):
        """The run loads its own copy of the modules: `make` rewrites
        build/modules/*.so in place (see run.py)."""
        d = self.work / "modules"
        d.mkdir(exist_ok=True)
        for m in MODS:
            src = module_path(m)
            if not src.exists():
                sys.exit(f"bench: modules not built (run 'make'): {src}")
            for _ in range(10):
                data = src.read_bytes()
                time.sleep(0.2)
                if src.read_bytes() == data:
                    break
            else:
                fail(f"{src} keeps changing (a build running?)")
            dst = d / src.name
            dst.write_bytes(data)
            self.modules[m] = dst
            self.module_sha256[m] = hashlib.sha256(data).hexdigest()

    def gateway(self, name, events, stream_opts, redis_opts, location):
        key = f"bench:usage:{name}"
        http = GATEWAY.format(pool=POOL, model=MODEL,
                              backend=self.backend.addr,
                              redis=self.redis.addr, redis_opts=redis_opts,
                              key=key, stream_opts=stream_opts,
                              events=events, location=location)
        n = Nginx(self.work / f"gw-{name}", http=http,
                  main="\n".join(f"load_module {self.modules[m]};"
                                 for m in MODS),
                  modules=[], workers=1, error_level="error")
        ok, out = n.check_config()
        if not ok:
            fail(f"gateway {name}: nginx -t failed:\n{out}")
        self._start(n)
        m = re.search(r"queue=(\w+)", stream_opts)
        gw = Gateway(name, n, key, size(m.group(1)) if m else 256 * 1024)
        gw.events = events == "on"
        path, body = lua_request(SCRIPT)
        preflight(name, n.url, path, body.encode())
        # infer_trace adds x-request-id: a size per gateway
        gw.response_size = raw_response_size(n.addr, path, body.encode())
        return gw

    def start(self, memory):
        self.snapshot_modules()
        self.redis = self._start(RedisServer(self.work / "redis"))
        self.client = self.redis.client()
        self.backend = self._start(Nginx(
            self.work / "backend", http=BACKEND, modules=[], workers=1,
            error_level="warn"))
        for name, *conf in self.configs + (MEMORY if memory else []):
            self.gateways[name] = self.gateway(name, *conf)
        # the preflights' events are sent within flush (100 ms)
        time.sleep(0.5)

    def stop(self):
        if self.redis and self.redis.proc:
            try:
                os.kill(self.redis.proc.pid, signal.SIGCONT)
            except OSError:
                pass
        for n in reversed(self.started):
            n.stop()

    def log_problems(self):
        problems = []
        for n in self.started:
            if isinstance(n, Nginx):
                problems += [f"{n.workdir.name}: {l}"
                             for l in n.log_problems()]
                log = n.workdir / "access.log"
                if log.exists() and log.stat().st_size > 0:
                    problems.append(f"{n.workdir.name}: access log written")
        return problems

    def wrk(self, gw, duration):
        path = lua_request(SCRIPT)[0]
        return ["taskset", "-c", str(self.client_cpu), "wrk", "-t1",
                f"-c{self.args.connections}", f"-d{duration}s", "--latency",
                "-s", str(BENCH / SCRIPT), gw.n.url + path]

    def check_wrk(self, gw, label, r):
        if r.returncode != 0:
            fail(f"{gw.name} ({label}): wrk exited {r.returncode}:\n"
                 + r.stdout + r.stderr)
        w = parse_wrk(r.stdout)
        s = w["summary"]
        errs = {k: v for k, v in w["errors"].items() if v}
        errs.update({f"lua:{k}": v for k, v in s["errors"].items() if v})
        if errs or w["requests"] <= 0:
            fail(f"{gw.name} ({label}): wrk reported errors {errs}:\n"
                 + r.stdout)
        lo = w["requests"] * gw.response_size
        hi = (w["requests"] + self.args.connections) * gw.response_size
        if not lo <= s["bytes"] <= hi:
            fail(f"{gw.name} ({label}): wrk read {s['bytes']} bytes for "
                 f"{w['requests']} responses of {gw.response_size} bytes")
        return w

    def settle(self, gw, o0, created, timeout=5.0):
        """Waits until every request created since the counts o0 has its
        event accounted for (written, dropped or failed), at most timeout
        seconds."""
        deadline = time.monotonic() + timeout
        while True:
            o = gw.outcomes()
            if (sum(o.values()) - sum(o0.values()) >= created
                    or time.monotonic() > deadline):
                return o
            time.sleep(0.05)

    # -- one measured run ---------------------------------------------------

    def run(self, gw, duration, label):
        worker = gw.worker()
        bworkers = self.backend.worker_pids()
        rpid = self.redis.proc.pid
        self.client.delete(gw.key)
        o0 = gw.outcomes()
        q0 = gw.requests()
        k0 = redis_calls(self.client)
        i0 = self.client.info("stats")["total_net_input_bytes"]
        w0, b0, rt0 = cpu_ticks(worker), cpu_ticks(bworkers[0]), \
            cpu_ticks(rpid)
        n0, rn0, io0 = cpu_ns(worker), cpu_ns(rpid), proc_io(worker)
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus0 = cpu_times()
        try:
            r = subprocess.run(self.wrk(gw, duration), capture_output=True,
                               text=True, timeout=duration + 30)
        except subprocess.TimeoutExpired:
            fail(f"{gw.name} ({label}): wrk did not finish")
        # the last events wait at most flush (100 ms) to be sent
        time.sleep(0.3)
        w1, b1, rt1 = cpu_ticks(worker), cpu_ticks(bworkers[0]), \
            cpu_ticks(rpid)
        n1, rn1, io1 = cpu_ns(worker), cpu_ns(rpid), proc_io(worker)
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus1 = cpu_times()
        if gw.worker() != worker or self.backend.worker_pids() != bworkers:
            fail(f"{gw.name} ({label}): a worker was replaced (crash?)\n"
                 + "\n".join(self.log_problems()))
        w = self.check_wrk(gw, label, r)
        own = gw.own
        q1 = gw.requests()
        # stub_status counts a request when it is created: what the gateway
        # served for wrk, without our own /status reads
        created = q1 - q0 - (gw.own - own)
        events_on = gw.events
        o1 = self.settle(gw, o0, created if events_on else 0)
        k1 = redis_calls(self.client)
        i1 = self.client.info("stats")["total_net_input_bytes"]
        xlen = self.client.xlen(gw.key)
        n = w["requests"]

        ours = {c: 0.0 for c in self.server_cpus | {self.client_cpu}}
        ours[min(self.server_cpus)] += (w1 - w0) + (b1 - b0) + (rt1 - rt0)
        ours[self.client_cpu] += (ru1.ru_utime - ru0.ru_utime
                                  + ru1.ru_stime - ru0.ru_stime) * CLK_TCK
        noise = 0.0
        for c in ours:
            d = {k: cpus1[c][k] - cpus0[c][k] for k in cpus0[c]}
            span = max(d["total"], 1)
            noise = max(noise, max(d["proc"] - ours[c], 0) / span,
                        d["steal"] / span)

        calls = {k: k1.get(k, 0) - k0.get(k, 0) for k in k1
                 if k1.get(k, 0) != k0.get(k, 0)}
        calls.pop("info", None)          # ours
        calls.pop("xlen", None)
        calls.pop("del", None)
        out = {k: o1[k] - o0[k] for k in o1}
        res = {
            "config": gw.name, "label": label,
            "requests": n, "created": created, "rps": w["rps"],
            "p50_us": w["p50_us"], "p99_us": w["p99_us"],
            "cpu_us_per_req": (n1 - n0) / 1e3 / created,
            "cpu_us_per_req_ticks": (w1 - w0) * 1e6 / CLK_TCK / created,
            "cpu_ticks": w1 - w0,
            "syscr_per_req": (io1[0] - io0[0]) / created,
            "syscw_per_req": (io1[1] - io0[1]) / created,
            "redis_cpu_us": (rn1 - rn0) / 1e3,
            "redis_cpu_us_per_event": ((rn1 - rn0) / 1e3 / out["written"]
                                       if out["written"] else None),
            "redis_calls_per_req": {k: v / created for k, v in calls.items()},
            # what Redis read per event (our few INFO calls included)
            "bytes_per_event": ((i1 - i0) / out["written"]
                                if out["written"] else None),
            "xadd": calls.get("xadd", 0), "xlen": xlen, "events": out,
            "noise": noise,
        }
        # every request created is one event in the stream, or none at all
        want = created if events_on else 0
        if not (n <= created <= n + self.args.connections):
            fail(f"{gw.name} ({label}): the gateway created {created} "
                 f"requests, wrk completed {n}")
        if (out["written"] != want or xlen != want
                or res["xadd"] != want or out["dropped"] or out["failed"]):
            fail(f"{gw.name} ({label}): {created} requests, but events "
                 f"{out}, {xlen} in the stream, {res['xadd']} XADD calls")
        return res

    # -- the memory check ---------------------------------------------------

    def memory(self, gw, seconds):
        """Redis stopped under load: the worker's RSS, the events dropped."""
        worker = gw.worker()
        # a first load with Redis up: the buffer and hiredis's at their
        # working size
        r = subprocess.run(self.wrk(gw, 2), capture_output=True, text=True,
                           timeout=40)
        self.check_wrk(gw, "memory warm-up", r)
        time.sleep(0.3)
        self.client.delete(gw.key)
        o0, q0, own = gw.outcomes(), gw.requests(), gw.own
        x0 = self.client.xlen(gw.key)

        samples = []              # (seconds, RssAnon) under load
        stop = threading.Event()

        def sample():
            t0 = time.monotonic()
            while not stop.is_set():
                samples.append((time.monotonic() - t0,
                                proc_status(worker)["RssAnon"]))
                time.sleep(0.02)

        up = 2
        seconds = max(1, round(seconds))
        sampler = threading.Thread(target=sample)
        proc = subprocess.Popen(self.wrk(gw, up + seconds), text=True,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        sampler.start()
        try:
            time.sleep(up)
            before = proc_status(worker)
            with open(f"/proc/{worker}/clear_refs", "w") as f:
                f.write("5")           # VmHWM from here on
            t_stop = samples[-1][0] if samples else 0.0
            os.kill(self.redis.proc.pid, signal.SIGSTOP)
            out, err = proc.communicate(timeout=up + seconds + 30)
        finally:
            os.kill(self.redis.proc.pid, signal.SIGCONT)
            stop.set()
            sampler.join()
            if proc.poll() is None:
                proc.kill()
        during = proc_status(worker)
        r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        w = self.check_wrk(gw, "Redis stopped", r)
        if gw.worker() != worker:
            fail(f"{gw.name}: the worker was replaced (crash?)")
        q1 = gw.requests()
        created = q1 - q0 - (gw.own - own)
        # after the resume: what the worker still held is sent once the
        # connection's backoff (at most 2 s) is over
        self.settle(gw, o0, created, timeout=10)
        time.sleep(1)
        o1 = gw.outcomes()
        x1 = self.client.xlen(gw.key)
        ev = {k: o1[k] - o0[k] for k in o1}
        up_rss = [v for t, v in samples if t < t_stop]
        down_rss = [v for t, v in samples if t >= t_stop]
        res = {
            "config": gw.name, "queue": gw.queue, "stopped_s": seconds,
            "requests": w["requests"], "created": created, "rps": w["rps"],
            "rss_anon_before": before["RssAnon"],
            "rss_anon_up_max": max(up_rss) if up_rss else None,
            "rss_anon_stopped_max": max(down_rss) if down_rss else None,
            "rss_anon_end": during["RssAnon"],
            "vm_hwm_growth": during["VmHWM"] - before["VmRSS"],
            "events": ev, "xlen": x1 - x0,
            "samples": len(samples),
        }
        res["growth"] = (max(res["rss_anon_stopped_max"],
                             res["rss_anon_end"]) - res["rss_anon_before"])
        res["bound"] = 2 * gw.queue + SLACK
        return res


def median(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else float("nan")


def kb(n):
    return f"{n / 1024:,.0f} KB"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=4,
                    help="seconds per wrk run (default 4)")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--retries", type=int, default=3,
                    help="rounds that may be redone, in all, because other "
                         f"work took over {NOISY * 100:.0f}%% of a benchmark CPU")
    ap.add_argument("--quick", action="store_true",
                    help="2 rounds of 2 s, the memory check 3 s")
    ap.add_argument("--stop", type=int, default=6,
                    help="seconds Redis is stopped in the memory check")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--only", default=None,
                    help="comma-separated gateways to measure (default "
                         "all: " + ",".join(c[0] for c in CONFIGS) + ")")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out", default=str(BENCH / "results" / "events.json"))
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.duration, args.stop, args.retries = 2, 2, 3, 0
    if args.rounds < 1 or args.duration < 1:
        ap.error("--rounds and --duration must be >= 1")
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} not found")

    configs = CONFIGS
    if args.only:
        only = [x.strip() for x in args.only.split(",") if x.strip()]
        known = [c[0] for c in CONFIGS]
        if not only or set(only) - set(known) or len(set(only)) != len(only):
            ap.error(f"--only: names from {known}, each once")
        configs = [c for c in CONFIGS if c[0] in only]
    workdir = tempfile.mkdtemp(prefix="ngx_infer_bench_events.")
    bench = Bench(args, workdir, configs)
    names = [c[0] for c in configs]
    runs, discarded, mem = [], [], []
    load0 = os.getloadavg()
    started = time.monotonic()
    print(f"usage events bench: {args.rounds} rounds x {args.duration} s, "
          f"wrk -t1 -c{args.connections}, gateways {', '.join(names)}; "
          f"loadavg {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    ok = False
    try:
        bench.start(not args.no_memory)
        print(f"  nginx and redis-server on CPU {sorted(bench.server_cpus)}"
              f", wrk on CPU {bench.client_cpu}; workdir {workdir}")
        for name in names:
            if args.warmup:
                bench.run(bench.gateways[name], args.warmup, "warm-up")
        redone = 0
        for rnd in range(1, args.rounds + 1):
            attempt = 0
            while True:
                k = (rnd - 1 + attempt) % len(names)
                this = []
                for name in names[k:] + names[:k]:
                    r = bench.run(bench.gateways[name], args.duration,
                                  f"round {rnd}")
                    r["round"] = rnd
                    this.append(r)
                    print(f"  round {rnd}/{args.rounds} {name:<9} "
                          f"{r['rps']:>8,.0f} req/s  "
                          f"{r['cpu_us_per_req']:6.2f} CPU µs/req  "
                          f"({r['created']} requests, "
                          f"{r['events']['written']} events; "
                          f"other load {r['noise']:.0%})", flush=True)
                if any(r["noise"] > NOISY for r in this) \
                        and redone < args.retries:
                    redone += 1
                    attempt += 1
                    print(f"  round {rnd}: other work took over {NOISY:.0%}"
                          f" of a benchmark CPU: redone", flush=True)
                    discarded += this
                    continue
                runs += this
                break
        if not args.no_memory:
            for name, *_ in MEMORY:
                m = bench.memory(bench.gateways[name], args.stop)
                mem.append(m)
                print(f"  memory {name}: RssAnon {kb(m['rss_anon_before'])}"
                      f" -> {kb(m['rss_anon_stopped_max'])} at most with "
                      f"Redis stopped ({m['growth'] / 1024:+,.0f} KB, bound"
                      f" {kb(m['bound'])}); {m['created']} requests, "
                      f"events {m['events']}", flush=True)
        problems = bench.log_problems()
        if problems:
            fail("nginx logged problems:\n" + "\n".join(problems))
        for m in mem:
            if m["growth"] > m["bound"]:
                fail(f"{m['config']}: the worker's RSS grew by "
                     f"{kb(m['growth'])} with Redis stopped, more than "
                     f"2 x queue + {kb(SLACK)}")
            if m["events"]["dropped"] == 0:
                fail(f"{m['config']}: Redis stopped {m['stopped_s']} s "
                     "under load, and no event counted as dropped")
            if sum(m["events"].values()) != m["created"]:
                fail(f"{m['config']}: {m['created']} requests, events "
                     f"{m['events']}: some not accounted for")
        ok = True
    except BenchError as e:
        print(f"\nBENCH FAILED: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\nbench: interrupted", file=sys.stderr)
    finally:
        bench.stop()
        if ok and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"bench: work directory kept in {workdir}",
                  file=sys.stderr)
    if not ok:
        sys.exit(1)
    elapsed = time.monotonic() - started
    load1 = os.getloadavg()

    summary = {}
    for name in names:
        rs = [r for r in runs if r["config"] == name]
        summary[name] = {
            k: median(r[k] for r in rs)
            for k in ("rps", "p50_us", "p99_us", "cpu_us_per_req",
                      "cpu_us_per_req_ticks", "syscr_per_req",
                      "syscw_per_req", "redis_cpu_us_per_event",
                      "bytes_per_event")}
        summary[name]["cpu_range"] = [min(r["cpu_us_per_req"] for r in rs),
                                      max(r["cpu_us_per_req"] for r in rs)]
        summary[name]["xadd_per_req"] = median(
            r["xadd"] / r["created"] for r in rs)
        summary[name]["redis_cpu_us_per_s"] = median(
            r["redis_cpu_us"] / args.duration for r in rs)
        summary[name]["requests"] = sum(r["created"] for r in rs)
        summary[name]["events"] = sum(r["events"]["written"] for r in rs)
    paired = {}
    for a, b in PAIRS:
        if a not in names or b not in names:
            continue
        diffs = []
        for rnd in range(1, args.rounds + 1):
            x = [r for r in runs if r["round"] == rnd and r["config"] == a]
            y = [r for r in runs if r["round"] == rnd and r["config"] == b]
            if x and y:
                diffs.append(x[0]["cpu_us_per_req"] - y[0]["cpu_us_per_req"])
        paired[f"{a} - {b}"] = {"median": median(diffs),
                                "range": [min(diffs), max(diffs)],
                                "rounds": diffs}

    print()
    print(f"Medians over {args.rounds} rounds of {args.duration} s (wrk -t1 "
          f"-c{args.connections}, POST {lua_request(SCRIPT)[0]} via "
          f"bench/{SCRIPT}); {elapsed / 60:.1f} min in all; loadavg "
          f"{load0[0]:.2f} before, {load1[0]:.2f} after.")
    print()
    head = ["config", "req/s", "p50", "p99", "CPU µs/req", "min–max",
            "ticks", "Redis µs/event", "bytes/event", "XADD/req", "syscalls r/w per req",
            "events = requests"]
    rows = []
    for name in names:
        s = summary[name]
        lo, hi = s["cpu_range"]
        rows.append([
            name, f"{s['rps']:,.0f}", fmt_lat(s["p50_us"]),
            fmt_lat(s["p99_us"]), f"{s['cpu_us_per_req']:.2f}",
            f"{lo:.2f}–{hi:.2f}", f"{s['cpu_us_per_req_ticks']:.2f}",
            ("—" if s["redis_cpu_us_per_event"] != s["redis_cpu_us_per_event"]
             else f"{s['redis_cpu_us_per_event']:.2f}"),
            ("—" if s["bytes_per_event"] != s["bytes_per_event"]
             else f"{s['bytes_per_event']:.0f}"),
            f"{s['xadd_per_req']:.3f}",
            f"{s['syscr_per_req']:.3f} / {s['syscw_per_req']:.3f}",
            f"{s['events']:,} / {s['requests']:,}"])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt_row = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w)
        for i, (c, w) in enumerate(zip(cells, widths)))
    print(fmt_row(head))
    print(fmt_row(["-" * w for w in widths]))
    for row in rows:
        print(fmt_row(row))
    print()
    for k, v in paired.items():
        lo, hi = v["range"]
        print(f"  CPU µs/req {k} (paired median over rounds): "
              f"{v['median']:+.3f} (range {lo:+.3f} to {hi:+.3f})")
    idle = [n for n in names if not bench.gateways[n].events]
    if idle:
        print("  Redis CPU with no events: " + ", ".join(
            f"{n} {summary[n]['redis_cpu_us_per_s'] / 1e3:.2f} ms/s"
            for n in idle))
    print("  CPU µs/req: the worker's time on CPU (/proc/PID/schedstat) / "
          "requests it created;\n  'ticks' is the same from /proc/PID/stat"
          f" ({1e3 / CLK_TCK:.0f} ms ticks), a cross-check.")
    noisy = [r for r in runs if r["noise"] > NOISY]
    if discarded:
        print(f"  {len(discarded) // len(names)} round(s) redone: other work"
              f" took over {NOISY:.0%} of a benchmark CPU.")
    if noisy:
        print(f"  WARNING: {len(noisy)} of {len(runs)} runs shared their "
              f"CPUs with other work (up to "
              f"{max(r['noise'] for r in runs):.0%} of a CPU).")
    else:
        print(f"  other load on the benchmark CPUs: at most "
              f"{max(r['noise'] for r in runs):.0%} of a CPU in any run.")
    if mem:
        print()
        print("Memory: Redis stopped (SIGSTOP) under load, then resumed")
        print()
        mhead = ["config", "stopped", "req/s", "RssAnon before",
                 "max stopped", "growth", "bound", "written", "dropped",
                 "failed", "in stream"]
        mrows = [[m["config"], f"{m['stopped_s']} s", f"{m['rps']:,.0f}",
                  kb(m["rss_anon_before"]), kb(m["rss_anon_stopped_max"]),
                  f"{m['growth'] / 1024:+,.0f} KB", kb(m["bound"]),
                  f"{m['events']['written']:,}",
                  f"{m['events']['dropped']:,}",
                  f"{m['events']['failed']:,}", f"{m['xlen']:,}"]
                 for m in mem]
        widths = [max(len(x) for x in col) for col in zip(mhead, *mrows)]
        print(fmt_row(mhead))
        print(fmt_row(["-" * w for w in widths]))
        for row in mrows:
            print(fmt_row(row))
        print(f"  bound: 2 x queue + {kb(SLACK)}; 'in stream': entries "
              "XADDed by the time the check ended, after the resume")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "date": datetime.datetime.now(datetime.timezone.utc)
                .isoformat(timespec="seconds"),
        "git": git_describe(),
        "nginx": tool_version([NGINX_BIN, "-v"]),
        "wrk": tool_version(["wrk", "--version"]),
        "redis": tool_version(["redis-server", "--version"]),
        "params": {"rounds": args.rounds, "duration_s": args.duration,
                   "connections": args.connections,
                   "warmup_s": args.warmup, "stop_s": args.stop,
                   "loadavg_before": load0, "loadavg_after": load1,
                   "elapsed_s": round(elapsed, 1)},
        "modules_sha256": bench.module_sha256,
        "configs": configs, "memory_configs": MEMORY,
        "summary": summary, "paired": paired,
        "runs": runs, "discarded": discarded, "memory": mem,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
