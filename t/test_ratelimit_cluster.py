"""ngx_infer_ratelimit with Redis Cluster: real redis-servers on loopback,
made a cluster by redis-cli (t/harness/redis_cluster.py).

The gateway is given seeds (infer_ratelimit_redis cluster:...), learns
the slot map and counts each key on the master that serves its slot.
Checked against Redis itself: which master holds each key (redis-py's
key_slot is the independent slot rule, CLUSTER NODES the map), exact
counts on each master (a calendar-day key is a plain integer count, so
exactness is an equality), one EVALSHA per slot, a refused part undone
on the other slots, a slot moved under load (MOVED, and ASK while it is
half moved), a master killed under load (the outage policy while its
slots have no master, exact counts on the replica that took over), every
node down and back, reload, tokens corrected through coalesced calls,
approximate limits, usage events, the readiness variable, and nginx -t.
The nginx_factory fixture fails a test whose error log has an [alert],
an [emerg] or a worker that exited on a signal."""

import datetime
import threading
import time

import pytest
import requests

from harness.openai import chat
from harness.redis_cluster import RedisCluster, key_slot
from test_ratelimit import STATUS_HEADERS, parallel
from test_ratelimit_redis import Blackhole

# requests seen answering: the status headers and which worker answered
HEADERS = STATUS_HEADERS + """
            add_header X-Pid $pid always;"""

HUGE = "requests=100000000/day"      # never refuses: only counts

# /closed and /open: one tenant's count, and each outage policy
POLICIES = f"""
        location /closed {{
            infer_ratelimit_limit c $http_x_tenant {HUGE}
                                  on_error=fail_closed;
            rewrite ^ /ok.txt break;
            {HEADERS}
        }}
        location /open {{
            infer_ratelimit_limit o $http_x_tenant {HUGE}
                                  on_error=fail_open;
            rewrite ^ /ok.txt break;
            {HEADERS}
        }}"""


def day():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")


def key(tenant, limit="req", prefix="infer:rl:"):
    return f"{prefix}{{{tenant}}}:{limit}:{day()}"


def conf(seeds, limits, opts="timeout=1s connect_timeout=300ms "
         "backoff=200ms", extra="", locations=""):
    """A gateway counting in the cluster of seeds: limits at the server
    level (location /), /warm with a limit of its own (to connect every
    worker to every master without charging the test's keys), /up for
    the readiness variable."""
    seeds = ",".join(seeds)
    return f"""
    infer_ratelimit_redis cluster:{seeds} {opts};
    {extra}
    server {{
        listen 127.0.0.1:{{port}};
        infer_ratelimit on;
        {limits}
        location / {{ {HEADERS} }}
        location /warm {{
            infer_ratelimit_limit warm $http_x_tenant {HUGE};
            rewrite ^ /ok.txt break;
            {HEADERS}
        }}
        location = /up {{
            infer_ratelimit off;
            rewrite ^ /ok.txt break;
            add_header X-Redis-Up $infer_ratelimit_redis_up always;
            add_header X-Pid $pid always;
        }}
        {locations}
    }}"""


def settle(rc, k, want, seconds=5):
    """k's count once the corrections (or syncs) landed (bounded)."""
    deadline = time.monotonic() + seconds
    got = rc.count(k)
    while got != want and time.monotonic() < deadline:
        time.sleep(0.05)
        got = rc.count(k)
    return got


def get(n, tenant=None, path="/ok.txt", session=None, timeout=10):
    h = {"X-Tenant": tenant} if tenant is not None else {}
    return (session or requests).get(n.url + path, headers=h,
                                     timeout=timeout)


def tenant_on(rc, port, base, taken=(), limit="req", prefix="infer:rl:"):
    """A tenant name whose key falls in a slot that port's master serves
    (by redis-py's key_slot, not the gateway's)."""
    owners = rc.slot_map()
    for i in range(200000):
        t = f"{base}{i}"
        if t not in taken and \
                owners[key_slot(key(t, limit, prefix))] == port:
            return t
    raise AssertionError(f"no tenant on {port}")


def tenants_per_master(rc, base):
    """{master port: a tenant of its own}, one per master."""
    out = {}
    for m in rc.masters():
        out[m.port] = tenant_on(rc, m.port, base, taken=out.values())
    assert len(set(key_slot(t) for t in out.values())) == len(out)
    return out


def tenant_in_slot(slot, base, taken=()):
    for i in range(2000000):
        t = f"{base}{i}"
        if t not in taken and key_slot(t) == slot:
            return t
    raise AssertionError(f"no tenant in slot {slot}")


def each(fn, items, threads=8):
    """fn(item) for each item, from several threads; the results."""
    items, lock = list(items), threading.Lock()

    def one():
        with lock:
            item = items.pop()
        return fn(item)

    return parallel(one, len(items), threads=threads)


def warm(n, rc, seconds=15):
    """Every worker has answered "passed" for a tenant on every master:
    each knows the slot map and has its connections.  (A worker that has
    not learned the map yet decides by the outage policy, as one that
    has not heard from the sentinels does; the tests measure after.)"""
    tenants = list(tenants_per_master(rc, "warm").values())
    pids = set(n.worker_pids())
    passed = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        def one(t):
            r = get(n, t, "/warm")
            return r.headers.get("X-Pid"), t, r.headers.get("X-RL-Status")
        for pid, t, st in each(one, tenants * 8):
            if st == "passed":
                passed.add((int(pid), t))
        if all((p, t) in passed for p in pids for t in tenants):
            return
        time.sleep(0.05)
    raise AssertionError(f"not every worker passed for every master: "
                         f"{sorted(passed)} of {pids} x {tenants}")


def connected_ports(pid):
    """The remote loopback ports worker pid has an established TCP
    connection to, as the kernel says (/proc): who it is connected to,
    whatever the gateway thinks."""
    import os
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for line in open(f"/proc/{pid}/net/tcp").read().splitlines()[1:]:
        f = line.split()
        if f[3] == "01" and f[9] in inodes:        # ESTABLISHED, ours
            ports.add(int(f[2].split(":")[1], 16))
    return ports


class Load:
    """Threads sending requests (a new connection each, so that both
    workers serve them) until stopped, bounded in time; each request's
    (when, path, tenant, code, X-RL-Status, seconds) recorded.  A request
    that got no answer is recorded with code None."""

    def __init__(self, n, targets, threads=6, limit=60.0):
        self.n = n
        self.targets = list(targets)     # (path, tenant)
        self.results = []
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.limit = limit
        self.t0 = time.monotonic()
        self.threads = [threading.Thread(target=self.run, args=(i,))
                        for i in range(threads)]
        for t in self.threads:
            t.start()

    def run(self, i):
        k = i
        while not self.stopped.is_set() and \
                time.monotonic() - self.t0 < self.limit:
            path, tenant = self.targets[k % len(self.targets)]
            k += 1
            t0 = time.monotonic()
            try:
                r = requests.get(self.n.url + path,
                                 headers={"X-Tenant": tenant,
                                          "Connection": "close"},
                                 timeout=10)
                code, status = r.status_code, r.headers.get("X-RL-Status")
            except requests.RequestException as e:
                code, status = None, repr(e)
            with self.lock:
                self.results.append((t0 - self.t0, path, tenant, code,
                                     status, time.monotonic() - t0))

    def stop(self):
        self.stopped.set()
        for t in self.threads:
            t.join(30)
        return self.results

    def passed(self, path=None, tenant=None, after=-1.0):
        return sum(1 for at, p, t, c, s, _ in self.results
                   if c == 200 and s == "passed" and at > after
                   and (path is None or p == path)
                   and (tenant is None or t == tenant))


def slowest(results):
    return max((r[5] for r in results), default=0.0)


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory):
    c = RedisCluster(tmp_path_factory.mktemp("cluster"), masters=3).start()
    yield c
    c.stop()


