"""ngx_infer_ratelimit with Redis: one budget for every gateway replica.

Exact limits across workers and across two nginx instances sharing one
Redis; one EVALSHA per admission and at most one per reconciliation; token
reconciliation through Redis; each outage policy with Redis killed
mid-run; a Redis that accepts connections and never answers; Redis
restarted and its scripts flushed; a client gone while its reply is
pending; AUTH, db and a unix socket.  redis-py inspects Redis."""

import datetime
import socket
import threading
import time

import pytest
import requests

from harness.nginx import has_debug
from harness.openai import chat, error_of
from test_ratelimit import STATUS_HEADERS, parallel, stream_usage, streamed


def conf(redis_addr, limits, redis_opts="timeout=2s", extra="",
         zone="infer_ratelimit_zone rl:1m;"):
    return f"""
    {zone}
    infer_ratelimit_redis {redis_addr} {redis_opts};
    server {{
        listen 127.0.0.1:{{port}};
        infer_ratelimit on;
        {limits}
        {extra}
        location / {{ {STATUS_HEADERS} }}
        location /free {{
            infer_ratelimit off;
            rewrite ^ /ok.txt break;
            add_header X-RL-Degraded $infer_ratelimit_degraded_total;
        }}
    }}"""


def get(n, path="/ok.txt", **kw):
    return requests.get(n.url + path, timeout=10, **kw)


def evalsha_calls(client):
    stats = client.info("commandstats")
    return sum(v["calls"] for k, v in stats.items()
               if k in ("cmdstat_evalsha", "cmdstat_eval"))


def test_exact_across_two_workers(nginx_factory, redis):
    n = nginx_factory(conf(redis.addr,
                           "infer_ratelimit_limit all global requests=30/h;"))
    codes = parallel(lambda: get(n).status_code, 70)
    assert sorted(codes) == [200] * 30 + [429] * 40
    c = redis.client()
    assert c.exists("infer:rl:{global}:all")
    assert 0 < c.pttl("infer:rl:{global}:all") <= 3600 * 1000


def test_exact_across_two_instances_sharing_redis(nginx_factory, redis):
    limits = ("infer_ratelimit_limit tenant $http_x_tenant requests=20/h;"
              "infer_ratelimit_limit all global requests=1000/h;")
    a = nginx_factory(conf(redis.addr, limits), name="a")
    b = nginx_factory(conf(redis.addr, limits), name="b")
    turn = iter(range(10**6))
    lock = threading.Lock()

    def one():
        with lock:
            gw = (a, b)[next(turn) % 2]
        return get(gw, headers={"X-Tenant": "acme"}).status_code

    codes = parallel(one, 50)
    assert sorted(codes) == [200] * 20 + [429] * 30
    # refused requests were charged nowhere: the wide limit counted 20
    r = get(a, headers={"X-Tenant": "globex"})
    assert r.status_code == 200
    assert r.headers["x-ratelimit-remaining-requests"] == "19"   # globex's
    c = redis.client()
    assert sorted(c.keys("infer:rl:*")) == [
        "infer:rl:{acme}:tenant", "infer:rl:{global}:all",
        "infer:rl:{globex}:tenant"]


def test_one_round_trip_per_admission(nginx_factory, redis):
    n = nginx_factory(conf(redis.addr,
                           "infer_ratelimit_limit a k1 requests=100/h;"
                           "infer_ratelimit_limit b k2 requests=100/h;"
                           "infer_ratelimit_limit c k3 requests=100/h;"))
    c = redis.client()
    get(n)   # connects and loads the script in both workers' pipelines
    before = evalsha_calls(c)
    for _ in range(10):
        assert get(n).status_code == 200
    assert evalsha_calls(c) - before == 10
    assert "cmdstat_eval" not in c.info("commandstats")


def proxy_conf(redis_addr, sim, limits):
    return f"""
    infer_ratelimit_redis {redis_addr} timeout=2s;
    upstream llama {{ server {sim.addr}; keepalive 8; }}
    infer_model llama-3-8b upstream=llama;
    server {{
        listen 127.0.0.1:{{port}};
        infer_route on;
        infer_ratelimit on;
        {limits}
        location / {{
            proxy_pass http://$infer_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            add_header X-Estimate $infer_prompt_tokens_estimate always;
            {STATUS_HEADERS}
        }}
    }}"""


