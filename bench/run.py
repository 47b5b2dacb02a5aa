"""ngx_infer benchmark: what the modules cost a proxied request.

wrk (pinned to one CPU) drives gateways (pinned to the other CPU, one
worker each) that proxy to a fast static backend (same CPU as the
gateways).  Every configuration in CONFIGS is measured in interleaved
rounds; the report gives, per configuration, the median over rounds of
req/s, p50 and p99 latency and the gateway worker's CPU time per request,
and the ratio of each to the baseline (the first configuration).

    /usr/bin/python3 bench/run.py                 # 5 rounds of 5 s (~1 min)
    /usr/bin/python3 bench/run.py --quick         # 2 rounds of 2 s, smoke run
    /usr/bin/python3 bench/run.py --only plain,infer --rounds 9

Exits non-zero, loudly, when any wrk run reports an error (non-2xx,
socket errors, timeouts), when responses are not the expected ones, when
a gateway worker was replaced during a run, or when an nginx logged an
[alert]/[emerg].  Results: printed, and bench/results/latest.json.

To add a configuration, append a GatewayConfig to CONFIGS (see README.md).
"""

import argparse
import datetime
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
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "t"))

from harness.nginx import MODULES, NGINX_BIN, Nginx, module_path  # noqa: E402


# --------------------------------------------------------------------------
# What is measured: a table of named gateway configurations.
#
# Every gateway is the same proxy (GATEWAY below) with the configuration's
# modules loaded and its snippets inserted at http, server and location
# level.  The first entry is the baseline the others are compared with.
# --------------------------------------------------------------------------

ALL_ON = " ".join(f"infer_{m} on;" for m in MODULES)


@dataclass
class GatewayConfig:
    name: str
    description: str
    modules: list = field(default_factory=list)   # names from MODULES
    http: str = ""          # inserted in http {}, before the server
    server: str = ""        # inserted in server {}
    location: str = ""      # inserted in location / {}, after proxy_pass
    script: str = "chat.lua"  # wrk Lua script in bench/: the request sent
    default: bool = True    # run without --only


CONFIGS = [
    GatewayConfig(
        name="plain",
        description="nginx without ngx_infer: plain proxy_pass",
    ),
    GatewayConfig(
        name="infer",
        description="the four modules loaded, all four enabled",
        modules=list(MODULES),
        location=ALL_ON,
    ),
    # Not run by default: the modules loaded but not enabled, which
    # separates the cost of loading them (phase handlers that decline at
    # once, a different memory layout) from the cost of their work.
    GatewayConfig(
        name="loaded",
        description="the four modules loaded, none enabled",
        modules=list(MODULES),
        default=False,
    ),
    # A/A check, not run by default: the baseline again, in a gateway of its
    # own.  `--only plain,plain-aa` shows the noise floor of this machine:
    # any plain-aa/plain ratio away from 1 is noise, not a cost.
    GatewayConfig(
        name="plain-aa",
        description="plain again (A/A noise check)",
        default=False,
    ),
]


# The backend answers every request with this body, from the rewrite phase
# (return), so it costs as little as nginx can; it is not what we measure.
BACKEND_BODY = (
    '{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,'
    '"model":"bench-model","choices":[{"index":0,"message":{"role":'
    '"assistant","content":"Hello."},"finish_reason":"stop"}],"usage":'
    '{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}'
)

# keepalive_requests is raised everywhere so that connections are never
# recycled during a run: reconnects would add a cost (and noise) that has
# nothing to do with the modules.  access_log off is at server level: the
# harness always writes an http-level access_log, which this overrides.
BACKEND = """
    server {
        listen 127.0.0.1:{port};
        access_log off;
        keepalive_requests 1000000;
        location / {
            default_type application/json;
            return 200 '%s';
        }
    }
""" % BACKEND_BODY

GATEWAY = """
    upstream bench_backend {{
        server {backend};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    {http}
    server {{
        listen 127.0.0.1:{{port}};
        access_log off;
        keepalive_requests 1000000;
        {server}
        location / {{
            proxy_pass http://bench_backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            {location}
        }}
    }}
"""


