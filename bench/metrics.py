"""ngx_infer_metrics benchmark: what recording costs a proxied request, and
how long /metrics takes to render.

1. The LOG-phase cost (with the PRECONTENT in-flight count): wrk against
   plain proxy_pass and against the same gateway with the metrics module
   recording every request (two labels), in interleaved rounds, through
   bench/run.py's Bench (same pinning, checks and CPU accounting).  The
   ratio is of the gateway worker's CPU time per request.
2. /metrics render time at 1,000 and 10,000 series: a gateway whose
   series are filled by requests with distinct label values, then scraped
   over one keep-alive connection; the median wall time per scrape, and
   the worker's CPU time per scrape.
3. With --perf (and perf installed): the share of the metrics gateway
   worker's CPU samples spent in the module's own code under wrk, a
   figure that does not drown in the noise of a shared machine as a
   difference of two CPU times does.

    /usr/bin/python3 bench/metrics.py            # ~1 min
    /usr/bin/python3 bench/metrics.py --quick    # 2 rounds of 2 s
    /usr/bin/python3 bench/metrics.py --only perf
"""

import argparse
import http.client
import re
import shutil
import signal
import subprocess
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench_run  # noqa: E402
from run import (DEFAULT_BUFFER, Bench, BenchError, Case,  # noqa: E402
                 GatewayConfig, Nginx, cpu_sample, make_body, summarize,
                 table)

METRICS_ON = GatewayConfig(
    name="metrics",
    description="plain with the metrics module recording every request "
                "(labels model and tenant from the request)",
    modules=["metrics"],
    http="infer_metrics_zone bench 16m;",
    location='infer_metrics on; '
             'infer_metrics_label model "llama-3-8b"; '
             'infer_metrics_label tenant $http_authorization;',
)

# html/ok.txt (written by the harness) answers; each distinct x-model
# value makes 5 series: requests, duration, request and response bytes,
# in flight
SERIES_PER_VALUE = 5
RENDER_GATEWAY = """
    infer_metrics_zone render 128m max_series=20000;
    server {
        listen 127.0.0.1:{port};
        access_log off;
        keepalive_requests 1000000;
        location / {
            infer_metrics on;
            infer_metrics_label model $http_x_model;
            infer_metrics_label tenant "bench-tenant";

            try_files /ok.txt =404;
        }
        location = /metrics { infer_metrics_export; }
    }
"""


def log_phase_cost(args, workdir):
    plain = bench_run.CONFIGS[0]
    case = Case(make_body("small", workdir), DEFAULT_BUFFER,
                [plain, METRICS_ON])
    b = Bench(args, [case], workdir)
    runs = []
    try:
        b.start()
        for cfg in case.configs:
            b.run(case, cfg, args.warmup, "warm-up")
        redone = 0
        for rnd in range(1, args.rounds + 1):
            attempt = 0
            while True:
                k = (rnd - 1 + attempt) % len(case.configs)
                this = []
                for cfg in case.configs[k:] + case.configs[:k]:
                    r = b.run(case, cfg, args.duration, f"round {rnd}")
                    r["round"] = rnd
                    this.append(r)
                    print(f"  round {rnd}/{args.rounds} {cfg.name:<8} "
                          f"{r['rps']:>9,.0f} req/s  "
                          f"{r['cpu_us_per_req']:7.2f} CPU µs/req "
                          f"(other load {r['noise']:.0%})", flush=True)
                # as bench/run.py: a round disturbed by other work is redone
                if (any(r["noise"] > bench_run.NOISY for r in this)
                        and redone < args.retries):
                    redone += 1
                    attempt += 1
                    print(f"  round {rnd}: other work took over "
                          f"{bench_run.NOISY:.0%} of a benchmark CPU: "
                          f"redone ({args.retries - redone} retries left)")
                    continue
                runs += this
                break
        problems = b.log_problems()
        if problems:
            raise BenchError("nginx logged problems:\n" + "\n".join(problems))
    finally:
        b.stop()
    summary, ratios = summarize(case.configs, runs)
    print()
    print(table(case.configs, summary, ratios))
    r = ratios["metrics/plain"]
    print(f"\nmetrics/plain CPU per request: "
          f"{r['paired_median']['cpu_us_per_req']:.3f} (paired median), "
          f"{r['cpu_us_per_req_added']:+.2f} µs/req")


def fill(conn, start, count):
    for i in range(start, start + count):
        conn.request("GET", "/", headers={"x-model": f"model-{i:06d}"})
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise BenchError(f"fill: status {r.status}")


def scrape(conn):
    conn.request("GET", "/metrics")
    r = conn.getresponse()
    body = r.read()
    if r.status != 200:
        raise BenchError(f"/metrics: status {r.status}")
    return body


