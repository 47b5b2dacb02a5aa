"""infer_balance: a pool's peer is picked by the tokens in flight on each,
counted across all workers in shared memory, with prefix affinity bounded
by load.

Simulated replicas of different speed serve one model; every answer
names the replica that served it (x-sim-replica) and the gateway adds the
peer it picked and that peer's score ($infer_endpoint,
$infer_endpoint_score, $infer_endpoint_reason).  Counts are compared, never
latencies; every loop is bounded in time."""

import os
import signal
import threading
import time
from collections import Counter

import pytest
import requests

HEADERS = """add_header X-Endpoint $infer_endpoint always;
            add_header X-Score $infer_endpoint_score always;
            add_header X-Reason $infer_endpoint_reason always;
            add_header X-Pid $pid always;"""


def balance_conf(sims, pools):
    """pools: {name: "infer_balance ...;" or "" (round robin)}; each pool
    has every sim, and a model of its own name that is served as
    llama-3-8b."""
    servers = " ".join(f"server {s.addr};" for s in sims)
    ups = "\n".join(f"upstream {name} {{ {method} {servers} keepalive 8; }}"
                    for name, method in pools.items())
    models = "\n".join(f"infer_model {name} upstream={name} model=llama-3-8b;"
                       for name in pools)
    return f"""
    {ups}
    {models}
    server {{
        listen 127.0.0.1:{{port}} reuseport;
        infer_route on;
        location / {{
            proxy_pass http://$infer_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            {HEADERS}
        }}
    }}"""