def gateway_http(cfg, backend_addr):
    # the result still holds {port}, which the harness fills in
    return GATEWAY.format(backend=backend_addr, http=cfg.http,
                          server=cfg.server, location=cfg.location)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    pass


def fail(msg):
    raise BenchError(msg)


def cpu_ticks(pid):
    """utime + stime of pid, in clock ticks (/proc/PID/stat fields 14, 15)."""
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    # field 2 (comm) is in parentheses and may hold spaces: split after it
    rest = s[s.rindex(")") + 2:].split()
    # rest[0] is field 3, so fields 14 and 15 are rest[11] and rest[12]
    return int(rest[11]) + int(rest[12])


def cpu_ns(pid):
    """Time on CPU in ns from /proc/PID/schedstat (a finer cross-check of
    the tick count); None where the kernel does not provide it."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def cpu_sample(pids):
    ns = [cpu_ns(p) for p in pids]
    return {"ticks": sum(cpu_ticks(p) for p in pids),
            "ns": None if None in ns else sum(ns)}


def cpu_times():
    """Per CPU from /proc/stat, in ticks: process time (user + nice +
    system), steal (time the hypervisor gave to someone else) and total."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if re.match(r"cpu\d+ ", line):
                name, *v = line.split()
                v = [int(x) for x in v] + [0] * 10
                out[int(name[3:])] = {"proc": v[0] + v[1] + v[2],
                                      "steal": v[7], "total": sum(v[:8])}
    return out


def pin(pid, cpus):
    os.sched_setaffinity(pid, cpus)


def master_and_workers(n):
    return [n.proc.pid] + n.worker_pids()


UNIT_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def to_us(value, unit):
    return float(value) * UNIT_US[unit]


def parse_wrk(text):
    """The numbers of wrk's text report (wrk 4.x with --latency), and the
    WRK_SUMMARY line our Lua done() prints."""
    out = {}
    m = re.search(r"^Requests/sec:\s+([\d.]+)\s*$", text, re.M)
    if not m:
        fail("no Requests/sec in wrk output:\n" + text)
    out["rps"] = float(m.group(1))
    m = re.search(r"^\s+(\d+) requests in ([\d.]+)(us|ms|s|m|h),", text, re.M)
    if not m:
        fail("no request count in wrk output:\n" + text)
    out["requests"] = int(m.group(1))
    out["duration_s"] = to_us(m.group(2), m.group(3)) / 1e6
    dist = re.search(r"Latency Distribution\n((?:\s+[\d.]+%\s+\S+\n)+)", text)
    if not dist:
        fail("no latency distribution in wrk output (--latency?):\n" + text)
    pct = {}
    for p, v, u in re.findall(r"([\d.]+)%\s+([\d.]+)(us|ms|s|m|h)\b",
                              dist.group(1)):
        pct[float(p)] = to_us(v, u)
    if 50.0 not in pct or 99.0 not in pct:
        fail("latency distribution lacks p50/p99:\n" + dist.group(0))
    out["p50_us"], out["p99_us"] = pct[50.0], pct[99.0]

    errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0, "status": 0}
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                  r"timeout (\d+)", text)
    if m:
        errors.update(connect=int(m.group(1)), read=int(m.group(2)),
                      write=int(m.group(3)), timeout=int(m.group(4)))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        errors["status"] = int(m.group(1))
    out["errors"] = errors

    m = re.search(r"^WRK_SUMMARY (\{.*\})\s*$", text, re.M)
    if not m:
        fail("no WRK_SUMMARY line (did the Lua script's done() run?):\n" + text)
    out["summary"] = json.loads(m.group(1))
    return out


def raw_response_size(addr, path, body):
    """Exact size in bytes of one keep-alive response to our POST, as wrk
    reads it (status line, headers, body)."""
    host, port = addr.rsplit(":", 1)
    req = (f"POST {path} HTTP/1.1\r\nHost: {addr}\r\n"
           f"Content-Type: application/json\r\nAuthorization: Bearer x\r\n"
           f"Content-Length: {len(body)}\r\n\r\n{body}").encode()
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(req)
        buf = b""
        deadline = time.monotonic() + 5
        while b"\r\n\r\n" not in buf:
            if time.monotonic() > deadline:
                fail(f"no response header from {addr}")
            chunk = s.recv(65536)
            if not chunk:
                fail(f"{addr} closed the connection")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        m = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.I)
        if not m:
            fail(f"{addr}: response without Content-Length:\n{head.decode()}")
        need = int(m.group(1))
        while len(rest) < need:
            if time.monotonic() > deadline:
                fail(f"short response body from {addr}")
            chunk = s.recv(65536)
            if not chunk:
                fail(f"{addr} closed the connection mid-body")
            rest += chunk
        return len(head) + 4 + need


