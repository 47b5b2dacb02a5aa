"""ngx_infer balance benchmark: infer_balance, with and without the
backend signals it scrapes, against round_robin and least_conn on a pool
where one of three replicas is three times slower.

Three simulated replicas (sim/infer_sim.py) serve one model: fast-a and
fast-b generate a token every TPOT ms, slow every 3 x TPOT ms.  Each
behaves like a GPU server with a bounded batch: MAX_CONCURRENCY requests
generate at once, the others wait in its FIFO queue, which its /metrics
page reports as vllm:num_requests_waiting (and the batch as
vllm:num_requests_running, the KV cache as vllm:kv_cache_usage_perc).

One gateway nginx (2 workers) has the same three servers in five upstream
blocks, one per policy, and a model per block:

    round_robin             (nginx's default)
    least_conn              least_conn;
    infer_balance           infer_balance least_tokens;
    infer_balance+signals   infer_balance least_tokens;
                            infer_balance_scrape interval=50ms timeout=200ms
                                                 stale=500ms;
    infer_balance+pace      infer_balance least_tokens pace; and the same
                            infer_balance_scrape

CLIENTS closed-loop clients (threads, keep-alive connections) ask the
gateway for answers of mixed lengths (max_tokens drawn from MIX) for
SECONDS per policy; the policies take turns in each round, in a shuffled
order.  Meanwhile BACKGROUND more closed-loop clients send the same mix
straight to fast-a, bypassing the gateway, from before the warm-up to the
end of the last round: load the gateway cannot count itself, as from
another gateway replica, which only the scraped signals (fast-a's queue,
batch and KV cache) show.  The gateway's policy decides how much of its
own traffic joins that queue.

The report gives, per policy, the throughput (median over rounds, and its
range), the p50 and p99 latency of a whole answer (over every request of
every round), the share of the gateway's requests each replica served,
and the background clients' req/s and p50 while that policy ran; ratios
to round_robin; the numbers of every round; and for infer_balance+signals
its per-round ratios to each other policy (the paired spread).  The
signals pool's scrape counts come from its infer_balance_status page.

    /usr/bin/python3 bench/balance.py                 # 3 rounds x 8 s, ~2.5 min
    /usr/bin/python3 bench/balance.py --quick         # 2 rounds x 3 s, smoke run
    /usr/bin/python3 bench/balance.py --background 0  # no traffic beside the gateway
    /usr/bin/python3 bench/balance.py --max-concurrency 0  # unbounded batch
                                      # (4 x CLIENTS), as this benchmark was first

Exits non-zero when a request fails (gateway or background), when nginx
logged an [alert]/[emerg] or a scrape failure ("infer balance: scrape
of ..." at [warn]), or when the status page shows a peer never scraped or
a failed scrape.  Results: printed, and bench/results/balance.json.
Standard library only.
"""

import argparse
import datetime
import hashlib
import http.client
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "t"))

from run import BenchError, fail, fmt_lat, git_describe  # noqa: E402
from harness.nginx import Nginx, module_path  # noqa: E402
from harness.simproc import SimProcess  # noqa: E402

MODEL = "llama-3-8b"

SIGNALS = "infer_balance+signals"
SCRAPE = "infer_balance_scrape interval=50ms timeout=200ms stale=500ms;"
POLICIES = [  # name, upstream block (and model) name, its balancing directives
    ("round_robin", "round_robin", ""),
    ("least_conn", "least_conn", "least_conn;"),
    ("infer_balance", "infer_balance", "infer_balance least_tokens;"),
    (SIGNALS, "infer_balance_signals", "infer_balance least_tokens; " + SCRAPE),
    ("infer_balance+pace", "infer_balance_pace",
     "infer_balance least_tokens pace; " + SCRAPE),
]
UPSTREAM = {name: ups for name, ups, _ in POLICIES}