def ask(gw, model, content="Hello there", max_tokens=10, headers=None,
        timeout=15):
    body = {"model": model, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": content}]}
    r = requests.post(gw.url + "/v1/chat/completions", json=body,
                      headers=headers or {}, timeout=timeout)
    assert r.status_code == 200, r.text
    return r


def load(gw, model, seconds, threads, **kw):
    """threads clients, each asking in turn for `seconds`: the replicas
    that answered, counted."""
    counts = Counter()
    lock = threading.Lock()
    errors = []
    stop = time.monotonic() + seconds

    def client():
        s = requests.Session()
        body = {"model": model, "max_tokens": kw.get("max_tokens", 20),
                "messages": [{"role": "user", "content": "Hello there"}]}
        while time.monotonic() < stop:
            try:
                r = s.post(gw.url + "/v1/chat/completions", json=body,
                           timeout=10)
            except requests.RequestException as e:
                errors.append(e)
                return
            with lock:
                if r.status_code != 200:
                    errors.append(r.status_code)
                    return
                counts[r.headers["x-sim-replica"]] += 1

    ts = [threading.Thread(target=client) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(seconds + 15)
    assert not errors, errors
    return counts


def wait_running(sim, n, timeout=5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sim.stats()["running"] >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"{sim.replica} never had {n} requests running")


def in_background(fn):
    out = {}

    def run():
        try:
            out["r"] = fn()
        except Exception as e:      # reported by the caller
            out["e"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, out


def settle(gw, model, n=12):
    """Sequential requests once the load is over: every pick sees a peer
    with nothing in flight, so the scores are zero and, all peers tied,
    round robin reaches every one of them."""
    seen = set()
    for _ in range(n):
        r = ask(gw, model)
        assert r.headers["x-score"] == "0", dict(r.headers)
        seen.add(r.headers["x-endpoint"])
    return seen


@pytest.fixture
def speeds(sim_factory):
    """Two fast replicas and one three times slower per output token."""
    return [sim_factory("llama-3-8b", "fast-a", ttft_ms=5, tpot_ms=5),
            sim_factory("llama-3-8b", "fast-b", ttft_ms=5, tpot_ms=5),
            sim_factory("llama-3-8b", "slow", ttft_ms=5, tpot_ms=15)]


def test_fewer_requests_reach_the_slow_replica_than_with_round_robin(
        nginx_factory, speeds):
    gw = nginx_factory(balance_conf(speeds, {
        "rr": "",
        "bal": "infer_balance least_tokens;",
    }), modules=["route"])

    rr = load(gw, "rr", 2.5, 6)
    bal = load(gw, "bal", 2.5, 6)

    rr_share = rr["slow"] / sum(rr.values())
    bal_share = bal["slow"] / sum(bal.values())

    # round robin gives the slow one its third whatever its speed
    assert rr_share > 0.25, rr
    assert bal_share < 0.75 * rr_share, (rr, bal)
    assert bal["fast-a"] > bal["slow"] and bal["fast-b"] > bal["slow"], bal

    # the counters come back to zero once the load is over
    assert settle(gw, "bal") == {s.addr for s in speeds}


@pytest.fixture
def same(sim_factory):
    return [sim_factory("llama-3-8b", f"r{i}", ttft_ms=1, tpot_ms=1)
            for i in range(3)]


def test_prefix_affinity_holds_while_load_is_low_and_spills(nginx_factory,
                                                            same):
    gw = nginx_factory(balance_conf(same, {
        "aff": "infer_balance least_tokens prefix_affinity bound=1.25;",
    }), modules=["route"])
    by_addr = {s.addr: s for s in same}

    # longer than the 1024 bytes of prompt the prefix hash covers
    prompt = "You are a helpful assistant. " * 40

    # on an idle pool a prefix goes home from its first request on
    picks = [ask(gw, "aff", prompt + f"question {i}") for i in range(10)]
    home = {r.headers["x-endpoint"] for r in picks}
    assert len(home) == 1, home
    assert {r.headers["x-reason"] for r in picks} == {"affinity"}
    home = home.pop()
    assert {r.headers["x-sim-replica"] for r in picks} == \
        {by_addr[home].replica}

    # other prefixes are spread over the pool, each on its home
    for _ in range(2):
        rs = [ask(gw, "aff", f"{i} is another conversation")
              for i in range(24)]
        assert {r.headers["x-reason"] for r in rs} == {"affinity"}
        assert len({r.headers["x-endpoint"] for r in rs}) == len(same)

    # the home replica busy: the same prefix spills to another one
    t, out = in_background(lambda: ask(
        gw, "aff", prompt + "slow", headers={"x-sim-ttft-ms": "1500"}))
    try:
        wait_running(by_addr[home], 1)
        r = ask(gw, "aff", prompt + "while busy")
        assert r.headers["x-reason"] == "spill", dict(r.headers)
        assert r.headers["x-endpoint"] != home
    finally:
        t.join(10)
    assert "e" not in out, out
    assert out["r"].headers["x-endpoint"] == home

    # and comes home when the load is gone
    r = ask(gw, "aff", prompt + "after")
    assert (r.headers["x-endpoint"], r.headers["x-reason"]) == \
        (home, "affinity")


def test_a_prefix_seen_for_the_first_time_is_placed_by_load(nginx_factory,
                                                            same):
    """Its home takes it only if no busier than the cheapest peer by this
    request's estimate: a prompt nobody shares is not placed by its hash.
    Seen before, the bound decides (the busy home is above it: spill)."""
    gw = nginx_factory(balance_conf(same, {
        "aff": "infer_balance least_tokens prefix_affinity bound=1.25;",
    }), modules=["route"])
    t, out = hold(gw, "aff", 2500)          # 50,000 tokens on one replica
    try:
        busy = busy_sim(same)
        busy_addr = busy.addr
        firsts = [ask(gw, "aff", f"{i} never seen before")
                  for i in range(24)]
        again = [ask(gw, "aff", f"{i} never seen before")
                 for i in range(24)]
    finally:
        t.join(10)
    assert "e" not in out, out
    for rs in (firsts, again):
        assert busy_addr not in {r.headers["x-endpoint"] for r in rs}
    # some of the 24 have the busy replica for home: placed by load the
    # first time, spilled the second; the others went home both times
    moved = [i for i, r in enumerate(firsts)
             if r.headers["x-reason"] == "least_tokens"]
    assert moved, [r.headers["x-reason"] for r in firsts]
    assert {firsts[i].headers["x-reason"] for i in range(24)
            if i not in moved} == {"affinity"}
    assert {again[i].headers["x-reason"] for i in moved} == {"spill"}


@pytest.fixture
def pair(sim_factory):
    return [sim_factory("llama-3-8b", f"p{i}", ttft_ms=1, tpot_ms=1)
            for i in range(2)]


def hold(gw, model, ms=1500):
    """A request that stays in flight for `ms` and counts 50,000 tokens
    (max_tokens), though the replica generates only one."""
    return in_background(lambda: ask(
        gw, model, "hold", max_tokens=50000,
        headers={"x-sim-ttft-ms": str(ms), "x-sim-completion-tokens": "1"}))


def busy_sim(sims, timeout=5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for s in sims:
            if s.stats()["running"]:
                return s
        time.sleep(0.02)
    raise AssertionError("no replica is serving the held request")


@pytest.mark.parametrize("zone", ["", "zone bal 256k;"],
                         ids=["no-zone", "nic-zone"])
def test_the_workers_share_the_counters(nginx_factory, pair, zone):
    """Also in an upstream with a zone of its own before the method, as
    F5 NGINX Ingress Controller and NGINX Gateway Fabric write every
    upstream: the balancer's counters are in a zone of their own."""
    gw = nginx_factory(balance_conf(pair, {"bal": zone + " infer_balance;"}),
                       modules=["route"])

    t, out = hold(gw, "bal", 2000)
    try:
        busy = busy_sim(pair)
        pids = set()
        picks = []
        # fresh connections: reuseport spreads them over both workers
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline and len(picks) < 30:
            r = ask(gw, "bal")
            picks.append(r.headers["x-sim-replica"])
            pids.add(r.headers["x-pid"])
    finally:
        t.join(10)
    assert "e" not in out, out
    held = out["r"]

    assert busy.replica not in picks, picks
    assert held.headers["x-sim-replica"] == busy.replica
    assert int(held.headers["x-score"]) == 0
    # a worker other than the one holding the request avoided the peer too
    assert pids - {held.headers["x-pid"]}, (pids, held.headers["x-pid"])

    assert settle(gw, "bal") == {s.addr for s in pair}


def test_reload_keeps_the_counters(nginx_factory, pair):
    gw = nginx_factory(balance_conf(pair, {"bal": "infer_balance;"}),
                       modules=["route"])

    t, out = hold(gw, "bal", 2500)
    try:
        busy = busy_sim(pair)

        # a reload of the same pool: the new workers find the zone as the
        # old ones left it, the held request still counted
        old = set(gw.worker_pids())
        gw.write_conf()
        gw.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if len(set(gw.worker_pids()) - old) >= 2:
                break
            time.sleep(0.02)
        else:
            raise AssertionError("no new workers")

        # an old worker may still accept on a socket it shares with a new
        # one for a moment: what matters are the new workers' picks
        picks = []
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline and len(picks) < 4:
            r = ask(gw, "bal")
            assert r.headers["x-sim-replica"] != busy.replica
            if int(r.headers["x-pid"]) not in old:
                picks.append(r)
    finally:
        t.join(10)
    assert "e" not in out, out
    assert picks, "no request reached a new worker"

    # the old worker released its request in the same zone
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and set(gw.worker_pids()) & old:
        time.sleep(0.05)
    assert settle(gw, "bal") == {s.addr for s in pair}

    # a reload that changes the pool starts with fresh counters
    gw.http = balance_conf(pair[:1], {"bal": "infer_balance;"})
    gw.reload()
    assert settle(gw, "bal", 4) == {pair[0].addr}


def test_retries_release_the_peer_they_leave(nginx_factory, pair,
                                             sim_factory):
    dead = sim_factory("llama-3-8b", "dead")
    addr = dead.addr
    dead.stop()
    gw = nginx_factory(balance_conf([*pair, dead],
                                    {"bal": "infer_balance;"}),
                       modules=["route"])
    for _ in range(12):
        r = ask(gw, "bal")
        assert r.headers["x-endpoint"] != addr
    # connection refused by the dead one: counted there, released on retry
    assert settle(gw, "bal") == {s.addr for s in pair}
    gw.forget_log()


@pytest.mark.parametrize("args, message", [
    ("bound=0.5", 'invalid bound "bound=0.5"'),
    ("bound=x", 'invalid bound "bound=x"'),
    ("fastest", 'invalid parameter "fastest"'),
    ("default_tokens=0", 'invalid number in "default_tokens=0"'),
    ("default_max_tokens=-1", 'invalid number in "default_max_tokens=-1"'),
])
def test_bad_parameters_are_refused_by_nginx_t(nginx_factory, pair, args,
                                              message):
    gw = nginx_factory(balance_conf(pair, {"bal": f"infer_balance {args};"}),
                       modules=["route"], start=False)
    ok, out = gw.check_config()
    assert not ok
    assert message in out, out


def test_weights_and_backup_still_apply(nginx_factory, pair, sim_factory):
    spare = sim_factory("llama-3-8b", "spare", ttft_ms=1, tpot_ms=1)
    a, b = pair
    gw = nginx_factory(f"""
    upstream bal {{
        infer_balance;
        server {a.addr} weight=3;
        server {b.addr} down;
        server {spare.addr} backup;
    }}
    infer_model bal upstream=bal model=llama-3-8b;
    server {{
        listen 127.0.0.1:{{port}};
        infer_route on;
        location / {{ proxy_pass http://$infer_upstream; {HEADERS} }}
    }}""", modules=["route"])
    seen = {ask(gw, "bal").headers["x-sim-replica"] for _ in range(6)}
    assert seen == {a.replica}


def test_what_a_request_counts(nginx_factory, sim_factory):
    """The score of the next pick on a one-server pool is what the held
    request counts: its prompt estimate plus max_tokens (or
    default_max_tokens), or default_tokens when the route module did not
    see it."""
    s = sim_factory("llama-3-8b", "only", ttft_ms=1, tpot_ms=1)
    gw = nginx_factory(f"""
    upstream bal {{
        infer_balance default_tokens=777 default_max_tokens=300;
        server {s.addr};
    }}
    infer_model bal upstream=bal model=llama-3-8b;
    server {{
        listen 127.0.0.1:{{port}};
        location / {{
            infer_route on;
            proxy_pass http://$infer_upstream;
            add_header X-Prompt-Tokens $infer_prompt_tokens_estimate always;
            {HEADERS}
        }}
        location /unrouted/ {{
            rewrite ^/unrouted(/.*)$ $1 break;
            proxy_pass http://bal;
            {HEADERS}
        }}
    }}""", modules=["route"])

    def held_by(path, body, expect):
        def go():
            return requests.post(
                gw.url + path + "v1/chat/completions", json=body,
                headers={"x-sim-ttft-ms": "1500",
                         "x-sim-completion-tokens": "1"}, timeout=15)
        t, out = in_background(go)
        try:
            wait_running(s, 1)
            r = ask(gw, "bal")
        finally:
            t.join(10)
        assert "e" not in out and out["r"].status_code == 200, out
        assert r.headers["x-score"] == expect(out["r"]), dict(r.headers)

    chat = {"model": "bal",
            "messages": [{"role": "user", "content": "x" * 400}]}
    held_by("/", dict(chat, max_tokens=1000),
            lambda r: str(int(r.headers["x-prompt-tokens"]) + 1000))
    held_by("/", chat,
            lambda r: str(int(r.headers["x-prompt-tokens"]) + 300))
    held_by("/unrouted/", dict(chat, model="llama-3-8b"), lambda r: "777")
    # absurd max_tokens count one million at most
    held_by("/", dict(chat, max_tokens=5000000), lambda r: "1000000")

    assert settle(gw, "bal", 3) == {s.addr}


def test_a_dead_workers_tokens_are_released(nginx_factory, pair):
    """A worker killed with a request in flight: the worker that replaces
    it (in the same process slot) releases what it left counted, where
    nothing else would."""
    gw = nginx_factory(balance_conf(pair, {"bal": "infer_balance;"}),
                       modules=["route"])

    t, out = hold(gw, "bal", 4000)
    try:
        busy = busy_sim(pair)
        # the held request is counted: fresh requests avoid its replica
        r = ask(gw, "bal")
        assert r.headers["x-sim-replica"] != busy.replica

        old = set(gw.worker_pids())
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            pids = set(gw.worker_pids())
            if len(pids) >= 2 and not pids & old:
                break
            time.sleep(0.02)
        else:
            raise AssertionError("the workers were not replaced")
    finally:
        t.join(10)
    assert "e" in out, "the held request survived its worker"

    # nothing in flight any more: sequential requests score 0 everywhere
    assert settle(gw, "bal") == {s.addr for s in pair}
    log = gw.log_text()
    assert "tokens in flight in upstream \"bal\" left by a worker that " \
           "is gone, released" in log, log
    gw.forget_log()     # the workers killed on purpose


def test_pace_weighs_a_slow_replica_by_its_time_per_token(nginx_factory,
                                                          sim_factory):
    """With `pace`, the same tokens in flight cost more on a replica that
    takes longer per token; without it the two tie (round robin)."""
    fast = sim_factory("llama-3-8b", "fast", ttft_ms=1, tpot_ms=1)
    slow = sim_factory("llama-3-8b", "slow", ttft_ms=1, tpot_ms=20)
    pair = [fast, slow]
    gw = nginx_factory(balance_conf(pair, {
        "paced": "infer_balance pace;", "plain": "infer_balance;"}),
        modules=["route"])
    # both replicas answer a few whole requests of 20 tokens in each pool
    for model in ("paced", "plain"):
        seen = Counter(ask(gw, model, max_tokens=20).headers["x-sim-replica"]
                       for _ in range(6))
        assert set(seen) == {"fast", "slow"}, seen

    for model, expect in (("paced", {"fast"}), ("plain", {"fast", "slow"})):
        # one request held on each replica, the same size: tied on tokens
        t1, o1 = hold(gw, model, 3000)
        busy_sim(pair)
        t2, o2 = hold(gw, model, 3000)
        deadline = time.monotonic() + 5
        while not (fast.stats()["running"] and slow.stats()["running"]):
            assert time.monotonic() < deadline, "holds not on both"
            time.sleep(0.02)
        try:
            got = {ask(gw, model).headers["x-sim-replica"] for _ in range(6)}
        finally:
            t1.join(10)
            t2.join(10)
        assert "e" not in o1 and "e" not in o2, (o1, o2)
        assert got == expect, (model, got)


def test_a_large_pool_fits_its_zone(nginx_factory):
    """2,000 peers: the zone holds their nodes and every process's
    account of them (8 KB a peer), the slab pool's pages included."""
    servers = "\n".join(f"server 127.0.0.{1 + i // 250}:{20000 + i};"
                        for i in range(2000))
    gw = nginx_factory(f"""
    upstream big {{ infer_balance; {servers} }}
    infer_model big upstream=big;
    server {{ listen 127.0.0.1:{{port}}; location / {{ infer_route on;
        proxy_pass http://$infer_upstream; }} }}""",
        modules=["route"], start=False)
    ok, out = gw.check_config()
    assert ok, out[-2000:]


def test_pace_counts_only_answers_read_to_their_end(nginx_factory,
                                                    sim_factory):
    """An answer cut short (a 200 whose body stops half way) says nothing
    of the replica's speed: only whole answers make its pace."""
    sim = sim_factory("llama-3-8b", "cut", ttft_ms=1, tpot_ms=1)
    gw = nginx_factory(f"""
    upstream paced {{ infer_balance pace; server {sim.addr}; }}
    infer_model paced upstream=paced model=llama-3-8b;
    server {{
        listen 127.0.0.1:{{port}};
        location = /balance {{ infer_balance_status; }}
        location / {{ infer_route on; proxy_pass http://$infer_upstream; }}
    }}""", modules=["route"])

    def pace():
        st = requests.get(gw.url + "/balance", timeout=5).json()
        (e,) = st["pools"][0]["endpoints"]
        return e["pace_us_per_token"]

    for _ in range(3):
        with pytest.raises(requests.RequestException):
            r = requests.post(gw.url + "/v1/chat/completions", timeout=10,
                              headers={"x-sim-reset-after-chunks": "1"},
                              json={"model": "paced", "max_tokens": 5,
                                    "messages": [{"role": "user",
                                                  "content": "hi"}]})
            r.raise_for_status()
            r.json()
    assert pace() == 0
    ask(gw, "paced")
    assert pace() > 0
    gw.forget_log()     # "upstream prematurely closed connection"
