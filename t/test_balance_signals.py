"""infer_balance with backend signals (issue 7): every peer's metric page
scraped from nginx timers, queue depth, KV-cache use and LoRA adapters
mixed into the score, shedding by priority when the whole pool is
saturated, an external picker's header, the JSON status page and
infer_endpoint_picks_total.

Simulated replicas (sim/infer_sim.py) say what load they have through
their fake_* options, in the vLLM, SGLang or TGI page format; requests are
sent one after another, so that the tokens in flight are the same (none)
at every pick and only the signals differ.  Counts are compared, never
latencies; every wait polls the status page with a time bound."""

import json
import re
import time
from collections import Counter

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from harness.openai import error_of
from harness.ports import free_port

HEADERS = """add_header X-Endpoint $infer_endpoint always;
            add_header X-Reason $infer_endpoint_reason always;"""

# short enough for quick tests: fresh within 50 ms, stale after 300 ms
SCRAPE = "infer_balance_scrape interval=50ms timeout=200ms stale=300ms;"

IDLE = dict(fake_waiting=0, fake_running=0, fake_kv_cache_usage=0.0)


def gateway_conf(pools, models=None, http="", location="", server=""):
    """pools: {name: (directives, [server lines])}; models: {model: pool},
    by default one model per pool, of its name, served as llama-3-8b."""
    ups = "\n".join(
        f"upstream {name} {{\n        {directives}\n        "
        + "\n        ".join(servers) + "\n    }"
        for name, (directives, servers) in pools.items())
    if models is None:
        models = {name: name for name in pools}
    regs = "\n".join(
        f"infer_model {m} upstream={p}"
        + (" model=llama-3-8b;" if m == p else ";")
        for m, p in models.items())
    return f"""
    {ups}
    {regs}
    {http}
    server {{
        listen 127.0.0.1:{{port}} reuseport;
        {server}
        location / {{
            infer_route on;
            proxy_pass http://$infer_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            {location}
            {HEADERS}
        }}
        location = /balance {{ infer_balance_status; }}
    }}"""


def servers(sims, suffix=""):
    return [f"server {s.addr}{suffix};" for s in sims]


def ask(gw, model, headers=None, expect=200, max_tokens=4):
    body = {"model": model, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "Hello there"}]}
    r = requests.post(gw.url + "/v1/chat/completions", json=body,
                      headers=headers or {}, timeout=15)
    assert r.status_code == expect, (r.status_code, r.text, dict(r.headers))
    return r


def spread(gw, model, n, headers=None):
    """n sequential requests, each on a new connection (so both workers
    pick): which replica answered, and why, counted.  Peers that tie are
    taken in turn by each worker, so of 3k requests over 3 tied peers each
    gets at least k - 1."""
    replicas, reasons = Counter(), Counter()
    for _ in range(n):
        r = ask(gw, model, headers)
        replicas[r.headers["x-sim-replica"]] += 1
        reasons[r.headers["x-reason"]] += 1
    return replicas, reasons


def status(gw):
    r = requests.get(gw.url + "/balance", timeout=5)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json"), \
        r.headers
    return r.json()


def pool_of(st, name):
    found = [p for p in st["pools"] if p["upstream"] == name]
    assert len(found) == 1, st
    return found[0]


def eps(st, name):
    return {e["endpoint"]: e for e in pool_of(st, name)["endpoints"]}


def wait_status(gw, pred, what, timeout=3.0):
    """Poll the status page until pred(page) holds (at most timeout s)."""
    deadline = time.monotonic() + timeout
    while True:
        st = status(gw)
        if pred(st):
            return st
        if time.monotonic() >= deadline:
            raise AssertionError(f"never {what}: {json.dumps(st)}")
        time.sleep(0.02)


def showing(gw, pool, expect, timeout=3.0):
    """Wait until every endpoint named in expect ({addr: {field: value}})
    shows those values (fresh=True unless said otherwise)."""
    def ok(st):
        e = eps(st, pool)
        for addr, fields in expect.items():
            want = {"fresh": True, **fields}
            if any(e[addr].get(k) != v for k, v in want.items()):
                return False
        return True
    return wait_status(gw, ok, f"showing {expect}", timeout)


def signals(sim):
    """What the status page should show for a replica's fake_* figures."""
    c = sim.config()
    return {"queue": c["fake_waiting"], "running": c["fake_running"],
            "kv_cache": c["fake_kv_cache_usage"]}


def warn_lines(gw, addr):
    return [line for line in gw.log_text().splitlines()
            if "[warn]" in line and
            f'infer balance: scrape of "{addr}/metrics" failed:' in line]


# ------------------------------------------------------------ the scrape