@pytest.fixture
def rc(shared_cluster):
    """The module's cluster (3 masters), emptied for this test, with no
    slot left half moved by the test before."""
    shared_cluster.stabilize()
    shared_cluster.wait_ok(20)
    shared_cluster.flushall()
    shared_cluster.reset_stats()
    return shared_cluster


@pytest.fixture
def own_cluster(tmp_path):
    """make(replicas=0, password=None, hostnames=False) -> a cluster of 3
    masters of the test's own, to kill.  (Asked for before nginx_factory,
    it stops after the test's nginx: no error for a cluster gone first.)"""
    made = []

    def make(replicas=0, **kw):
        c = RedisCluster(tmp_path / f"cluster{len(made)}", masters=3,
                         replicas=replicas, **kw)
        made.append(c)
        return c.start()

    yield make
    for c in made:
        c.stop()


# ------------------------------------------------------------ the harness

def test_the_harness_moves_a_slot_with_its_keys(rc):
    """The resharding the tests rely on, checked with redis-py's own
    cluster client: keys go with their slot, ASK while it is half moved."""
    k = key("harness")
    slot = key_slot(k)
    src = rc.node_for_slot(slot)
    dst = next(m for m in rc.masters() if m is not src)
    rc.cluster_client().set(k, 41)
    src_, dst_ = rc.begin_move(slot, dst.port)
    assert (src_, dst_) == (src, dst)
    # a key the source no longer has (here: never had) is asked of dst
    import redis
    with pytest.raises(redis.exceptions.ResponseError, match="^ASK"):
        src.client().get(key("harness", "other"))
    assert rc.count(k) == 41
    assert rc.migrate_keys(slot, src, dst) == 1
    assert rc.count(k) == 41            # read on dst, after ASKING
    rc.finish_move(slot, dst.port)
    assert rc.node_for_slot(slot) is dst
    assert rc.cluster_client().incr(k) == 42
    assert k in rc.keys_everywhere()[dst.port]


# ------------------------------------------------------------ counting

def test_one_seed_and_each_master_counts_its_own_tenants(nginx_factory, rc):
    """One seed; tenants whose keys fall on three different masters: each
    count is exact on the master that serves its slot, and nowhere else."""
    n = nginx_factory(conf(rc.seeds()[:1], "infer_ratelimit_limit req "
                           "$http_x_tenant requests=8/day;"))
    warm(n, rc)
    tenants = tenants_per_master(rc, "acme")
    for port, t in tenants.items():
        codes = parallel(lambda: get(n, t).status_code, 11)
        assert sorted(codes) == [200] * 8 + [429] * 3, (t, codes)
    r = get(n, tenants[rc.masters()[0].port])
    assert r.status_code == 429 and r.headers["X-RL-Status"] == "limited"
    keys = rc.keys_everywhere("infer:rl:*:req:*")
    for port, t in tenants.items():
        assert rc.master_for(key(t)).port == port
        assert int(rc.client_for(port).get(key(t))) == 8
        assert keys[port] == [key(t)], keys


@pytest.mark.parametrize("how", ["refused", "silent"])
def test_a_seed_that_does_not_answer_is_passed_over(nginx_factory, rc,
                                                    how):
    """The first seed refuses connections, or accepts and never answers:
    the next one tells the map; counts are exact."""
    from harness.ports import free_port
    hole = Blackhole() if how == "silent" else None
    try:
        first = f"127.0.0.1:{hole.port if hole else free_port()}"
        n = nginx_factory(conf([first] + rc.seeds()[:1],
                               "infer_ratelimit_limit req $http_x_tenant "
                               "requests=5/day;",
                               opts="timeout=300ms connect_timeout=300ms "
                               "backoff=200ms"))
        warm(n, rc)
        for port, t in tenants_per_master(rc, "sd").items():
            codes = [get(n, t).status_code for _ in range(7)]
            assert codes == [200] * 5 + [429] * 2
            assert int(rc.client_for(port).get(key(t))) == 5
    finally:
        if hole:
            hole.close()


@pytest.mark.parametrize("prefix", ["infer:rl:", "{}:", "rl{", "x}{"])
def test_the_slot_is_redis_rule(nginx_factory, rc, prefix):
    """Key values and prefixes with braces: the gateway sends each key to
    the master of the slot Redis computes (the first "{" and the next
    "}"; the whole key when what is between is empty): not one MOVED,
    and each count exact where redis-py's key_slot says."""
    n = nginx_factory(conf(rc.seeds(), "infer_ratelimit_limit req "
                           "$http_x_tenant requests=3/day;",
                           opts=f'"prefix={prefix}" timeout=1s'))
    warm(n, rc)
    rc.reset_stats()
    tenants = ["plain", "a}b", "}x{", "{y}", "{}", "z{w}", "}", "{"]
    s = requests.Session()
    for t in tenants:
        codes = [get(n, t, session=s).status_code for _ in range(4)]
        assert codes == [200] * 3 + [429], (t, codes)
    assert sum(rc.errors("MOVED").values()) == 0, rc.errors("MOVED")
    slots = set()
    for t in tenants:
        k = key(t, "req", prefix)
        slots.add(key_slot(k))
        assert int(rc.master_for(k).client().get(k)) == 3, k
    assert len(slots) >= 3


def test_one_call_per_slot(nginx_factory, rc):
    """Five limits: two keyed by the tenant (one slot), three by constants
    in three other slots, two of them on one master.  Each request is one
    EVALSHA per slot, on that slot's master; a refusal in one slot undoes
    the four other keys."""
    masters = rc.masters()
    a, b = masters[0], masters[1]
    t = tenant_on(rc, a.port, "cs")
    c1 = tenant_on(rc, b.port, "k")
    c2 = tenant_on(rc, b.port, "k", taken=[c1])
    c3 = tenant_on(rc, a.port, "k", taken=[c1, c2])
    assert len({key_slot(x) for x in (t, c1, c2, c3)}) == 4
    n = nginx_factory(conf(rc.seeds(), f"""
        infer_ratelimit_limit r1 $http_x_tenant requests=100/day;
        infer_ratelimit_limit r2 $http_x_tenant requests=100/day;
        infer_ratelimit_limit k1 {c1} requests=100/day;
        infer_ratelimit_limit k2 {c2} requests=100/day;
        infer_ratelimit_limit k3 {c3} requests=6/day;"""))
    warm(n, rc)
    rc.reset_stats()
    s = requests.Session()
    codes = [get(n, t, session=s).status_code for _ in range(5)]
    assert codes == [200] * 5
    calls = {p: c + rc.calls("eval")[p]
             for p, c in rc.calls("evalsha").items()}
    # a: the tenant's slot and k3's; b: k1's and k2's
    assert calls == {m.port: 10 if m in (a, b) else 0 for m in masters}, \
        calls
    codes = [get(n, t, session=s) for _ in range(3)]
    assert [r.status_code for r in codes] == [200, 429, 429]
    assert {r.headers["X-RL-By"] for r in codes[1:]} == {"k3"}
    for k, want in ((key(t, "r1"), 6), (key(t, "r2"), 6), (key(c1, "k1"), 6),
                    (key(c2, "k2"), 6), (key(c3, "k3"), 6)):
        assert settle(rc, k, want) == want, k


def test_a_standalone_redis_as_a_seed(nginx_factory, redis):
    """A seed that is not a cluster (CLUSTER NODES answered with an error):
    said in the log, the policy decides at once, nothing crashes."""
    n = nginx_factory(conf([redis.addr], "infer_ratelimit_limit req "
                           "$http_x_tenant requests=100/day "
                           "on_error=fail_closed;",
                           opts="timeout=300ms connect_timeout=300ms "
                           "backoff=200ms"))
    t0 = time.monotonic()
    rs = parallel(lambda: get(n, "acme"), 10)
    assert time.monotonic() - t0 < 5
    assert {(r.status_code, r.headers["X-RL-Status"]) for r in rs} == \
        {(429, "degraded")}
    assert get(n, path="/up").headers["X-Redis-Up"] == "0"
    assert not redis.client().keys("*")
    assert "no slot map" in n.log_text()