@pytest.fixture
def sim(sim_factory):
    return sim_factory("llama-3-8b", "llama-a", ttft_ms=0, tpot_ms=0)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_tokens_reconciled_through_redis(nginx_factory, redis, sim, stream):
    n = nginx_factory(proxy_conf(
        redis.addr, sim, "infer_ratelimit_limit tpd global tokens=10000/d;"))
    c = redis.client()
    c.config_resetstat()
    s = requests.Session()
    r1 = chat(n, session=s, max_tokens=100, completion=7,
              **streamed(stream))
    assert r1.status_code == 200
    est1 = int(r1.headers["X-Estimate"]) + 100
    assert r1.headers["x-ratelimit-remaining-tokens"] == str(10000 - est1)
    used1 = (stream_usage(r1) if stream else r1.json()["usage"])["total_tokens"]

    # the reconciliation is sent after the answer: wait for it (bounded)
    deadline = time.monotonic() + 5
    while evalsha_calls(c) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert evalsha_calls(c) == 2   # one admission, one reconciliation

    r2 = chat(n, session=s, max_tokens=50, completion=3,
              **streamed(stream))
    est2 = int(r2.headers["X-Estimate"]) + 50
    assert r2.headers["x-ratelimit-remaining-tokens"] == \
        str(10000 - used1 - est2)
    assert r2.headers["X-RL-Status"] == "passed"


def test_tokens_limit_refuses_in_the_envelope(nginx_factory, redis, sim):
    n = nginx_factory(proxy_conf(
        redis.addr, sim, "infer_ratelimit_limit tpd global tokens=500/d;"))
    s = requests.Session()
    r = chat(n, session=s, max_tokens=300, completion=300)
    assert r.status_code == 200
    r = chat(n, session=s, max_tokens=300, completion=1)
    assert r.status_code == 429
    e = error_of(r)
    assert e["type"] == "tokens" and e["code"] == "rate_limit_exceeded"
    assert int(r.headers["Retry-After"]) >= 1


# ------------------------------------------------------------ outages

@pytest.mark.parametrize("policy, status, code", [
    ("fail_open", "degraded", 200),
    ("fail_closed", "degraded", 429),
])
def test_outage_policy_with_redis_killed(nginx_factory, own_redis, policy,
                                         status, code):
    rs = own_redis()
    n = nginx_factory(conf(
        rs.addr, f"infer_ratelimit_limit l global requests=100/h "
                 f"on_error={policy};", redis_opts="timeout=200ms"))
    r = get(n)
    assert r.status_code == 200 and r.headers["X-RL-Status"] == "passed"
    rs.stop()
    for _ in range(6):
        r = get(n)
        assert r.status_code == code
        assert r.headers["X-RL-Status"] == status
        assert "x-ratelimit-remaining-requests" not in r.headers
    if code == 429:
        e = error_of(r)
        assert e["code"] == "rate_limit_exceeded"
        assert r.headers["Retry-After"] == "1"
    # counted, for both workers: the six degraded decisions so far
    assert get(n, "/free").headers["X-RL-Degraded"] == "6"
    # throttled: a handful of lines for the outage, not one per request
    lines = [l for l in n.log_text().splitlines()
             if "infer ratelimit: redis" in l]
    assert 1 <= len(lines) <= 6, lines


def test_redis_killed_under_load_fails_open(nginx_factory, own_redis):
    rs = own_redis()
    n = nginx_factory(conf(
        rs.addr, "infer_ratelimit_limit l global requests=100000/h;",
        redis_opts="timeout=300ms"))
    assert get(n).headers["X-RL-Status"] == "passed"
    killer = threading.Timer(0.3, rs.stop)
    killer.start()
    t0 = time.monotonic()

    def one():
        r = get(n)
        return r.status_code, r.headers["X-RL-Status"]

    results = []
    while time.monotonic() - t0 < 1.5:
        results += parallel(one, 40)
    killer.join()
    assert {c for c, _ in results} == {200}
    statuses = [s for _, s in results]
    assert statuses[-1] == "degraded"
    assert set(statuses) == {"passed", "degraded"}


def test_outage_policy_local_divides_by_the_replicas(nginx_factory,
                                                     own_redis):
    rs = own_redis()
    n = nginx_factory(conf(
        rs.addr, "infer_ratelimit_limit l global requests=9/h on_error=local;",
        redis_opts="timeout=200ms replicas=3"))
    assert get(n).status_code == 200
    rs.stop()
    # the share is 3, of which this gateway used 1 while Redis was up:
    # the outage goes on from there
    rs_codes = [get(n) for _ in range(5)]
    assert [r.status_code for r in rs_codes] == [200, 200, 429, 429, 429]
    assert {r.headers["X-RL-Status"] for r in rs_codes} == {"degraded"}
    assert rs_codes[0].headers["x-ratelimit-limit-requests"] == "3"
    assert error_of(rs_codes[-1])["code"] == "rate_limit_exceeded"


