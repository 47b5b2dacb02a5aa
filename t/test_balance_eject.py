"""infer_balance_eject (issue 18): outlier ejection shared by the workers
through the pool's zone.  A replica whose answers fail (a 5xx, a refused
connection, an answer cut short), whose metric page fails, or whose first
bytes come far later than its peers', is taken out for a time that grows
when it fails again soon after coming back; never more than max_share of
the pool, never all of it.

Simulated replicas fail on demand (fail_ratio, reset_after_chunks,
metrics_status, ttft_ms); requests are sent one after another on fresh
connections, so that both workers pick, and counts are compared, never
latencies.  Every wait is bounded in time."""

import json
import re
import shutil
import subprocess
import time
from collections import Counter

import pytest
import requests
from prometheus_client.openmetrics.parser import \
    text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from harness.ports import free_port

HEADERS = """add_header X-Endpoint $infer_endpoint always;
            add_header X-Reason $infer_endpoint_reason always;"""


def gateway_conf(directives, servers, location="", http="", server=""):
    return f"""
    {http}
    upstream pool {{
        infer_balance;
        {directives}
        {" ".join(servers)}
    }}
    infer_model pool upstream=pool model=llama-3-8b;
    server {{
        listen 127.0.0.1:{{port}} reuseport;
        location / {{
            infer_route on;
            proxy_pass http://$infer_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            {location}
            {HEADERS}
        }}
        location = /balance {{ infer_balance_status; }}
        {server}
    }}"""


def servers(sims):
    return [f"server {s.addr};" for s in sims]


def ask(gw, stream=False):
    body = {"model": "pool", "max_tokens": 4, "stream": stream,
            "messages": [{"role": "user", "content": "Hello there"}]}
    try:
        r = requests.post(gw.url + "/v1/chat/completions", json=body,
                          headers={"Connection": "close"}, timeout=15)
        if stream:
            r.content       # read to the end, or to the reset
        return r
    except requests.exceptions.RequestException as e:
        return e


def replica(r):
    return getattr(r, "headers", {}).get("x-sim-replica", "-")


def spread(gw, n, stream=False):
    got = Counter()
    for _ in range(n):
        got[replica(ask(gw, stream))] += 1
    return got


def only(got, *names):
    """got went to those replicas only, and to each of them.  Not evenly:
    each worker takes tied peers in turn, but from wherever its smooth
    round robin stood when the ejection began (which the picks before it
    left uneven), so one replica may take two or three in a row (seen:
    r2 r2 r0 r2 in one worker)."""
    return set(got) == set(names)


def endpoints(gw):
    r = requests.get(gw.url + "/balance", timeout=5)
    assert r.status_code == 200, r.text
    pool = json.loads(r.text)["pools"][0]
    return pool, {e["endpoint"]: e for e in pool["endpoints"]}


def wait_for(what, pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"never {what}")
        time.sleep(0.02)


def ejected(gw, addr):
    return endpoints(gw)[1][addr]["ejected"]


@pytest.fixture
def trio(sim_factory):
    return [sim_factory("llama-3-8b", f"r{i}", ttft_ms=1, tpot_ms=1)
            for i in range(3)]


# ------------------------------------------------------------- failures

def test_a_failing_replica_is_out_within_its_errors_and_back_after(
        nginx_factory, trio):
    a, b, c = trio
    gw = nginx_factory(gateway_conf(
        "infer_balance_eject errors=3 time=600ms max_time=10s;",
        servers(trio)), modules=["route"])
    b.configure(fail_ratio=1.0)

    # round robin reaches b; its third failure in a row (from either
    # worker: the count is the zone's) takes it out
    statuses = Counter()
    for _ in range(12):
        r = ask(gw)
        statuses[(replica(r), r.status_code)] += 1
        if ejected(gw, b.addr):
            break
    assert statuses[("r1", 500)] == 3, statuses
    pool, eps = endpoints(gw)
    e = eps[b.addr]
    assert e["ejected"] and e["ejected_for"] == "errors", e
    assert e["ejections"] == 1 and e["errors_in_a_row"] == 3, e
    assert 0 < e["ejected_ms"] <= 600, e
    assert pool["eject"] == {"errors": 3, "scrapes": 0, "slow": 0.0,
                             "time_ms": 600, "max_time_ms": 10000,
                             "max_share": 50}, pool
    assert not eps[a.addr]["ejected"] and not eps[c.addr]["ejected"], eps
    assert (f'infer balance: "{b.addr}" of upstream "pool" ejected for '
            '600 ms: 3 failed answers in a row') in gw.log_text()

    # while it is out, nobody is sent there
    before = b.stats()["inference_total"]
    got = spread(gw, 12)
    assert only(got, "r0", "r2"), got
    assert b.stats()["inference_total"] == before

    # it recovers; after its time it is back, and keeps its place while
    # it answers
    b.configure(fail_ratio=0.0)
    wait_for("back", lambda: not ejected(gw, b.addr), timeout=3)
    got = spread(gw, 12)
    assert got["r1"] >= 3, got
    assert endpoints(gw)[1][b.addr]["errors_in_a_row"] == 0
    assert (f'infer balance: "{b.addr}" of upstream "pool" is back after '
            'ejection') in gw.log_text()


