"""ngx_infer benchmark: many gateways sharing one Redis (issue 16).

    /usr/bin/python3 bench/gateways.py                # 5 rounds x 3 s, 3.6 min
    /usr/bin/python3 bench/gateways.py --quick        # 1 round of 2 s
    /usr/bin/python3 bench/gateways.py --hot          # one key for all
    /usr/bin/python3 bench/gateways.py --no-accuracy  # throughput only
    /usr/bin/python3 bench/gateways.py --modes approx # one mode or more
    /usr/bin/python3 bench/gateways.py --cluster      # a Redis Cluster

One redis-server, a static backend and eighteen gateways (nginx, one
worker each) all run pinned to one CPU; wrk runs on the other.  Three
modes: four gateways with `infer_ratelimit_redis ... coalesce=off`, four
with the default coalesce=10ms (both exact limits), and approx: the
limits `approximate=100ms`, `infer_ratelimit_redis ... replicas=R`, in
three fleets, R = 1 (four gateways), 2 (two) and 4 (four), so that a run
through N gateways has replicas=N, as the bound of approximate limits
asks (and the misconfigured run, four gateways of the replicas=1 fleet,
has not).  Every gateway counts its limits in the same Redis.

Throughput: for N = 1, 2 and 4 gateways and each mode, N wrk
processes run at the same time, one per gateway (-t1, the --connections
split evenly between them), each sending chat completions (POST, a JSON
body naming a model, max_tokens 64) through the route module and a
tokens limit keyed by X-Key (10,000 keys in turn, each wrk starting at
its own offset; --hot: one key for all), so that every request is one
admission and one correction (11 tokens of usage against the
reservation).  One wrk per gateway rather than one wrk rotating over the
gateways: wrk sends all of a thread's requests to one address, so a
rotating script would still need a thread per gateway, and a wrk per
gateway gives each gateway's own req/s and errors.  The limit
(tokens=1000000000/h per key) never refuses; a key's bucket is full again
microseconds after its request, so keys expire between their requests
and Redis runs the same script for every one.  The configurations run in
interleaved rounds (round 0 warms up); a run ends when Redis has had no
script call for 0.3 s (at most 3 s after wrk: the approximate gateways'
last syncs, which carry at most 1,000 keys each, are the run's); a run
during which other work took over 5 % of a CPU is discarded and redone
once the machine is quiet (at most --retries in all).  Reported per N
and mode:
total req/s, each gateway's share, per-gateway worker CPU per request
(/proc/PID/schedstat, ns), Redis CPU per request (utime + stime of
redis-server from /proc/PID/stat, all its threads; the threads'
schedstat as a cross-check), Redis calls per request (INFO commandstats:
evalsha + eval), p50 (median of the gateways) and p99 (worst gateway).

Accuracy: a requests limit of --limit per 30 days on one fresh key
(requests=N/30d: the bucket refills one request per 30d/N, so nothing
refills during a run and exactly N may pass), hammered through 1, 2 and
4 gateways at once, then a tokens limit of 11 x --limit tokens per 30
days the same way (each answer's usage is 11 tokens, its reservation
the prompt's estimate + max_tokens, read from the route module's
$infer_prompt_tokens_estimate at the start); in approx mode also the
requests limit once through the four gateways of the replicas=1 fleet
(misconfigured: each worker takes the whole limit for its share).
Counted: the 200s at the clients (wrk's response(), per gateway), the
requests the backend served (stub_status, exact, including those wrk cut
off at its end) and what Redis holds for the key at the end (its TAT,
waited for up to 1 s: the last coalesced corrections and syncs), which
must be what was charged (requests admitted, 11 x answers) in every
mode.  Exact modes: a requests limit must admit exactly --limit; 11 x
served must not pass the tokens limit.  Approx: over-admission is
expected; the stated bound (docs/ratelimit.md, "Approximate limits") is
allowed + W x (ceil(allowed / W) + one request), W = replicas x
worker_processes = N, one request being 1 or the reservation in tokens;
a run with replicas= right that passes it fails.  Also printed: the
fleet's requests per sync interval (100 ms, the run's mean), the other
form of the bound.

--cluster: the same runs, but Redis is a Redis Cluster of three masters
and no replicas on loopback (t/harness/redis_cluster.py: made by
redis-cli --cluster create, cluster-node-timeout 15 s, Redis's
default), its processes on the servers' CPU, and every gateway has
`infer_ratelimit_redis cluster:<the three masters> ...`.  A key's slot
is its hash tag, the X-Key value, so the 10,000 keys spread over the
masters by slot (their share per master is printed, computed with
redis-py's slot rule against the cluster's map).  A coalesced
correction or a sync is split by slot, a call per slot (one script call
may not touch keys of several slots), so with one key per slot it saves
no call; admissions are not batched (batch= does not apply to a
cluster).  Redis CPU per request
is summed over the three redis-servers (utime + stime, all threads),
calls per request over the masters' INFO commandstats; also reported,
over all rounds, each master's share of the script calls and of Redis's
CPU, and per run the MOVED and ASK answered (INFO errorstats of every
master: ~0 once each worker knows the slot map; the warm-up round and
the accuracy runs are in the whole-bench count).  The accuracy runs read
the key on the master that serves its slot (the harness's get(), which
follows MOVED and ASK) and that master's TIME.

Exits non-zero on any wrk socket error, any non-2xx in a throughput run,
a response other than 200/429 in an accuracy run, a replaced worker, an
nginx [alert]/[emerg], or an accuracy check failed (after writing the
results).  Results: printed, and bench/results/gateways.json (--cluster:
gateways-cluster.json).  INFER_MODULES_DIR picks the modules (take a
copy of build/modules if someone may rebuild during the run).
"""

import argparse
import datetime
import hashlib
import json
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "t"))

from run import (BACKEND_BODY, CLK_TCK, BenchError, cpu_ns,  # noqa: E402
                 cpu_ticks, cpu_times, fail, git_describe, master_and_workers,
                 parse_wrk, pin, tool_version)