@pytest.mark.parametrize("flavor", ["vllm", "sglang", "tgi"])
def test_every_replica_is_scraped_and_its_signals_shown(nginx_factory,
                                                        sim_factory, flavor):
    figures = [(3, 2, 0.25), (0, 7, 0.5), (12, 0, 0.875)]
    sims = [sim_factory("llama-3-8b", f"{flavor}-{i}", metrics_flavor=flavor,
                        fake_waiting=q, fake_running=r, fake_kv_cache_usage=kv)
            for i, (q, r, kv) in enumerate(figures)]
    gw = nginx_factory(gateway_conf(
        {"pool": (f"infer_balance; {SCRAPE}", servers(sims))}),
        modules=["route"])

    expect = {}
    for s, (q, r, kv) in zip(sims, figures):
        # TGI's page has no KV-cache figure: never found, null
        expect[s.addr] = {"queue": q, "running": r,
                          "kv_cache": None if flavor == "tgi" else kv}
    st = showing(gw, "pool", expect)
    pool = pool_of(st, "pool")
    assert pool["scrape"] == {"uri": "/metrics", "interval_ms": 50,
                              "timeout_ms": 200, "stale_ms": 300}
    for e in pool["endpoints"]:
        assert 0 <= e["age_ms"] <= 300 and e["scrapes"] >= 1, e
        assert e["scrape_failures"] == 0, e

    # every interval, every replica: each page asked for again and again
    first = {s.replica: s.stats()["metrics_requests"] for s in sims}
    assert all(first.values()), first
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        now = {s.replica: s.stats()["metrics_requests"] for s in sims}
        if all(now[k] >= first[k] + 3 for k in now):
            break
        time.sleep(0.05)
    assert all(now[k] >= first[k] + 3 for k in now), (first, now)

    # values follow the replicas' pages as they change
    sims[0].configure(fake_waiting=40, fake_running=1,
                      fake_kv_cache_usage=0.125)
    showing(gw, "pool", {sims[0].addr: {
        "queue": 40, "running": 1,
        "kv_cache": None if flavor == "tgi" else 0.125}})

    # over HTTP/1.0, Host: the peer's name, Connection: close
    for s in sims:
        scrapes = [q for q in s.requests() if q["path"] == "/metrics"]
        assert scrapes, s.replica
        q = scrapes[-1]
        assert (q["method"], q["http_version"]) == ("GET", "HTTP/1.0"), q
        hdrs = {k.lower(): v for k, v in q["headers"]}
        assert hdrs["host"] == s.addr, q
        assert hdrs.get("connection", "").lower() == "close", q


def test_port_and_uri_of_the_scrape(nginx_factory, sim_factory):
    """port= scrapes another port of the peer's address: here one metrics
    replica speaks for both peers; the uri may carry a query."""
    a = sim_factory("llama-3-8b", "a", **IDLE)
    b = sim_factory("llama-3-8b", "b", **IDLE)
    side = sim_factory("llama-3-8b", "side", fake_waiting=3, fake_running=1,
                       fake_kv_cache_usage=0.5)
    gw = nginx_factory(gateway_conf({"pool": (
        "infer_balance; infer_balance_scrape /metrics?from=gateway "
        f"interval=50ms timeout=200ms stale=300ms port={side.port};",
        servers([a, b]))}), modules=["route"])
    want = {"queue": 3, "running": 1, "kv_cache": 0.5}
    st = showing(gw, "pool", {a.addr: want, b.addr: want})
    assert pool_of(st, "pool")["scrape"]["uri"] == "/metrics?from=gateway"
    assert a.stats()["metrics_requests"] == 0
    assert b.stats()["metrics_requests"] == 0
    got = [q for q in side.requests() if q["path"] == "/metrics"]
    assert got and {q["query"] for q in got} == {"from=gateway"}
    # Host: the peer's name, though another port was asked
    hosts = {dict((k.lower(), v) for k, v in q["headers"])["host"]
             for q in got}
    assert hosts == {a.addr, b.addr}, hosts


# ----------------------------------------------------------- the scores

@pytest.fixture
def trio(sim_factory):
    return [sim_factory("llama-3-8b", f"r{i}", ttft_ms=1, tpot_ms=1, **IDLE)
            for i in range(3)]


@pytest.mark.parametrize("load", [{"fake_waiting": 20},
                                  {"fake_kv_cache_usage": 1.0}],
                         ids=["queue", "kv"])
def test_a_loaded_replica_gets_fewer_requests(nginx_factory, trio, load):
    a, b, c = trio
    gw = nginx_factory(gateway_conf({
        "sig": (f"infer_balance; {SCRAPE}", servers(trio)),
        "plain": ("infer_balance;", servers(trio)),
    }), modules=["route"])
    b.configure(**load)
    showing(gw, "sig", {b.addr: {k: v for k, v in signals(b).items()},
                        a.addr: signals(a), c.addr: signals(c)})

    sig, why = spread(gw, "sig", 24)
    plain, _ = spread(gw, "plain", 24)

    # the same replica, the same requests: its round-robin third without
    # signals, nothing while it says it is loaded and the others idle
    assert plain[b.replica] >= 6, plain
    assert sig[b.replica] == 0, sig
    assert sig[a.replica] >= 8 and sig[c.replica] >= 8, sig
    assert set(why) == {"least_tokens"}, why

    # idle again: it is back in the rotation
    b.configure(**IDLE)
    showing(gw, "sig", {b.addr: signals(b)})
    sig, _ = spread(gw, "sig", 12)
    assert sig[b.replica] >= 2, sig