def test_a_peer_back_on_probation_is_ejected_again_for_longer(
        nginx_factory, trio):
    a, b, c = trio
    gw = nginx_factory(gateway_conf(
        "infer_balance_eject errors=2 time=400ms max_time=1s;",
        servers(trio)), modules=["route"])
    b.configure(fail_ratio=1.0)
    wait_for("ejected", lambda: (ask(gw), ejected(gw, b.addr))[1])
    wait_for("back", lambda: not ejected(gw, b.addr), timeout=3)

    # back with its count as it was: its next failure sends it out again,
    # for twice the time, then three times capped by max_time
    wait_for("ejected again", lambda: (ask(gw), ejected(gw, b.addr))[1])
    e = endpoints(gw)[1][b.addr]
    assert e["ejections"] == 2 and 400 < e["ejected_ms"] <= 800, e
    wait_for("back", lambda: not ejected(gw, b.addr), timeout=3)
    wait_for("ejected a third time",
             lambda: (ask(gw), ejected(gw, b.addr))[1])
    e = endpoints(gw)[1][b.addr]
    assert e["ejections"] == 3 and 800 < e["ejected_ms"] <= 1000, e
    assert "ejected for 800 ms" in gw.log_text()
    assert "ejected for 1000 ms" in gw.log_text()


@pytest.mark.parametrize("peers, share, out", [
    (3, "50%", 1), (4, "50%", 2), (4, "100%", 3), (2, "10%", 1)])
def test_the_share_holds_when_every_replica_fails(nginx_factory, sim_factory,
                                                  peers, share, out):
    sims = [sim_factory("llama-3-8b", f"f{i}", ttft_ms=1, tpot_ms=1,
                        fail_ratio=1.0) for i in range(peers)]
    gw = nginx_factory(gateway_conf(
        f"infer_balance_eject errors=2 time=30s max_share={share};",
        servers(sims)), modules=["route"])
    for _ in range(8 * peers):
        r = ask(gw)
        assert r.status_code == 500, r.status_code
    eps = endpoints(gw)[1]
    assert sum(e["ejected"] for e in eps.values()) == out, eps
    # the others still get the requests (and answer their 500s)
    assert len(spread(gw, 2 * peers)) == peers - out
    refused = re.findall(r'is not ejected \(errors\): (\d+) of its (\d+) '
                         r'peers are out already', gw.log_text())
    assert refused and set(refused) == {(str(out), str(peers))}, refused


def test_a_single_peer_is_never_ejected(nginx_factory, sim_factory):
    s = sim_factory("llama-3-8b", "only", ttft_ms=1, tpot_ms=1,
                    fail_ratio=1.0)
    gw = nginx_factory(gateway_conf("infer_balance_eject errors=1;",
                                    servers([s])), modules=["route"])
    for _ in range(4):
        assert ask(gw).status_code == 500
    assert not ejected(gw, s.addr)


def test_refused_connections_eject_and_are_not_tried_again(nginx_factory,
                                                           trio):
    dead = f"127.0.0.1:{free_port()}"
    gw = nginx_factory(gateway_conf(
        "infer_balance_eject errors=2 time=30s;",
        servers(trio) + [f"server {dead};"],
        location="add_header X-Tried $upstream_addr always;"),
        modules=["route"])
    tried = 0
    for _ in range(16):
        r = ask(gw)
        assert r.status_code == 200         # retried on another peer
        tried += r.headers["x-tried"].count(dead)
    assert tried == 2, tried
    assert ejected(gw, dead)
    gw.forget_log()     # the refused connections, logged at [error]


