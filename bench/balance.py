"""ngx_infer balance benchmark: infer_balance against round_robin and
least_conn on a pool where one of three replicas is three times slower.

Three simulated replicas (sim/infer_sim.py) serve one model: two generate
a token every TPOT ms, the third every 3 x TPOT ms.  One gateway nginx (2
workers) has the same three servers in three upstream blocks, one per
policy, and a model per block.  CLIENTS closed-loop clients (threads,
keep-alive connections) ask for answers of mixed lengths (max_tokens
drawn from MIX) for SECONDS per policy; the policies take turns in each
round, in a shuffled order.

The report gives, per policy, the throughput (median over rounds), the
p50 and p99 latency of a whole answer (over every request of every
round) and the share of requests the slow replica served.

    /usr/bin/python3 bench/balance.py            # 3 rounds x 8 s, ~90 s
    /usr/bin/python3 bench/balance.py --quick    # 2 rounds x 3 s, smoke run
    /usr/bin/python3 bench/balance.py --clients 24 --rounds 5

Exits non-zero when a request fails or nginx logged an [alert]/[emerg].
Results: printed, and bench/results/balance.json.  Standard library only.
"""

import argparse
import datetime
import http.client
import json
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
from harness.nginx import Nginx  # noqa: E402
from harness.simproc import SimProcess  # noqa: E402

MODEL = "llama-3-8b"

POLICIES = [  # name, the upstream block's balancing directive
    ("round_robin", ""),
    ("least_conn", "least_conn;"),
    ("infer_balance", "infer_balance least_tokens;"),
]


def gateway_http(sims):
    servers = " ".join(f"server {s.addr};" for s in sims)
    ups = "\n".join(f"upstream {name} {{ {how} {servers} keepalive 32; }}"
                    for name, how in POLICIES)
    models = "\n".join(f"infer_model {name} upstream={name} model={MODEL};"
                       for name, _ in POLICIES)
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
        }}
    }}"""


def run_clients(port, model, seconds, clients, mix):
    """Closed loop: each client asks again as soon as it has its answer,
    for a max_tokens drawn from mix (each client's sequence of draws is
    the same for every policy)."""
    bodies = [json.dumps({"model": model, "max_tokens": n,
                          "messages": [{"role": "user",
                                        "content": "Tell me about GPUs."}]})
              for n in mix]
    lock = threading.Lock()
    lat, served, errors = [], Counter(), []
    stop = time.monotonic() + seconds

    def client(seed):
        rng = random.Random(seed)
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            while time.monotonic() < stop:
                body = rng.choice(bodies)
                t0 = time.monotonic()
                c.request("POST", "/v1/chat/completions", body,
                          {"content-type": "application/json"})
                r = c.getresponse()
                r.read()
                dt = time.monotonic() - t0
                with lock:
                    if r.status != 200:
                        errors.append(r.status)
                        return
                    lat.append(dt * 1e6)
                    served[r.getheader("x-sim-replica")] += 1
        except (OSError, http.client.HTTPException) as e:
            with lock:
                errors.append(repr(e))
        finally:
            c.close()

    t0 = time.monotonic()
    ts = [threading.Thread(target=client, args=(i,))
          for i in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(seconds + 60)
    elapsed = time.monotonic() - t0
    if errors:
        fail(f"{model}: {len(errors)} failed requests, e.g. {errors[:3]}")
    return {"rps": len(lat) / elapsed, "lat": lat, "served": served}


def pct(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--clients", type=int, default=12)
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
    mix = [int(x) for x in a.mix.split(",")]

    work = Path(tempfile.mkdtemp(prefix="infer-bench-balance-"))
    sims, gw = [], None
    try:
        for name, tpot in (("fast-a", a.tpot_ms), ("fast-b", a.tpot_ms),
                           ("slow", 3 * a.tpot_ms)):
            s = SimProcess(MODEL, name, work / f"sim-{name}",
                           ttft_ms=a.ttft_ms, tpot_ms=tpot,
                           max_concurrency=4 * a.clients)
            sims.append(s.start())
        gw = Nginx(work / "gateway", http=gateway_http(sims),
                   modules=["route"], error_level="warn").start()

        # warm-up: connections made, every policy once
        for name, _ in POLICIES:
            run_clients(gw.port, name, 0.5, 3, mix)

        runs = {name: [] for name, _ in POLICIES}
        rng = random.Random(7)
        for i in range(a.rounds):
            order = [name for name, _ in POLICIES]
            rng.shuffle(order)
            for name in order:
                runs[name].append(run_clients(gw.port, name, a.seconds,
                                              a.clients, mix))
            print(f"round {i + 1}/{a.rounds} done", file=sys.stderr)

        problems = gw.log_problems()
        if problems:
            fail("nginx logged:\n" + "\n".join(problems))
    finally:
        if gw is not None:
            gw.stop()
        for s in sims:
            s.stop()

    summary = {}
    for name, rs in runs.items():
        lat = [x for r in rs for x in r["lat"]]
        served = sum((r["served"] for r in rs), Counter())
        summary[name] = {
            "rps": statistics.median(r["rps"] for r in rs),
            "p50_us": pct(lat, 50),
            "p99_us": pct(lat, 99),
            "requests": len(lat),
            "slow_share": served["slow"] / max(1, sum(served.values())),
            "served": dict(served),
        }

    base = summary["round_robin"]
    print(f"\n{a.clients} clients, max_tokens from {a.mix}, "
          f"TPOT {a.tpot_ms:g} ms (slow replica {3 * a.tpot_ms:g} ms), "
          f"{a.rounds} rounds x {a.seconds:g} s\n")
    print(f"{'policy':<15}{'req/s':>8}{'x rr':>7}{'p50':>12}{'x rr':>7}"
          f"{'p99':>12}{'x rr':>7}{'slow share':>12}")
    for name, s in summary.items():
        print(f"{name:<15}{s['rps']:>8.1f}{s['rps'] / base['rps']:>7.2f}"
              f"{fmt_lat(s['p50_us']):>12}"
              f"{s['p50_us'] / base['p50_us']:>7.2f}"
              f"{fmt_lat(s['p99_us']):>12}"
              f"{s['p99_us'] / base['p99_us']:>7.2f}"
              f"{s['slow_share']:>12.1%}")

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "git": git_describe(),
        "params": vars(a),
        "summary": summary,
    }, indent=2) + "\n")
    print(f"\nresults: {out}")


if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        print(f"bench/balance.py: {e}", file=sys.stderr)
        sys.exit(1)
