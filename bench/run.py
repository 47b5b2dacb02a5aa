"""ngx_infer benchmark: what the modules cost a proxied request.

wrk (pinned to one CPU) drives gateways (pinned to the other CPU, one
worker each) that proxy to a fast static backend (same CPU as the
gateways).  The run is a list of cases, one per request body (and
client_body_buffer_size); each case measures its configurations (from
CONFIGS) in interleaved rounds.  The report gives, per case and
configuration, the median over rounds of req/s, p50 and p99 latency and
the gateway worker's CPU time per request, and the ratio of each to the
baseline (the case's first configuration).

    /usr/bin/python3 bench/run.py                 # the default cases, ~4 min
    /usr/bin/python3 bench/run.py --quick         # 2 rounds of 2 s, smoke run
    /usr/bin/python3 bench/run.py --body 2k,200k  # plain vs route at 2 and 200 KB
    /usr/bin/python3 bench/run.py --only plain,infer --body small --rounds 9

Exits non-zero, loudly, when any wrk run reports an error (non-2xx,
socket errors, timeouts), when responses are not the expected ones, when
a gateway worker was replaced during a run, or when an nginx logged an
[alert]/[emerg].  Results: printed, and bench/results/latest.json.

To add a configuration, append a GatewayConfig to CONFIGS (see README.md).
"""

import argparse
import datetime
import hashlib
import json
import os
import random
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
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

# The model every benchmark request names, and the upstream block (the
# "pool") that proxies to the backend.  Every gateway has that upstream;
# plain proxy_passes to it by name, the route module resolves the model to
# it through the registry (infer_model) and $infer_upstream.
MODEL = "llama-3-8b"
POOL = "llama-3-8b"
REGISTRY = f"infer_model {MODEL} upstream={POOL};"

ALL_ON = " ".join(f"infer_{m} on;" for m in MODULES)


@dataclass
class GatewayConfig:
    name: str
    description: str
    modules: list = field(default_factory=list)   # names from MODULES
    http: str = ""          # inserted in http {}, after the upstream block
    server: str = ""        # inserted in server {}
    location: str = ""      # inserted in location / {}, after proxy_pass
    proxy_pass: str = f"http://{POOL}"  # the location's proxy_pass target
    script: str = "chat.lua"  # wrk Lua script in bench/: the request sent
    default: bool = True    # run without --only (with the bodies it suits)

    @property
    def routes(self):
        """The route module looks at this gateway's requests: the preflight
        also checks that an unknown model is refused."""
        return "infer_route on" in " ".join((self.http, self.server,
                                             self.location))