def test_an_answer_cut_short_counts_as_a_failure(nginx_factory, trio):
    a, b, c = trio
    gw = nginx_factory(gateway_conf("infer_balance_eject errors=2 time=30s;",
                                    servers(trio)), modules=["route"])
    b.configure(reset_after_chunks=1)
    wait_for("ejected", lambda: (ask(gw, stream=True),
                                 ejected(gw, b.addr))[1])
    assert only(spread(gw, 10, stream=True), "r0", "r2")
    gw.forget_log()     # "upstream prematurely closed connection"


def test_client_errors_never_eject(nginx_factory, trio):
    """A 4xx is the client's doing: the replica answered."""
    a, b, c = trio
    gw = nginx_factory(gateway_conf("infer_balance_eject errors=1;",
                                    servers(trio)), modules=["route"])
    b.configure(fail_ratio=1.0, fail_status=429)
    got = Counter()
    for _ in range(9):
        r = ask(gw)
        got[(replica(r), r.status_code)] += 1
    assert got[("r1", 429)] == 3, got
    assert not any(e["ejected"] for e in endpoints(gw)[1].values())


# -------------------------------------------------- scrapes and slowness

def test_failed_scrapes_eject_when_asked(nginx_factory, trio):
    a, b, c = trio
    gw = nginx_factory(gateway_conf(
        "infer_balance_scrape interval=50ms timeout=200ms stale=300ms;\n"
        "        infer_balance_eject scrapes=3 time=30s;", servers(trio)),
        modules=["route"])
    b.configure(metrics_status=500)
    wait_for("ejected", lambda: ejected(gw, b.addr), timeout=3)
    e = endpoints(gw)[1][b.addr]
    assert e["ejected_for"] == "scrapes" and e["scrape_failures"] >= 3, e
    assert "3 failed scrapes in a row" in gw.log_text()
    assert only(spread(gw, 10), "r0", "r2")


def test_a_stuck_but_answering_replica_is_ejected_as_slow(nginx_factory,
                                                          sim_factory):
    fast = [sim_factory("llama-3-8b", f"fast{i}", ttft_ms=2, tpot_ms=1)
            for i in range(2)]
    slow = sim_factory("llama-3-8b", "slow", ttft_ms=250, tpot_ms=1)
    gw = nginx_factory(gateway_conf(
        "infer_balance_eject errors=5 slow=4 time=30s;",
        servers(fast + [slow])), modules=["route"])
    # 8 answers of each before it is judged
    got = Counter()
    deadline = time.monotonic() + 20
    while not ejected(gw, slow.addr) and time.monotonic() < deadline:
        for _ in range(3):
            got[replica(ask(gw, stream=True))] += 1
    e = endpoints(gw)[1][slow.addr]
    assert e["ejected"] and e["ejected_for"] == "slow", (e, got)
    assert got["slow"] >= 8, got
    assert e["ttfb_ms"] >= 250, e
    assert re.search(rf'"{re.escape(slow.addr)}" of upstream "pool" ejected '
                     r'for 30000 ms: its first bytes take \d+\.\d\d times '
                     r"its peers'", gw.log_text())
    assert "slow" not in spread(gw, 6)


def test_replicas_alike_are_never_ejected_as_slow(nginx_factory,
                                                  sim_factory):
    sims = [sim_factory("llama-3-8b", f"s{i}", ttft_ms=120, tpot_ms=1)
            for i in range(3)]
    gw = nginx_factory(gateway_conf("infer_balance_eject slow=2;",
                                    servers(sims)), modules=["route"])
    spread(gw, 30)
    eps = endpoints(gw)[1]
    assert not any(e["ejected"] for e in eps.values()), eps
    assert all(e["ttfb_ms"] >= 120 for e in eps.values()), eps