REPLICAS = ("fast-a", "fast-b", "slow")      # fast-a gets the background
BACKGROUND_TO = "fast-a"
STATUS_URI = "/_balance"
SCRAPE_WARN = "infer balance: scrape of"     # what a failed scrape logs
HTTP_TIMEOUT = 30                            # per request, seconds


def gateway_http(sims, policies=POLICIES, location=""):
    """The gateway's http{} lines: an upstream block and a model per
    policy, one location routing by model (and `location` in it)."""
    servers = " ".join(f"server {s.addr};" for s in sims)
    ups = "\n    ".join(f"upstream {u} {{ {how} {servers} keepalive 32; }}"
                        for _, u, how in policies)
    models = "\n    ".join(f"infer_model {u} upstream={u} model={MODEL};"
                           for _, u, _ in policies)
    return f"""
    access_log off;
    {ups}
    {models}
    server {{
        listen 127.0.0.1:{{port}} reuseport;
        keepalive_requests 1000000;
        location / {{
            infer_route on;
            proxy_pass http://$infer_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            {location}
        }}
        location = {STATUS_URI} {{
            infer_balance_status;
        }}
    }}"""


def chat_bodies(model, mix):
    return [json.dumps({"model": model, "max_tokens": n,
                        "messages": [{"role": "user",
                                      "content": "Tell me about GPUs."}]})
            for n in mix]


def post(c, body):
    """One request on connection c: (status, replica, latency in µs)."""
    t0 = time.monotonic()
    c.request("POST", "/v1/chat/completions", body,
              {"content-type": "application/json"})
    r = c.getresponse()
    r.read()
    return r.status, r.getheader("x-sim-replica"), (time.monotonic() - t0) * 1e6


def join_all(threads, deadline, what):
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = sum(t.is_alive() for t in threads)
    if alive:
        fail(f"{what}: {alive} client thread(s) still running at the "
             "deadline")


def run_clients(port, model, seconds, clients, mix):
    """Closed loop through the gateway: each client asks again as soon as
    it has its answer, for a max_tokens drawn from mix (each client's
    sequence of draws is the same for every policy), until `seconds` have
    passed; the answers in flight then are waited for (and counted)."""
    bodies = chat_bodies(model, mix)
    lock = threading.Lock()
    lat, served, errors = [], Counter(), []
    stop = time.monotonic() + seconds

    def client(seed):
        rng = random.Random(seed)
        c = http.client.HTTPConnection("127.0.0.1", port,
                                       timeout=HTTP_TIMEOUT)
        try:
            while time.monotonic() < stop:
                status, replica, dt = post(c, rng.choice(bodies))
                with lock:
                    if status != 200:
                        errors.append(status)
                        return
                    lat.append(dt)
                    served[replica] += 1
        except (OSError, http.client.HTTPException) as e:
            with lock:
                errors.append(repr(e))
        finally:
            c.close()

    t0 = time.monotonic()
    ts = [threading.Thread(target=client, args=(i,), daemon=True)
          for i in range(clients)]
    for t in ts:
        t.start()
    join_all(ts, stop + HTTP_TIMEOUT + 5, model)
    t1 = time.monotonic()
    if errors:
        fail(f"{model}: {len(errors)} failed requests, e.g. {errors[:3]}")
    return {"rps": len(lat) / (t1 - t0), "lat": lat, "served": served,
            "t0": t0, "t1": t1}