def test_policies_per_limit(nginx_factory, own_redis):
    rs = own_redis()
    n = nginx_factory(conf(
        rs.addr, "infer_ratelimit_limit open global requests=9/h;"
                 "infer_ratelimit_limit loc global2 requests=2/h "
                 "on_error=local;", redis_opts="timeout=200ms"))
    rs.stop()
    codes = [get(n).status_code for _ in range(3)]
    assert codes == [200, 200, 429]


def test_a_local_policy_needs_a_zone(nginx_factory):
    n = nginx_factory(conf("127.0.0.1:1",
                           "infer_ratelimit_limit l k requests=1/s "
                           "on_error=local;", zone=""), start=False)
    ok, out = n.check_config()
    assert not ok and "needs an infer_ratelimit_zone" in out, out
    n = nginx_factory(conf("127.0.0.1:1",
                           "infer_ratelimit_limit l k requests=1/s;",
                           zone=""), start=False)
    ok, out = n.check_config()
    assert ok, out


class Blackhole:
    """A loopback listener that accepts connections and never answers;
    given an answer, a fake Redis that answers whatever a connection
    sends with those bytes, once per read.  Bounded in time."""

    def __init__(self, answer=None):
        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self.stopped = False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        self.sock.settimeout(0.2)
        deadline = time.monotonic() + 120
        while not self.stopped and time.monotonic() < deadline:
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            self.conns.append(c)
            if self.answer is not None:
                threading.Thread(target=self.serve, args=(c,),
                                 daemon=True).start()

    def serve(self, c):
        c.settimeout(0.2)
        deadline = time.monotonic() + 120
        while not self.stopped and time.monotonic() < deadline:
            try:
                if not c.recv(65536):
                    return
                c.sendall(self.answer)
            except socket.timeout:
                continue
            except OSError:
                return

    def close(self):
        self.stopped = True
        self.t.join(2)
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.fixture
def blackhole():
    b = Blackhole()
    yield b
    b.close()


def test_a_redis_that_never_answers(nginx_factory, blackhole):
    n = nginx_factory(conf(
        f"127.0.0.1:{blackhole.port}",
        "infer_ratelimit_limit l global requests=100/h;",
        redis_opts="timeout=100ms connect_timeout=100ms backoff=300ms"))

    def timed():
        t0 = time.monotonic()
        r = get(n)
        return r.status_code, r.headers["X-RL-Status"], time.monotonic() - t0

    results = parallel(timed, 40)
    assert {(c, s) for c, s, _ in results} == {(200, "degraded")}
    # each within the call's timeout, plus a generous margin for a busy
    # machine: nothing waits for the silent Redis longer than that
    assert max(t for _, _, t in results) < 1.5
    # and the workers are free meanwhile
    assert get(n, "/free").status_code == 200
    assert len(blackhole.conns) >= 1


def vm_peak_kb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmPeak:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmPeak for {pid}")


@pytest.mark.parametrize("answer", [
    b"*2147483647\r\n",                     # hiredis 0.14: 2^31 pointers
    b"*100000000\r\n",                      # 800 MB of them
    b"*4\r\n" + b"*1000000\r\n" * 7,        # nested, 8 MB each
], ids=["2^31-1", "10^8", "nested"])
def test_a_huge_array_from_redis_is_refused(nginx_factory, answer):
    """A Redis (or whatever answers on its address) that sends an array
    header hiredis would allocate for at once: the connection is refused
    with it, the worker stays up and no bigger, and the outage policy
    decides."""
    fake = Blackhole(answer)
    try:
        n = nginx_factory(conf(
            f"127.0.0.1:{fake.port}",
            "infer_ratelimit_limit l global requests=100/h "
            "on_error=fail_closed;",
            redis_opts="timeout=500ms connect_timeout=500ms backoff=200ms"))
        pids = sorted(n.worker_pids())
        peak = {pid: vm_peak_kb(pid) for pid in pids}
        for _ in range(10):
            r = get(n)
            assert r.status_code == 429, r.status_code
            assert r.headers["X-RL-Status"] == "degraded"
            assert error_of(r)["code"] == "rate_limit_exceeded"
            time.sleep(0.1)
        assert sorted(n.worker_pids()) == pids
        for pid in pids:
            grown = vm_peak_kb(pid) - peak[pid]
            assert grown < 64 * 1024, (pid, grown)
        assert "an array nested or longer than our scripts answer" \
            in n.log_text()
        assert "[alert]" not in n.log_text()
    finally:
        fake.close()