def test_score_weights_are_configurable(nginx_factory, trio):
    """a and c queue, b runs: by default (queue=1024 running=0) b takes
    everything; with queue=1 running=2048 nothing."""
    a, b, c = trio
    gw = nginx_factory(gateway_conf({
        "dflt": (f"infer_balance; {SCRAPE}", servers(trio)),
        "pool": (f"infer_balance; {SCRAPE} "
                 "infer_balance_score queue=1 running=2048 kv=1 lora=1;",
                 servers(trio))}), modules=["route"])
    a.configure(fake_waiting=50)
    b.configure(fake_running=4)
    c.configure(fake_waiting=50)
    for pool in ("dflt", "pool"):
        showing(gw, pool, {s.addr: signals(s) for s in trio})
    got, _ = spread(gw, "dflt", 6)
    assert got == {b.replica: 6}, got
    got, _ = spread(gw, "pool", 12)
    assert got[b.replica] == 0, got
    assert got[a.replica] >= 4 and got[c.replica] >= 4, got


def test_signal_names_are_configurable(nginx_factory, trio):
    a, b, c = trio
    gw = nginx_factory(gateway_conf({"pool": (
        f"infer_balance; {SCRAPE}\n"
        # queue read from the running figure; kv: the first name present
        "infer_balance_signal queue vllm:num_requests_running;\n"
        "infer_balance_signal kv nope:missing vllm:kv_cache_usage_perc "
        "sglang:token_usage;\n"
        # running: the samples of every label set summed
        "infer_balance_signal running vllm:request_success_total;",
        servers(trio))}), modules=["route"])

    # a: 2 requests finished by length, 1 by stop: 3 in all
    for n in (1, 1):
        a_req = requests.post(a.url + "/v1/chat/completions", json={
            "model": "m", "max_tokens": n,
            "messages": [{"role": "user", "content": "x"}]}, timeout=10)
        assert a_req.status_code == 200
    assert requests.post(a.url + "/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "x"}]},
        headers={"x-sim-completion-tokens": "1"}, timeout=10).ok
    b.configure(fake_running=20, fake_waiting=0, fake_kv_cache_usage=0.5)
    c.configure(fake_waiting=9)

    showing(gw, "pool", {
        a.addr: {"queue": 0, "running": 3, "kv_cache": 0.0},
        b.addr: {"queue": 20, "running": 0, "kv_cache": 0.5},
        c.addr: {"queue": 0, "running": 0, "kv_cache": 0.0}})

    # b's "queue" (its running requests) keeps it out; c's waiting ones
    # are no longer seen
    got, _ = spread(gw, "pool", 12)
    assert got[b.replica] == 0, got
    assert got[c.replica] >= 4, got


# --------------------------------------------------- failing scrapes

def _fail_status(sim, gw):
    sim.configure(metrics_status=500)


def _fail_stall(sim, gw):
    sim.configure(metrics_stall_ms=2000)


FAILURES = {"status_500": _fail_status, "stall": _fail_stall}


@pytest.mark.parametrize("kind", sorted(FAILURES))
def test_a_failing_scrape_never_takes_the_peer_out(nginx_factory, trio,
                                                   kind):
    a, b, c = trio
    gw = nginx_factory(gateway_conf({"pool": (
        "infer_balance; infer_balance_scrape interval=50ms timeout=100ms "
        "stale=300ms;", servers(trio))}), modules=["route"])
    # b says it is very busy, then its page fails
    a.configure(fake_waiting=1)
    b.configure(fake_waiting=20)
    c.configure(fake_waiting=1)
    showing(gw, "pool", {s.addr: signals(s) for s in trio})
    FAILURES[kind](b, gw)

    st = wait_status(
        gw, lambda st: not eps(st, "pool")[b.addr]["fresh"]
        and eps(st, "pool")[b.addr]["scrape_failures"] >= 2,
        "b stale with failures")
    e = eps(st, "pool")
    # its last values stay in place, stale
    assert e[b.addr]["queue"] == 20, e[b.addr]
    assert e[b.addr]["age_ms"] >= 300, e[b.addr]
    assert e[a.addr]["fresh"] and e[c.addr]["fresh"], e
    assert e[a.addr]["scrape_failures"] == 0, e

    # a stale peer costs the average of the fresh ones (1024 each): it
    # ties with them, so it takes its share, no more; its old queue of 20
    # is not held against it
    got, why = spread(gw, "pool", 12)
    assert 2 <= got[b.replica] <= 6, got
    assert set(why) == {"least_tokens"}, why

    # logged at [warn], at most once per 10 s per worker
    lines = warn_lines(gw, b.addr)
    assert 1 <= len(lines) <= 2, gw.log_text()[-3000:]
    assert not warn_lines(gw, a.addr)

    # the page comes back: fresh again, its new values used
    b.configure(metrics_status=200, metrics_stall_ms=0, fake_waiting=30)
    showing(gw, "pool", {b.addr: {"queue": 30}})
    got, _ = spread(gw, "pool", 8)
    assert got[b.replica] == 0, got