class Background:
    """n closed-loop clients straight to one replica (not through the
    gateway) until stopped, or until `limit` seconds have passed at the
    latest.  Records (end time, latency in µs) of every answer."""

    def __init__(self, sim, n, mix, limit):
        self.sim, self.n = sim, n
        self.bodies = chat_bodies(MODEL, mix)
        self.done, self.errors = [], []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.deadline = time.monotonic() + limit
        self.threads = []

    def start(self):
        self.threads = [threading.Thread(target=self.client, args=(1000 + i,),
                                         daemon=True)
                        for i in range(self.n)]
        for t in self.threads:
            t.start()
        return self

    def client(self, seed):
        rng = random.Random(seed)
        c = http.client.HTTPConnection(self.sim.host, self.sim.port,
                                       timeout=HTTP_TIMEOUT)
        try:
            while (not self.stop.is_set()
                   and time.monotonic() < self.deadline):
                status, replica, dt = post(c, rng.choice(self.bodies))
                with self.lock:
                    if status != 200 or replica != self.sim.replica:
                        self.errors.append((status, replica))
                        return
                    self.done.append((time.monotonic(), dt))
        except (OSError, http.client.HTTPException) as e:
            with self.lock:
                self.errors.append(repr(e))
        finally:
            c.close()

    def check(self):
        with self.lock:
            if self.errors:
                fail(f"background to {self.sim.replica}: "
                     f"{len(self.errors)} failed requests, "
                     f"e.g. {self.errors[:3]}")
        if self.n and time.monotonic() >= self.deadline:
            fail("background: time limit reached before the end of the "
                 "measurements")

    def window(self, t0, t1):
        """req/s and p50 latency (µs) of the answers that ended in [t0, t1]."""
        with self.lock:
            lat = [dt for t, dt in self.done if t0 <= t <= t1]
        return {"rps": len(lat) / (t1 - t0),
                "p50_us": pct(lat, 50) if lat else None,
                "requests": len(lat)}

    def finish(self):
        self.stop.set()
        join_all(self.threads, time.monotonic() + HTTP_TIMEOUT + 5,
                 "background")


def get_status(gw):
    c = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        c.request("GET", STATUS_URI)
        r = c.getresponse()
        data = r.read()
    finally:
        c.close()
    if r.status != 200:
        fail(f"GET {STATUS_URI} -> {r.status}: {data[:300]!r}")
    return json.loads(data)


def scrape_report(status, sims):
    """The signals pool's endpoints from the status page, by replica name;
    fails when the pool is missing, a peer was never scraped or a scrape
    failed, or another pool is scraped."""
    by_addr = {s.addr: s.replica for s in sims}
    pools = {p["upstream"]: p for p in status.get("pools", [])}
    ups = UPSTREAM[SIGNALS]
    if ups not in pools:
        fail(f"{STATUS_URI}: no pool {ups!r} in {sorted(pools)}")
    scraped = {u for _, u, how in POLICIES if "infer_balance_scrape" in how}
    for name, p in pools.items():
        if name not in scraped and p.get("scrape") is not None:
            fail(f"{STATUS_URI}: pool {name!r} is scraped: {p['scrape']}")
    out = {}
    for e in pools[ups]["endpoints"]:
        rep = by_addr.get(e["endpoint"], e["endpoint"])
        out[rep] = {k: e.get(k) for k in (
            "scrapes", "scrape_failures", "fresh", "age_ms", "queue",
            "running", "kv_cache", "picks")}
    bad = [f"{r}: {v['scrapes']} scrapes, {v['scrape_failures']} failed"
           for r, v in out.items()
           if not v["scrapes"] or v["scrape_failures"]]
    if bad or set(out) != set(REPLICAS):
        fail(f"{STATUS_URI}: scrapes of {ups!r} went wrong: "
             + "; ".join(bad or [f"endpoints {sorted(out)}"]))
    return out


