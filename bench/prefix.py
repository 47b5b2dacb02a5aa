"""ngx_infer prefix benchmark: does picking by load and prefix beat
least_conn when the replicas have a prefix cache?

Three simulated replicas (sim/infer_sim.py) with the engine model on: a
prompt's tokens that are not in the replica's prefix cache are
prefilled at PREFILL tokens/s, one prompt after another; the KV cache
holds KV tokens in blocks of 16, reused least recently used first; a
batch of MAX_CONCURRENCY requests.  So a replica answers a prompt fast
when it saw its prefix recently, and every cold prefill delays the first
token of the requests behind it.

One gateway nginx (2 workers) has the three servers in one upstream
block per policy, and a model per block:

    round_robin                 (nginx's default)
    least_conn                  least_conn;
    infer_balance               infer_balance least_tokens;
    infer_balance+prefix        infer_balance least_tokens prefix_affinity;
    infer_balance+prefix+signals  the same, and infer_balance_scrape

CLIENTS closed-loop clients (threads, keep-alive connections, streamed
answers) play users.  The mix (--mix shared, the default):

    chat      SHARE_CHAT: a conversation of up to TURNS turns under one
              of SYSTEMS long system prompts; each turn sends the whole
              conversation so far (the prompt grows, its start repeats)
    document  SHARE_DOC: questions about one of DOCS long documents,
              which come first in the prompt after a short instruction
    unique    the rest: a short prompt no one else sends

--mix unique: every prompt is unique (same sizes as a chat turn): no
prefix to exploit, where a prefix policy must not lose.

Each policy runs in turn, in a shuffled order per round, with the
replicas' caches emptied before (POST /_sim/config kv_cache_tokens) and
WARM seconds of its own traffic not measured, then SECONDS measured; each
client's sequence of requests is the same for every policy.  The report
gives per policy: time to first token p50 / p99 (the first SSE event,
measured at the client), answers/s and generated tokens/s, the prefix
cache hit rate (the replicas' vllm:prefix_cache_hits / queries over the
measured seconds, from /_sim/stats), preemptions, and each replica's
share; and the paired ratios of the best infer_balance row to
least_conn, per round.

    /usr/bin/python3 bench/prefix.py               # 2 rounds, ~3 min
    /usr/bin/python3 bench/prefix.py --mix unique  # no shared prefixes
    /usr/bin/python3 bench/prefix.py --quick       # smoke run

Exits non-zero when a request fails, or nginx logged an [alert]/[emerg]
or a failed scrape.  Results: printed, and bench/results/prefix-<mix>.json.
Standard library only.
"""

import argparse
import datetime
import http.client
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "t"))

from run import BenchError, fail, git_describe  # noqa: E402
from balance import MODEL, gateway_http, join_all, pct, sha256  # noqa: E402
from harness.nginx import Nginx, module_path  # noqa: E402
from harness.simproc import SimProcess  # noqa: E402

REPLICAS = ("a", "b", "c")
SCRAPE = "infer_balance_scrape interval=50ms timeout=200ms stale=500ms;"
BEST = "infer_balance+prefix+signals"
POLICIES = [  # name, upstream block (and model) name, balancing directives
    ("round_robin", "round_robin", ""),
    ("least_conn", "least_conn", "least_conn;"),
    ("infer_balance", "ib", "infer_balance least_tokens;"),
    ("infer_balance+prefix", "ib_prefix",
     "infer_balance least_tokens prefix_affinity;"),
    (BEST, "ib_prefix_signals",
     "infer_balance least_tokens prefix_affinity; " + SCRAPE),
]
UPSTREAM = {name: ups for name, ups, _ in POLICIES}
HTTP_TIMEOUT = 60
SCRAPE_WARN = "infer balance: scrape of"

WORDS = ("system user model token cache prefix block replica answer "
         "question document context window batch queue latency gateway "
         "policy engine prefill decode tensor layer weight vector").split()


def text(rng, nbytes):
    out, n = [], 0
    while n < nbytes:
        w = rng.choice(WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)