def test_no_fresh_peer_means_tokens_in_flight_only(nginx_factory, trio):
    """port= to a port where nothing listens: every scrape is refused; the
    pool is balanced by tokens in flight alone, every peer still used."""
    a, b, c = trio
    dead = free_port()
    gw = nginx_factory(gateway_conf({"pool": (
        "infer_balance; infer_balance_scrape interval=50ms timeout=200ms "
        f"stale=300ms port={dead};", servers(trio))}), modules=["route"])
    b.configure(fake_waiting=50, fake_kv_cache_usage=1.0)

    st = wait_status(gw, lambda st: all(
        e["scrape_failures"] >= 2 for e in pool_of(st, "pool")["endpoints"]),
        "failures on every peer")
    for e in pool_of(st, "pool")["endpoints"]:
        assert e["fresh"] is False, e
        assert e["age_ms"] is None, e          # never scraped
        assert (e["queue"], e["running"], e["kv_cache"]) == \
            (None, None, None), e
    assert not any(s.stats()["metrics_requests"] for s in trio)

    # b's queue of 50 is not known: all three in turn
    got, _ = spread(gw, "pool", 12)
    assert min(got[s.replica] for s in trio) >= 3, got

    text = gw.log_text()
    assert re.search(r"\[warn\].*infer balance: scrape of \"127\.0\.0\.1:"
                     r"\d+/metrics\" failed: ", text), text[-3000:]


def test_a_garbage_page_is_harmless(nginx_factory, sim_factory):
    a, b = [sim_factory("llama-3-8b", f"r{i}", ttft_ms=1, tpot_ms=1, **IDLE)
            for i in range(2)]
    g = sim_factory("llama-3-8b", "garbage", ttft_ms=1, tpot_ms=1,
                    metrics_garbage=True)
    gw = nginx_factory(gateway_conf({"pool": (
        f"infer_balance; {SCRAPE}", servers([a, b, g]))}), modules=["route"])
    showing(gw, "pool", {a.addr: signals(a), b.addr: signals(b)})
    deadline = time.monotonic() + 3
    while g.stats()["metrics_requests"] < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert g.stats()["metrics_requests"] >= 3
    e = eps(status(gw), "pool")[g.addr]
    # nothing on the page is a signal
    assert (e["queue"], e["running"], e["kv_cache"]) == (None, None, None), e
    got, _ = spread(gw, "pool", 9)
    assert got[g.replica] >= 2, got


# ----------------------------------------------------------- shedding

SHED_MAP = """map $http_x_priority $prio {
        default 0;
        high 1;
        urgent 7;
        weird abc;
    }"""