def pct(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def sha256(path):
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--clients", type=int, default=12,
                    help="closed-loop clients through the gateway")
    ap.add_argument("--background", type=int, default=4,
                    help="closed-loop clients straight to fast-a, beside "
                         "the gateway, during every run (default 4)")
    ap.add_argument("--max-concurrency", type=int, default=4,
                    help="requests a replica generates at once, the rest "
                         "queue (default 4; 0 = 4 x clients, no queue)")
    ap.add_argument("--mix", default="8,32,128",
                    help="the max_tokens values drawn from, comma-separated")
    ap.add_argument("--tpot-ms", type=float, default=10)
    ap.add_argument("--ttft-ms", type=float, default=20)
    ap.add_argument("--quick", action="store_true",
                    help="2 rounds of 3 s")
    ap.add_argument("--out", default=str(BENCH / "results" / "balance.json"))
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.seconds = 2, 3
    if (a.rounds < 1 or a.seconds <= 0 or a.clients < 1 or a.background < 0
            or a.max_concurrency < 0):
        ap.error("--rounds, --seconds, --clients must be positive, "
                 "--background and --max-concurrency >= 0")
    mix = [int(x) for x in a.mix.split(",")]
    maxc = a.max_concurrency or 4 * a.clients
    # a full queue answers 503: never with these many clients
    max_queue = max(256, 4 * (a.clients + a.background))

    load_before = os.getloadavg()
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="infer-bench-balance-"))
    sims, gw, bg = [], None, None
    runs = {name: [] for name, _, _ in POLICIES}
    try:
        for name in REPLICAS:
            tpot = 3 * a.tpot_ms if name == "slow" else a.tpot_ms
            s = SimProcess(MODEL, name, work / f"sim-{name}",
                           ttft_ms=a.ttft_ms, tpot_ms=tpot,
                           max_concurrency=maxc, max_queue=max_queue)
            sims.append(s.start())
        gw = Nginx(work / "gateway", http=gateway_http(sims),
                   modules=["route"], error_level="warn").start()

        # the background runs from here to the end of the last round; its
        # time limit is a bound far above what the rounds can take
        limit = (60 + len(POLICIES) * (a.rounds + 1)
                 * (a.seconds + HTTP_TIMEOUT + 5))
        bg = Background(sims[REPLICAS.index(BACKGROUND_TO)], a.background,
                        mix, limit).start()

        # warm-up: connections made, every policy once, the background's
        # queue built up
        for name, ups, _ in POLICIES:
            run_clients(gw.port, ups, 0.5, 3, mix)
        bg.check()

        rng = random.Random(7)
        for i in range(a.rounds):
            order = [name for name, _, _ in POLICIES]
            rng.shuffle(order)
            for name in order:
                r = run_clients(gw.port, UPSTREAM[name], a.seconds,
                                a.clients, mix)
                r["bg"] = bg.window(r["t0"], r["t1"])
                r["round"] = i + 1
                runs[name].append(r)
                bg.check()
            print(f"round {i + 1}/{a.rounds} done ({' '.join(order)})",
                  file=sys.stderr)
        bg.finish()
        bg.check()

        scrapes = scrape_report(get_status(gw), sims)
        log = gw.log_text().splitlines()
        problems = gw.log_problems() + [l for l in log if SCRAPE_WARN in l]
        if problems:
            fail("nginx logged:\n" + "\n".join(problems))
    finally:
        if bg is not None:
            bg.stop.set()
        if gw is not None:
            gw.stop()
        for s in sims:
            s.stop()
    elapsed = time.monotonic() - started
    load_after = os.getloadavg()

    summary = {}
    for name, rs in runs.items():
        lat = [x for r in rs for x in r["lat"]]
        served = sum((r["served"] for r in rs), Counter())
        total = max(1, sum(served.values()))
        bg_p50 = [r["bg"]["p50_us"] for r in rs if r["bg"]["p50_us"]]
        summary[name] = {
            "rps": statistics.median(r["rps"] for r in rs),
            "rps_rounds": [r["rps"] for r in rs],
            "p50_us": pct(lat, 50),
            "p99_us": pct(lat, 99),
            "p50_us_rounds": [pct(r["lat"], 50) for r in rs],
            "p99_us_rounds": [pct(r["lat"], 99) for r in rs],
            "requests": len(lat),
            "share": {rep: served[rep] / total for rep in REPLICAS},
            "slow_share": served["slow"] / total,
            "served": dict(served),
            "background_rps": (statistics.median(r["bg"]["rps"] for r in rs)
                               if a.background else None),
            "background_p50_us": (statistics.median(bg_p50)
                                  if bg_p50 else None),
        }

    base = summary["round_robin"]
    print(f"\n{a.clients} clients through the gateway, "
          f"{a.background} background clients straight to {BACKGROUND_TO}; "
          f"max_tokens from {a.mix}; TPOT {a.tpot_ms:g} ms (slow replica "
          f"{3 * a.tpot_ms:g} ms), TTFT {a.ttft_ms:g} ms; batch of "
          f"{maxc} per replica"
          + (" (4 x clients)" if not a.max_concurrency else "")
          + f"; {a.rounds} rounds x {a.seconds:g} s; {elapsed:.0f} s in all; "
          f"load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after\n")
    w = max(len(n) for n in summary) + 2
    print(f"{'policy':<{w}}{'req/s':>7}{'x rr':>6}{'p50':>12}{'x rr':>6}"
          f"{'p99':>12}{'x rr':>6}"
          + "".join(f"{rep:>8}" for rep in REPLICAS)
          + f"{'bg req/s':>10}{'bg p50':>11}")
    for name, s in summary.items():
        print(f"{name:<{w}}{s['rps']:>7.2f}{s['rps'] / base['rps']:>6.2f}"
              f"{fmt_lat(s['p50_us']):>12}"
              f"{s['p50_us'] / base['p50_us']:>6.2f}"
              f"{fmt_lat(s['p99_us']):>12}"
              f"{s['p99_us'] / base['p99_us']:>6.2f}"
              + "".join(f"{s['share'][rep]:>8.1%}" for rep in REPLICAS)
              + (f"{s['background_rps']:>10.2f}" if a.background
                 else f"{'-':>10}")
              + (f"{fmt_lat(s['background_p50_us']):>11}"
                 if s["background_p50_us"] else f"{'-':>11}"))
    print("  req/s: median over rounds; p50/p99: over every request of every"
          " round; fast-a/fast-b/slow: share of the gateway's requests;"
          "\n  bg: the background clients (to fast-a) while the policy ran "
          "(req/s median over rounds, p50 median of the rounds' p50)")

    print("\nper round (req/s, p50, p99):")
    for name, s in summary.items():
        cells = [f"{r:6.2f} {fmt_lat(p50):>10} {fmt_lat(p99):>10}"
                 for r, p50, p99 in zip(s["rps_rounds"], s["p50_us_rounds"],
                                        s["p99_us_rounds"])]
        print(f"  {name:<{w}}" + "  | ".join(cells))

    sig = summary[SIGNALS]
    paired = {}
    print(f"\n{SIGNALS} / other policy, per round (same round, "
          "> 1 = more req/s, longer p50/p99):")
    for name, s in summary.items():
        if name == SIGNALS:
            continue
        ratios = {k: [x / y for x, y in zip(sig[k + "_rounds"],
                                            s[k + "_rounds"])]
                  for k in ("rps", "p50_us", "p99_us")}
        paired[name] = ratios
        print(f"  vs {name:<{w}}" + "   ".join(
            f"{k.replace('_us', '')} " + " ".join(f"{x:.2f}" for x in v)
            for k, v in ratios.items()))

    print("\nscrapes of the signals pool (infer_balance_status at the end): "
          + ", ".join(f"{rep} {v['scrapes']} ({v['scrape_failures']} failed)"
                      for rep, v in scrapes.items()))

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "git": git_describe(),
        "route_module_sha256": sha256(module_path("route")),
        "params": {**vars(a), "max_concurrency_used": maxc,
                   "max_queue": max_queue},
        "policies": {name: how for name, _, how in POLICIES},
        "elapsed_s": round(elapsed, 1),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "summary": summary,
        "signals_vs_other_per_round": paired,
        "scrapes": scrapes,
    }, indent=2) + "\n")
    print(f"\nresults: {out}")


if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        print(f"bench/balance.py: {e}", file=sys.stderr)
        sys.exit(1)