class Workload:
    """The prompts users send, made from fixed seeds: the same for every
    policy.  Sizes in bytes (a token is 4 bytes to the simulator)."""

    def __init__(self, a):
        rng = random.Random(11)
        self.a = a
        self.systems = [f"[system prompt {i}] " + text(rng, a.system_bytes)
                        for i in range(a.systems)]
        self.docs = [f"[document {i}] " + text(rng, a.doc_bytes)
                     for i in range(a.docs)]

    def session(self, rng, cid, k):
        """A user's next session: a list of request bodies, each sent
        after the answer to the one before."""
        a = self.a
        q = lambda: (f"[client {cid} session {k} {rng.random():.9f}] "  # noqa
                     + text(rng, a.question_bytes))
        kind = rng.random()
        if a.mix == "unique":
            # the size of a chat turn, no prefix shared with anyone
            return [[{"role": "system",
                      "content": f"[unique {cid} {k} {rng.random():.9f}] "
                                 + text(rng, a.system_bytes)},
                     {"role": "user", "content": q()}]]
        if kind < a.share_chat:
            msgs = [{"role": "system", "content": rng.choice(self.systems)}]
            out = []
            for t in range(rng.randint(1, a.turns)):
                msgs = msgs + [{"role": "user", "content": q()}]
                out.append(msgs)
                msgs = msgs + [{"role": "assistant",
                                "content": text(rng, a.answer_bytes)}]
            return out
        if kind < a.share_chat + a.share_doc:
            doc = rng.choice(self.docs)
            return [[{"role": "system", "content": "Answer from the document."},
                     {"role": "user", "content": doc + "\n\n" + q()}]
                    for _ in range(rng.randint(1, a.turns))]
        return [[{"role": "user", "content": q()}]]


def stream(c, body):
    """One streamed request: (status, replica, TTFT s, end s, tokens)."""
    t0 = time.monotonic()
    c.request("POST", "/v1/chat/completions", body,
              {"content-type": "application/json"})
    r = c.getresponse()
    ttft, tokens = None, 0
    if r.status != 200:
        r.read()
        return r.status, None, None, None, 0
    replica = r.getheader("x-sim-replica")
    while True:
        line = r.readline()
        if not line:
            break
        if line.startswith(b"data: {"):
            if ttft is None:
                ttft = time.monotonic() - t0
            # a token: content, not the first chunk's role
            if b'"content":"' in line and b'"role"' not in line:
                tokens += 1
    return 200, replica, ttft, time.monotonic() - t0, tokens


def check_log(gw):
    log = gw.log_text().splitlines()
    problems = gw.log_problems() + [l for l in log if SCRAPE_WARN in l]
    if problems:
        fail("nginx logged:\n" + "\n".join(problems))


def sim_stats(sims):
    out = {}
    for s in sims:
        with urllib.request.urlopen(f"http://{s.addr}/_sim/stats",
                                    timeout=10) as r:
            out[s.replica] = json.loads(r.read())
    return out


def reset_caches(sims, kv):
    for s in sims:
        req = urllib.request.Request(
            f"http://{s.addr}/_sim/config", method="POST",
            data=json.dumps({"kv_cache_tokens": kv}).encode())
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()