def test_shedding_when_every_peer_is_saturated(nginx_factory, sim_factory,
                                               openai_sdk):
    full = [sim_factory("llama-3-8b", f"full{i}", ttft_ms=1, tpot_ms=1,
                        fake_waiting=q, fake_running=0,
                        fake_kv_cache_usage=0.0)
            for i, q in enumerate((10, 12, 30))]
    off = sim_factory("llama-3-8b", "off", ttft_ms=1, tpot_ms=1, **IDLE)
    spare = sim_factory("llama-3-8b", "spare", ttft_ms=1, tpot_ms=1, **IDLE)
    a, b, c = full
    srv = servers(full) + [f"server {off.addr} down;",
                           f"server {spare.addr} backup;"]
    gw = nginx_factory(gateway_conf({
        "pool": (f"infer_balance; {SCRAPE} infer_balance_shed queue=5 "
                 "priority=$prio admit=1 wait=250ms;", srv),
        "slow": (f"infer_balance; {SCRAPE} infer_balance_shed queue=5 "
                 "kv=0.9 priority=$prio wait=10s;", srv),
    }, models={"llama-3-8b": "pool", "slow-model": "slow"},
        http=SHED_MAP), modules=["route"])

    # the down peer and the backup, idle, do not keep the pool from being
    # saturated: its primary peers all queue 5 or more
    st = wait_status(gw, lambda st: pool_of(st, "pool")["saturated"]
                     and pool_of(st, "slow")["saturated"], "saturated")
    assert eps(st, "pool")[spare.addr]["backup"] is True

    before = sum(s.stats()["inference_total"] for s in (*full, off, spare))
    for prio in (None, "low", "weird", ""):
        r = ask(gw, "llama-3-8b", {"x-priority": prio} if prio is not None
                else {}, expect=429)
        assert r.json() == {"error": {
            "message": r.json()["error"]["message"],
            "type": "server_overloaded", "param": None,
            "code": "pool_saturated",
            "request_id": r.json()["error"]["request_id"]}}, r.text
        assert len(r.json()["error"]["request_id"]) == 32
        assert isinstance(r.json()["error"]["message"], str) and \
            r.json()["error"]["message"]
        # ceil(shortest queue 10 * 250 ms)
        assert r.headers["retry-after"] == "3", dict(r.headers)
        assert r.headers["x-reason"] == "shed", dict(r.headers)
    # 10 * 10 s, at most 60
    r = ask(gw, "slow-model", expect=429)
    assert r.headers["retry-after"] == "60", dict(r.headers)
    assert sum(s.stats()["inference_total"]
               for s in (*full, off, spare)) == before

    # priorities at or above admit= still go to the pool
    for prio in ("high", "urgent"):
        r = ask(gw, "llama-3-8b", {"x-priority": prio})
        assert r.headers["x-sim-replica"] in {s.replica for s in full}
        assert r.headers["x-reason"] != "shed"

    # the SDK sees a rate limit error it could retry after Retry-After
    out = openai_sdk(gw.url + "/v1", "chat", {
        "model": "llama-3-8b", "max_tokens": 2,
        "messages": [{"role": "user", "content": "hi"}]})
    assert not out["ok"], out
    assert out["error_class"] == "RateLimitError", out
    assert out["status"] == 429 and out["error"]["code"] == "pool_saturated"
    assert out["headers"]["retry-after"] == "3"

    # one primary below the threshold: nothing is shed
    b.configure(fake_waiting=4)
    wait_status(gw, lambda st: not pool_of(st, "pool")["saturated"],
                "unsaturated")
    for _ in range(3):
        assert ask(gw, "llama-3-8b").headers["x-reason"] != "shed"

    # saturated again, then one primary's page stale: nothing is shed
    b.configure(fake_waiting=6)
    wait_status(gw, lambda st: pool_of(st, "pool")["saturated"],
                "saturated again")
    ask(gw, "llama-3-8b", expect=429)
    c.configure(metrics_status=503)
    wait_status(gw, lambda st: not eps(st, "pool")[c.addr]["fresh"]
                and not pool_of(st, "pool")["saturated"], "stale c")
    for _ in range(3):
        ask(gw, "llama-3-8b")


def test_shedding_by_kv_cache(nginx_factory, trio):
    gw = nginx_factory(gateway_conf({"pool": (
        f"infer_balance; {SCRAPE} infer_balance_shed kv=0.9;",
        servers(trio))}), modules=["route"])
    for s in trio:
        s.configure(fake_kv_cache_usage=0.95)
    wait_status(gw, lambda st: pool_of(st, "pool")["saturated"], "saturated")
    r = ask(gw, "pool", expect=429)
    # no queue anywhere: shortest queue 0 -> at least 1 s
    assert r.headers["retry-after"] == "1"
    assert error_of(r)["code"] == "pool_saturated"
    trio[0].configure(fake_kv_cache_usage=0.5)
    wait_status(gw, lambda st: not pool_of(st, "pool")["saturated"],
                "unsaturated")
    assert ask(gw, "pool").headers["x-sim-replica"] == trio[0].replica


# ------------------------------------------------- the external picker

def test_the_external_pickers_header(nginx_factory, trio, sim_factory):
    a, b, c = trio
    off = sim_factory("llama-3-8b", "off", ttft_ms=1, tpot_ms=1, **IDLE)
    gw = nginx_factory(gateway_conf({"pool": (
        f"infer_balance; {SCRAPE} "
        "infer_balance_external $http_x_gateway_destination_endpoint;",
        servers(trio) + [f"server {off.addr} down;"])}), modules=["route"])
    # b is the busiest: the local scoring would never take it
    b.configure(fake_waiting=50)
    showing(gw, "pool", {s.addr: signals(s) for s in trio})

    def to(value):
        r = ask(gw, "pool", {"x-gateway-destination-endpoint": value})
        return r.headers["x-sim-replica"], r.headers["x-reason"]

    for _ in range(3):
        assert to(b.addr) == (b.replica, "external")
    assert to(f"127.0.0.2:1,{b.addr}") == (b.replica, "external")
    assert to(f"{c.addr} ,  {b.addr}") == (c.replica, "external")
    assert to(f"{off.addr}, {b.addr}") == (b.replica, "external")

    for value in ("", "garbage", "127.0.0.2:1", "127.0.0.1:notaport",
                  ",,,", off.addr, "x" * 3000):
        replica, reason = to(value)
        assert reason == "least_tokens", (value, reason)
        assert replica in (a.replica, c.replica), (value, replica)
    assert off.stats()["inference_total"] == 0

    # without the header: local scoring as usual
    got, why = spread(gw, "pool", 6)
    assert got[b.replica] == 0 and set(why) == {"least_tokens"}, (got, why)


# ------------------------------------------------------------------ LoRA