CONFIGS = [
    GatewayConfig(
        name="plain",
        description="nginx without ngx_infer: plain proxy_pass to the pool",
    ),
    GatewayConfig(
        name="route",
        description="the route module alone: reads the body, resolves the "
                    "model, proxy_pass http://$infer_upstream",
        modules=["route"],
        http=REGISTRY,
        location="infer_route on;",
        proxy_pass="http://$infer_upstream",
    ),
    GatewayConfig(
        name="infer",
        description="the four modules loaded, all four enabled, "
                    "proxy_pass http://$infer_upstream",
        modules=list(MODULES),
        http=REGISTRY,
        location=ALL_ON,
        proxy_pass="http://$infer_upstream",
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
    # Not run by default: route, and the cache key computed for every
    # request (sent to the backend in a header, so that it is evaluated
    # after routing, as proxy_cache_key is): route-key/route is the cost
    # of $infer_cache_key, a jansson parse and a SHA-256 of the body.
    GatewayConfig(
        name="route-key",
        description="route, and $infer_cache_key computed for every "
                    "request (proxy_set_header X-Cache-Key)",
        modules=["route"],
        http=REGISTRY,
        location="infer_route on; "
                 "proxy_set_header X-Cache-Key $infer_cache_key;",
        proxy_pass="http://$infer_upstream",
        default=False,
    ),
    # Not run by default: plain, but proxy_pass through a variable, as
    # route does.  route/plain-var is the route module's own work, without
    # the cost of a run-time proxy_pass (evaluating the variable, looking
    # the upstream up by name for every request).
    GatewayConfig(
        name="plain-var",
        description="plain with a variable proxy_pass (set $pool; "
                    "proxy_pass http://$pool)",
        location=f"set $pool {POOL};",
        proxy_pass="http://$pool",
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


# --------------------------------------------------------------------------
# The request bodies.
#
# A run is a list of cases: one request body and one client_body_buffer_size
# each, with the configurations measured on it.  "small" is the body written
# in chat.lua; sizes ("2k", "200k", "4096") are chat requests generated to
# that exact size.  The gateways' client_body_buffer_size is set explicitly
# (nginx's default is 2 pages: 8k on x86-64, 16k elsewhere): a body larger
# than it (more exactly, than 1.25 times it) is written to a temp file by
# nginx before it is proxied, with or without our modules.
# --------------------------------------------------------------------------

DEFAULT_BUFFER = "16k"
DEFAULT_BODIES = "small,2k,200k,200k:256k"


def default_configs(body_name):
    """What a case measures without --only: the small body compares the
    four modules with plain (as this benchmark always did); the sized
    bodies compare the route module alone with plain."""
    return ["plain", "infer"] if body_name == "small" else ["plain", "route"]


SYSTEM_PROMPT = (
    "You are a careful assistant for an engineering team. Answer only from "
    "the document the user gives you, quote the sentence you rely on, and "
    "say so when the document does not contain the answer.")

FILLER = (
    "the gateway reads each request and forwards it to a pool of model "
    "servers while the scheduler keeps batches full and the cache warm so "
    "that latency stays low under load; every replica reports its queue "
    "depth, the number of tokens in flight and the memory left for new "
    "sequences, and the router uses these figures to pick where the next "
    "prompt should go. when a replica fails its health check it is taken out "
    "of the pool until it answers again, and requests in flight are retried "
    "on another replica if nothing was sent to the client yet").split()


def chat_body(size):
    """A chat completion request of exactly size bytes of JSON: a system
    prompt and one user message of filler text (English words, sentences,
    paragraphs separated by \\n\\n escapes), max_tokens 64."""
    def doc(content):   # content: the user message, already JSON-escaped
        return ('{"model": "%s", "messages": [{"role": "system", "content": '
                '%s}, {"role": "user", "content": "%s"}], "max_tokens": 64}'
                % (MODEL, json.dumps(SYSTEM_PROMPT), content))
    room = size - len(doc(""))
    if room < 0:
        fail(f"a {size}-byte body is too small for the chat request "
             f"({len(doc(''))} bytes without text)")
    rng = random.Random(size)
    text = ["Summarize the document below in three sentences.\\n\\n"]
    n = len(text[0])
    while n <= room:
        words = [rng.choice(FILLER) for _ in range(rng.randint(8, 24))]
        sentence = " ".join(words).capitalize() + "."
        sentence += "\\n\\n" if rng.random() < 0.15 else " "
        text.append(sentence)
        n += len(sentence)
    content = "".join(text)[:room]
    if content.endswith("\\"):        # cut inside a \n escape
        content = content[:-1] + " "
    out = doc(content).encode()
    obj = json.loads(out)
    assert len(out) == size and obj["model"] == MODEL, (len(out), size)
    return out


def nginx_size(text):
    """nginx size syntax (12, 16k, 1m) in bytes."""
    m = re.fullmatch(r"(\d+)([kKmM]?)", text.strip())
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1 << 20}[m.group(2).lower()]


@dataclass
class Body:
    name: str           # "small", "2k", "200k", ...
    data: bytes
    path: Path = None   # the file wrk's script reads (in the run's workdir)

    @property
    def size(self):
        return len(self.data)


@dataclass
class Case:
    body: Body
    buffer: str         # client_body_buffer_size of its gateways
    configs: list       # GatewayConfig, the first is the baseline
    spills: bool = None  # body written to a temp file (seen in preflight)

    @property
    def label(self):
        return self.body.name + ("" if self.buffer == DEFAULT_BUFFER
                                 else f":{self.buffer}")


def make_body(name, workdir):
    if name == "small":
        data = lua_request("chat.lua")[1].encode()
    else:
        data = chat_body(nginx_size(name))
    body = Body(name, data)
    body.path = Path(workdir) / f"body-{name}.json"
    body.path.write_bytes(data)
    return body


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
    upstream {pool} {{
        server {backend};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    {http}
    server {{
        listen 127.0.0.1:{{port}};
        access_log off;
        keepalive_requests 1000000;
        client_body_buffer_size {buffer};
        client_max_body_size 64m;
        {server}
        location / {{
            proxy_pass {proxy_pass};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            {location}
        }}
    }}
"""


def gateway_http(cfg, backend_addr, buffer):
    # the result still holds {port}, which the harness fills in
    return GATEWAY.format(pool=POOL, backend=backend_addr, http=cfg.http,
                          server=cfg.server, location=cfg.location,
                          proxy_pass=cfg.proxy_pass, buffer=buffer)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


# what nginx logs (level warn) when a request body goes to a temp file
SPILL = "a client request body is buffered to a temporary file"


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
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
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
        if not head.startswith(b"HTTP/1.1 200 "):
            fail(f"{addr}: not a 200:\n{head.decode(errors='replace')}")
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
        if rest[:need] != BACKEND_BODY.encode():
            fail(f"{addr}: not the backend's body: {rest[:need]!r}")
        return len(head) + 4 + need


def lua_request(script):
    """path and default body of the wrk script (its wrk.path and wrk.body
    lines; run.py makes it send a body file instead, see chat.lua)."""
    text = (BENCH / script).read_text()
    path = re.search(r'^wrk\.path\s*=\s*"([^"]*)"', text, re.M).group(1)
    body = re.search(r"^wrk\.body\s*=\s*'([^']*)'", text, re.M).group(1)
    return path, body


def post(url, path, body):
    """(status, response body) of one POST through url."""
    req = urllib.request.Request(
        url + path, data=body, method="POST",
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except Exception as e:  # noqa: BLE001 - any failure is fatal here
        fail(f"POST {url}{path} failed: {e}")


def preflight(name, url, path, body):
    """One POST through url: it must be a 200 with the backend's body."""
    status, got = post(url, path, body)
    if status != 200 or got != BACKEND_BODY:
        fail(f"{name}: preflight POST {url}{path} answered {status}: "
             f"{got[:500]!r}")


def preflight_unknown_model(name, url, path, body):
    """The same body naming a model the registry does not know must be
    refused by the route module (404): it really looks at these requests."""
    other = body.replace(f'"{MODEL}"'.encode(), b'"no-such-model"', 1)
    if other == body:
        fail(f"{name}: the body does not name {MODEL!r}")
    status, got = post(url, path, other)
    if status != 404 or "model_not_found" not in got:
        fail(f"{name}: a POST naming an unknown model answered {status}, "
             f"not the route module's 404: {got[:500]!r}")


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
    def __init__(self, args, cases, workdir):
        self.args = args
        self.cases = cases
        self.workdir = Path(workdir)
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            fail(f"need 2 CPUs (one for wrk, one for nginx), have {cpus}")
        self.server_cpus = {cpus[0]}
        self.client_cpu = cpus[1]
        self.backend = None
        self.modules = {}         # module name -> path of the run's copy
        self.module_sha256 = {}
        self.gateways = {}        # gateway_key() -> Nginx
        self.expected_size = {}   # (case label, config name) -> bytes

    @staticmethod
    def gateway_key(cfg, buffer):
        """One gateway per configuration and client_body_buffer_size: the
        cases with other bodies share it."""
        return cfg.name if buffer == DEFAULT_BUFFER else f"{cfg.name}:{buffer}"

    def gateway(self, case, cfg):
        return self.gateways[self.gateway_key(cfg, case.buffer)]

    # -- servers ------------------------------------------------------------

    def _pin_check(self, n):
        for pid in master_and_workers(n):
            if os.sched_getaffinity(pid) != self.server_cpus:
                pin(pid, self.server_cpus)   # belt and braces
            if os.sched_getaffinity(pid) != self.server_cpus:
                fail(f"could not pin nginx pid {pid} to {self.server_cpus}")

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
        self._pin_check(n)
        return n

    def snapshot_modules(self):
        """Copy the modules the run loads into its work directory, and load
        them from there.  `make` rewrites build/modules/*.so in place: a
        rebuild during a run (someone working in the same tree) would change
        the code under the running workers, which then die of SIGSEGV or
        SIGILL.  The copy is checked against a second read of the source,
        in case make was writing it at that moment."""
        names = sorted({m for c in self.cases for cfg in c.configs
                        for m in cfg.modules})
        d = self.workdir / "modules"
        d.mkdir(exist_ok=True)
        for m in names:
            src = module_path(m)
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

    def start(self):
        self.snapshot_modules()
        self.backend = self._start(Nginx(
            self.workdir / "backend", http=BACKEND, modules=[], workers=1,
            error_level="warn"))
        # The gateways start at error_log level warn, which logs the temp
        # file of every request body that spills to one: the preflight
        # counts these lines.  They are then reloaded at level error, so
        # that the measured runs do not write one log line per request.
        for case in self.cases:
            for cfg in case.configs:
                key = self.gateway_key(cfg, case.buffer)
                if key in self.gateways:
                    continue
                # the modules are loaded from the run's own copy (see
                # snapshot_modules), hence modules=[] and load_module here
                n = Nginx(self.workdir / f"gw-{key.replace(':', '-')}",
                          http=gateway_http(cfg, self.backend.addr,
                                            case.buffer),
                          main="\n".join(f"load_module {self.modules[m]};"
                                         for m in cfg.modules),
                          modules=[], workers=1, error_level="warn")
                ok, out = n.check_config()
                if not ok:
                    fail(f"gateway {key}: nginx -t failed:\n{out}")
                self.gateways[key] = self._start(n)

        for case in self.cases:
            spilled = {}
            for cfg in case.configs:
                gw = self.gateway(case, cfg)
                name = f"{cfg.name} (body {case.label})"
                path = lua_request(cfg.script)[0]
                before = gw.log_text().count(SPILL)
                preflight(name, gw.url, path, case.body.data)
                self.expected_size[(case.label, cfg.name)] = \
                    raw_response_size(gw.addr, path, case.body.data)
                spilled[cfg.name] = gw.log_text().count(SPILL) - before
                if cfg.routes:
                    preflight_unknown_model(name, gw.url, path,
                                            case.body.data)
            # both requests spilled, or neither, and the same in every
            # configuration of the case: they buffer the body alike
            if set(spilled.values()) not in ({0}, {2}):
                fail(f"body {case.label}: request bodies are not buffered "
                     f"alike: temp files per 2 preflight requests {spilled}")
            case.spills = spilled[case.configs[0].name] == 2

        for key, n in self.gateways.items():
            n.error_level = "error"
            mine = os.sched_getaffinity(0)
            os.sched_setaffinity(0, self.server_cpus)
            try:
                n.reload()
            finally:
                os.sched_setaffinity(0, mine)
            self._pin_check(n)
        for case in self.cases:     # still the same answers after reload
            for cfg in case.configs:
                gw = self.gateway(case, cfg)
                preflight(f"{cfg.name} (body {case.label})", gw.url,
                          lua_request(cfg.script)[0], case.body.data)

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

    def run(self, case, cfg, duration, label):
        gw = self.gateway(case, cfg)
        workers = gw.worker_pids()
        bworkers = self.backend.worker_pids()
        cmd = ["taskset", "-c", str(self.client_cpu), "wrk",
               "-t1", f"-c{self.args.connections}", f"-d{duration}s",
               "--latency", "-s", str(BENCH / cfg.script),
               gw.url + lua_request(cfg.script)[0]]
        env = dict(os.environ, BENCH_BODY_FILE=str(case.body.path))
        before, bbefore = cpu_sample(workers), cpu_sample(bworkers)
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus0 = cpu_times()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, env=env,
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
        self.check(case, cfg, label, w, s, r.stdout)

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
            "case": case.label, "config": cfg.name, "label": label,
            "duration_s": w["duration_s"],
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

    def check(self, case, cfg, label, w, s, text):
        where = f"{cfg.name} (body {case.label}, {label})"
        errs = {k: v for k, v in w["errors"].items() if v}
        errs.update({f"lua:{k}": v for k, v in s["errors"].items() if v})
        if errs:
            fail(f"{where}: wrk reported errors {errs}:\n{text}")
        if w["requests"] <= 0:
            fail(f"{where}: no request completed:\n{text}")
        if s["requests"] != w["requests"]:
            fail(f"{where}: wrk text says {w['requests']} requests, "
                 f"done() says {s['requests']}")
        # the script sent the case's body (it read the file we wrote)
        if s.get("body_bytes") != case.body.size:
            fail(f"{where}: wrk sent a body of {s.get('body_bytes')} bytes, "
                 f"not the {case.body.size} bytes of {case.body.path}")
        # the text percentiles are rounded to 2 decimals: allow 2 %
        for p in ("p50", "p99"):
            exact, parsed = s["latency_us"][p], w[f"{p}_us"]
            if abs(parsed - exact) > max(0.02 * exact, 1.0):
                fail(f"{where}: parsed {p} {parsed} us but wrk's exact value "
                     f"is {exact} us (latency parse error?)\n{text}")
        # every response must be the very response checked in preflight:
        # bytes read is requests x its size, plus at most the partial
        # responses in flight when wrk stopped
        size = self.expected_size[(case.label, cfg.name)]
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
        diff = [a["cpu_us_per_req"] - b["cpu_us_per_req"] for a, b in pairs]
        ratios[f"{cfg.name}/{base}"] = {
            "of_medians": {k: summary[cfg.name][k] / summary[base][k]
                           for k, _, _ in METRICS},
            "paired_median": {k: statistics.median(v)
                              for k, v in paired.items()},
            "paired_range": {k: [min(v), max(v)] for k, v in paired.items()},
            # CPU µs/req the config adds to the baseline, paired per round
            "cpu_us_per_req_added": statistics.median(diff),
            "cpu_us_per_req_added_range": [min(diff), max(diff)],
        }
    return summary, ratios


def per_kb(cases, results):
    """For each configuration measured against the same baseline with two
    or more bodies at the same client_body_buffer_size: the CPU µs/req it
    adds at each body size, and the slope between the smallest and the
    largest body (what each KB of body costs it, beyond what it costs
    plain).  Lines of text, and the numbers."""
    lines, out = [], []
    groups = {}
    for case in cases:
        base = case.configs[0].name
        for cfg in case.configs[1:]:
            groups.setdefault((cfg.name, base, case.buffer), []).append(case)
    for (name, base, buffer), cs in groups.items():
        if len(cs) < 2:
            continue
        cs = sorted(cs, key=lambda c: c.body.size)
        added = [(c, results[c.label]["ratios"][f"{name}/{base}"]
                  ["cpu_us_per_req_added"]) for c in cs]
        small, large = added[0], added[-1]
        dbytes = large[0].body.size - small[0].body.size
        slope = (large[1] - small[1]) / dbytes if dbytes else float("nan")
        lines.append(
            f"  {name} - {base}, client_body_buffer_size {buffer}: " +
            ", ".join(f"{c.body.name} ({c.body.size:,} B"
                      f"{', spilled' if c.spills else ''}) {a:+.2f}"
                      for c, a in added) +
            f" CPU µs/req\n    -> {slope * 1024:.3f} µs per KB of body "
            f"({slope * 1000:.2f} ns/byte) between {small[0].body.name} "
            f"and {large[0].body.name}")
        out.append({"config": name, "baseline": base, "buffer": buffer,
                    "added_cpu_us_per_req": {c.label: a for c, a in added},
                    "us_per_kb": slope * 1024})
    return lines, out


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

def parse_bodies(text):
    """--body: comma-separated BODY[:BUFFER] -> [(body name, buffer)]."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, buffer = item.partition(":")
        buffer = buffer or DEFAULT_BUFFER
        if name != "small":
            nginx_size(name)            # raises ValueError if not a size
        nginx_size(buffer)
        out.append((name, buffer))
    if not out:
        raise ValueError("no body")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--body", default=DEFAULT_BODIES,
                    help="comma-separated request bodies, each BODY[:BUFFER]: "
                         "'small' (the body in chat.lua) or a size (2k, "
                         "200k, 4096) of generated chat request; BUFFER is "
                         "the gateways' client_body_buffer_size (default "
                         f"{DEFAULT_BUFFER}).  Default: {DEFAULT_BODIES}")
    ap.add_argument("--rounds", type=int, default=5,
                    help="measured rounds; each runs every config of every "
                         "body once, in rotating order (default 5)")
    ap.add_argument("--duration", type=int, default=5,
                    help="seconds per wrk run (default 5)")
    ap.add_argument("--connections", type=int, default=32,
                    help="wrk connections, one wrk thread (default 32)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="seconds of warm-up per config and body (default 1)")
    ap.add_argument("--retries", type=int, default=None,
                    help="rounds of a body's configs that may be redone, in "
                         "all, because other work took over "
                         f"{NOISY * 100:.0f}%% of a benchmark CPU (default 3, "
                         "0 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 2 rounds of 2 s (overrides --rounds and "
                         "--duration)")
    ap.add_argument("--only", default=None,
                    help="comma-separated config names (the first is the "
                         "baseline) measured with every body; default: "
                         "plain,infer for 'small', plain,route for the "
                         "others; all: " + ",".join(c.name for c in CONFIGS))
    ap.add_argument("--keep", action="store_true",
                    help="keep the nginx work directories (confs, logs, "
                         "bodies)")
    ap.add_argument("--out", default=str(BENCH / "results" / "latest.json"),
                    help="JSON results (default bench/results/latest.json)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.duration = 2, 2
    if args.retries is None:
        args.retries = 0 if args.quick else 3
    if args.warmup is None:
        args.warmup = 1
    if args.rounds < 1 or args.duration < 1 or args.connections < 1:
        ap.error("--rounds, --duration and --connections must be >= 1")
    if args.retries < 0 or args.warmup < 0:
        ap.error("--retries and --warmup must be >= 0")
    try:
        bodies = parse_bodies(args.body)
    except ValueError as e:
        ap.error(f"--body: {e}")
    if len(set(bodies)) != len(bodies):
        ap.error("--body: a body is listed twice")

    by_name = {c.name: c for c in CONFIGS}
    only = None
    if args.only:
        only = [x.strip() for x in args.only.split(",") if x.strip()]
        unknown = [x for x in only if x not in by_name]
        if unknown:
            ap.error(f"unknown config(s) {unknown}; known: {list(by_name)}")
        if len(set(only)) != len(only):
            ap.error("--only: a config is listed twice")

    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} not found (apt-get install "
                     f"{'wrk' if tool == 'wrk' else 'util-linux'})")

    workdir = tempfile.mkdtemp(prefix="ngx_infer_bench.")
    try:
        cases = [Case(make_body(name, workdir), buffer,
                      [by_name[x] for x in (only or default_configs(name))])
                 for name, buffer in bodies]
    except BenchError as e:
        shutil.rmtree(workdir, ignore_errors=True)
        ap.error(f"--body: {e}")
    missing = sorted({str(module_path(m)) for c in cases for cfg in c.configs
                      for m in cfg.modules if not module_path(m).exists()})
    if missing:
        shutil.rmtree(workdir, ignore_errors=True)
        sys.exit("bench: modules not built (run 'make'): " + ", ".join(missing))

    bench = Bench(args, cases, workdir)
    runs, warmups, discarded = [], [], []
    nruns = sum(len(c.configs) for c in cases)
    est = nruns * (args.warmup + args.rounds * args.duration)
    print(f"ngx_infer bench: {len(cases)} bodies x their configs x "
          f"{args.rounds} rounds x {args.duration} s, wrk -t1 "
          f"-c{args.connections} (~{est // 60} min {est % 60} s of wrk, "
          f"plus up to {args.retries} rounds redone)")
    for c in cases:
        print(f"  body {c.label:<10} {c.body.size:>9,} bytes, "
              f"client_body_buffer_size {c.buffer}: "
              + " vs ".join(x.name for x in c.configs))
    print(f"  nginx on CPU {sorted(bench.server_cpus)}, 1 worker per gateway;"
          f" wrk on CPU {bench.client_cpu}; workdir {workdir}")
    ok = False
    started = time.monotonic()
    try:
        bench.start()
        print(f"  backend {bench.backend.addr}; gateways " + ", ".join(
            f"{n} {g.addr}" for n, g in bench.gateways.items()))
        for c in cases:
            print(f"  body {c.label}: "
                  + ("spills to a temp file" if c.spills else "stays in memory")
                  + " in every gateway (checked: nginx's temp file warnings "
                    "in preflight)")
        if args.warmup > 0:
            for case in cases:
                for cfg in case.configs:
                    warmups.append(bench.run(case, cfg, args.warmup,
                                             "warm-up"))
        # Each round runs every case, and within a case every config once,
        # in an order that rotates from round to round; a case whose runs
        # were disturbed by other work is redone at once (while retries
        # last), so that its runs stay seconds apart.
        redone = 0
        for rnd in range(1, args.rounds + 1):
            for case in cases:
                attempt = 0
                while True:
                    k = (rnd - 1 + attempt) % len(case.configs)
                    this = []
                    for cfg in case.configs[k:] + case.configs[:k]:
                        r = bench.run(case, cfg, args.duration,
                                      f"round {rnd}")
                        r["round"] = rnd
                        this.append(r)
                        print(f"  round {rnd}/{args.rounds} {case.label:<9} "
                              f"{cfg.name:<6} {r['rps']:>9,.0f} req/s  "
                              f"p50 {fmt_lat(r['p50_us']):>9}  "
                              f"p99 {fmt_lat(r['p99_us']):>9}  "
                              f"{r['cpu_us_per_req']:7.2f} CPU µs/req "
                              f"({r['requests']} req, {r['cpu_ticks']} ticks;"
                              f" wrk CPU {r['wrk_cpu_util']:.0%}; "
                              f"other load {r['noise']:.0%})",
                              flush=True)
                    if (any(r["noise"] > NOISY for r in this)
                            and redone < args.retries):
                        redone += 1
                        attempt += 1
                        print(f"  round {rnd} {case.label}: other work took "
                              f"over {NOISY:.0%} of a benchmark CPU: "
                              f"discarded, redone ({args.retries - redone} "
                              "retries left)", flush=True)
                        discarded += this
                        continue
                    runs += this
                    break
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
    elapsed = time.monotonic() - started

    tick_us = 1e6 / CLK_TCK
    results = {}
    script = cases[0].configs[0].script
    print()
    print(f"Medians over {args.rounds} rounds of {args.duration} s (wrk -t1 "
          f"-c{args.connections}, POST {lua_request(script)[0]} via "
          f"bench/{script}); {elapsed / 60:.1f} min in all.")
    for case in cases:
        crs = [r for r in runs if r["case"] == case.label]
        summary, ratios = summarize(case.configs, crs)
        results[case.label] = {"summary": summary, "ratios": ratios}
        worst = max(tick_us / r["requests"] for r in crs)
        print()
        print(f"Body {case.label}: {case.body.size:,} bytes, "
              f"client_body_buffer_size {case.buffer}: the body "
              + ("spills to a temp file" if case.spills else "stays in memory")
              + f" (one /proc tick <= {worst:.3f} µs/req)")
        print()
        print(table(case.configs, summary, ratios))
        added = [f"{name.split('/')[0]} {r['cpu_us_per_req_added']:+.2f}"
                 for name, r in ratios.items()]
        if added:
            print("  CPU µs/req added to " + case.configs[0].name
                  + " (paired median): " + ", ".join(added))
        sched = [(c.name, summary[c.name]["cpu_us_per_req_schedstat"])
                 for c in case.configs]
        if all(v is not None for _, v in sched):
            print("  cross-check from /proc/PID/schedstat (ns resolution): "
                  + ", ".join(f"{n} {v:.2f}" for n, v in sched) + " µs/req")
        print("  backend CPU µs/req (same CPU, not part of the comparison): "
              + ", ".join(f"{c.name} "
                          f"{summary[c.name]['backend_cpu_us_per_req']:.2f}"
                          for c in case.configs))

    kb_lines, kb = per_kb(cases, results)
    print()
    if kb_lines:
        print("Cost by body size (paired CPU µs/req over the baseline):")
        print("\n".join(kb_lines))
        print()
    print(f"CPU µs/req: the gateway worker's utime+stime (/proc/PID/stat) over "
          f"the run / requests completed;")
    print(f"  /proc counts CPU in ticks of {tick_us / 1000:.0f} ms: runs much "
          "shorter than a few seconds make this column meaningless.")
    print("  ratios: config / baseline (the first config of each body): first"
          " of the medians, then 'paired' = median over rounds of the ratio"
          "\n  within each round (robust to drift; its range is in the last "
          "column).  > 1 is slower for p50/p99/CPU, faster for req/s.")
    if discarded:
        print(f"  {redone} round(s) of a body discarded and redone: other "
              f"work took over {NOISY:.0%} of a benchmark CPU.")
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
    used = []
    for c in cases:
        for cfg in c.configs:
            if cfg not in used:
                used.append(cfg)
    doc = {
        "date": datetime.datetime.now(datetime.timezone.utc)
                .isoformat(timespec="seconds"),
        "git": git_describe(),
        "nginx": tool_version([NGINX_BIN, "-v"]),
        "wrk": tool_version(["wrk", "--version"]),
        "params": {"rounds": args.rounds, "duration_s": args.duration,
                   "connections": args.connections, "threads": 1,
                   "warmup_s": args.warmup, "body": args.body,
                   "server_cpus": sorted(bench.server_cpus),
                   "client_cpu": bench.client_cpu,
                   "clk_tck": CLK_TCK, "elapsed_s": round(elapsed, 1)},
        "modules_sha256": bench.module_sha256,
        "configs": [{"name": c.name, "description": c.description,
                     "modules": c.modules, "http": c.http, "server": c.server,
                     "location": c.location, "proxy_pass": c.proxy_pass,
                     "script": c.script}
                    for c in used],
        "cases": [{"label": c.label, "body": c.body.name,
                   "body_bytes": c.body.size,
                   "client_body_buffer_size": c.buffer,
                   "body_spills_to_temp_file": c.spills,
                   "configs": [x.name for x in c.configs],
                   "baseline": c.configs[0].name,
                   **results[c.label]}
                  for c in cases],
        "cost_by_body_size": kb,
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