def run_policy(port, model, work, a, rnd, sims):
    """Closed loop through the gateway for warm + seconds; measured: the
    requests started after the warm-up."""
    lock = threading.Lock()
    rows, errors = [], []
    t_start = time.monotonic()
    t_meas = t_start + a.warm
    stop = t_meas + a.seconds
    max_tokens = [int(x) for x in a.max_tokens.split(",")]

    def client(cid):
        rng = random.Random(cid * 1000003 + rnd)
        c = http.client.HTTPConnection("127.0.0.1", port,
                                       timeout=HTTP_TIMEOUT)
        k = 0
        try:
            while time.monotonic() < stop:
                k += 1
                for msgs in work.session(rng, cid, k):
                    if time.monotonic() >= stop:
                        break
                    body = json.dumps({"model": model, "stream": True,
                                       "max_tokens": rng.choice(max_tokens),
                                       "messages": msgs})
                    started = time.monotonic()
                    st, rep, ttft, dur, toks = stream(c, body)
                    with lock:
                        if st != 200 or ttft is None:
                            errors.append(st)
                            return
                        if started >= t_meas:
                            rows.append((started, rep, ttft, dur, toks))
        except (OSError, http.client.HTTPException) as e:
            with lock:
                errors.append(repr(e))
        finally:
            c.close()

    ts = [threading.Thread(target=client, args=(i,), daemon=True)
          for i in range(a.clients)]
    for t in ts:
        t.start()
    # the replicas' counters at the start of the measured seconds
    time.sleep(max(0.0, t_meas - time.monotonic()))
    before = sim_stats(sims)
    join_all(ts, stop + HTTP_TIMEOUT + 5, model)
    after = sim_stats(sims)
    if errors:
        fail(f"{model}: {len(errors)} failed requests, e.g. {errors[:3]}")
    q = sum(after[r]["prefix_cache_queries"] - before[r]["prefix_cache_queries"]
            for r in after)
    h = sum(after[r]["prefix_cache_hits"] - before[r]["prefix_cache_hits"]
            for r in after)
    pre = sum(after[r]["preemptions"] - before[r]["preemptions"]
              for r in after)
    # throughput: the answers that ended within the measured seconds
    done = [x for x in rows if x[0] + x[3] <= stop]
    return {"ttft": [x[2] for x in rows], "dur": [x[3] for x in rows],
            "rps": len(done) / a.seconds,
            "tps": sum(x[4] for x in done) / a.seconds,
            "served": Counter(x[1] for x in rows),
            "hit_rate": h / q if q else 0.0, "preemptions": pre,
            "requests": len(rows)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mix", choices=("shared", "unique"), default="shared")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=12)
    ap.add_argument("--warm", type=float, default=4)
    ap.add_argument("--clients", type=int, default=18)
    ap.add_argument("--prefill", type=float, default=20000,
                    help="prefill tokens/s per replica")
    ap.add_argument("--kv", type=int, default=40000,
                    help="KV cache tokens per replica")
    ap.add_argument("--max-concurrency", type=int, default=8)
    ap.add_argument("--tpot-ms", type=float, default=8)
    ap.add_argument("--ttft-ms", type=float, default=5)
    ap.add_argument("--max-tokens", default="16,32,64")
    ap.add_argument("--systems", type=int, default=6)
    ap.add_argument("--system-bytes", type=int, default=6000)
    ap.add_argument("--docs", type=int, default=12)
    ap.add_argument("--doc-bytes", type=int, default=16000)
    ap.add_argument("--question-bytes", type=int, default=200)
    ap.add_argument("--answer-bytes", type=int, default=200)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--share-chat", type=float, default=0.6)
    ap.add_argument("--share-doc", type=float, default=0.3)
    ap.add_argument("--only", help="comma-separated policies")
    ap.add_argument("--affinity", default="",
                    help="more parameters of prefix_affinity's infer_balance "
                         "line, e.g. bound=2")
    ap.add_argument("--quick", action="store_true", help="1 round of 4 s")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.seconds, a.warm = 1, 4, 2
    policies = [(n, u, how.replace("prefix_affinity;",
                                   f"prefix_affinity {a.affinity};"))
                for n, u, how in POLICIES
                if not a.only or n in a.only.split(",")]
    work = Workload(a)

    load_before = os.getloadavg()
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="infer-bench-prefix-"))
    sims, gw = [], None
    runs = {name: [] for name, _, _ in policies}
    try:
        for name in REPLICAS:
            sims.append(SimProcess(
                MODEL, name, tmp / f"sim-{name}", ttft_ms=a.ttft_ms,
                tpot_ms=a.tpot_ms, max_concurrency=a.max_concurrency,
                max_queue=4 * a.clients, prefill_tokens_per_s=a.prefill,
                kv_cache_tokens=a.kv).start())
        gw = Nginx(tmp / "gateway", http=gateway_http(
                       sims, policies, "proxy_buffering off;"),
                   modules=["route"], error_level="warn").start()
        rng = random.Random(7)
        for i in range(a.rounds):
            order = [name for name, _, _ in policies]
            rng.shuffle(order)
            for name in order:
                # every policy starts cold: the replicas' caches emptied,
                # a gateway started afresh (infer_balance's seen prefixes)
                check_log(gw)
                gw.stop()
                reset_caches(sims, a.kv)
                gw.start()
                r = run_policy(gw.port, UPSTREAM[name], work, a, i, sims)
                r["round"] = i + 1
                runs[name].append(r)
                print(f"round {i + 1}: {name}: TTFT p50 "
                      f"{pct(r['ttft'], 50) * 1e3:.0f} ms p99 "
                      f"{pct(r['ttft'], 99) * 1e3:.0f} ms, "
                      f"{r['rps']:.1f} req/s, hits {r['hit_rate']:.0%}",
                      file=sys.stderr)
        check_log(gw)
    finally:
        if gw is not None:
            gw.stop()
        for s in sims:
            s.stop()
    elapsed = time.monotonic() - started

    summary = {}
    for name, rs in runs.items():
        ttft = [x for r in rs for x in r["ttft"]]
        served = sum((r["served"] for r in rs), Counter())
        total = max(1, sum(served.values()))
        summary[name] = {
            "ttft_p50_ms": pct(ttft, 50) * 1e3,
            "ttft_p99_ms": pct(ttft, 99) * 1e3,
            "ttft_p50_ms_rounds": [pct(r["ttft"], 50) * 1e3 for r in rs],
            "ttft_p99_ms_rounds": [pct(r["ttft"], 99) * 1e3 for r in rs],
            "rps": statistics.mean(r["rps"] for r in rs),
            "rps_rounds": [r["rps"] for r in rs],
            "tokens_per_s": statistics.mean(r["tps"] for r in rs),
            "hit_rate": statistics.mean(r["hit_rate"] for r in rs),
            "preemptions": sum(r["preemptions"] for r in rs),
            "requests": len(ttft),
            "share": {rep: served[rep] / total for rep in REPLICAS},
        }

    print(f"\nmix {a.mix}: {a.clients} clients, {a.rounds} rounds x "
          f"({a.warm:g} s warm-up + {a.seconds:g} s); replicas: prefill "
          f"{a.prefill:g} tokens/s, KV {a.kv} tokens, batch "
          f"{a.max_concurrency}, TPOT {a.tpot_ms:g} ms; {elapsed:.0f} s in "
          f"all; load average {load_before[0]:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after\n")
    w = max(len(n) for n in summary) + 2
    print(f"{'policy':<{w}}{'TTFT p50':>10}{'p99':>9}{'req/s':>8}"
          f"{'tok/s':>8}{'hits':>7}{'preempt':>9}"
          + "".join(f"{r:>7}" for r in REPLICAS))
    for name, s in summary.items():
        print(f"{name:<{w}}{s['ttft_p50_ms']:>8.0f}ms{s['ttft_p99_ms']:>7.0f}ms"
              f"{s['rps']:>8.1f}{s['tokens_per_s']:>8.0f}"
              f"{s['hit_rate']:>7.0%}{s['preemptions']:>9}"
              + "".join(f"{s['share'][r]:>7.0%}" for r in REPLICAS))
    paired = {}
    if BEST in summary and "least_conn" in summary:
        b, lc = summary[BEST], summary["least_conn"]
        paired = {k: [x / y for x, y in zip(lc[k], b[k])]
                  for k in ("ttft_p50_ms_rounds", "ttft_p99_ms_rounds")}
        paired["rps_rounds"] = [x / y for x, y in zip(b["rps_rounds"],
                                                      lc["rps_rounds"])]
        print(f"\nleast_conn / {BEST}, per round: TTFT p50 "
              + " ".join(f"{x:.2f}" for x in paired["ttft_p50_ms_rounds"])
              + ", p99 "
              + " ".join(f"{x:.2f}" for x in paired["ttft_p99_ms_rounds"])
              + f"; req/s {BEST} / least_conn "
              + " ".join(f"{x:.2f}" for x in paired["rps_rounds"]))

    out = Path(a.out or BENCH / "results" / f"prefix-{a.mix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "git": git_describe(),
        "route_module_sha256": sha256(module_path("route")),
        "params": vars(a),
        "policies": {name: how for name, _, how in policies},
        "elapsed_s": round(elapsed, 1),
        "summary": summary,
        "least_conn_over_best_per_round": paired,
    }, indent=2) + "\n")
    print(f"\nresults: {out}")


if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        print(f"bench/prefix.py: {e}", file=sys.stderr)
        sys.exit(1)