def test_lora_adapter_affinity(nginx_factory, sim_factory):
    # a: room for adapters; b: sql-lora running, wait-lora waiting, and an
    # older label set on its page (changed at run time, back again, so
    # that the current one comes first); c: full with another adapter
    a = sim_factory("llama-3-8b", "a", ttft_ms=1, tpot_ms=1, max_lora=4,
                    lora_running="old-lora", **IDLE)
    b = sim_factory("llama-3-8b", "b", ttft_ms=1, tpot_ms=1, max_lora=4,
                    lora_running="sql-lora", lora_waiting="wait-lora",
                    **IDLE)
    c = sim_factory("llama-3-8b", "c", ttft_ms=1, tpot_ms=1, max_lora=1,
                    lora_running="other-lora", **IDLE)
    a.configure(lora_running="")
    b.configure(lora_running="old-lora", lora_waiting="")
    b.configure(lora_running="sql-lora", lora_waiting="wait-lora")
    page = requests.get(b.url + "/metrics", timeout=5).text
    assert page.count("vllm:lora_requests_info{") == 2, page

    sims = [a, b, c]
    gw = nginx_factory(gateway_conf(
        {"pool": (f"infer_balance; {SCRAPE}", servers(sims)),
         "weighed": (f"infer_balance; {SCRAPE} infer_balance_score "
                     "queue=1 running=0 kv=0 lora=2048;", servers(sims))},
        models={"llama-3-8b": "pool", "sql-lora": "pool",
                "wait-lora": "pool", "old-lora": "pool",
                "new-lora": "pool", "lw-lora": "weighed"}),
        modules=["route"])
    showing(gw, "pool", {
        a.addr: {"lora_running": 0, "lora_waiting": 0, "max_lora": 4},
        b.addr: {"lora_running": 1, "lora_waiting": 1, "max_lora": 4},
        c.addr: {"lora_running": 1, "lora_waiting": 0, "max_lora": 1}})

    for model in ("sql-lora", "wait-lora"):
        got, _ = spread(gw, model, 8)
        assert got == {b.replica: 8}, (model, got)

    # an adapter no fresh peer has: no penalty anywhere; old-lora is only
    # in b's older label set, so no one has it either; base model: as ever
    for model in ("new-lora", "old-lora", "llama-3-8b"):
        got, _ = spread(gw, model, 9)
        assert min(got[s.replica] for s in sims) >= 2, (model, got)

    # the adapter gone from b, running on c: c has it, a has room (L/2),
    # b has room too
    b.configure(lora_running="", lora_waiting="")
    c.configure(lora_running="sql-lora")
    showing(gw, "pool", {b.addr: {"lora_running": 0, "lora_waiting": 0},
                         c.addr: {"lora_running": 1}})
    got, _ = spread(gw, "sql-lora", 6)
    assert got == {c.replica: 6}, got

    # the penalty: 0 on c that has lw-lora, L/2 = 1024 on a that has room,
    # L = 2048 on b that is full; the queues (1 token each) decide:
    # c 3000, a 900 + 1024, b 0 + 2048
    c.configure(lora_running="lw-lora", fake_waiting=3000)
    a.configure(fake_waiting=900)
    b.configure(max_lora=1, lora_running="x-lora")
    showing(gw, "weighed", {
        a.addr: {"queue": 900, "lora_running": 0, "max_lora": 4},
        b.addr: {"queue": 0, "lora_running": 1, "max_lora": 1},
        c.addr: {"queue": 3000, "lora_running": 1, "max_lora": 1}})
    got, _ = spread(gw, "lw-lora", 4)
    assert got == {a.replica: 4}, got


# ------------------------------------------------------- status, metrics

ENDPOINT_KEYS = {"endpoint", "backup", "tokens_in_flight", "picks", "fresh",
                 "age_ms", "queue", "running", "kv_cache", "lora_running",
                 "lora_waiting", "max_lora", "scrapes", "scrape_failures",
                 "pace_us_per_token", "ejected", "ejected_ms", "ejected_for",
                 "ejections", "errors_in_a_row", "scrape_errors_in_a_row",
                 "ttfb_ms"}