from ratelimit import redis_calls  # noqa: E402
from harness.nginx import (MODULES_DIR, NGINX_BIN, Nginx,  # noqa: E402
                           module_path)
from harness.redis import RedisServer  # noqa: E402
from harness.redis_cluster import RedisCluster, key_slot  # noqa: E402

KEYS = 10000
SIZES = (1, 2, 4)
MODES = ("off", "10ms", "approx")   # coalesce=off, =10ms (the default),
                                    # approximate limits
APPROX = "100ms"                # their sync interval
APPROX_S = 0.1
FLEETS = {1: 4, 2: 2, 4: 4}     # approx: gateways started per replicas=
LABEL = {"off": "coalesce=off", "10ms": "coalesce=10ms",
         "approx": "approx=" + APPROX}
USAGE = 11                      # total_tokens in BACKEND_BODY's usage
NOISY = 0.05
GW_RPS = 20000                  # the extrapolation: a gateway's req/s
FLEET = 50                      # and the fleet's gateways
MASTERS = 3                     # --cluster: its masters, no replicas
# --cluster: Redis's own default; the harness's 1 s (made for failover
# tests) could see a master starved of CPU 0 by the gateways as failing
NODE_TIMEOUT_MS = 15000

CHAT = ('{"model":"bench-model","max_tokens":64,"messages":'
        '[{"role":"user","content":"Say hello."}]}')

# GW_KEY set: every request has that key (wrk's fast path: one request
# built once); otherwise keys k1..kGW_KEYS in turn from GW_OFFSET.
# GW_COUNT set: count the answers by status (200, 429, other).
LUA = r"""
wrk.method = "POST"
wrk.path = os.getenv("GW_PATH")
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
local fixed = os.getenv("GW_KEY")
local nkeys = tonumber(os.getenv("GW_KEYS"))
local i = tonumber(os.getenv("GW_OFFSET"))
if fixed then
   wrk.headers["X-Key"] = fixed
else
   request = function()
      i = i %% nkeys + 1
      wrk.headers["X-Key"] = "k" .. i
      return wrk.format()
   end
end
ok, limited, other = 0, 0, 0
if os.getenv("GW_COUNT") then
   response = function(status, headers, body)
      if status == 200 then ok = ok + 1
      elseif status == 429 then limited = limited + 1
      else other = other + 1 end
   end
end
local threads = {}
function setup(thread)
   table.insert(threads, thread)
end
function done(summary, latency, requests)
   local o, l, x = 0, 0, 0
   for _, t in ipairs(threads) do
      o = o + t:get("ok"); l = l + t:get("limited"); x = x + t:get("other")
   end
   io.write(string.format('WRK_SUMMARY {"requests":%%d,"status":%%d,'
            .. '"ok":%%d,"limited":%%d,"other":%%d}\n', summary.requests,
            summary.errors.status, o, l, x))
end
""" % CHAT

BACKEND = """
    server {
        listen 127.0.0.1:{port};
        access_log off;
        keepalive_requests 1000000;
        location / {
            default_type application/json;
            return 200 '%s';
        }
        location = /status {
            stub_status;
        }
    }
""" % BACKEND_BODY

GATEWAY = """
    upstream pool {{ server {backend}; keepalive 64;
                     keepalive_requests 1000000; }}
    infer_ratelimit_redis {redis} timeout=1s{redis_opts};
    infer_model bench-model upstream=pool;
    server {{
        listen 127.0.0.1:{{port}};
        access_log off;
        keepalive_requests 1000000;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        infer_route on;
        infer_ratelimit on;
        location / {{
            infer_ratelimit_limit bench $http_x_key {rate}{approx};
            proxy_pass http://pool;
        }}
        location /acc-req/ {{
            infer_ratelimit_limit acc_req $http_x_key
                                  requests={limit}/30d{approx};
            proxy_pass http://pool;
        }}
        location /acc-tok/ {{
            infer_ratelimit_limit acc_tok $http_x_key
                                  tokens={tokens}/30d{approx};
            proxy_pass http://pool;
        }}
        location /est/ {{
            add_header X-Estimate $infer_prompt_tokens_estimate always;
            proxy_pass http://pool;
        }}
    }}
"""

# the throughput limit never refuses: a refusal does not reach the
# backend and would look cheap (and fails the run as a non-2xx)
RATE = "tokens=1000000000/h"
WINDOW_US = 30 * 86400 * 10 ** 6