# ---------------------------------------------------------------- metrics

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def test_ejections_on_the_metrics_page(nginx_factory, trio):
    """infer_balance_ejected, infer_balance_ejections_total and
    infer_balance_tokens_in_flight per pool and endpoint, on the metrics
    module's page, in both of its formats; promtool finds nothing wrong."""
    a, b, c = trio
    gw = nginx_factory(gateway_conf(
        "infer_balance_eject errors=2 time=30s;", servers(trio),
        http="infer_metrics_zone m 4m;", location="infer_metrics on;",
        server="location = /metrics { infer_metrics_export; }"),
        modules=["route", "metrics"])
    b.configure(fail_ratio=1.0)
    wait_for("ejected", lambda: (ask(gw), ejected(gw, b.addr))[1])

    text = requests.get(gw.url + "/metrics", timeout=5).text
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["infer_balance_ejected"].type == "gauge"
    assert fams["infer_balance_ejections"].type == "counter"
    assert fams["infer_balance_tokens_in_flight"].type == "gauge"

    def values(fams, name):
        return {s.labels["endpoint"]: s.value for s in fams[name].samples
                if s.labels["upstream"] == "pool"
                and not s.name.endswith("_created")}

    assert values(fams, "infer_balance_ejected") == \
        {a.addr: 0, b.addr: 1, c.addr: 0}
    assert values(fams, "infer_balance_ejections") == \
        {a.addr: 0, b.addr: 1, c.addr: 0}
    assert values(fams, "infer_balance_tokens_in_flight") == \
        {a.addr: 0, b.addr: 0, c.addr: 0}

    om = requests.get(gw.url + "/metrics", timeout=5, headers={
        "Accept": "application/openmetrics-text; version=1.0.0"}).text
    assert om.endswith("# EOF\n")
    fams = {f.name: f for f in openmetrics_families(om)}
    assert values(fams, "infer_balance_ejected")[b.addr] == 1
    assert values(fams, "infer_balance_ejections")[b.addr] == 1


# ------------------------------------------------------- reload, nginx -t

def test_an_ejection_outlives_a_reload(nginx_factory, trio):
    a, b, c = trio
    gw = nginx_factory(gateway_conf("infer_balance_eject errors=2 time=30s;",
                                    servers(trio)), modules=["route"])
    b.configure(fail_ratio=1.0)
    wait_for("ejected", lambda: (ask(gw), ejected(gw, b.addr))[1])
    gw.reload()
    assert ejected(gw, b.addr)
    assert only(spread(gw, 10), "r0", "r2")


def _check(nginx_factory, directives):
    gw = nginx_factory(gateway_conf(directives, ["server 127.0.0.1:9;"]),
                       modules=["route"], start=False)
    return gw.check_config()


def test_defaults_and_a_full_line_pass_nginx_t(nginx_factory):
    for line in ["infer_balance_eject;",
                 "infer_balance_scrape; infer_balance_eject errors=0 "
                 "scrapes=5 slow=3.5 time=1s max_time=1h max_share=34%;"]:
        ok, out = _check(nginx_factory, line)
        assert ok, out


@pytest.mark.parametrize("directives, words", [
    ("infer_balance_eject errors=x;", ['invalid parameter "errors=x"']),
    ("infer_balance_eject slow=1;", ['invalid "slow=1"']),
    ("infer_balance_eject time=50ms;", ['invalid parameter "time=50ms"']),
    ("infer_balance_eject time=10s max_time=5s;", ["max_time= is below"]),
    ("infer_balance_eject max_share=50;", ['"max_share=50"']),
    ("infer_balance_eject max_share=0%;", ['"max_share=0%"']),
    ("infer_balance_eject max_share=101%;", ['"max_share=101%"']),
    ("infer_balance_eject errors=0;", ["ejects on nothing"]),
    ("infer_balance_eject scrapes=3;", ['needs "infer_balance_scrape"']),
    ("infer_balance_eject; infer_balance_eject;", ["is duplicate"]),
    ("infer_balance_eject sometimes;", ['invalid parameter "sometimes"']),
])
def test_mistakes_are_refused_by_nginx_t(nginx_factory, directives, words):
    ok, out = _check(nginx_factory, directives)
    assert not ok, out
    assert "[emerg]" in out and all(w in out for w in words), out


def test_eject_needs_infer_balance(nginx_factory):
    gw = nginx_factory("""
    upstream pool { infer_balance_eject; server 127.0.0.1:9; }
    server { listen 127.0.0.1:{port}; }""", modules=["route"], start=False)
    ok, out = gw.check_config()
    assert not ok
    assert '"infer_balance_eject" needs "infer_balance" in upstream "pool"' \
        in out, out