def test_a_cluster_with_a_password(own_cluster, nginx_factory):
    """requirepass on every node: the gateway authenticates on each
    connection (the map's and each master's); a wrong password is an
    outage, and the password is never logged."""
    cl = own_cluster(password="s3cret-pw")
    n = nginx_factory(conf(cl.seeds()[:1], "infer_ratelimit_limit req "
                           "$http_x_tenant requests=5/day "
                           "on_error=fail_closed;",
                           opts="password=s3cret-pw timeout=1s"))
    warm(n, cl)
    for port, t in tenants_per_master(cl, "pw").items():
        assert [get(n, t).status_code for _ in range(6)] == \
            [200] * 5 + [429]
        assert int(cl.client_for(port).get(key(t))) == 5
    bad = nginx_factory(conf(cl.seeds()[:1], "infer_ratelimit_limit req "
                             "$http_x_tenant requests=5/day "
                             "on_error=fail_closed;",
                             opts="password=wrong-pw timeout=300ms "
                             "connect_timeout=300ms backoff=200ms"),
                        name="bad")
    rs = [get(bad, "acme") for _ in range(4)]
    assert {(r.status_code, r.headers["X-RL-Status"]) for r in rs} == \
        {(429, "degraded")}
    for gw in (n, bad):
        log = gw.log_text()
        assert "s3cret-pw" not in log and "wrong-pw" not in log


def test_nodes_that_announce_a_host_name(own_cluster, nginx_factory):
    """cluster-announce-hostname on every node: CLUSTER NODES lines carry
    ",hostname" after the address; the addresses are still IPs (the
    preferred endpoint), so the gateway counts as usual."""
    cl = own_cluster(hostnames=True)
    assert ".test" in cl.live()[0].client().execute_command("CLUSTER",
                                                              "NODES")
    n = nginx_factory(conf(cl.seeds()[:1], "infer_ratelimit_limit req "
                           "$http_x_tenant requests=5/day;"))
    warm(n, cl)
    cl.reset_stats()
    for port, t in tenants_per_master(cl, "hn").items():
        assert [get(n, t).status_code for _ in range(6)] == \
            [200] * 5 + [429]
        assert int(cl.client_for(port).get(key(t))) == 5
    assert sum(cl.errors("MOVED").values()) == 0


def test_a_hash_tag_in_the_prefix_puts_every_key_in_one_slot(nginx_factory,
                                                              rc):
    """prefix={rl}: makes every key's slot that of "rl": two limits of two
    entities are one EVALSHA on that slot's master, and no other master
    is asked anything."""
    prefix = "{rl}:"
    n = nginx_factory(conf(rc.seeds(), "infer_ratelimit_limit req "
                           "$http_x_tenant requests=100/day;"
                           "infer_ratelimit_limit all global "
                           "requests=1000/day;",
                           opts=f'"prefix={prefix}" timeout=1s'))
    owner = rc.node_for_slot(key_slot("{rl}"))
    s = requests.Session()
    deadline = time.monotonic() + 10
    while get(n, "warm", session=s).headers["X-RL-Status"] != "passed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # both workers: each has its connection before the count starts
    parallel(lambda: get(n, "warm"), 16)
    before = rc.count(key("global", "all", prefix))
    rc.reset_stats()
    tenants = ["acme", "globex", "initech"]
    statuses = [get(n, t).headers["X-RL-Status"]
                for _ in range(10) for t in tenants]
    assert statuses == ["passed"] * 30
    calls = {p: c + rc.calls("eval")[p]
             for p, c in rc.calls("evalsha").items()}
    assert calls == {m.port: 30 if m is owner else 0
                     for m in rc.masters()}, calls
    for t in tenants:
        assert rc.count(key(t, "req", prefix)) == 10
    assert rc.count(key("global", "all", prefix)) == before + 30
    keys = rc.keys_everywhere("{rl}:*")
    assert all(not v for p, v in keys.items() if p != owner.port), keys
    assert len(keys[owner.port]) == 4 + 1     # the tenants, all, warm


def test_a_refusal_on_one_slot_undoes_the_other(nginx_factory, rc):
    """A tenant's limit and a global one, in different slots: when either
    refuses, the request is refused and the other is not charged."""
    everyone = "everyone"
    owner_all = rc.master_for(key(everyone, "g"))
    other = next(m for m in rc.masters() if m is not owner_all)
    a = tenant_on(rc, other.port, "a")
    b = tenant_on(rc, other.port, "b")
    c_ = tenant_on(rc, owner_all.port, "c")     # same master, other slot
    assert key_slot(c_) != key_slot(everyone)
    n = nginx_factory(conf(rc.seeds(), "", locations=f"""
        location /two {{
            infer_ratelimit_limit t $http_x_tenant requests=5/day;
            infer_ratelimit_limit g {everyone} requests=8/day;
            rewrite ^ /ok.txt break;
            {HEADERS}
        }}
        location /par {{
            infer_ratelimit_limit t2 $http_x_tenant requests=6/day;
            infer_ratelimit_limit g2 {everyone} requests=20/day;
            rewrite ^ /ok.txt break;
            {HEADERS}
        }}"""))
    warm(n, rc)
    s = requests.Session()
    # the tenant's limit refuses: the global one keeps only the admitted
    rs = [get(n, a, "/two", s) for _ in range(7)]
    assert [r.status_code for r in rs] == [200] * 5 + [429] * 2
    assert [r.headers["X-RL-By"] for r in rs[5:]] == ["t", "t"]
    # (an undo is sent with the refusal, not waited for: read it landed)
    assert settle(rc, key(a, "t"), 5) == 5
    assert settle(rc, key(everyone, "g"), 5) == 5
    # the global limit refuses: the tenant's is not charged for it
    rs = [get(n, b, "/two", s) for _ in range(5)]
    assert [r.status_code for r in rs] == [200] * 3 + [429] * 2
    assert [r.headers["X-RL-By"] for r in rs[3:]] == ["g", "g"]
    assert settle(rc, key(b, "t"), 3) == 3
    assert settle(rc, key(everyone, "g"), 8) == 8
    rs = [get(n, c_, "/two", s) for _ in range(2)]
    assert [r.status_code for r in rs] == [429, 429]
    assert settle(rc, key(c_, "t"), 0) == 0
    assert rc.count(key(everyone, "g")) == 8
    # in parallel, refusals of both kinds racing: whatever was admitted
    # is exactly what each key holds
    tenants = []
    for m in rc.masters():
        for _ in range(2):
            tenants.append(tenant_on(rc, m.port, "p", taken=tenants))
    results = each(lambda t: (t, get(n, t, "/par").status_code),
                   tenants * 10, threads=12)
    assert {c for _, c in results} <= {200, 429}
    ok = {t: sum(1 for u, c in results if u == t and c == 200)
          for t in tenants}
    assert all(v <= 6 for v in ok.values()), ok
    assert 6 <= sum(ok.values()) <= 20, ok
    for t in tenants:
        assert settle(rc, key(t, "t2"), ok[t]) == ok[t], (t, ok)
    assert settle(rc, key(everyone, "g2"), sum(ok.values())) == \
        sum(ok.values())