def lua_request(script):
    """path and body the wrk script sends (for the preflight requests)."""
    text = (BENCH / script).read_text()
    path = re.search(r'^wrk\.path\s*=\s*"([^"]*)"', text, re.M).group(1)
    body = re.search(r"^wrk\.body\s*=\s*'([^']*)'", text, re.M).group(1)
    return path, body


def preflight(name, url, path, body):
    """One POST through url: it must be a 200 with the backend's body."""
    req = urllib.request.Request(
        url + path, data=body.encode(), method="POST",
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            status, got = r.status, r.read().decode()
    except Exception as e:  # noqa: BLE001 - any failure is fatal here
        fail(f"{name}: preflight POST {url}{path} failed: {e}")
    if status != 200 or got != BACKEND_BODY:
        fail(f"{name}: preflight POST {url}{path} answered {status}: {got!r}")


def tool_version(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (r.stdout + r.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def git_describe():
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                              capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status",
                                "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------

class Bench:
    def __init__(self, args, configs, workdir):
        self.args = args
        self.configs = configs
        self.workdir = Path(workdir)
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            fail(f"need 2 CPUs (one for wrk, one for nginx), have {cpus}")
        self.server_cpus = {cpus[0]}
        self.client_cpu = cpus[1]
        self.backend = None
        self.gateways = {}
        self.expected_size = {}

    # -- servers ------------------------------------------------------------

    def _start(self, n):
        """Start n with the server CPU as its affinity: nginx's master and
        workers inherit it from us at fork.  Our own affinity is restored
        right after, and the result is checked on every process."""
        mine = os.sched_getaffinity(0)
        os.sched_setaffinity(0, self.server_cpus)
        try:
            n.start()
        finally:
            os.sched_setaffinity(0, mine)
        for pid in master_and_workers(n):
            if os.sched_getaffinity(pid) != self.server_cpus:
                pin(pid, self.server_cpus)   # belt and braces
            if os.sched_getaffinity(pid) != self.server_cpus:
                fail(f"could not pin nginx pid {pid} to {self.server_cpus}")
        return n

    def start(self):
        self.backend = self._start(Nginx(
            self.workdir / "backend", http=BACKEND, modules=[], workers=1,
            error_level="warn"))
        for cfg in self.configs:
            n = Nginx(self.workdir / f"gw-{cfg.name}",
                      http=gateway_http(cfg, self.backend.addr),
                      modules=cfg.modules, workers=1, error_level="warn")
            ok, out = n.check_config()
            if not ok:
                fail(f"gateway {cfg.name}: nginx -t failed:\n{out}")
            self.gateways[cfg.name] = self._start(n)

        for cfg in self.configs:
            gw = self.gateways[cfg.name]
            path, body = lua_request(cfg.script)
            preflight(cfg.name, gw.url, path, body)
            self.expected_size[cfg.name] = raw_response_size(gw.addr, path,
                                                             body)

    def stop(self):
        for n in list(self.gateways.values()) + [self.backend]:
            if n is not None:
                n.stop()

    def log_problems(self):
        problems = []
        for name, n in [("backend", self.backend)] + list(self.gateways.items()):
            if n is None:
                continue
            problems += [f"{name}: {l}" for l in n.log_problems()]
            # access_log off must hold: a log write per request would be
            # measured along with the modules
            log = n.workdir / "access.log"
            if log.exists() and log.stat().st_size > 0:
                problems.append(f"{name}: access log written ({log})")
        return problems

    # -- one wrk run --------------------------------------------------------

    def run(self, cfg, duration, label):
        gw = self.gateways[cfg.name]
        workers = gw.worker_pids()
        bworkers = self.backend.worker_pids()
        cmd = ["taskset", "-c", str(self.client_cpu), "wrk",
               "-t1", f"-c{self.args.connections}", f"-d{duration}s",
               "--latency", "-s", str(BENCH / cfg.script),
               gw.url + lua_request(cfg.script)[0]]
        before, bbefore = cpu_sample(workers), cpu_sample(bworkers)
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus0 = cpu_times()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True,
                               timeout=duration + 30)
        except subprocess.TimeoutExpired:
            fail(f"{cfg.name} ({label}): wrk did not finish in "
                 f"{duration + 30} s")
        after, bafter = cpu_sample(workers), cpu_sample(bworkers)
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus1 = cpu_times()
        if r.returncode != 0:
            fail(f"{cfg.name} ({label}): wrk exited {r.returncode}:\n"
                 + r.stdout + r.stderr)
        if gw.worker_pids() != workers or self.backend.worker_pids() != bworkers:
            fail(f"{cfg.name} ({label}): an nginx worker was replaced during "
                 "the run (crash?): CPU accounting is void\n"
                 + "\n".join(self.log_problems()))

        w = parse_wrk(r.stdout)
        s = w["summary"]
        self.check(cfg, label, w, s, r.stdout)

        n = w["requests"]
        wrk_ticks = (ru1.ru_utime - ru0.ru_utime + ru1.ru_stime
                     - ru0.ru_stime) * CLK_TCK
        ours = {cpu: 0.0 for cpu in self.server_cpus | {self.client_cpu}}
        sc = min(self.server_cpus)
        ours[sc] += (after["ticks"] - before["ticks"]
                     + bafter["ticks"] - bbefore["ticks"])
        ours[self.client_cpu] += wrk_ticks
        # interference: process time on our CPUs that is not ours (the
        # machine may be shared), and steal, as fractions of the run
        interference = {}
        for cpu in ours:
            d = {k: cpus1[cpu][k] - cpus0[cpu][k] for k in cpus0[cpu]}
            span = max(d["total"], 1)
            interference[cpu] = {
                "other": max(d["proc"] - ours[cpu], 0) / span,
                "steal": d["steal"] / span}
        res = {
            "config": cfg.name, "label": label, "duration_s": w["duration_s"],
            "requests": n, "rps": w["rps"],
            "p50_us": w["p50_us"], "p99_us": w["p99_us"],
            "cpu_ticks": after["ticks"] - before["ticks"],
            "cpu_us_per_req": (after["ticks"] - before["ticks"])
                              * 1e6 / CLK_TCK / n,
            "backend_cpu_us_per_req": (bafter["ticks"] - bbefore["ticks"])
                                      * 1e6 / CLK_TCK / n,
            "cpu_us_per_req_schedstat": None,
            "bytes_per_req": s["bytes"] / n,
            # wrk's own CPU use (of its one CPU): near 1.0 would mean the
            # client, not the gateway, limits req/s
            "wrk_cpu_util": wrk_ticks / CLK_TCK / w["duration_s"],
            "interference": interference,
            "noise": max(max(v["other"], v["steal"])
                         for v in interference.values()),
            "wrk_summary": s,
        }
        if before["ns"] is not None and after["ns"] is not None:
            res["cpu_us_per_req_schedstat"] = \
                (after["ns"] - before["ns"]) / 1e3 / n
        return res

    def check(self, cfg, label, w, s, text):
        where = f"{cfg.name} ({label})"
        errs = {k: v for k, v in w["errors"].items() if v}
        errs.update({f"lua:{k}": v for k, v in s["errors"].items() if v})
        if errs:
            fail(f"{where}: wrk reported errors {errs}:\n{text}")
        if w["requests"] <= 0:
            fail(f"{where}: no request completed:\n{text}")
        if s["requests"] != w["requests"]:
            fail(f"{where}: wrk text says {w['requests']} requests, "
                 f"done() says {s['requests']}")
        # the text percentiles are rounded to 2 decimals: allow 2 %
        for p in ("p50", "p99"):
            exact, parsed = s["latency_us"][p], w[f"{p}_us"]
            if abs(parsed - exact) > max(0.02 * exact, 1.0):
                fail(f"{where}: parsed {p} {parsed} us but wrk's exact value "
                     f"is {exact} us (latency parse error?)\n{text}")
        # every response must be the very response checked in preflight:
        # bytes read is requests x its size, plus at most the partial
        # responses in flight when wrk stopped
        size = self.expected_size[cfg.name]
        lo = w["requests"] * size
        hi = (w["requests"] + self.args.connections) * size
        if not lo <= s["bytes"] <= hi:
            fail(f"{where}: wrk read {s['bytes']} bytes for {w['requests']} "
                 f"responses of {size} bytes: some responses were not the "
                 f"expected 200")


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

# a run where other processes (or the hypervisor) took more than this
# fraction of one of our CPUs is flagged as noisy
NOISY = 0.05

METRICS = [  # key, heading, format
    ("rps", "req/s", "{:,.0f}"),
    ("p50_us", "p50", None),
    ("p99_us", "p99", None),
    ("cpu_us_per_req", "CPU µs/req", "{:.2f}"),
]


def fmt_lat(us):
    return f"{us:.0f} µs" if us < 1000 else f"{us / 1000:.2f} ms"


def fmt(key, fmtstr, v):
    return fmt_lat(v) if fmtstr is None else fmtstr.format(v)


def summarize(configs, runs):
    summary = {}
    for cfg in configs:
        rs = [r for r in runs if r["config"] == cfg.name]
        summary[cfg.name] = {
            "rounds": len(rs),
            **{k: statistics.median(r[k] for r in rs) for k, _, _ in METRICS},
            "backend_cpu_us_per_req":
                statistics.median(r["backend_cpu_us_per_req"] for r in rs),
            "range": {k: [min(r[k] for r in rs), max(r[k] for r in rs)]
                      for k, _, _ in METRICS},
        }
        sched = [r["cpu_us_per_req_schedstat"] for r in rs]
        summary[cfg.name]["cpu_us_per_req_schedstat"] = \
            None if None in sched else statistics.median(sched)
    # Two ratios per config: of the medians, and the median of the ratios
    # within each round (paired: the two runs were seconds apart, so slow
    # drifts of the machine cancel out).
    base = configs[0].name
    by_round = {}
    for r in runs:
        by_round.setdefault(r["round"], {})[r["config"]] = r
    ratios = {}
    for cfg in configs[1:]:
        pairs = [(rd[cfg.name], rd[base]) for rd in by_round.values()
                 if cfg.name in rd and base in rd]
        paired = {k: [a[k] / b[k] for a, b in pairs] for k, _, _ in METRICS}
        ratios[f"{cfg.name}/{base}"] = {
            "of_medians": {k: summary[cfg.name][k] / summary[base][k]
                           for k, _, _ in METRICS},
            "paired_median": {k: statistics.median(v)
                              for k, v in paired.items()},
            "paired_range": {k: [min(v), max(v)] for k, v in paired.items()},
        }
    return summary, ratios


def table(configs, summary, ratios):
    head = ["config"] + [h for _, h, _ in METRICS] + ["CPU µs/req min–max"]
    rows = []
    for cfg in configs:
        s = summary[cfg.name]
        lo, hi = s["range"]["cpu_us_per_req"]
        rows.append([cfg.name] + [fmt(k, f, s[k]) for k, _, f in METRICS]
                    + [f"{lo:.2f}–{hi:.2f}"])
    for name, r in ratios.items():
        rows.append([name] + [f"{r['of_medians'][k]:.3f}"
                              for k, _, _ in METRICS] + [""])
        lo, hi = r["paired_range"]["cpu_us_per_req"]
        rows.append(["  paired"] + [f"{r['paired_median'][k]:.3f}"
                                    for k, _, _ in METRICS]
                    + [f"{lo:.3f}–{hi:.3f}"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(  # noqa: E731
        (c.ljust(w) if i == 0 else c.rjust(w))
        for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(head), line(["-" * w for w in widths])]
    for i, row in enumerate(rows):
        if i == len(configs):
            out.append(line(["-" * w for w in widths]))
        out.append(line(row))
    return "\n".join(out)


# --------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5,
                    help="measured rounds; each runs every config once, in "
                         "rotating order (default 5)")
    ap.add_argument("--duration", type=int, default=5,
                    help="seconds per wrk run (default 5)")
    ap.add_argument("--connections", type=int, default=32,
                    help="wrk connections, one wrk thread (default 32)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="seconds of warm-up per config (default 2, 1 with "
                         "--quick)")
    ap.add_argument("--retries", type=int, default=None,
                    help="rounds that may be redone because other work took "
                         f"over {NOISY * 100:.0f}%% of a benchmark CPU (default 3, "
                         "0 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 2 rounds of 2 s (overrides --rounds and "
                         "--duration)")
    ap.add_argument("--only", default=None,
                    help="comma-separated config names (the first is the "
                         "baseline); default: " +
                         ",".join(c.name for c in CONFIGS if c.default) +
                         "; all: " + ",".join(c.name for c in CONFIGS))
    ap.add_argument("--keep", action="store_true",
                    help="keep the nginx work directories (confs, logs)")
    ap.add_argument("--out", default=str(BENCH / "results" / "latest.json"),
                    help="JSON results (default bench/results/latest.json)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.duration = 2, 2
    if args.retries is None:
        args.retries = 0 if args.quick else 3
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.rounds < 1 or args.duration < 1 or args.connections < 1:
        ap.error("--rounds, --duration and --connections must be >= 1")
    if args.retries < 0 or args.warmup < 0:
        ap.error("--retries and --warmup must be >= 0")

    by_name = {c.name: c for c in CONFIGS}
    if args.only:
        names = [x.strip() for x in args.only.split(",") if x.strip()]
        unknown = [x for x in names if x not in by_name]
        if unknown:
            ap.error(f"unknown config(s) {unknown}; known: {list(by_name)}")
        configs = [by_name[x] for x in names]
    else:
        configs = [c for c in CONFIGS if c.default]

    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} not found (apt-get install "
                     f"{'wrk' if tool == 'wrk' else 'util-linux'})")
    missing = [str(module_path(m)) for c in configs for m in c.modules
               if not module_path(m).exists()]
    if missing:
        sys.exit("bench: modules not built (run 'make'): " + ", ".join(missing))

    workdir = tempfile.mkdtemp(prefix="ngx_infer_bench.")
    bench = Bench(args, configs, workdir)
    runs, warmups, discarded = [], [], []
    est = len(configs) * (args.warmup + args.rounds * args.duration)
    est_max = est + len(configs) * args.retries * args.duration
    print(f"ngx_infer bench: {len(configs)} configs x {args.rounds} rounds x "
          f"{args.duration} s, wrk -t1 -c{args.connections} "
          f"(~{est} s, at most ~{est_max} s with retries)")
    print(f"  nginx on CPU {sorted(bench.server_cpus)}, 1 worker per gateway;"
          f" wrk on CPU {bench.client_cpu}; workdir {workdir}")
    ok = False
    try:
        bench.start()
        print(f"  backend {bench.backend.addr}; gateways " + ", ".join(
            f"{n} {g.addr}" for n, g in bench.gateways.items()))
        if args.warmup > 0:
            for cfg in configs:
                warmups.append(bench.run(cfg, args.warmup, "warm-up"))
        attempt = 0
        while len(runs) < args.rounds * len(configs):
            attempt += 1
            rnd = len(runs) // len(configs) + 1
            retries_left = args.retries - len(discarded) // len(configs)
            k = (attempt - 1) % len(configs)  # rotate who goes first
            this = []
            for cfg in configs[k:] + configs[:k]:
                r = bench.run(cfg, args.duration, f"round {rnd}")
                r["round"] = rnd
                this.append(r)
                print(f"  round {rnd}/{args.rounds} {cfg.name:<8} "
                      f"{r['rps']:>10,.0f} req/s  p50 {fmt_lat(r['p50_us']):>9}"
                      f"  p99 {fmt_lat(r['p99_us']):>9}  "
                      f"{r['cpu_us_per_req']:6.2f} CPU µs/req "
                      f"({r['requests']} req, {r['cpu_ticks']} ticks; "
                      f"wrk CPU {r['wrk_cpu_util']:.0%}; "
                      f"other load {r['noise']:.0%})",
                      flush=True)
            if any(r["noise"] > NOISY for r in this) and retries_left > 0:
                print(f"  round {rnd}: other work took over {NOISY:.0%} of a "
                      f"benchmark CPU: discarded, redone "
                      f"({retries_left - 1} retries left)", flush=True)
                discarded += this
            else:
                runs += this
        problems = bench.log_problems()
        if problems:
            fail("nginx logged problems:\n" + "\n".join(problems))
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
            print(f"bench: nginx work directories kept in {workdir}",
                  file=sys.stderr)
    if not ok:
        sys.exit(1)

    summary, ratios = summarize(configs, runs)
    tick_us = 1e6 / CLK_TCK
    worst = max(tick_us / r["requests"] for r in runs)
    print()
    print(f"Median over {args.rounds} rounds of {args.duration} s "
          f"(wrk -t1 -c{args.connections}, POST {lua_request(configs[0].script)[0]}"
          f" via bench/{configs[0].script}):")
    print()
    print(table(configs, summary, ratios))
    print()
    print(f"CPU µs/req: the gateway worker's utime+stime (/proc/PID/stat) over "
          f"the run / requests completed.")
    print(f"  /proc counts CPU in ticks of {tick_us / 1000:.0f} ms: at these "
          f"request counts one tick is <= {worst:.3f} µs/req per run; runs "
          f"much shorter than a few seconds make this column meaningless.")
    sched = [(c.name, summary[c.name]["cpu_us_per_req_schedstat"])
             for c in configs]
    if all(v is not None for _, v in sched):
        print("  cross-check from /proc/PID/schedstat (ns resolution): " +
              ", ".join(f"{n} {v:.2f}" for n, v in sched) + " µs/req")
    print("  backend CPU µs/req (same CPU, not part of the comparison): " +
          ", ".join(f"{c.name} {summary[c.name]['backend_cpu_us_per_req']:.2f}"
                    for c in configs))
    print("  ratios: config / baseline (" + configs[0].name + "): first of "
          "the medians, then 'paired' = median over rounds of the ratio within"
          "\n  each round (robust to drift; its range is in the last column)."
          " > 1 is slower for p50/p99/CPU, faster for req/s.")
    if discarded:
        print(f"  {len(discarded) // len(configs)} round(s) discarded and "
              f"redone: other work took over {NOISY:.0%} of a benchmark CPU.")
    noisy = [r for r in runs if r["noise"] > NOISY]
    worst_noise = max(r["noise"] for r in runs)
    if noisy:
        print(f"  WARNING: {len(noisy)} of {len(runs)} runs shared their CPUs "
              f"with other work (up to {worst_noise:.0%} of a CPU taken by "
              "other processes or steal): req/s and latency are unreliable, "
              "CPU µs/req less so; rerun on a quiet machine or with more "
              "--rounds.")
    else:
        print(f"  other load on the benchmark CPUs: at most {worst_noise:.0%}"
              " of a CPU in any run.")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "date": datetime.datetime.now(datetime.timezone.utc)
                .isoformat(timespec="seconds"),
        "git": git_describe(),
        "nginx": tool_version([NGINX_BIN, "-v"]),
        "wrk": tool_version(["wrk", "--version"]),
        "params": {"rounds": args.rounds, "duration_s": args.duration,
                   "connections": args.connections, "threads": 1,
                   "warmup_s": args.warmup,
                   "server_cpus": sorted(bench.server_cpus),
                   "client_cpu": bench.client_cpu,
                   "clk_tck": CLK_TCK},
        "configs": [{"name": c.name, "description": c.description,
                     "modules": c.modules, "http": c.http, "server": c.server,
                     "location": c.location, "script": c.script}
                    for c in configs],
        "baseline": configs[0].name,
        "summary": summary,
        "ratios": ratios,
        "runs": runs,
        "warmups": warmups,
        "discarded": discarded,
        "noise_threshold": NOISY,
        "noisy_runs_kept": sum(r["noise"] > NOISY for r in runs),
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