def test_the_status_page(nginx_factory, trio, sim_factory):
    a, b, c = trio
    spare = sim_factory("llama-3-8b", "spare", ttft_ms=1, tpot_ms=1,
                        fake_waiting=2, fake_running=1,
                        fake_kv_cache_usage=0.3333)
    gw = nginx_factory(gateway_conf({
        "pool": ("infer_balance; infer_balance_scrape interval=50ms "
                 "stale=300ms;",
                 servers([a, b]) + [f"server {spare.addr} backup;"]),
        "bare": ("infer_balance;", servers([c])),
    }), modules=["route"])

    raw = requests.get(gw.url + "/balance", timeout=5)
    assert raw.status_code == 200
    assert raw.headers["content-type"].startswith("application/json")
    st = showing(gw, "pool", {spare.addr: {"queue": 2, "running": 1,
                                           "kv_cache": 0.333}})
    assert set(st) == {"pools"}
    names = [p["upstream"] for p in st["pools"]]
    assert "pool" in names and "bare" in names
    for p in st["pools"]:
        assert set(p) == {"upstream", "average_tokens", "saturated",
                          "scrape", "eject", "endpoints"}, p
        assert p["eject"] is None, p
        assert p["saturated"] is False
        for e in p["endpoints"]:
            assert set(e) == ENDPOINT_KEYS, e

    pool = pool_of(st, "pool")
    assert pool["scrape"] == {"uri": "/metrics", "interval_ms": 50,
                              "timeout_ms": 1000, "stale_ms": 300}
    assert {e["endpoint"]: e["backup"] for e in pool["endpoints"]} == \
        {a.addr: False, b.addr: False, spare.addr: True}
    # the backup is scraped too
    assert spare.stats()["metrics_requests"] >= 1
    e = eps(st, "pool")[spare.addr]
    assert e["tokens_in_flight"] == 0 and e["picks"] == 0
    assert e["fresh"] is True and isinstance(e["age_ms"], int)
    # no LoRA on the page
    assert e["max_lora"] in (0, None) and e["lora_running"] in (0, None)

    bare = pool_of(st, "bare")
    assert bare["scrape"] is None
    (e,) = bare["endpoints"]
    assert e["endpoint"] == c.addr
    assert (e["fresh"], e["age_ms"], e["queue"], e["running"],
            e["kv_cache"], e["scrapes"], e["scrape_failures"]) == \
        (False, None, None, None, None, 0, 0), e

    # picks per endpoint; the pool's average request: its estimates
    assert pool["average_tokens"] == 0
    got, _ = spread(gw, "pool", 6)
    spread(gw, "bare", 2)
    st = status(gw)
    assert {k: v["picks"] for k, v in eps(st, "pool").items()} == \
        {a.addr: got[a.replica], b.addr: got[b.replica], spare.addr: 0}
    assert eps(st, "bare")[c.addr]["picks"] == 2
    # the same request everywhere: the same average, its estimate
    assert pool_of(st, "pool")["average_tokens"] \
        == pool_of(st, "bare")["average_tokens"] > 0
    assert all(v["tokens_in_flight"] == 0 for v in eps(st, "pool").values())

    # numbers with 3 decimals at most
    text = requests.get(gw.url + "/balance", timeout=5).text
    assert not re.search(r"\d\.\d{4,}", text), text


def test_picks_counted_by_the_metrics_module(nginx_factory, trio,
                                             sim_factory):
    a, b, c = trio
    dead = sim_factory("llama-3-8b", "dead")
    dead_addr = dead.addr
    dead.stop()
    gw = nginx_factory(gateway_conf(
        {"pool": (f"infer_balance; {SCRAPE} infer_balance_external "
                  "$http_x_gateway_destination_endpoint;",
                  servers([a, b, dead]))},
        models={"llama-3-8b": "pool"},
        http="infer_metrics_zone m 4m;",
        location="infer_metrics on;",
        server="location = /metrics { infer_metrics_export; }"),
        modules=["route", "metrics"])
    showing(gw, "pool", {a.addr: signals(a), b.addr: signals(b)})

    # 8 picked by the score: the dead peer, refused, is retried on another
    # one; only the last pick of a request counts
    got, _ = spread(gw, "llama-3-8b", 8)
    assert sum(got.values()) == 8
    ext, _ = spread(gw, "llama-3-8b", 3,
                    {"x-gateway-destination-endpoint": b.addr})
    assert ext == {b.replica: 3}

    def picks():
        text = requests.get(gw.url + "/metrics", timeout=5).text
        return {(s.labels["endpoint"], s.labels["reason"]): s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
                if s.name == "infer_endpoint_picks_total"}

    deadline = time.monotonic() + 2
    while sum(picks().values()) < 11 and time.monotonic() < deadline:
        time.sleep(0.02)
    p = picks()
    assert sum(p.values()) == 11, p
    assert p[(b.addr, "external")] == 3, p
    by_endpoint = Counter()
    for (ep, reason), v in p.items():
        assert reason in ("least_tokens", "external"), p
        by_endpoint[ep] += v
    assert by_endpoint[dead_addr] == 0, p
    assert by_endpoint[a.addr] == got[a.replica], (p, got)
    assert by_endpoint[b.addr] == got[b.replica] + 3, (p, got)
    gw.forget_log()     # the refused connections to the dead peer


# ------------------------------------------------------------ nginx -t

def _check(nginx_factory, directives):
    gw = nginx_factory(gateway_conf(
        {"pool": (directives, ["server 127.0.0.1:9;"])}),
        modules=["route"], start=False)
    return gw.check_config()