def test_a_concurrency_limit_and_a_requests_limit_in_two_slots(
        nginx_factory, rc, sim_factory):
    """A tenant's in-flight count and everyone's request count, on two
    masters: refusals by the first undo the second; every request leaves
    the in-flight count when it ends."""
    sim = sim_factory("llama-3-8b", "llama-a", ttft_ms=0, tpot_ms=0)
    t = tenant_on(rc, rc.masters()[0].port, "cc")
    everyone = tenant_on(rc, rc.masters()[1].port, "all")
    n = nginx_factory(proxy_conf(
        rc.seeds(), sim,
        "infer_ratelimit_limit inflight $http_x_tenant concurrency=2;"
        f"infer_ratelimit_limit rpd {everyone} requests=1000/day;"))
    warm(n, rc)

    def slow(_):
        return chat(n, max_tokens=2, headers={"X-Tenant": t,
                                              "x-sim-ttft-ms": "600"}
                    ).status_code

    assert sorted(each(slow, range(5), threads=5)) == [200] * 2 + [429] * 3
    assert settle(rc, key(everyone, "rpd"), 2) == 2
    inflight = f"infer:rl:{{{t}}}:inflight"
    assert settle(rc, inflight, 0) == 0           # released, or gone
    assert sorted(each(slow, range(2), threads=2)) == [200, 200]
    assert settle(rc, key(everyone, "rpd"), 4) == 4


def test_a_client_gone_while_a_part_is_pending(nginx_factory, rc):
    """A request on two slots whose client goes away while one part is
    held (its master paused) and the other admitted: when the held part
    admits too, both are undone (nothing was served)."""
    import socket
    a, b = rc.masters()[0], rc.masters()[1]
    t = tenant_on(rc, a.port, "gone")
    everyone = tenant_on(rc, b.port, "all")
    n = nginx_factory(conf(rc.seeds(), f"""
        infer_ratelimit_limit t $http_x_tenant requests=100/day;
        infer_ratelimit_limit g {everyone} requests=100/day;""",
                           opts="timeout=3s"))
    warm(n, rc)
    assert get(n, t).status_code == 200
    a.client().execute_command("CLIENT", "PAUSE", 700, "ALL")
    socks = []
    for _ in range(6):
        c = socket.create_connection(("127.0.0.1", n.port))
        c.sendall(f"GET /ok.txt HTTP/1.1\r\nHost: x\r\nX-Tenant: {t}"
                  "\r\n\r\n".encode())
        socks.append(c)
    time.sleep(0.2)
    for c in socks:
        c.close()               # gone before the paused master answers
    time.sleep(0.8)             # its answers come to no one
    r = get(n, t)
    assert r.status_code == 200 and r.headers["X-RL-Status"] == "passed"
    assert settle(rc, key(t, "t"), 2) == 2
    assert settle(rc, key(everyone, "g"), 2) == 2
    time.sleep(0.3)
    assert (rc.count(key(t, "t")), rc.count(key(everyone, "g"))) == (2, 2)
    n.stop()
    assert (n.workdir / "access.log").read_text().count('" 499 ') >= 1


# ------------------------------------------------------------ resharding

def test_a_slot_moved_under_load(nginx_factory, rc):
    """A slot is resharded, with its keys, while threads send requests:
    no request waits past the timeout, none is degraded (MOVED and ASK are
    followed), and once moved each key holds exactly what was admitted.
    While the slot is half moved, a key the source does not have is asked
    of the destination (ASKING)."""
    n = nginx_factory(conf(rc.seeds(), "infer_ratelimit_limit req "
                           f"$http_x_tenant {HUGE} on_error=fail_closed;"))
    warm(n, rc)
    masters = rc.masters()
    src, dst = masters[0], masters[1]
    moving = tenant_on(rc, src.port, "mv")
    slot = key_slot(moving)
    fresh = tenant_in_slot(slot, "fr")
    steady = [tenant_on(rc, m.port, "st") for m in masters]
    for t in [moving] + steady:           # their keys exist before
        assert get(n, t).headers["X-RL-Status"] == "passed"
    before = {t: rc.count(key(t)) for t in [moving] + steady}
    assert before[moving] == 1
    rc.reset_stats()

    load = Load(n, [("/ok.txt", t) for t in [moving] * 3 + steady])
    try:
        time.sleep(0.3)
        rc.begin_move(slot, dst.port)
        time.sleep(0.3)
        # half moved: the source still has moving's key, not fresh's
        s = requests.Session()
        rs = [get(n, fresh, session=s) for _ in range(5)]
        assert [(r.status_code, r.headers["X-RL-Status"]) for r in rs] == \
            [(200, "passed")] * 5
        assert rc.calls("asking")[dst.port] >= 1
        assert rc.count(key(fresh)) == 5      # on dst, read with ASKING
        rc.migrate_keys(slot, src, dst, batch=1, pause=0.2)
        time.sleep(0.3)                       # every key on dst: ASK
        rc.finish_move(slot, dst.port)
        time.sleep(0.5)                       # MOVED, the map refreshed
    finally:
        results = load.stop()
    assert rc.node_for_slot(slot) is dst
    assert len(results) > 50, len(results)
    bad = [r for r in results if r[3] != 200 or r[4] != "passed"]
    assert not bad, bad[:10]
    assert slowest(results) < 1 + 2, slowest(results)
    for t in [moving] + steady:
        assert rc.count(key(t)) == before[t] + load.passed(tenant=t), t
    assert rc.count(key(fresh)) == 5
    assert key(moving) in rc.keys_everywhere()[dst.port]
    # the source sent the gateway elsewhere: ASK while the slot was half
    # moved, MOVED once it was gone
    assert rc.errors("ASK")[src.port] >= 1
    assert rc.errors("MOVED")[src.port] >= 1
    # and after, the map refreshed: the slot's requests go straight to dst
    rc.reset_stats()
    for t in (fresh, moving):
        assert [get(n, t).headers["X-RL-Status"] for _ in range(4)] == \
            ["passed"] * 4
    assert sum(rc.errors("MOVED").values()) == 0
    assert sum(rc.errors("ASK").values()) == 0
    assert rc.count(key(fresh)) == 9


def test_a_new_master_and_a_slot_moved_to_it(own_cluster, nginx_factory):
    """A fourth master joins and a slot (with its keys) is moved to it:
    the gateway, told MOVED, connects to a node it did not know and counts
    there exactly.  A fifth joins and takes a slot no request asks for:
    every worker learns of it all the same (the map is asked for again
    periodically), connects to it for the readiness probe, and counts
    there exactly."""
    cl = own_cluster()
    n = nginx_factory(conf(cl.seeds(), "infer_ratelimit_limit req "
                           f"$http_x_tenant {HUGE} on_error=fail_closed;"))
    warm(n, cl)
    t1 = tenant_on(cl, cl.masters()[0].port, "nm")
    t2 = tenant_on(cl, cl.masters()[1].port, "nm", taken=[t1])
    s = requests.Session()
    for t in (t1, t2):
        for _ in range(3):
            assert get(n, t, session=s).headers["X-RL-Status"] == "passed"
    fourth = cl.add_master()
    # half moved to it: a key the source does not have is asked of a node
    # the gateway has never connected to
    src, _ = cl.begin_move(key_slot(t1), fourth.port)
    f1 = tenant_in_slot(key_slot(t1), "nf")
    rs = [get(n, f1) for _ in range(3)]
    assert [(r.status_code, r.headers["X-RL-Status"]) for r in rs] == \
        [(200, "passed")] * 3
    assert cl.count(key(f1)) == 3
    assert key(f1) not in [k for ks in cl.keys_everywhere().values()
                           for k in ks]      # on fourth, not a master yet
    cl.migrate_keys(key_slot(t1), src, fourth)
    cl.finish_move(key_slot(t1), fourth.port)
    assert cl.master_for(key(t1)) is fourth
    assert int(fourth.client().get(key(f1))) == 3
    statuses = [get(n, t1).headers["X-RL-Status"] for _ in range(10)]
    assert statuses == ["passed"] * 10, statuses
    assert int(fourth.client().get(key(t1))) == 13

    # the MOVEDs' map questions answered (at most one per 100 ms): each
    # worker's map is current before the fifth master comes
    for _ in range(5):
        time.sleep(0.15)
        parallel(lambda: get(n, path="/up"), 8)
    fifth = cl.add_master()
    cl.move_slot(key_slot(t2), fifth.port)
    pids = n.worker_pids()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and \
            not all(fifth.port in connected_ports(p) for p in pids):
        get(n, path="/up")
        time.sleep(0.1)
    assert {p: fifth.port in connected_ports(p) for p in pids} == \
        {p: True for p in pids}, "a worker never learnt of the new master"
    assert {get(n, path="/up").headers["X-Redis-Up"] for _ in range(6)} \
        == {"1"}
    statuses = [get(n, t2).headers["X-RL-Status"] for _ in range(10)]
    assert statuses == ["passed"] * 10, statuses
    assert int(fifth.client().get(key(t2))) == 13