def redis_cpu(pid):
    """utime + stime ticks of all of redis-server's threads (/proc/PID/stat
    of the process), and their schedstat ns summed."""
    ns = 0
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            ns += int((t / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return cpu_ticks(pid), ns


def redis_errors(client):
    """{code: errors answered} from INFO errorstats (MOVED, ASK, ...)."""
    out = {}
    for k, v in client.info("errorstats").items():
        if not k.startswith("errorstat_"):
            continue
        if isinstance(v, str):              # redis-py 4.3: "count=N"
            v = dict(kv.split("=") for kv in v.split(","))
        out[k[len("errorstat_"):]] = int(v.get("count", 0))
    return out


def script_calls(calls):
    return calls.get("evalsha", 0) + calls.get("eval", 0)


def children_ticks():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (ru.ru_utime + ru.ru_stime) * CLK_TCK


def stub_requests(url):
    with urllib.request.urlopen(url + "/status", timeout=5) as r:
        text = r.read().decode()
    m = re.search(r"^\s*\d+\s+\d+\s+(\d+)\s*$", text, re.M)
    if not m:
        fail(f"stub_status: {text!r}")
    return int(m.group(1))


class Bench:
    def __init__(self, args, work):
        self.args = args
        self.work = work
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            fail("need 2 CPUs")
        self.server_cpu, self.client_cpu = {cpus[0]}, cpus[1]
        self.started = []
        self.lua = work / "gateways.lua"
        self.lua.write_text(LUA)

    def start(self):
        a = self.args
        mine = os.sched_getaffinity(0)
        os.sched_setaffinity(0, self.server_cpu)
        try:
            # the Redis side: one redis-server, or a cluster's masters
            # (every node a master), each a process with .proc, .addr
            # and .client()
            if a.cluster:
                self.cluster = RedisCluster(
                    self.work / "cluster", masters=MASTERS, replicas=0,
                    node_timeout_ms=NODE_TIMEOUT_MS)
                self.started.append(self.cluster)
                self.cluster.start()
                self.redis_nodes = sorted(self.cluster.masters(),
                                          key=lambda m: m.port)
                if len(self.redis_nodes) != MASTERS:
                    fail(f"the cluster has {len(self.redis_nodes)} "
                         f"masters serving slots, not {MASTERS}")
                redis_conf = "cluster:" + ",".join(
                    m.addr for m in self.redis_nodes)
            else:
                self.cluster = None
                redis = RedisServer(self.work / "redis").start()
                self.started.append(redis)
                self.redis_nodes = [redis]
                redis_conf = redis.addr
            self.redis_conf = redis_conf
            self.clients = [m.client() for m in self.redis_nodes]
            # the errors Redis answers from now on (MOVED, ASK before the
            # gateways know the slot map)
            self.errors0 = [redis_errors(c) for c in self.clients]
            self.backend = Nginx(self.work / "backend", http=BACKEND,
                                 modules=[], workers=1,
                                 error_level="warn").start()
            self.started.append(self.backend)
            # fleet name -> its gateways: off, 10ms, approx-r1, -r2, -r4
            self.gws = {}
            for mode in a.modes:
                fleets = ({f"approx-r{r}": (r, k) for r, k in FLEETS.items()}
                          if mode == "approx" else {mode: (0, max(SIZES))})
                for name, (replicas, count) in fleets.items():
                    opts = (f" replicas={replicas}" if replicas
                            else " coalesce=off" if mode == "off" else "")
                    http = GATEWAY.format(
                        backend=self.backend.addr, redis=redis_conf,
                        redis_opts=opts, rate=RATE, limit=a.limit,
                        tokens=USAGE * a.limit,
                        approx=(f" approximate={APPROX}"
                                if mode == "approx" else ""))
                    self.gws[name] = []
                    for i in range(count):
                        n = Nginx(self.work / f"gw-{name}-{i + 1}",
                                  http=http, modules=["route", "ratelimit"],
                                  workers=1, error_level="warn").start()
                        self.started.append(n)
                        self.gws[name].append(n)
        finally:
            os.sched_setaffinity(0, mine)
        for n in self.started:
            pids = (master_and_workers(n) if isinstance(n, Nginx)
                    else [x.proc.pid for x in n.nodes]
                    if isinstance(n, RedisCluster) else [n.proc.pid])
            for pid in pids:
                pin(pid, self.server_cpu)
                if os.sched_getaffinity(pid) != self.server_cpu:
                    fail(f"pid {pid} not pinned")
        self.workers = {n: n.worker_pids()[0]
                        for f in self.gws.values() for n in f}
        self.workers[self.backend] = self.backend.worker_pids()[0]
        self.reserve = self.reservation()

    def fleet(self, mode, size, replicas=None):
        """The gateways of a run: approx ones from the fleet whose
        replicas= is the run's size, unless told otherwise."""
        if mode == "approx":
            return self.gws[f"approx-r{replicas or size}"][:size]
        return self.gws[mode][:size]

    def reservation(self):
        """What one chat completion reserves of a tokens limit: the route
        module's prompt estimate + max_tokens (64)."""
        n = next(iter(self.gws.values()))[0]
        req = urllib.request.Request(
            n.url + "/est/v1/chat/completions", data=CHAT.encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            est = r.headers.get("X-Estimate")
        if not est or not est.isdigit():
            fail(f"no prompt estimate from {n.workdir.name}: {est!r}")
        return int(est) + json.loads(CHAT)["max_tokens"]

    def script_calls(self):
        return sum(script_calls(redis_calls(c)) for c in self.clients)

    def key_shares(self):
        """--cluster: the share of the throughput keys each master serves
        (redis-py's slot rule against the cluster's own map), to set
        beside its share of the calls."""
        owner = self.cluster.slot_map()
        ports = [m.port for m in self.redis_nodes]
        n = [0] * len(ports)
        keys = [f"k{i}" for i in range(1, self.keys + 1)]
        for k in keys:
            n[ports.index(owner[key_slot(k)])] += 1
        return [x / len(keys) for x in n]

    def settle(self, quiet=0.3, limit=3.0):
        """Until Redis has had no script call for quiet seconds (the last
        coalesced corrections; the approximate gateways' last syncs, 1,000
        keys a call), at most limit seconds; the seconds waited."""
        t0 = time.monotonic()
        last, since = self.script_calls(), t0
        while time.monotonic() - t0 < limit:
            time.sleep(0.1)
            n = self.script_calls()
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return time.monotonic() - t0

    def stop(self):
        for n in reversed(self.started):
            n.stop()

    def check_workers(self):
        for n, pid in self.workers.items():
            if n.worker_pids() != [pid]:
                fail(f"{n.workdir.name}: the worker was replaced "
                     f"(crash?): {n.log_text()[-2000:]}")

    def sample(self):
        """Everything a run's deltas are taken from."""
        return {"t": time.monotonic(),
                "ns": {n: cpu_ns(p) for n, p in self.workers.items()},
                "ticks": {n: cpu_ticks(p) for n, p in self.workers.items()},
                "masters": sum(cpu_ticks(n.proc.pid) for n in self.workers),
                "redis_nodes": [redis_cpu(m.proc.pid)
                                for m in self.redis_nodes],
                "calls": [redis_calls(c) for c in self.clients],
                "errors": [redis_errors(c) for c in self.clients],
                "kids": children_ticks(),
                "stat": cpu_times()}

    def wrk(self, gws, duration, path, key=None, count=False):
        """One wrk per gateway, all at once; their parsed reports."""
        per = max(1, self.args.connections // len(gws))
        procs = []
        for i, n in enumerate(gws):
            env = dict(os.environ, GW_PATH=path, GW_KEYS=str(self.keys),
                       GW_OFFSET=str(i * self.keys // len(gws)))
            if key:
                env["GW_KEY"] = key
            if count:
                env["GW_COUNT"] = "1"
            procs.append(subprocess.Popen(
                ["taskset", "-c", str(self.client_cpu), "wrk", "-t1",
                 f"-c{per}", f"-d{duration}s", "--latency", "-s",
                 str(self.lua), n.url + path],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True))
        outs = []
        for p in procs:
            try:
                out, _ = p.communicate(timeout=duration + 60)
            except subprocess.TimeoutExpired:
                p.kill()
                fail("wrk did not finish")
            outs.append(out)
        res = []
        for n, out in zip(gws, outs):
            try:
                w = parse_wrk(out)
            except BenchError as e:
                fail(f"{n.workdir.name}: {e}\nwrk's whole output:\n{out}"
                     f"\nits error log:\n{n.log_text()[-3000:]}")
            e = w["errors"]
            if e["connect"] or e["read"] or e["write"] or e["timeout"]:
                fail(f"{n.workdir.name}: socket errors:\n{out}")
            if e["status"] and not count:
                fail(f"{n.workdir.name}: non-2xx answers:\n{out}")
            if count and w["summary"]["other"]:
                fail(f"{n.workdir.name}: answers other than 200/429:\n{out}")
            w["text"] = out
            res.append(w)
        return res

    def throughput(self, mode, size, duration):
        gws = self.fleet(mode, size)
        s0 = self.sample()
        ws = self.wrk(gws, duration, "/v1/chat/completions")
        tail = self.settle()
        s1 = self.sample()
        self.check_workers()
        reqs = sum(w["requests"] for w in ws)
        # summed over the redis-servers (the cluster's masters)
        node_ticks = [t1 - t0 for (t0, _), (t1, _)
                      in zip(s0["redis_nodes"], s1["redis_nodes"])]
        ticks = sum(node_ticks)
        ns = sum(n1 - n0 for (_, n0), (_, n1)
                 in zip(s0["redis_nodes"], s1["redis_nodes"]))
        per_node = [{k: c1.get(k, 0) - c0.get(k, 0) for k in c1}
                    for c0, c1 in zip(s0["calls"], s1["calls"])]
        d = {}
        for c in per_node:
            for k, v in c.items():
                d[k] = d.get(k, 0) + v
        node_calls = [script_calls(c) for c in per_node]
        errs = errors_delta(s0["errors"], s1["errors"])
        wall = (s1["t"] - s0["t"]) * CLK_TCK
        ours = (sum(s1["ticks"][n] - s0["ticks"][n] for n in self.workers)
                + s1["masters"] - s0["masters"] + ticks
                + s1["kids"] - s0["kids"])
        used = sum(s1["stat"][c]["proc"] - s0["stat"][c]["proc"]
                   + s1["stat"][c]["steal"] - s0["stat"][c]["steal"]
                   for c in s1["stat"]
                   if c in self.server_cpu or c == self.client_cpu)
        return {
            "mode": mode, "gateways": size, "requests": reqs,
            "rps": sum(w["rps"] for w in ws),
            "gw_rps": [w["rps"] for w in ws],
            "gw_cpu_us": [(s1["ns"][n] - s0["ns"][n]) / 1e3 / w["requests"]
                          for n, w in zip(gws, ws)],
            "gw_cpu_us_ticks": [(s1["ticks"][n] - s0["ticks"][n])
                                * 1e6 / CLK_TCK / w["requests"]
                                for n, w in zip(gws, ws)],
            "backend_cpu_us": (s1["ns"][self.backend]
                               - s0["ns"][self.backend]) / 1e3 / reqs,
            "redis_ticks": ticks,
            "redis_cpu_us": ticks * 1e6 / CLK_TCK / reqs,
            "redis_cpu_us_schedstat": ns / 1e3 / reqs,
            "redis_calls": script_calls(d) / reqs,
            # per redis-server (a cluster's masters by port): its share
            # of the script calls and of the Redis CPU
            "redis_nodes": [m.addr for m in self.redis_nodes],
            "redis_node_calls": node_calls,
            "redis_node_ticks": node_ticks,
            "redis_calls_share": [c / max(1, sum(node_calls))
                                  for c in node_calls],
            # errors answered during the run, summed over the nodes
            # (MOVED, ASK: ~0 once the gateways know the slot map)
            "redis_errors": errs,
            # INFO is this script's own
            "redis_cmds": {k: v / reqs for k, v in d.items()
                           if v and k != "info"},
            "p50_us": statistics.median(w["p50_us"] for w in ws),
            "p99_us": max(w["p99_us"] for w in ws),
            "wrk_cpu": (s1["kids"] - s0["kids"]) / wall,
            "noise": max(0.0, used - ours) / wall,
            "tail_s": tail,
        }

    def wait_quiet(self, limit=60):
        """Until a second passes with the two CPUs busy less than NOISY
        (only idle servers of ours on them), at most limit seconds."""
        cpus = self.server_cpu | {self.client_cpu}
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            s0, t0 = cpu_times(), time.monotonic()
            time.sleep(1)
            s1, t1 = cpu_times(), time.monotonic()
            busy = sum(s1[c]["proc"] - s0[c]["proc"] + s1[c]["steal"]
                       - s0[c]["steal"] for c in cpus)
            if busy / ((t1 - t0) * CLK_TCK) < NOISY:
                return

    def held(self, key, name, limit):
        """The units Redis holds for a key: its TAT ahead of Redis's
        clock, over the emission interval (the refill during a run is
        under 0.03 of a unit)."""
        k = f"infer:rl:{{{key}}}:{name}"
        if self.cluster:
            # where it lives (the harness follows MOVED and ASK), and
            # that master's clock
            tat = self.cluster.get(k)
            c = self.clients[[m.port for m in self.redis_nodes].index(
                self.cluster.master_for(k).port)]
        else:
            c = self.clients[0]
            tat = c.get(k)
        sec, usec = c.time()
        now = sec * 10 ** 6 + usec
        return (max(0.0, float(tat) - now) / (WINDOW_US / limit)
                if tat is not None else 0.0)

    def accuracy(self, kind, mode, size, duration, tag, replicas=None):
        """One limit on one fresh key through size gateways at once."""
        gws = self.fleet(mode, size, replicas)
        label = mode if replicas is None else f"{mode}-r{replicas}"
        key = f"acc-{tag}-{kind}-{label}-{size}"
        path = "/acc-req/" if kind == "requests" else "/acc-tok/"
        b0 = stub_requests(self.backend.url)
        e0 = [redis_errors(c) for c in self.clients]
        ws = self.wrk(gws, duration, path, key=key, count=True)
        t_end = time.monotonic()
        time.sleep(0.2)                 # requests wrk cut off finish
        b1 = stub_requests(self.backend.url)
        self.check_workers()
        served = b1 - b0 - 1            # the second /status counts itself
        limit = self.args.limit * (1 if kind == "requests" else USAGE)
        name = "acc_req" if kind == "requests" else "acc_tok"
        ok = [w["summary"]["ok"] for w in ws]
        charged = sum(ok) if kind == "requests" else USAGE * served
        # Redis must come to hold what was charged: the last coalesced
        # corrections land within 10 ms, the last syncs within an
        # interval; waited for up to 1 s after wrk
        while True:
            held = self.held(key, name, limit)
            if abs(held - charged) < 0.5 \
                    or time.monotonic() - t_end >= 1.0:
                break
            time.sleep(0.05)
        settled = time.monotonic() - t_end
        errs = errors_delta(e0, [redis_errors(c) for c in self.clients])
        total = sum(w["requests"] for w in ws)
        r = {"kind": kind, "mode": mode, "gateways": size, "key": key,
             "replicas": (replicas or size) if mode == "approx" else None,
             "limit": limit, "admitted": sum(ok), "gw_admitted": ok,
             "refused": sum(w["summary"]["limited"] for w in ws),
             "served": served, "redis_held": held, "held_after_s": settled,
             "allowed": limit, "charged": charged,
             "held_ok": abs(held - charged) < 0.5,
             "redis_errors": errs,
             "master": (self.cluster.master_for(
                 f"infer:rl:{{{key}}}:{name}").addr
                 if self.cluster else None),
             # the fleet's traffic in one sync interval (the run's mean)
             "per_interval": total / duration * APPROX_S}
        r["over"] = r["charged"] > r["allowed"]
        r["over_by"] = max(0, r["charged"] - r["allowed"])
        if mode == "approx":
            # the stated bound, W = replicas x worker_processes = size
            # when replicas= is right: one share of the whole limit and
            # one request per worker past the limit
            unit = 1 if kind == "requests" else self.reserve
            r["unit"] = unit
            r["bound"] = limit + size * (-(-limit // size) + unit)
            r["within"] = r["charged"] <= r["bound"]
        return r

    def log_lines(self):
        bad, other = [], []
        for n in self.started:
            if not isinstance(n, Nginx):
                continue
            bad += [f"{n.workdir.name}: {x}" for x in n.log_problems()]
            other += [f"{n.workdir.name}: {x}"
                      for x in n.log_text().splitlines()
                      if "[error]" in x or "[warn]" in x]
        return bad, other


def errors_delta(e0, e1):
    """{code: errors answered between two samples}, summed over nodes."""
    out = {}
    for a, b in zip(e0, e1):
        for k, v in b.items():
            if v - a.get(k, 0):
                out[k] = out.get(k, 0) + v - a.get(k, 0)
    return out


def cluster_note(r):
    """A run's calls per master and its MOVED / ASK answers."""
    e = r["redis_errors"]
    return ("  calls per master " + "/".join(
        f"{x:.0%}" for x in r["redis_calls_share"])
        + f"  MOVED {e.get('MOVED', 0)} ASK {e.get('ASK', 0)}")


def median(vals):
    return statistics.median(vals)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5,
                    help="measured rounds (default 5)")
    ap.add_argument("--duration", type=int, default=3,
                    help="seconds per throughput run (default 3)")
    ap.add_argument("--connections", type=int, default=32,
                    help="wrk connections in all, split between the "
                         "gateways of a run (default 32)")
    ap.add_argument("--limit", type=int, default=2000,
                    help="the accuracy runs' requests limit, per 30 days, "
                         "on one key; the tokens limit is 11 times it "
                         "(default 2000)")
    ap.add_argument("--acc-duration", type=int, default=2,
                    help="seconds per accuracy run (default 2)")
    ap.add_argument("--quick", action="store_true",
                    help="1 round of 2 s")
    ap.add_argument("--hot", action="store_true",
                    help="one key for every throughput request")
    ap.add_argument("--retries", type=int, default=10,
                    help="throughput runs that may be redone, in all, "
                         "because other work took over "
                         f"{NOISY * 100:.0f}%% of a CPU (default 10)")
    ap.add_argument("--no-accuracy", action="store_true",
                    help="throughput only")
    ap.add_argument("--modes", default=",".join(MODES),
                    help="the modes to run, comma-separated (default "
                         f"{','.join(MODES)})")
    ap.add_argument("--cluster", action="store_true",
                    help=f"count in a Redis Cluster of {MASTERS} masters "
                         "(no replicas) instead of one redis-server")
    ap.add_argument("--keep", action="store_true",
                    help="keep the work directory (confs, logs)")
    ap.add_argument("--out",
                    help="JSON results (default bench/results/gateways.json"
                         ", with --cluster gateways-cluster.json)")
    args = ap.parse_args()
    if args.out is None:
        args.out = str(BENCH / "results" / ("gateways-cluster.json"
                                            if args.cluster
                                            else "gateways.json"))
    if args.quick:
        args.rounds, args.duration = 1, 2
    asked = set(args.modes.split(","))
    args.modes = [m for m in MODES if m in asked]
    if not args.modes or asked - set(MODES):
        ap.error(f"--modes: one or more of {','.join(MODES)}")
    if min(args.rounds, args.duration, args.limit, args.acc_duration) < 1 \
            or args.connections < max(SIZES) or args.retries < 0:
        ap.error("--rounds, --duration, --limit, --acc-duration must be >= 1"
                 f", --connections >= {max(SIZES)}, --retries >= 0")

    work = Path(tempfile.mkdtemp(prefix="infer-bench-gw-"))
    bench = Bench(args, work)
    bench.keys = 1 if args.hot else KEYS
    configs = [(m, n) for n in SIZES for m in args.modes]
    runs, acc, discarded = [], [], []
    warm_errors = {}                    # answered during the warm-up round
    load = [os.getloadavg()]
    started = time.monotonic()
    ok = False
    try:
        bench.start()
        print(f"gateways bench: {args.rounds} rounds x {args.duration} s, "
              f"{args.connections} wrk connections in all, "
              f"{bench.keys} keys; redis {bench.redis_conf}, backend "
              f"{bench.backend.addr}; {bench.reserve} tokens reserved "
              f"per request; servers on CPU "
              f"{sorted(bench.server_cpu)}, wrk on CPU {bench.client_cpu}; "
              f"modules {MODULES_DIR}", flush=True)
        key_share = bench.key_shares() if args.cluster else None
        if key_share:
            print(f"cluster: {MASTERS} masters, no replicas, "
                  f"cluster-node-timeout {NODE_TIMEOUT_MS} ms; the "
                  f"{bench.keys} throughput keys' share per master (by "
                  "slot): " + " / ".join(f"{x:.1%}" for x in key_share),
                  flush=True)
        for rnd in range(args.rounds + 1):          # round 0 warms up
            k = rnd % len(configs)
            for mode, size in configs[k:] + configs[:k]:
                while True:
                    r = bench.throughput(mode, size,
                                         1 if rnd == 0 else args.duration)
                    if rnd == 0 or r["noise"] <= NOISY \
                            or len(discarded) >= args.retries:
                        break
                    discarded.append(r)
                    print(f"  round {rnd} N={size} {LABEL[mode]}: other "
                          f"work took {r['noise']:.0%} of a CPU: discarded"
                          f" ({args.retries - len(discarded)} retries "
                          "left), redone once the machine is quiet",
                          flush=True)
                    bench.wait_quiet()
                if rnd == 0:
                    for code, v in r["redis_errors"].items():
                        warm_errors[code] = warm_errors.get(code, 0) + v
                    continue
                r["round"] = rnd
                runs.append(r)
                print(f"  round {rnd} N={size} {LABEL[mode]:<13} "
                      f"{r['rps']:8,.0f} req/s ("
                      + "/".join(f"{x:,.0f}" for x in r["gw_rps"])
                      + f")  gw {statistics.mean(r['gw_cpu_us']):5.1f} "
                      f"µs/req  redis {r['redis_cpu_us']:5.2f} µs/req "
                      f"(schedstat {r['redis_cpu_us_schedstat']:5.2f})  "
                      f"{r['redis_calls']:.3f} calls/req  wrk CPU "
                      f"{r['wrk_cpu']:.0%}  other load {r['noise']:.0%}"
                      + (cluster_note(r) if args.cluster else ""),
                      flush=True)
        if not args.no_accuracy:
            tag = str(int(time.time()))
            runs_acc = [(kind, mode, size, None)
                        for kind in ("requests", "tokens")
                        for mode in args.modes for size in SIZES]
            if "approx" in args.modes:
                # misconfigured: four gateways that each think they are
                # the only one (replicas=1)
                runs_acc.append(("requests", "approx", max(SIZES), 1))
            for kind, mode, size, replicas in runs_acc:
                r = bench.accuracy(kind, mode, size, args.acc_duration,
                                   tag, replicas)
                acc.append(r)
                print(f"  accuracy {kind:<8} {LABEL[mode]:<13} N={size}"
                      + (f" replicas={r['replicas']}" if r["replicas"]
                         else "")
                      + f": admitted {r['admitted']} ("
                      + "/".join(map(str, r["gw_admitted"]))
                      + f"), served {r['served']}, charged {r['charged']} "
                      f"of {r['allowed']}"
                      + (f" (bound {r['bound']})" if "bound" in r else "")
                      + f", redis holds {r['redis_held']:.1f} after "
                      f"{r['held_after_s']:.2f} s, refused {r['refused']}"
                      f", {r['per_interval']:,.0f} req per "
                      f"{APPROX}"
                      + (f"; on {r['master']}, MOVED "
                         f"{r['redis_errors'].get('MOVED', 0)} ASK "
                         f"{r['redis_errors'].get('ASK', 0)}"
                         if args.cluster else ""), flush=True)
        all_errors = errors_delta(bench.errors0, [redis_errors(c)
                                                  for c in bench.clients])
        bad, other = bench.log_lines()
        if bad:
            fail("nginx logged problems:\n" + "\n".join(bad[:20]))
        ok = True
    except BenchError as e:
        print(f"\nBENCH FAILED: {e}", file=sys.stderr)
    finally:
        bench.stop()
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory kept: {work}", file=sys.stderr)
    if not ok:
        sys.exit(1)
    load.append(os.getloadavg())
    elapsed = time.monotonic() - started

    summary = []
    print()
    print(f"Medians over {args.rounds} rounds of {args.duration} s; "
          f"{elapsed / 60:.1f} min in all; load average before "
          f"{load[0][0]:.2f}, after {load[1][0]:.2f}.")
    print()
    head = (f"{'N':>2} {'mode':>13} {'req/s':>8} {'per gateway':>23} "
            f"{'gw CPU µs/req':>14} {'redis µs/req':>12} "
            f"{'calls/req':>9} {'p50 ms':>6} {'p99 ms':>6}")
    print(head)
    print("-" * len(head))
    for size in SIZES:
        for mode in args.modes:
            rs = [r for r in runs if r["mode"] == mode
                  and r["gateways"] == size]
            # Redis CPU from the tick count summed over the rounds: a 3 s
            # run is only some tens of ticks of Redis
            ticks = sum(r["redis_ticks"] for r in rs)
            reqs = sum(r["requests"] for r in rs)
            m = {"mode": mode, "gateways": size,
                 "rps": median([r["rps"] for r in rs]),
                 "gw_rps": [median([r["gw_rps"][i] for r in rs])
                            for i in range(size)],
                 "gw_cpu_us": [median([r["gw_cpu_us"][i] for r in rs])
                               for i in range(size)],
                 "redis_cpu_us": ticks * 1e6 / CLK_TCK / reqs,
                 "redis_cpu_us_schedstat":
                     median([r["redis_cpu_us_schedstat"] for r in rs]),
                 "redis_calls": median([r["redis_calls"] for r in rs]),
                 "backend_cpu_us": median([r["backend_cpu_us"] for r in rs]),
                 "p50_us": median([r["p50_us"] for r in rs]),
                 "p99_us": median([r["p99_us"] for r in rs]),
                 "redis_cmds": rs[-1]["redis_cmds"],
                 "tail_s": max(r["tail_s"] for r in rs)}
            if args.cluster:
                # over all rounds: each master's share of the script calls
                # and of Redis's CPU, and the MOVED / ASK answered
                calls = [sum(r["redis_node_calls"][i] for r in rs)
                         for i in range(len(bench.redis_nodes))]
                nt = [sum(r["redis_node_ticks"][i] for r in rs)
                      for i in range(len(bench.redis_nodes))]
                m["redis_calls_share"] = [c / max(1, sum(calls))
                                          for c in calls]
                m["redis_cpu_share"] = [t / max(1, sum(nt)) for t in nt]
                m["moved"] = sum(r["redis_errors"].get("MOVED", 0)
                                 for r in rs)
                m["ask"] = sum(r["redis_errors"].get("ASK", 0) for r in rs)
            summary.append(m)
            share = "/".join(f"{x:,.0f}" for x in m["gw_rps"])
            cpu = statistics.mean(m["gw_cpu_us"])
            print(f"{size:>2} {LABEL[mode]:>13} {m['rps']:8,.0f} "
                  f"{share:>23} {cpu:14.1f} {m['redis_cpu_us']:12.2f} "
                  f"{m['redis_calls']:9.4f} {m['p50_us'] / 1e3:6.2f} "
                  f"{m['p99_us'] / 1e3:6.2f}")
    print()
    print("gw CPU µs/req: mean of the gateways' workers (per gateway: "
          + "; ".join(f"N={m['gateways']} {LABEL[m['mode']]} "
                      + "/".join(f"{x:.1f}" for x in m["gw_cpu_us"])
                      for m in summary if m["gateways"] > 1) + ")")
    print("redis µs/req: redis-server utime+stime (/proc/PID/stat) over "
          "all rounds / requests; schedstat cross-check: "
          + ", ".join(f"N={m['gateways']} {LABEL[m['mode']]} "
                      f"{m['redis_cpu_us_schedstat']:.2f}" for m in summary))
    print("redis commands per request (last round): "
          + "; ".join(f"N={m['gateways']} {LABEL[m['mode']]} "
                      + ", ".join(f"{k}={v:.3f}" for k, v in
                                  sorted(m["redis_cmds"].items()))
                      for m in summary))
    print("a run's tail after wrk (until Redis had no call for 0.3 s), "
          "at most: " + ", ".join(f"N={m['gateways']} {LABEL[m['mode']]} "
                                  f"{m['tail_s']:.1f} s" for m in summary))
    print("backend CPU µs/req (same CPU, for reference): "
          + ", ".join(f"N={m['gateways']} {LABEL[m['mode']]} "
                      f"{m['backend_cpu_us']:.1f}" for m in summary))
    if args.cluster:
        print(f"cluster masters {', '.join(m.addr for m in bench.redis_nodes)}"
              ": the throughput keys' share by slot "
              + "/".join(f"{x:.1%}" for x in key_share))
        print("  share of the script calls (all rounds): "
              + "; ".join(f"N={m['gateways']} {LABEL[m['mode']]} "
                          + "/".join(f"{x:.1%}"
                                     for x in m["redis_calls_share"])
                          for m in summary))
        print("  share of Redis's CPU (all rounds): "
              + "; ".join(f"N={m['gateways']} {LABEL[m['mode']]} "
                          + "/".join(f"{x:.1%}"
                                     for x in m["redis_cpu_share"])
                          for m in summary))
        print("  MOVED / ASK answered in the kept runs: "
              + ", ".join(f"N={m['gateways']} {LABEL[m['mode']]} "
                          f"{m['moved']}/{m['ask']}" for m in summary)
              + "; in the warm-up round (every gateway's first "
              "requests, before its workers know the slot map): "
              + (", ".join(f"{k} {v}" for k, v in
                           sorted(warm_errors.items())) or "none")
              + "; over the whole bench (accuracy runs and the "
              "gateways' first request included): "
              + (", ".join(f"{k} {v}" for k, v in
                           sorted(all_errors.items())) or "none"))
    noisy = [r for r in runs if r["noise"] > NOISY]
    print(f"other load on the two CPUs: at most "
          f"{max(r['noise'] for r in runs):.0%} of a CPU in a kept run"
          + (f"; WARNING: {len(noisy)} of {len(runs)} kept runs over "
             f"{NOISY:.0%}, their figures are unreliable" if noisy else "")
          + (f"; {len(discarded)} runs discarded and redone"
             if discarded else ""))

    if acc:
        print()
        print(f"Accuracy: one key, {args.acc_duration} s per run, all the "
              "gateways at once (admitted = 200s at the clients; served = "
              "the backend's count)")
        print()
        head = (f"{'limit':<22} {'mode':>13} {'N':>2} {'R':>2} "
                f"{'admitted':>8} {'per gateway':>19} {'served':>7} "
                f"{'charged/allowed':>17} {'over':>6} {'bound':>6} "
                f"{'redis holds':>11} {'429s':>7} {'req/100ms':>9}")
        print(head)
        print("-" * len(head))
        for r in acc:
            lim = (f"requests={args.limit}/30d" if r["kind"] == "requests"
                   else f"tokens={r['limit']}/30d")
            print(f"{lim:<22} {LABEL[r['mode']]:>13} {r['gateways']:>2} "
                  f"{r['replicas'] or '':>2} {r['admitted']:>8} "
                  f"{'/'.join(map(str, r['gw_admitted'])):>19} "
                  f"{r['served']:>7} "
                  f"{str(r['charged']) + '/' + str(r['allowed']):>17} "
                  f"{r['over_by']:>6} {r.get('bound', ''):>6} "
                  f"{r['redis_held']:11.1f} {r['refused']:>7} "
                  f"{r['per_interval']:9,.0f}"
                  + ("" if r["held_ok"] else "  REDIS")
                  + ("  PAST BOUND" if not r.get("within", True) else ""))
        print("R: replicas= of the approximate gateways; charged: requests "
              "admitted, or 11 tokens x requests served; over: charged - "
              "allowed; bound: allowed + N x (ceil(allowed / N) + one "
              f"request: 1, or {bench.reserve} tokens reserved), stated "
              "for R = N; req/100ms: the fleet's requests (200s and 429s) "
              f"in one sync interval of {APPROX}, the run's mean")
    print()
    print("What one Redis core carries at these figures (Redis CPU per "
          "request as measured here: loopback, this machine, one worker "
          "per gateway, 100 % of the core):")
    for m in summary:
        if m["gateways"] != max(SIZES):
            continue
        cap = 1e6 / m["redis_cpu_us"]
        print(f"  {LABEL[m['mode']]:<13} (N={m['gateways']}): "
              f"{m['redis_cpu_us']:.1f} µs/req -> {cap:,.0f} req/s per "
              f"Redis core = {cap / GW_RPS:.1f} gateways at {GW_RPS:,} "
              f"req/s; {FLEET} gateways ({FLEET * GW_RPS:,} req/s) need "
              f"{FLEET * GW_RPS * m['redis_cpu_us'] / 1e6:.1f} Redis cores")
        if args.cluster:
            # a master runs the scripts on one thread: masters = cores,
            # spread as evenly as the keys are; the busiest master sets
            # the pace
            cores = FLEET * GW_RPS * m["redis_cpu_us"] / 1e6
            skew = max(m["redis_cpu_share"]) * MASTERS
            print(f"    a cluster: {math.ceil(cores)} masters at 100 % of "
                  f"a core, {math.ceil(cores / 0.7)} at 70 %, if the keys "
                  "spread evenly; here the busiest of "
                  f"{MASTERS} masters had {max(m['redis_cpu_share']):.1%} "
                  f"of Redis's CPU ({skew:.2f} x an even share): "
                  f"{math.ceil(cores * skew / 0.7)} at 70 % with that skew")
    if other:
        print()
        print(f"nginx logged {len(other)} [error]/[warn] lines, e.g.:")
        print("\n".join(other[:5]))

    # exact: a requests limit admits exactly its limit, a tokens limit
    # is never passed; approx: within the stated bound when replicas= is
    # right (the misconfigured run is only reported); every mode: the
    # clients' 200s are the backend's count, and Redis holds what was
    # charged
    bad_acc = [r for r in acc
               if (r["mode"] != "approx" and r["kind"] == "requests"
                   and r["admitted"] != r["allowed"])
               or (r["mode"] != "approx" and r["over"])
               or (r["mode"] == "approx" and r["replicas"] == r["gateways"]
                   and not r["within"])
               or (r["kind"] == "requests" and r["served"] != r["admitted"])
               or not r["held_ok"]]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": datetime.datetime.now(datetime.timezone.utc)
                .isoformat(timespec="seconds"),
        "git": git_describe(), "nginx": tool_version([NGINX_BIN, "-v"]),
        "redis": tool_version(["redis-server", "--version"]),
        "modules_dir": str(MODULES_DIR),
        "modules_sha256": {m: hashlib.sha256(
            module_path(m).read_bytes()).hexdigest()
            for m in ("route", "ratelimit")},
        "params": {k: v for k, v in vars(args).items()},
        "reserve_tokens": bench.reserve, "approximate": APPROX,
        "loadavg_before_after": load, "keys": bench.keys,
        "summary": summary, "runs": runs, "discarded": discarded,
        "accuracy": acc,
        "redis_errors_warmup": warm_errors, "redis_errors_all": all_errors,
        "cluster": ({"masters": [m.addr for m in bench.redis_nodes],
                     "node_timeout_ms": NODE_TIMEOUT_MS,
                     "key_share": key_share} if args.cluster else None),
        "nginx_error_warn_lines": other[:100],
    }, indent=2, default=str) + "\n")
    print(f"\nwritten: {out}")
    if bad_acc:
        print("ACCURACY FAILED: " + "; ".join(
            f"{r['kind']} {LABEL[r['mode']]} N={r['gateways']}"
            + (f" replicas={r['replicas']}" if r["replicas"] else "")
            + f": admitted {r['admitted']}, served {r['served']}, charged "
            f"{r['charged']} of {r['allowed']}"
            + (f" (bound {r['bound']})" if "bound" in r else "")
            + f", Redis holds {r['redis_held']:.1f}" for r in bad_acc),
            file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