def test_a_full_configuration_passes_nginx_t(nginx_factory):
    ok, out = _check(nginx_factory, """infer_balance least_tokens;
        infer_balance_scrape /metrics interval=10ms timeout=1ms stale=10ms
            port=9100;
        infer_balance_signal queue vllm:num_requests_waiting my_queue;
        infer_balance_signal running my_running;
        infer_balance_signal kv my_kv;
        infer_balance_signal lora vllm:lora_requests_info;
        infer_balance_score queue=512 running=10 kv=4096 lora=0;
        infer_balance_shed queue=8 kv=0.95 priority=$http_x_priority
            admit=2 wait=50ms;
        infer_balance_external $http_x_gateway_destination_endpoint;""")
    assert ok, out


@pytest.mark.parametrize("directives, words", [
    ("infer_balance; infer_balance_scrape interval=5ms;", ["interval"]),
    ("infer_balance; infer_balance_scrape interval=61s;", ["interval"]),
    ("infer_balance; infer_balance_scrape interval=fast;", ["interval"]),
    ("infer_balance; infer_balance_scrape timeout=0;", ["timeout"]),
    ("infer_balance; infer_balance_scrape interval=500ms stale=200ms;",
     ["stale"]),
    ("infer_balance; infer_balance_scrape metrics;", ["metrics"]),
    ("infer_balance; infer_balance_scrape port=70000;", ["port"]),
    ("infer_balance; infer_balance_shed admit=1;", ["queue", "kv"]),
    ("infer_balance; infer_balance_shed;", []),
    ("infer_balance; infer_balance_shed queue=x;", ["queue"]),
    ("infer_balance; infer_balance_signal latency vllm:x;", ["latency"]),
    ("infer_balance; infer_balance_signal queue;", []),
    ("infer_balance; infer_balance_score queue=-1;", ["queue"]),
    ("infer_balance; infer_balance_score speed=3;", ["speed"]),
    ("infer_balance; infer_balance_scrape; infer_balance_shed queue=4 "
     "admit=0;", ["admit"]),
    ('infer_balance; infer_balance_signal queue "";', ["empty"]),
    # shedding on figures that are never read would never shed
    ("infer_balance; infer_balance_shed queue=4;",
     ['"infer_balance_shed" needs "infer_balance_scrape"']),
    # another balancing method after infer_balance would leave the
    # scrapes, the shedding and the status page without their pool
    ("infer_balance; infer_balance_scrape; hash $uri;",
     ['"infer_balance" is replaced by another balancing method']),
], ids=["scrape-interval-too-short", "scrape-interval-too-long",
        "scrape-interval-not-a-time", "scrape-timeout-zero",
        "stale-shorter-than-the-interval", "scrape-uri-not-a-path",
        "scrape-port-too-large", "shed-admit-without-a-threshold",
        "shed-without-parameters", "shed-queue-not-a-number",
        "signal-of-an-unknown-name", "signal-queue-without-a-metric",
        "score-weight-negative", "score-of-an-unknown-signal",
        "shed-admit-zero", "signal-of-an-empty-metric-name",
        "shed-without-scrape", "another-balancing-method-after"])
def test_mistakes_are_refused_by_nginx_t(nginx_factory, directives, words):
    ok, out = _check(nginx_factory, directives)
    assert not ok, out
    assert "[emerg]" in out, out
    # the message names what is wrong (one of the words)
    if words:
        assert any(w in out for w in words), out


@pytest.mark.parametrize("directive", [
    "infer_balance_scrape;",
    "infer_balance_signal queue my_queue;",
    "infer_balance_score queue=1;",
    "infer_balance_shed queue=1;",
    "infer_balance_external $http_x_gateway_destination_endpoint;",
])
def test_directives_need_infer_balance(nginx_factory, directive):
    ok, out = _check(nginx_factory, directive)
    assert not ok, out
    name = directive.split()[0].rstrip(";")
    assert f'"{name}" needs "infer_balance" in upstream "pool"' in out, out


def test_port_cannot_apply_to_a_unix_socket(nginx_factory, tmp_path):
    gw = nginx_factory(gateway_conf({"pool": (
        "infer_balance; infer_balance_scrape port=9100;",
        [f"server unix:{tmp_path}/model.sock;"])}),
        modules=["route"], start=False)
    ok, out = gw.check_config()
    assert not ok and "cannot scrape the unix socket" in out, out


def test_a_scrape_in_flight_never_holds_a_quitting_worker(nginx_factory,
                                                         sim_factory):
    """A replica whose page never comes (a 30 s timeout): on reload and on
    quit the old workers close the scrape and go at once."""
    sim = sim_factory("llama-3-8b", "stuck", metrics_stall_ms=60000)
    gw = nginx_factory(gateway_conf({"pool": (
        "infer_balance; infer_balance_scrape interval=50ms timeout=30s;",
        servers([sim]))}), modules=["route"])
    deadline = time.monotonic() + 5
    while sim.stats()["metrics_requests"] < 1:
        assert time.monotonic() < deadline, "never scraped"
        time.sleep(0.02)
    t0 = time.monotonic()
    gw.reload(timeout=5)
    assert time.monotonic() - t0 < 5
    assert not warn_lines(gw, sim.addr), gw.log_text()
    ask(gw, "pool")