def test_redirects_are_bounded(nginx_factory, rc):
    """A move half undone (the source MIGRATING, the destination not
    IMPORTING): the source answers ASK, the destination MOVED back, for
    ever.  The gateway follows a few and gives up: the policy decides at
    once, and the slot works again once the cluster is mended."""
    n = nginx_factory(conf(rc.seeds(), "infer_ratelimit_limit req "
                           f"$http_x_tenant {HUGE} on_error=fail_closed;"))
    warm(n, rc)
    masters = rc.masters()
    src, dst = masters[0], masters[1]
    t = tenant_on(rc, src.port, "loop")
    slot = key_slot(t)
    src.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING",
                                 dst.id)
    try:
        rc.reset_stats()
        t0 = time.monotonic()
        rs = [get(n, t) for _ in range(3)]
        took = time.monotonic() - t0
        assert [(r.status_code, r.headers["X-RL-Status"]) for r in rs] == \
            [(429, "degraded")] * 3
        assert took < 3 * (1 + 2), took
        # a few redirects each, not a storm
        assert 1 <= rc.calls("asking")[dst.port] <= 3 * 10
    finally:
        src.client().execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
    assert rc.count(key(t)) == 0
    deadline = time.monotonic() + 5
    while get(n, t).headers["X-RL-Status"] != "passed":
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["timeout", "tryagain", "error"])
def test_a_part_that_fails_undoes_the_others(nginx_factory, rc, how):
    """A request on two slots, a tenant's and everyone's, on two masters:
    when the tenant's part fails (its master paused past the timeout;
    TRYAGAIN: the slot half moved, one of the tenant's two keys gone; an
    error: its key holds a hash), everyone's part, admitted, is undone,
    and the policy decides."""
    masters = rc.masters()
    a, b, c = masters
    t = tenant_on(rc, a.port, "f")
    everyone = tenant_on(rc, b.port, "all")
    n = nginx_factory(conf(rc.seeds(), f"""
        infer_ratelimit_limit r1 $http_x_tenant {HUGE} on_error=fail_closed;
        infer_ratelimit_limit r2 $http_x_tenant {HUGE} on_error=fail_closed;
        infer_ratelimit_limit g {everyone} {HUGE} on_error=fail_closed;""",
                           opts="timeout=300ms connect_timeout=300ms "
                           "backoff=200ms"))
    warm(n, rc)
    s = requests.Session()
    for _ in range(2):
        assert get(n, t, session=s).headers["X-RL-Status"] == "passed"
    assert rc.count(key(everyone, "g")) == 2
    slot = key_slot(t)
    if how == "timeout":
        a.client().execute_command("CLIENT", "PAUSE", 1000, "ALL")
        paused_until = time.monotonic() + 1.0
    elif how == "error":
        a.client().delete(key(t, "r2"))
        a.client().hset(key(t, "r2"), "not", "a count")
    else:
        rc.begin_move(slot, c.port)
        a.client().execute_command("MIGRATE", c.host, c.port, "", 0, 5000,
                                   "KEYS", key(t, "r1"))
    t0 = time.monotonic()
    r = get(n, t, session=s)
    took = time.monotonic() - t0
    assert (r.status_code, r.headers["X-RL-Status"]) == (429, "degraded")
    assert took < 0.3 + 2, took
    assert settle(rc, key(everyone, "g"), 2) == 2
    time.sleep(0.3)
    assert rc.count(key(everyone, "g")) == 2
    if how == "timeout":
        time.sleep(max(0, paused_until - time.monotonic()) + 0.1)
    elif how == "error":
        a.client().delete(key(t, "r2"))
    else:
        errs = rc.errors("TRYAGAIN")
        assert errs[a.port] + errs[c.port] >= 1, errs
        rc.migrate_keys(slot, a, c)
        rc.finish_move(slot, c.port)
    passed = 2
    deadline = time.monotonic() + 5
    while get(n, t, session=s).headers["X-RL-Status"] != "passed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    passed += 1
    for _ in range(3):
        assert get(n, t, session=s).headers["X-RL-Status"] == "passed"
        passed += 1
    assert rc.count(key(everyone, "g")) == passed
    if how == "tryagain":
        # nothing was charged twice or lost in the move
        assert rc.count(key(t, "r1")) == rc.count(key(t, "r2")) == passed


# ------------------------------------------------------------ outages

def test_a_master_killed_under_load(own_cluster, nginx_factory):
    """3 masters with a replica each; one master SIGKILLed under load: no
    request waits past the timeout, each limit's policy decides while
    its slots have no master (fail_closed: 429, fail_open: 200), the
    readiness variable says 0, and once a replica took over the counts
    are exact on it."""
    cl = own_cluster(replicas=1)
    masters = cl.masters()
    victim, other = masters[1], masters[2]
    x = tenant_on(cl, victim.port, "x")
    y = tenant_on(cl, other.port, "y")
    everyone = tenant_on(cl, other.port, "all")
    n = nginx_factory(conf(cl.seeds(), "", opts="timeout=300ms "
                           "connect_timeout=200ms backoff=300ms",
                           locations=POLICIES + f"""
        location /both {{
            infer_ratelimit_limit bt $http_x_tenant {HUGE}
                                  on_error=fail_closed;
            infer_ratelimit_limit bg {everyone} {HUGE} on_error=fail_closed;
            rewrite ^ /ok.txt break;
            {HEADERS}
        }}"""))
    warm(n, cl)
    ups = []
    load = Load(n, [(p, t) for p in ("/closed", "/open") for t in (x, y)]
                + [("/both", x)])
    try:
        time.sleep(0.5)
        killed_at = time.monotonic() - load.t0
        cl.kill_master(victim.port)
        time.sleep(0.3)
        ups += [get(n, path="/up").headers["X-Redis-Up"] for _ in range(6)]
        new = cl.wait_promoted()
        promoted_at = time.monotonic() - load.t0
        # the gateway finds the new master (on errors, or periodically)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if all(load.passed(p, x, after=time.monotonic() - load.t0 - 0.3)
                   for p in ("/closed", "/open")):
                break
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        results = load.stop()
    print(f"killed at {killed_at:.1f}s, promoted at {promoted_at:.1f}s, "
          f"{len(results)} requests")
    assert new is not victim and cl.master_for(key(x, "c")) is new
    assert slowest(results) < 0.3 + 0.2 + 2, slowest(results)
    assert all(r[3] is not None for r in results), \
        [r for r in results if r[3] is None][:5]
    for at, path, t, code, status, _ in results:
        if path in ("/closed", "/both"):
            assert (code, status) in ((200, "passed"), (429, "degraded"))
        else:
            assert (code, status) in ((200, "passed"), (200, "degraded"))
    # x's slots had no master for a while: the policy decided
    outage = [(p, c) for at, p, t, c, s, _ in results
              if t == x and s == "degraded"]
    assert ("/closed", 429) in outage and ("/open", 200) in outage
    assert ("/both", 429) in outage
    # a request on two slots whose part on the dead master failed: its
    # part on the live one was undone (or never sent)
    assert cl.count(key(everyone, "bg")) == load.passed("/both")
    assert "0" in ups, ups
    # x's requests pass again, through both workers
    assert load.passed("/closed", x, after=promoted_at) > 0
    assert load.passed("/open", x, after=promoted_at) > 0
    # counted exactly on the new master: a fresh tenant of its slots, and
    # x's key from what the replica had
    z = tenant_on(cl, new.port, "z")
    before = cl.count(key(x, "c"))
    for t, path in ((z, "/closed"), (z, "/open"), (x, "/closed")):
        rs = parallel(lambda: get(n, t, path), 10)
        assert {(r.status_code, r.headers["X-RL-Status"]) for r in rs} == \
            {(200, "passed")}, (t, path)
    assert int(new.client().get(key(z, "c"))) == 10
    assert int(new.client().get(key(z, "o"))) == 10
    assert cl.count(key(x, "c")) == before + 10
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and \
            get(n, path="/up").headers["X-Redis-Up"] != "1":
        time.sleep(0.05)
    assert {get(n, path="/up").headers["X-Redis-Up"] for _ in range(6)} \
        == {"1"}