def test_redis_restarted_reconnects_and_reloads_the_script(nginx_factory,
                                                           own_redis):
    rs = own_redis()
    n = nginx_factory(conf(rs.addr,
                           "infer_ratelimit_limit l global requests=100/h;",
                           redis_opts="timeout=500ms backoff=200ms"))
    assert get(n).headers["X-RL-Status"] == "passed"
    port = rs.port
    rs.stop()
    assert get(n).headers["X-RL-Status"] == "degraded"
    n.reload()                     # the count of degraded decisions stays
    assert get(n, "/free").headers["X-RL-Degraded"] == "1"
    rs2 = own_redis(port=port)     # empty: no script, no keys
    deadline = time.monotonic() + 8
    statuses = []
    while time.monotonic() < deadline:
        statuses.append(get(n).headers["X-RL-Status"])
        if statuses[-2:] == ["passed", "passed"]:
            break
        time.sleep(0.05)
    assert statuses[-2:] == ["passed", "passed"], statuses
    assert rs2.client().exists("infer:rl:{global}:l")


def test_script_flushed_is_reloaded_with_no_degraded_answer(nginx_factory,
                                                            redis):
    n = nginx_factory(conf(redis.addr,
                           "infer_ratelimit_limit l global requests=100/h;"))
    for _ in range(4):
        assert get(n).headers["X-RL-Status"] == "passed"
    redis.client().script_flush()
    for _ in range(4):
        r = get(n)
        assert r.headers["X-RL-Status"] == "passed"
    assert r.headers["x-ratelimit-remaining-requests"] == "92"