def render_time(args, workdir):
    n = Nginx(Path(workdir) / "render", http=RENDER_GATEWAY,
              modules=["metrics"], workers=1, error_level="warn")
    n.start()
    try:
        conn = http.client.HTTPConnection(n.host, n.port, timeout=30)
        done = 0
        for target in (1000, 10000):
            values = target // SERIES_PER_VALUE
            fill(conn, done, values - done)
            done = values
            body = scrape(conn)
            series = [l for l in body.decode().splitlines()
                      if l.startswith("infer_metrics_series ")]
            have = int(series[0].split()[1])
            if have != target:
                raise BenchError(f"{have} series, wanted {target}")
            worker = n.worker_pids()
            walls = []
            c0 = cpu_sample(worker)
            for _ in range(args.scrapes):
                t = time.perf_counter()
                body = scrape(conn)
                walls.append(time.perf_counter() - t)
            c1 = cpu_sample(worker)
            cpu_ms = ((c1["ns"] - c0["ns"]) / 1e6 / args.scrapes
                      if c0["ns"] is not None else
                      (c1["ticks"] - c0["ticks"]) * 1e3
                      / bench_run.CLK_TCK / args.scrapes)
            print(f"  {target:>6,} series: page {len(body) / 1e6:6.2f} MB, "
                  f"{len(body.splitlines()):>7,} lines; scrape median "
                  f"{statistics.median(walls) * 1e3:6.1f} ms wall "
                  f"(min {min(walls) * 1e3:.1f}), "
                  f"{cpu_ms:6.1f} ms worker CPU per scrape "
                  f"({args.scrapes} scrapes)", flush=True)
        conn.close()
        problems = n.log_problems()
        if problems:
            raise BenchError("nginx logged problems:\n" + "\n".join(problems))
    finally:
        n.stop()


def perf_share(args, workdir):
    """perf record the metrics gateway's worker under wrk; the share of its
    samples in ngx_http_infer_metrics_module.so."""
    if shutil.which("perf") is None:
        raise BenchError("perf not found (apt-get install linux-perf)")
    w = Path(workdir) / "perf"
    backend = Nginx(w / "backend", http=bench_run.BACKEND, modules=[],
                    workers=1, error_level="warn").start()
    gw = Nginx(w / "gateway",
               http=bench_run.gateway_http(METRICS_ON, backend.addr,
                                           DEFAULT_BUFFER),
               modules=["metrics"], workers=1, error_level="warn").start()
    data = w / "perf.data"
    try:
        perf = subprocess.Popen(["perf", "record", "-q", "-o", str(data), "-p",
                                 str(gw.worker_pids()[0])],
                                stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        subprocess.run(["wrk", "-t1", f"-c{args.connections}",
                        f"-d{args.duration}s", "-s",
                        str(bench_run.BENCH / "chat.lua"),
                        gw.url + "/v1/chat/completions"],
                       capture_output=True, timeout=args.duration + 30,
                       check=True)
        perf.send_signal(signal.SIGINT)
        perf.wait(30)
        r = subprocess.run(["perf", "report", "-i", str(data), "--stdio",
                            "--no-children", "--sort", "dso", "-g", "none"],
                           capture_output=True, text=True, timeout=120)
    finally:
        gw.stop()
        backend.stop()
    shares = {m.group(2): float(m.group(1)) for m in re.finditer(
        r"^\s+([\d.]+)%\s+(\S+)\s*$", r.stdout, re.M)}
    if not shares:
        raise BenchError("perf report gave nothing:\n" + r.stderr[-2000:])
    for dso, share in sorted(shares.items(), key=lambda x: -x[1])[:5]:
        print(f"  {share:6.2f}%  {dso}")
    mod = shares.get("ngx_http_infer_metrics_module.so", 0.0)
    print(f"  the module's own code: {mod:.2f}% of the worker's CPU samples "
          f"({args.duration} s of wrk -c{args.connections}; nginx and libc "
          "functions it calls are counted under theirs)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--scrapes", type=int, default=20)
    ap.add_argument("--retries", type=int, default=3,
                    help="rounds that may be redone because other work "
                         "took a benchmark CPU (default 3, 0 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="2 rounds of 2 s, 5 scrapes")
    ap.add_argument("--only", choices=("log", "render", "perf"),
                    default=None)
    ap.add_argument("--perf", action="store_true",
                    help="also profile the module's share with perf")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.duration, args.scrapes = 2, 2, 5
        args.retries = 0
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} not found")
    workdir = tempfile.mkdtemp(prefix="ngx_infer_bench_metrics.")
    try:
        if args.only in (None, "log"):
            print(f"LOG-phase cost: plain vs metrics, {args.rounds} rounds x "
                  f"{args.duration} s, wrk -t1 -c{args.connections}")
            log_phase_cost(args, workdir)
        if args.only in (None, "render"):
            print("\n/metrics render time (1 worker, keep-alive client):")
            render_time(args, workdir)
        if args.only == "perf" or (args.only is None and args.perf):
            print("\nperf: where the metrics gateway's worker spends its CPU:")
            perf_share(args, workdir)
    except BenchError as e:
        print(f"\nBENCH FAILED: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