def test_a_graceful_failover_under_load(own_cluster, nginx_factory):
    """CLUSTER FAILOVER on a replica while threads send requests: the old
    master becomes a replica and answers MOVED; no request is degraded or
    waits past the timeout, and every count is exact on the new master
    (a graceful failover loses no write).  The gateway's seeds are the
    replicas."""
    cl = own_cluster(replicas=1)
    tenants = tenants_per_master(cl, "g")
    old = cl.masters()[0]
    replica = cl.replicas_of(old)[0]
    # the seeds are the replicas: any node tells the map
    replicas = [r.addr for m in cl.masters() for r in cl.replicas_of(m)]
    n = nginx_factory(conf(replicas, "infer_ratelimit_limit req "
                           f"$http_x_tenant {HUGE} on_error=fail_closed;"))
    warm(n, cl)
    for t in tenants.values():
        assert get(n, t).headers["X-RL-Status"] == "passed"
    before = {t: cl.count(key(t)) for t in tenants.values()}
    load = Load(n, [("/ok.txt", t) for t in tenants.values()])
    try:
        time.sleep(0.5)
        assert cl.failover(replica.port) is old
        time.sleep(1.0)
    finally:
        results = load.stop()
    assert cl.master_for(key(tenants[old.port])) is replica
    assert len(results) > 50
    bad = [r for r in results if r[3] != 200 or r[4] != "passed"]
    assert not bad, bad[:10]
    assert slowest(results) < 1 + 2, slowest(results)
    for t in tenants.values():
        assert cl.count(key(t)) == before[t] + load.passed(tenant=t), t


def test_readiness_follows_a_failover_without_traffic(own_cluster,
                                                     nginx_factory):
    """Only a readiness probe asks: a master killed makes it 0; once a
    replica took over, it is 1 again, without any request counted (the
    map is asked for again by the probe's connection attempts, or
    periodically, not only by a request that failed)."""
    cl = own_cluster(replicas=1)
    n = nginx_factory(conf(cl.seeds(), "", opts="timeout=300ms "
                           "connect_timeout=200ms backoff=300ms"),
                      workers=1)

    def up():
        return get(n, path="/up").headers["X-Redis-Up"]

    deadline = time.monotonic() + 5
    while up() != "1":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    victim = cl.masters()[1]
    cl.kill_master(victim.port)
    deadline = time.monotonic() + 3
    while up() != "0":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cl.wait_promoted()
    promoted = time.monotonic()
    seen = []
    while time.monotonic() - promoted < 10 and seen[-3:] != ["1"] * 3:
        seen.append(up())
        time.sleep(0.1)
    assert seen[-3:] == ["1"] * 3, \
        f"still {seen[-1]} {time.monotonic() - promoted:.1f}s after the " \
        f"promotion"


def test_every_node_down_and_back(own_cluster, nginx_factory):
    """Every node SIGKILLed: each request is decided by its policy at
    once, and the readiness variable says 0; the same nodes started again
    (their config files, no data): requests pass and are counted again."""
    cl = own_cluster()
    tenants = tenants_per_master(cl, "d")
    n = nginx_factory(conf(cl.seeds(), "", opts="timeout=300ms "
                           "connect_timeout=200ms backoff=300ms",
                           locations=POLICIES))
    warm(n, cl)
    load = Load(n, [(p, t) for p in ("/closed", "/open")
                    for t in tenants.values()])
    try:
        time.sleep(0.3)
        cl.kill_all()
        down_at = time.monotonic() - load.t0
        time.sleep(1.5)
    finally:
        results = load.stop()
    assert slowest(results) < 0.3 + 0.2 + 2, slowest(results)
    late = [r for r in results if r[0] > down_at + 0.5]
    assert len(late) > 10
    for at, path, t, code, status, _ in late:
        assert (code, status) == ((429 if path == "/closed" else 200),
                                  "degraded"), (path, code, status)
    assert {get(n, path="/up").headers["X-Redis-Up"] for _ in range(6)} \
        == {"0"}

    cl.restart_all()
    fresh = tenants_per_master(cl, "back")
    warm(n, cl)           # within 15 s, each worker passes on each master
    for port, t in fresh.items():
        for path in ("/closed", "/open"):
            rs = parallel(lambda: get(n, t, path), 10)
            assert {r.headers["X-RL-Status"] for r in rs} == {"passed"}
    for port, t in fresh.items():
        c = cl.client_for(port)
        assert int(c.get(key(t, "c"))) == 10
        assert int(c.get(key(t, "o"))) == 10
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and \
            get(n, path="/up").headers["X-Redis-Up"] != "1":
        time.sleep(0.05)
    assert {get(n, path="/up").headers["X-Redis-Up"] for _ in range(6)} \
        == {"1"}


# ------------------------------------------------------------ nginx -t

@pytest.mark.parametrize("opts, words", [
    ("cluster:127.0.0.1:7000 db=1", ["cluster", "db="]),
    ("cluster:127.0.0.1:7000 sentinels=127.0.0.1:26379",
     ["cluster", "sentinels="]),
    ("cluster:127.0.0.1", ["127.0.0.1"]),
    ("cluster:127.0.0.1:7000,redis.example.com:7001", ["redis.example.com"]),
    ("cluster:localhost:7000", ["localhost"]),
    ("cluster:127.0.0.1:70000", ["127.0.0.1:70000"]),
    ("cluster:", ["cluster"]),
    ("cluster:127.0.0.1:7000,", ["cluster"]),
    ("cluster:127.0.0.1:7000 batch=8", ["cluster", "batch="]),
], ids=["db", "sentinels", "no-port", "a-name-among-seeds", "a-name",
        "port-too-large", "no-seed", "an-empty-seed", "batch"])
def test_nginx_t_names_cluster_mistakes(nginx_factory, opts, words):
    n = nginx_factory(f"""
        infer_ratelimit_redis {opts};
        server {{ listen 127.0.0.1:{{port}}; infer_ratelimit on;
                  infer_ratelimit_limit l k requests=1/s;
                  location / {{ }} }}""", start=False)
    ok, out = n.check_config()
    assert not ok, out
    assert "[emerg]" in out, out
    for w in words:
        assert w in out, out


def test_nginx_t_takes_a_cluster(nginx_factory):
    n = nginx_factory("""
        infer_ratelimit_redis cluster:127.0.0.1:7000,127.0.0.1:7001
                              password=s3cret timeout=100ms
                              connect_timeout=100ms backoff=1s replicas=2
                              "prefix={rl}:" coalesce=off;
        server { listen 127.0.0.1:{port}; infer_ratelimit on;
                 infer_ratelimit_limit l k requests=1/s;
                 location / { } }""", start=False)
    ok, out = n.check_config()
    assert ok, out


# ------------------------------------------------------------ reload