def test_a_client_gone_while_its_reply_is_pending(nginx_factory, redis):
    n = nginx_factory(conf(redis.addr,
                           "infer_ratelimit_limit l global requests=100/h;",
                           redis_opts="timeout=3s"))
    c = redis.client()
    assert get(n).status_code == 200
    c.execute_command("CLIENT", "PAUSE", "700", "ALL")
    socks = []
    for _ in range(6):
        s = socket.create_connection(("127.0.0.1", n.port))
        s.sendall(b"GET /ok.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        socks.append(s)
    time.sleep(0.2)
    for s in socks:
        s.close()               # gone before Redis answers
    time.sleep(0.8)             # the replies come to no one
    r = get(n)
    assert r.status_code == 200 and r.headers["X-RL-Status"] == "passed"
    # Redis admitted the gone requests; their charges were undone
    assert r.headers["x-ratelimit-remaining-requests"] == "98"
    # nginx saw them go while they waited (499), and nothing leaked or
    # crashed when their replies came (the harness checks the error log)
    n.stop()
    assert (n.workdir / "access.log").read_text().count('" 499 ') >= 1


def test_auth_with_user_and_password_and_a_db(nginx_factory, redis):
    c = redis.client()
    c.execute_command("ACL", "SETUSER", "rl", "on", ">s3cret", "~*",
                      "+@all")
    try:
        n = nginx_factory(conf(
            redis.addr, "infer_ratelimit_limit l global requests=5/h;",
            redis_opts="user=rl password=s3cret db=3 timeout=2s"))
        assert get(n).headers["X-RL-Status"] == "passed"
        import redis as redis_py
        c3 = redis_py.Redis(host=redis.host, port=redis.port, db=3,
                            decode_responses=True)
        assert c3.exists("infer:rl:{global}:l")
        assert not c.exists("infer:rl:{global}:l")

        bad = nginx_factory(conf(
            redis.addr, "infer_ratelimit_limit l global requests=5/h;",
            redis_opts="user=rl password=wrong timeout=500ms"), name="bad",
            error_level="debug")
        assert get(bad).headers["X-RL-Status"] == "degraded"
        # at debug level, what our modules logged: never the password
        ours = bad.our_log_lines()
        assert any("[debug]" in l and "infer ratelimit" in l
                   for l in ours) or not has_debug()
        log = "\n".join(ours)
        assert "AUTH failed" in log
        assert "wrong" not in log and "s3cret" not in log
    finally:
        c.execute_command("ACL", "DELUSER", "rl")


def test_a_unix_socket(nginx_factory, own_redis, tmp_path):
    path = tmp_path / "redis.sock"
    rs = own_redis(extra_args=["--unixsocket", str(path),
                               "--unixsocketperm", "777"])
    deadline = time.monotonic() + 5
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    n = nginx_factory(conf(f"unix:{path}",
                           "infer_ratelimit_limit l global requests=2/h;"))
    assert [get(n).status_code for _ in range(3)] == [200, 200, 429]
    assert rs.client().exists("infer:rl:{global}:l")


@pytest.mark.parametrize("opts, message", [
    ("redis.example.com:6379", 'invalid redis address "redis.example.com'),
    ("127.0.0.1:99999", 'invalid redis address "127.0.0.1:99999"'),
    ("127.0.0.1 timeout=0", 'invalid parameter "timeout=0"'),
    ("127.0.0.1 user=u", "has user= without password="),
    ("127.0.0.1 replicas=0", 'invalid parameter "replicas=0"'),
    ("127.0.0.1 color=blue", 'invalid parameter "color=blue"'),
], ids=["address-a-host-name", "port-too-large", "timeout-zero",
        "user-without-password", "replicas-zero", "unknown-parameter"])
def test_nginx_t_names_redis_mistakes(nginx_factory, opts, message):
    n = nginx_factory(conf(opts, "infer_ratelimit_limit l k requests=1/s;"
                           ).replace(" timeout=2s;", ";"), start=False)
    ok, out = n.check_config()
    if message:
        assert not ok and message in out, out


def test_a_connect_that_never_completes_times_out(nginx_factory):
    # a listener that never accepts, its accept queue filled: the kernel
    # drops further SYNs, so a connect hangs until our connect_timeout
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    port = lsock.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    try:
        n = nginx_factory(conf(
            f"127.0.0.1:{port}", "infer_ratelimit_limit l global "
            "requests=100/h on_error=local;",
            redis_opts="timeout=5s connect_timeout=150ms backoff=300ms"))
        t0 = time.monotonic()
        r = get(n)
        elapsed = time.monotonic() - t0
        assert r.status_code == 200
        assert r.headers["X-RL-Status"] == "degraded"
        # bounded by connect_timeout (plus a margin), not by timeout=5s
        assert elapsed < 2.5
        assert r.headers["x-ratelimit-remaining-requests"] == "99"
        n.stop()
        assert "connect timed out" in n.log_text()
    finally:
        for s in fillers:
            s.close()
        lsock.close()


def test_a_concurrency_limit_in_redis(nginx_factory, redis, sim):
    from test_ratelimit import slow_chats
    n = nginx_factory(proxy_conf(
        redis.addr, sim, "infer_ratelimit_limit inflight global "
                         "concurrency=2;"))
    assert sorted(slow_chats(n, 5)) == [200, 200, 429, 429, 429]
    c = redis.client()
    deadline = time.monotonic() + 5
    while c.exists("infer:rl:{global}:inflight") and \
            time.monotonic() < deadline:
        time.sleep(0.01)
    assert not c.exists("infer:rl:{global}:inflight")   # released: 0
    assert sorted(slow_chats(n, 2, ttft_ms=50)) == [200, 200]


def test_a_debt_outlives_an_expired_key(nginx_factory, redis, sim):
    from test_ratelimit import debt_after_a_long_answer
    n = nginx_factory(proxy_conf(
        redis.addr, sim, "infer_ratelimit_limit tps global tokens=1000/s;"))
    assert debt_after_a_long_answer(n) < 750


def test_workers_serve_others_while_calls_wait(nginx_factory, blackhole):
    n = nginx_factory(conf(
        f"127.0.0.1:{blackhole.port}",
        "infer_ratelimit_limit l global requests=100/h;",
        redis_opts="timeout=1500ms"))
    results = []
    t = threading.Thread(target=lambda: results.extend(
        parallel(lambda: get(n).headers["X-RL-Status"], 8, threads=8)))
    t.start()
    time.sleep(0.3)             # 8 requests now wait for the silent Redis
    t0 = time.monotonic()
    for _ in range(4):          # both workers answer meanwhile
        assert get(n, "/free").status_code == 200
    served = time.monotonic() - t0
    t.join(10)
    assert results == ["degraded"] * 8
    # well under the 1.5 s the waiting requests are held: nothing stalled
    assert served < 1.0, served


def test_a_debt_past_the_window_refuses_and_is_not_an_outage(nginx_factory,
                                                             redis, sim):
    """An answer charged a whole window's worth of tokens (its cap) on a
    bucket already half used leaves the key in debt past the window: the
    next request is refused with 0 remaining, by the limit, not let
    through as if Redis had failed (fail_open)."""
    n = nginx_factory(proxy_conf(
        redis.addr, sim, "infer_ratelimit_limit tpm global tokens=1000/m;"))
    s = requests.Session()
    r = chat(n, session=s, max_tokens=10, completion=500)
    assert r.status_code == 200
    r = chat(n, session=s, max_tokens=10, completion=3000)
    assert r.status_code == 200
    r = chat(n, session=s, max_tokens=10, completion=1)
    assert r.status_code == 429, r.headers
    assert r.headers["X-RL-Status"] == "limited"
    assert r.headers["x-ratelimit-remaining-tokens"] == "0"
    n.stop()
    assert "unexpected" not in n.log_text()


def test_a_concurrency_key_keeps_the_expiry_it_was_made_with(nginx_factory,
                                                              redis, sim):
    """A slot lost to an outage is recovered when the key expires: new
    admissions do not push the expiry back."""
    from test_ratelimit import slow_chats
    n = nginx_factory(proxy_conf(
        redis.addr, sim, "infer_ratelimit_limit inflight global "
                         "concurrency=5;"))
    c = redis.client()
    key = "infer:rl:{global}:inflight"
    c.set(key, 1, px=600000)            # a slot whose release was lost
    time.sleep(0.2)
    assert sorted(slow_chats(n, 2, ttft_ms=300)) == [200, 200]
    # the releases are sent in LOG, after the client has its answer
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and int(c.get(key)) != 1:
        time.sleep(0.01)
    assert int(c.get(key)) == 1
    assert c.pttl(key) <= 600000 - 200


def test_redis_up_for_a_readiness_probe(nginx_factory, redis, blackhole):
    """$infer_ratelimit_redis_up: 1 once this worker's connection has done
    its handshake (asking starts one), 0 with a Redis that never answers."""
    def probe(addr):
        n = nginx_factory(f"""
        infer_ratelimit_redis {addr} timeout=200ms connect_timeout=200ms;
        server {{
            listen 127.0.0.1:{{port}};
            location / {{
                try_files /ok.txt =404;
                add_header X-Redis-Up $infer_ratelimit_redis_up always;
            }}
        }}""", modules=["ratelimit"], workers=1)
        seen = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and "1" not in seen:
            seen.append(requests.get(n.url + "/", timeout=5)
                        .headers["X-Redis-Up"])
            time.sleep(0.05)
        n.stop()
        return seen
    up = probe(redis.addr)
    assert up[-1] == "1"
    assert set(probe(f"127.0.0.1:{blackhole.port}")) == {"0"}


def test_a_request_that_can_never_fit_says_so(nginx_factory, redis, sim):
    from test_ratelimit import too_large
    n = nginx_factory(proxy_conf(
        redis.addr, sim, "infer_ratelimit_limit tpm global tokens=100000/m;"))
    s = requests.Session()
    too_large(chat(n, session=s, max_tokens=2147483647, completion=1),
              100000, "minute")
    r = chat(n, session=s, max_tokens=10, completion=1)
    assert r.status_code == 200 and r.headers["X-RL-Status"] == "passed"


def test_a_runaway_usage_charges_at_most_the_limit(nginx_factory, redis):
    from test_ratelimit import (runaway_answer_charges_at_most_the_limit,
                                runaway_conf)
    n = nginx_factory(runaway_conf(
        "infer_ratelimit_limit tpm global tokens=100000/m;", zone="",
        redis=f"infer_ratelimit_redis {redis.addr} timeout=2s;"))
    c = redis.client()
    key = "infer:rl:{global}:tpm"

    def charged_one_window():
        # the reconciliation is sent after the answer: wait for it
        # (bounded); the key then expires when its bucket is full again,
        # within the window
        deadline = time.monotonic() + 5
        while c.pttl(key) < 1000 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert 1000 <= c.pttl(key) <= 60000

    runaway_answer_charges_at_most_the_limit(n, charged_one_window)


# ------------------------------------------- what an outage may give away

def test_an_outage_and_a_restart_give_no_more_than_the_limit(nginx_factory,
                                                             own_redis):
    """One gateway (replicas=1), 300 requests a minute for acme: Redis is
    killed after 2 s, restarted empty on the same port 3 s later, and acme
    sends as fast as it can for 8 s in all.  The stated bound is what the
    limit allows in that time, outage or not: N + N * t / window, i.e.
    300 + 5 a second (with a margin of a few requests for the moments the
    clocks of Redis and the gateway disagree)."""
    rs = own_redis()
    port = rs.port
    n = nginx_factory(conf(
        rs.addr, "infer_ratelimit_limit rpm $http_x_tenant requests=300/m "
                 "on_error=local;",
        redis_opts="timeout=200ms connect_timeout=100ms backoff=200ms"))
    h = {"X-Tenant": "acme"}
    lock = threading.Lock()
    admitted = []          # (seconds since the start, X-RL-Status)
    t0 = time.monotonic()
    duration, cap = 8.0, 20000

    def load():
        s = requests.Session()
        while time.monotonic() - t0 < duration:
            with lock:
                if len(admitted) >= cap:
                    return
            r = s.get(n.url + "/ok.txt", headers=h, timeout=5)
            if r.status_code == 200:
                with lock:
                    admitted.append((time.monotonic() - t0,
                                     r.headers["X-RL-Status"]))
            else:
                assert r.status_code == 429, r.status_code

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    rs.kill()
    time.sleep(3.0)
    rs2 = own_redis(port=port)          # empty: it lost every key
    for t in threads:
        t.join(duration + 10)
    elapsed = time.monotonic() - t0
    bound = 300 + 5 * elapsed + 5
    statuses = [s for _, s in admitted]
    # each phase was exercised: Redis, the outage, the restarted Redis
    assert statuses[0] == "passed"
    assert "degraded" in statuses
    assert any(s == "passed" and at > 5.5 for at, s in admitted), admitted
    assert rs2.client().exists("infer:rl:{acme}:rpm")
    print(f"admitted {len(admitted)} in {elapsed:.1f}s, bound {bound:.0f}")
    assert len(admitted) <= bound, (len(admitted), bound)


def test_a_local_policy_keeps_redis_exact_while_it_is_up(nginx_factory,
                                                         redis, sim):
    """on_error=local keeps this gateway's own use in the zone, refunds
    included: while Redis is up that changes nothing Redis decides."""
    n = nginx_factory("infer_ratelimit_zone rl:1m;" + proxy_conf(
        redis.addr, sim, "infer_ratelimit_limit tpd global tokens=10000/d "
                         "on_error=local;"))
    c = redis.client()
    s = requests.Session()
    used = 0
    for max_tokens, completion in ((100, 7), (50, 3), (200, 1)):
        before = evalsha_calls(c)
        r = chat(n, session=s, max_tokens=max_tokens, completion=completion)
        assert r.status_code == 200 and r.headers["X-RL-Status"] == "passed"
        est = int(r.headers["X-Estimate"]) + max_tokens
        assert r.headers["x-ratelimit-remaining-tokens"] == \
            str(10000 - used - est)
        used += r.json()["usage"]["total_tokens"]
        deadline = time.monotonic() + 5       # the reconciliation landed
        while evalsha_calls(c) < before + 2 and time.monotonic() < deadline:
            time.sleep(0.01)


# ------------------------------------------------------------ coalescing

# 30 days of a million tokens: 2.592 s of TAT per token, so a key's
# tokens barely decay while a test reads them
EM = 30 * 86400 * 1_000_000 / 1_000_000


def tokens_gateway(nginx_factory, redis, sim, coalesce):
    """A tokens limit per X-Tenant, in Redis, with coalesce= as given."""
    return nginx_factory(proxy_conf(
        redis.addr, sim, "infer_ratelimit_limit tpd $http_x_tenant "
        "tokens=1000000/30d;").replace("timeout=2s;",
                                       f"timeout=2s coalesce={coalesce};"))


def tokens_held(c, tenant):
    return tokens_in_redis(c, f"infer:rl:{{{tenant}}}:tpd") / EM


def tokens_in_redis(c, key):
    """A GCRA key's tokens used now: (TAT - now) / emission interval."""
    tat = int(c.get(key) or 0)
    sec, usec = c.time()
    now = sec * 1_000_000 + usec
    return max(0, tat - now)


def test_corrections_are_coalesced_into_few_calls(nginx_factory, redis,
                                                  sim):
    """40 requests of 40 tenants: 40 admissions, and their 40 corrections
    in a few calls (one per worker and coalesce= interval), not 40; every
    correction lands."""
    n = tokens_gateway(nginx_factory, redis, sim, "200ms")
    c = redis.client()
    s = requests.Session()
    chat(n, session=s, headers={"X-Tenant": "warm"})    # connects
    time.sleep(0.5)
    c.config_resetstat()
    est = {}
    for i in range(40):
        r = chat(n, session=s, max_tokens=100, completion=5,
                 headers={"X-Tenant": f"t{i}"})
        assert r.status_code == 200
        est[f"t{i}"] = r.json()["usage"]["total_tokens"]
    time.sleep(0.6)
    calls = evalsha_calls(c)
    assert 40 + 1 <= calls <= 40 + 2 * 4, calls
    # each key holds the real usage (2.592 s of TAT per token)
    for t, used in est.items():
        held = tokens_held(c, t)
        assert abs(held - used) < 2, (t, held, used)


def test_coalesce_off_sends_each_correction(nginx_factory, redis, sim):
    n = tokens_gateway(nginx_factory, redis, sim, "off")
    c = redis.client()
    s = requests.Session()
    chat(n, session=s, headers={"X-Tenant": "warm"})
    time.sleep(0.2)
    c.config_resetstat()
    for i in range(10):
        chat(n, session=s, max_tokens=100, completion=5,
             headers={"X-Tenant": f"t{i}"})
    deadline = time.monotonic() + 5
    while evalsha_calls(c) < 20 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert evalsha_calls(c) == 20


def test_a_quitting_worker_sends_its_pending_corrections(nginx_factory,
                                                         redis, sim):
    n = tokens_gateway(nginx_factory, redis, sim, "1s")
    c = redis.client()
    s = requests.Session()
    used = {}
    for i in range(6):
        r = chat(n, session=s, max_tokens=1000, completion=5,
                 headers={"X-Tenant": f"q{i}"})
        used[f"q{i}"] = r.json()["usage"]["total_tokens"]
    s.close()
    n.reload()
    for t, u in used.items():
        held = tokens_held(c, t)
        assert abs(held - u) < 2, (t, held, u)


def test_a_busy_keys_corrections_ride_with_its_admissions(nginx_factory,
                                                          redis, sim):
    """One tenant's requests back to back: each correction rides with the
    next admission of the key, so 30 requests cost 30 calls and one for
    the last correction (per worker), and the key holds every answer's
    real usage."""
    n = tokens_gateway(nginx_factory, redis, sim, "200ms")
    c = redis.client()
    s = requests.Session()
    chat(n, session=s, headers={"X-Tenant": "warm"})
    time.sleep(0.5)
    c.config_resetstat()
    total = 0
    for _ in range(30):
        r = chat(n, session=s, max_tokens=1000, completion=5,
                 headers={"X-Tenant": "busy"})
        assert r.status_code == 200
        total += r.json()["usage"]["total_tokens"]
    time.sleep(0.6)
    assert 31 <= evalsha_calls(c) <= 32
    held = tokens_held(c, "busy")
    assert abs(held - total) < 2, (held, total)


def paused_burst(n, c, tenants):
    """A request for each of tenants (X-Tenant), all sent while Redis is
    paused for 1 s, so that they pile up: (tenant, status, X-RL-Status)
    of each."""
    tenants = list(tenants)
    lock = threading.Lock()
    c.execute_command("CLIENT", "PAUSE", "1000", "ALL")

    def one():
        with lock:
            t = tenants.pop()
        r = get(n, headers={"X-Tenant": t})
        return t, r.status_code, r.headers.get("X-RL-Status")

    return parallel(one, len(tenants), threads=len(tenants))


@pytest.mark.parametrize("batch", ["16", "off"])
def test_admissions_in_flight_make_the_next_wait_and_go_together(
        nginx_factory, redis, batch):
    """While a worker's admission is in flight, the next ones wait and go
    in one call when it is back (batch=16), or go each alone (off).
    Redis is paused so that they pile up: 80 requests of 10 tenants, each
    request checked by two keys, all-or-nothing one after the other as
    separate calls would be: exactly 5 per tenant pass, and the wide
    limit counted only those."""
    n = nginx_factory(conf(
        redis.addr,
        "infer_ratelimit_limit tenant $http_x_tenant requests=5/day;"
        "infer_ratelimit_limit all global requests=1000/day;",
        redis_opts=f"timeout=3s batch={batch}"))
    c = redis.client()
    parallel(lambda: get(n, headers={"X-Tenant": "warm"}), 8, threads=8)
    c.config_resetstat()
    tenants = [f"t{i}" for i in range(10)] * 8
    got = paused_burst(n, c, tenants)
    assert len(got) == 80
    assert all(s in (200, 429) for _, s, _ in got), got
    for t in set(tenants):
        assert sum(1 for x, s, _ in got if x == t and s == 200) == 5, t
    day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    for i in range(10):
        assert c.get(f"infer:rl:{{t{i}}}:tenant:{day}") == "5"
    assert c.get(f"infer:rl:{{global}}:all:{day}") == str(50 + 5)   # and warm's 5
    calls = evalsha_calls(c)
    if batch == "off":
        assert calls == 80
    else:
        # two workers: the first of each alone, the rest in batches of 16
        assert calls <= 16, calls


def test_a_batched_admission_that_fails_fails_alone(nginx_factory, redis):
    """One tenant's key is a hash (someone else wrote it): the script
    fails for that tenant's admissions only, which the outage policy
    decides (fail_closed: 429, degraded); the other requests batched with
    them are admitted and counted exactly, as separate calls would be."""
    n = nginx_factory(conf(
        redis.addr,
        "infer_ratelimit_limit tenant $http_x_tenant requests=100/day "
        "on_error=fail_closed;",
        redis_opts="timeout=3s batch=16"))
    c = redis.client()
    day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    c.hset(f"infer:rl:{{bad}}:tenant:{day}", "x", "1")
    parallel(lambda: get(n, headers={"X-Tenant": "warm"}), 8, threads=8)
    got = paused_burst(n, c, ["bad", "g1", "g2", "g3"] * 10)
    for t, status, rl in got:
        if t == "bad":
            assert (status, rl) == (429, "degraded"), (t, status, rl)
        else:
            assert (status, rl) == (200, "passed"), (t, status, rl)
    for t in ("g1", "g2", "g3"):
        assert c.get(f"infer:rl:{{{t}}}:tenant:{day}") == "10"
    assert "the script failed for one admission of a batch" in n.log_text()