def test_reload_under_load(nginx_factory, rc):
    """Two reloads while threads send requests for tenants on every
    master: every request answered, no crash, and each key holds exactly
    the requests that passed."""
    n = nginx_factory(conf(rc.seeds(), "infer_ratelimit_limit req "
                           f"$http_x_tenant {HUGE} on_error=fail_closed;"))
    warm(n, rc)
    tenants = list(tenants_per_master(rc, "rl").values())
    load = Load(n, [("/ok.txt", t) for t in tenants])
    try:
        time.sleep(0.6)
        n.reload()
        time.sleep(0.6)
        n.reload()
        time.sleep(0.8)
    finally:
        results = load.stop()
    assert len(results) > 50
    assert all(r[3] in (200, 429) for r in results), \
        [r for r in results if r[3] not in (200, 429)][:5]
    assert all((r[3] == 200) == (r[4] == "passed") for r in results)
    assert slowest(results) < 1 + 2, slowest(results)
    degraded = sum(1 for r in results if r[4] == "degraded")
    print(f"{len(results)} requests, {degraded} degraded")
    for t in tenants:
        assert rc.count(key(t)) == load.passed(tenant=t), t


# ------------------------------------------------------------ tokens

def proxy_conf(seeds, sim, limits, opts="timeout=2s"):
    return f"""
    infer_ratelimit_redis cluster:{",".join(seeds)} {opts};
    upstream llama {{ server {sim.addr}; keepalive 8; }}
    infer_model llama-3-8b upstream=llama;
    server {{
        listen 127.0.0.1:{{port}};
        infer_ratelimit on;
        {limits}
        location / {{
            infer_route on;
            proxy_pass http://$infer_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            {HEADERS}
        }}
        location /warm {{
            infer_ratelimit_limit warm $http_x_tenant {HUGE};
            rewrite ^ /ok.txt break;
            {HEADERS}
        }}
    }}"""


@pytest.mark.parametrize("coalesce", ["", "coalesce=200ms"],
                         ids=["default", "200ms"])
def test_tokens_corrected_on_every_master(nginx_factory, rc, sim_factory,
                                          coalesce):
    """Token limits of a tenant and of everyone (different slots, and
    tenants on every master): reservations corrected with the real usage
    through coalesced calls, which carry keys of several slots; each
    day's key ends holding exactly the tokens the answers used."""
    sim = sim_factory("llama-3-8b", "llama-a", ttft_ms=0, tpot_ms=0)
    n = nginx_factory(proxy_conf(
        rc.seeds(), sim,
        "infer_ratelimit_limit tpd $http_x_tenant tokens=100000000/day;"
        "infer_ratelimit_limit all everyone tokens=100000000/day;",
        opts=f"timeout=2s {coalesce}"))
    tenants = list(tenants_per_master(rc, "tok").values())
    used = {t: 0 for t in tenants}
    lock = threading.Lock()
    turn = iter(range(10**6))

    def one():
        with lock:
            i = next(turn)
        t = tenants[i % len(tenants)]
        r = chat(n, max_tokens=100, completion=3 + i % 7,
                 headers={"X-Tenant": t})
        assert r.status_code == 200, r.text
        with lock:
            used[t] += r.json()["usage"]["total_tokens"]
        return r.headers["X-RL-Status"]

    warm(n, rc)
    statuses = parallel(one, 45, threads=6)
    assert statuses == ["passed"] * 45
    for t in tenants:
        assert settle(rc, key(t, "tpd"), used[t]) == used[t], t
    total = sum(used.values())
    assert settle(rc, key("everyone", "all"), total) == total


def test_a_quitting_worker_sends_its_corrections_to_every_master(
        nginx_factory, rc, sim_factory):
    """coalesce=1s, then a reload: the old workers send the corrections
    they hold, split by slot, to every master before they exit."""
    sim = sim_factory("llama-3-8b", "llama-a", ttft_ms=0, tpot_ms=0)
    n = nginx_factory(proxy_conf(
        rc.seeds(), sim,
        "infer_ratelimit_limit tpd $http_x_tenant tokens=100000000/day;",
        opts="timeout=2s coalesce=1s"))
    warm(n, rc)
    tenants = [tenant_on(rc, m.port, f"q{i}") for i in range(2)
               for m in rc.masters()]
    used = {}
    s = requests.Session()
    for t in tenants:
        r = chat(n, session=s, max_tokens=1000, completion=5,
                 headers={"X-Tenant": t})
        assert r.headers["X-RL-Status"] == "passed"
        used[t] = r.json()["usage"]["total_tokens"]
    s.close()
    n.reload()
    for t in tenants:
        assert rc.count(key(t, "tpd")) == used[t], t


def test_a_script_flushed_on_one_master(nginx_factory, rc):
    """SCRIPT FLUSH on one master (as after its restart): the part sent
    there is answered NOSCRIPT and sent again with the script; no request
    is degraded and the counts are exact."""
    a, b = rc.masters()[0], rc.masters()[1]
    t = tenant_on(rc, a.port, "sf")
    everyone = tenant_on(rc, b.port, "all")
    n = nginx_factory(conf(rc.seeds(), f"""
        infer_ratelimit_limit t $http_x_tenant requests=100/day
                              on_error=fail_closed;
        infer_ratelimit_limit g {everyone} requests=100/day
                              on_error=fail_closed;"""))
    warm(n, rc)
    s = requests.Session()
    assert get(n, t, session=s).headers["X-RL-Status"] == "passed"
    a.client().script_flush()
    statuses = [get(n, t, session=s).headers["X-RL-Status"]
                for _ in range(4)]
    statuses += [r.headers["X-RL-Status"]
                 for r in parallel(lambda: get(n, t), 8)]
    assert statuses == ["passed"] * 12
    assert rc.count(key(t, "t")) == 13
    assert rc.count(key(everyone, "g")) == 13


def test_many_limits_in_many_slots(nginx_factory, rc):
    """Twelve limits keyed by twelve values in twelve slots: admitted
    together, and a refusal by the last one undoes the eleven others."""
    names = [tenant_on(rc, rc.masters()[i % 3].port, f"m{i}-")
             for i in range(12)]
    assert len({key_slot(x) for x in names}) == 12
    limits = "".join(f"infer_ratelimit_limit l{i} {x} requests=100/day;"
                     for i, x in enumerate(names[:-1]))
    limits += f"infer_ratelimit_limit l11 {names[-1]} requests=4/day;"
    n = nginx_factory(conf(rc.seeds(), limits))
    warm(n, rc)
    s = requests.Session()
    rs = [get(n, session=s) for _ in range(6)]
    assert [r.status_code for r in rs] == [200] * 4 + [429] * 2
    assert rs[-1].headers["X-RL-By"] == "l11"
    for i, x in enumerate(names):
        assert settle(rc, key(x, f"l{i}"), 4) == 4, (i, x)


# ------------------------------------------------------------ approximate

def test_an_approximate_limit_holds_what_was_admitted(nginx_factory, rc):
    """Approximate limits of tenants on every master and of everyone: each
    worker's sync carries keys of several slots; once synced, each key
    holds exactly the requests admitted."""
    n = nginx_factory(conf(rc.seeds(), "infer_ratelimit_limit a "
                           "$http_x_tenant requests=1000/day "
                           "approximate=100ms;"
                           "infer_ratelimit_limit b everyone "
                           "requests=1000/day approximate=100ms;"))
    warm(n, rc)
    tenants = list(tenants_per_master(rc, "ap").values())
    lock = threading.Lock()
    turn = iter(range(10**6))

    def one():
        with lock:
            t = tenants[next(turn) % len(tenants)]
        return t, get(n, t).status_code

    results = parallel(one, 60, threads=8)
    assert {c for _, c in results} == {200}
    for t in tenants:
        want = sum(1 for u, _ in results if u == t)
        assert settle(rc, key(t, "a"), want) == want, t
    assert settle(rc, key("everyone", "b"), 60) == 60


def test_an_approximate_sync_part_that_times_out(nginx_factory, rc):
    """A sync split by slot, one master paused past the timeout: the
    other masters' parts land exactly; the paused one's units are not
    counted twice (a call that got no answer may have been counted)."""
    n = nginx_factory(conf(rc.seeds(), "infer_ratelimit_limit a "
                           "$http_x_tenant requests=1000/day "
                           "approximate=100ms;",
                           opts="timeout=300ms connect_timeout=300ms "
                           "backoff=200ms"))
    warm(n, rc)
    tenants = tenants_per_master(rc, "as")
    sent = {t: 0 for t in tenants.values()}

    def burst():
        codes = each(lambda t: get(n, t).status_code,
                     list(tenants.values()) * 10)
        assert codes == [200] * 30     # each worker's share: 500
        for t in tenants.values():
            sent[t] += 10

    burst()
    for t in tenants.values():
        assert settle(rc, key(t, "a"), sent[t]) == sent[t]
    paused = rc.masters()[0]
    paused.client().execute_command("CLIENT", "PAUSE", 1000, "ALL")
    burst()
    time.sleep(1.5)
    for port, t in tenants.items():
        if port == paused.port:
            assert 10 <= rc.count(key(t, "a")) <= sent[t]
        else:
            assert settle(rc, key(t, "a"), sent[t]) == sent[t], t
    # and after: counted again
    burst()
    for port, t in tenants.items():
        if port != paused.port:
            assert settle(rc, key(t, "a"), sent[t]) == sent[t], t


@pytest.mark.parametrize("kind", ["tokens", "approximate"])
def test_corrections_and_syncs_follow_a_moving_slot(nginx_factory, rc,
                                                    sim_factory, kind):
    """Token corrections (coalesced for 200 ms) and approximate syncs
    (every 200 ms) of a tenant whose slot is resharded meanwhile: sent
    while the slot is half moved (ASK), after its key went, and after the
    move (MOVED), each lands once: the day's key ends holding exactly
    what the answers used (tokens) or what was admitted (requests)."""
    sim = sim_factory("llama-3-8b", "llama-a", ttft_ms=0, tpot_ms=0)
    if kind == "tokens":
        limit = "infer_ratelimit_limit d $http_x_tenant tokens=100000000/day;"
        opts = "timeout=2s coalesce=200ms"
    else:
        limit = ("infer_ratelimit_limit d $http_x_tenant requests=100000/day"
                 " approximate=200ms;")
        opts = "timeout=2s"
    n = nginx_factory(proxy_conf(rc.seeds(), sim, limit, opts=opts))
    warm(n, rc)
    masters = rc.masters()
    src, dst = masters[0], masters[1]
    t = tenant_on(rc, src.port, "mc")
    slot = key_slot(t)
    total = 0

    def some(k):
        nonlocal total
        for i in range(k):
            r = chat(n, max_tokens=100, completion=3 + i,
                     headers={"X-Tenant": t})
            assert r.status_code == 200
            assert r.headers["X-RL-Status"] == "passed"
            total += r.json()["usage"]["total_tokens"] \
                if kind == "tokens" else 1

    some(3)
    assert settle(rc, key(t, "d"), total) == total
    rc.reset_stats()
    # each phase lasts past the interval, so that a call of corrections
    # or a sync is sent in each
    rc.begin_move(slot, dst.port)
    some(3)                          # the key still on src
    time.sleep(0.3)
    rc.migrate_keys(slot, src, dst)
    some(3)                          # the key on dst: ASK
    time.sleep(0.3)
    rc.finish_move(slot, dst.port)
    some(3)                          # MOVED
    time.sleep(0.3)
    assert rc.node_for_slot(slot) is dst
    assert rc.errors("ASK")[src.port] >= 1
    assert settle(rc, key(t, "d"), total) == total
    time.sleep(0.5)
    assert rc.count(key(t, "d")) == total


# ------------------------------------------------------------ events

def test_usage_events_go_to_the_streams_master(nginx_factory, rc):
    """Every event, admitted or refused, is in the stream, on the master
    of the stream key's slot; the limits count on the others meanwhile."""
    stream = "infer:usage"
    owner = rc.master_for(stream)
    tenants = [tenant_on(rc, m.port, "ev") for m in rc.masters()
               if m is not owner]
    n = nginx_factory(conf(
        rc.seeds(), "infer_ratelimit_limit req $http_x_tenant "
        "requests=8/day;",
        extra=f"infer_usage_events_stream {stream} flush=20ms;",
        locations="""
        location /ev {
            infer_usage_events on;
            rewrite ^ /ok.txt break;
        }"""))
    warm(n, rc)
    codes = []
    for t in tenants:
        codes += parallel(lambda: get(n, t, "/ev").status_code, 10)
    assert sorted(codes) == [200] * 16 + [429] * 4
    c = owner.client()
    deadline = time.monotonic() + 5
    while c.xlen(stream) < 20 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    assert c.xlen(stream) == 20
    events = [f for _, f in c.xrange(stream)]
    assert sorted(e["status"] for e in events) == ["200"] * 16 + ["429"] * 4
    for t in tenants:
        assert rc.count(key(t)) == 8


def test_a_standalone_gateway_pointed_at_a_cluster_node(nginx_factory, rc):
    """infer_ratelimit_redis with one cluster node's address, not
    cluster:, and usage events whose stream is another master's: the XADDs
    are answered MOVED, counted as failed, and no worker crashes (found by
    review: the MOVED was followed into the cluster's table, which a
    standalone configuration does not have)."""
    stream = "infer:usage"
    other = [m for m in rc.masters() if m is not rc.master_for(stream)][0]
    n = nginx_factory(f"""
    infer_ratelimit_redis {other.addr} timeout=1s;
    infer_usage_events_stream {stream} flush=20ms;
    server {{
        listen 127.0.0.1:{{port}};
        location / {{ infer_usage_events on; }}
    }}""")
    for _ in range(5):
        assert get(n).status_code == 200
        time.sleep(0.05)
    deadline = time.monotonic() + 5
    while "XADD" not in n.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "MOVED" in n.log_text()
    assert get(n).status_code == 200


# ------------------------------------------------------------ readiness

def test_redis_up_once_every_master_is_connected(nginx_factory, rc):
    """$infer_ratelimit_redis_up for a readiness probe: 0 until the slot
    map is known and every master connected (asking starts it), then 1,
    from one seed; when it first says 1, the worker has a connection to
    every master (the kernel says so); always 0 with a seed that never
    answers."""
    def probe(seeds, seconds=3):
        n = nginx_factory(f"""
        infer_ratelimit_redis cluster:{",".join(seeds)} timeout=200ms
                              connect_timeout=200ms;
        server {{
            listen 127.0.0.1:{{port}};
            location / {{
                try_files /ok.txt =404;
                add_header X-Redis-Up $infer_ratelimit_redis_up always;
            }}
        }}""", modules=["ratelimit"], workers=1)
        seen, connected = [], None
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and seen[-3:] != ["1"] * 3:
            seen.append(requests.get(n.url + "/", timeout=5)
                        .headers["X-Redis-Up"])
            if seen[-1] == "1" and connected is None:
                connected = connected_ports(n.worker_pids()[0])
            time.sleep(0.02)
        n.stop()
        return seen, connected

    up, connected = probe(rc.seeds()[:1])
    assert up[-3:] == ["1"] * 3, up
    # 0s, then 1s: no flapping
    ones = "".join(up).lstrip("0")
    assert ones == "1" * len(ones), up
    masters = {m.port for m in rc.masters()}
    assert masters <= connected, (masters, connected)
    hole = Blackhole()
    try:
        up, _ = probe([f"127.0.0.1:{hole.port}"], seconds=1.5)
        assert set(up) == {"0"}, up
    finally:
        hole.close()
