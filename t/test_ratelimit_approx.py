"""Approximate limits (infer_ratelimit_limit ... approximate[=time]): each
worker admits from what Redis said was left at its last sync and sends
what it used every interval, in one call for all its keys.

Counted: Redis calls per request; what all workers admit against the
limit (the stated bound: at most what was left times the workers); that
Redis is charged everything admitted (a calendar-day key is a plain count,
so it is an equality); tokens reconciled with the real usage; exact and
approximate limits on one request; Redis stopped; nginx -t."""

import datetime
import time

import pytest
import requests

from harness.openai import chat
from test_ratelimit import parallel
from test_ratelimit_redis import evalsha_calls


def conf(redis, limits, extra=""):
    return f"""
    infer_ratelimit_redis {redis.addr} timeout=300ms;
    {extra}
    server {{
        listen 127.0.0.1:{{port}};
        infer_ratelimit on;
        {limits}
        location / {{
            add_header X-RL-Status $infer_ratelimit_status always;
            add_header X-RL-Requests $infer_ratelimit_remaining_requests
                       always;
        }}
    }}"""


def day():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")


def get(n, session=None, **kw):
    return (session or requests).get(n.url + "/ok.txt", timeout=5, **kw)


def settle(c, key, want=None, seconds=3):
    """The key's count once the workers' syncs landed (bounded wait)."""
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        v = c.get(key)
        if v is not None and v == last and (want is None or int(v) == want):
            return int(v)
        last = v
        time.sleep(0.25)
    return int(c.get(key) or 0)


def test_few_redis_calls(nginx_factory, redis):
    n = nginx_factory(conf(redis, "infer_ratelimit_limit a $http_x_key "
                           "requests=1000000/h approximate=200ms;"))
    c = redis.client()
    get(n)
    time.sleep(0.5)
    c.config_resetstat()
    t0 = time.monotonic()
    codes = parallel(lambda: get(n, headers={"X-Key": "k"}).status_code,
                     600)
    took = time.monotonic() - t0
    time.sleep(0.5)
    assert codes == [200] * 600
    calls = evalsha_calls(c)
    # one sync per worker and interval at most, whatever the traffic
    assert calls <= 2 * ((took + 0.5) / 0.2 + 2), (calls, took)
    assert calls / 600 < 0.1


def test_over_admission_is_bounded_and_redis_is_charged_all(nginx_factory,
                                                            redis):
    """Bursts of 60 requests, a sync interval apart, on a limit of 50: each
    of the 2 workers admits its share of what was left at its last sync
    (half, rounded up), and one request more when it admitted none since.
    The stated bound: past the limit by at most one share of the whole
    limit and one request per worker (50 + 2 * 26); Redis is charged every
    admitted request; and once synced the limit holds."""
    n = nginx_factory(conf(redis, "infer_ratelimit_limit a global "
                           "requests=50/day approximate=200ms;"))
    c = redis.client()
    codes = []
    for _ in range(6):
        codes += parallel(lambda: get(n).status_code, 60, threads=16)
        time.sleep(0.3)
    admitted = codes.count(200)
    assert 40 <= admitted <= 50 + 2 * (25 + 1), admitted
    assert codes.count(429) == 360 - admitted
    assert settle(c, f"infer:rl:{{global}}:a:{day()}", admitted) == admitted
    # once synced, no worker admits more than one more request
    time.sleep(0.5)
    assert parallel(lambda: get(n).status_code, 20).count(200) <= 2


def test_tokens_reconciled_locally_then_synced(nginx_factory, redis,
                                               sim_factory):
    sim = sim_factory("llama-3-8b", "a", ttft_ms=0, tpot_ms=0)
    n = nginx_factory(f"""
    infer_ratelimit_redis {redis.addr} timeout=300ms;
    upstream pool {{ server {sim.addr}; keepalive 8; }}
    infer_model llama-3-8b upstream=pool;
    server {{
        listen 127.0.0.1:{{port}};
        location / {{
            infer_route on;
            infer_ratelimit on;
            infer_ratelimit_limit tpd $http_x_tenant tokens=100000000/day
                                  approximate=100ms;
            proxy_pass http://$infer_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}""")
    c = redis.client()
    s = requests.Session()
    total = 0
    for i in range(20):
        r = chat(n, session=s, max_tokens=500, completion=3 + i,
                 headers={"X-Tenant": "acme"})
        assert r.status_code == 200
        total += r.json()["usage"]["total_tokens"]
    assert settle(c, f"infer:rl:{{acme}}:tpd:{day()}", total) == total


def test_an_exact_refusal_takes_back_the_approximate_charge(nginx_factory,
                                                           redis):
    n = nginx_factory(conf(redis,
                           "infer_ratelimit_limit exact global "
                           "requests=5/day;"
                           "infer_ratelimit_limit approx global "
                           "requests=1000/day approximate=100ms;"))
    c = redis.client()
    s = requests.Session()
    codes = [get(n, s).status_code for _ in range(12)]
    assert codes == [200] * 5 + [429] * 7
    assert settle(c, f"infer:rl:{{global}}:approx:{day()}", 5) == 5
    assert int(c.get(f"infer:rl:{{global}}:exact:{day()}")) == 5


def test_redis_stopped_goes_on_from_what_was_known(nginx_factory,
                                                   own_redis):
    rs = own_redis()
    n = nginx_factory(conf(rs, "infer_ratelimit_limit a global "
                           "requests=1000/day approximate=100ms;"))
    s = requests.Session()
    for _ in range(10):
        assert get(n, s).status_code == 200
    time.sleep(0.3)
    rs.stop()
    t0 = time.monotonic()
    for _ in range(50):
        r = get(n, s)
        assert r.status_code == 200
        assert r.headers["X-RL-Status"] == "passed"
    assert time.monotonic() - t0 < 10
    n.forget_log()


@pytest.mark.parametrize("limits, redis_line, message", [
    ("infer_ratelimit_limit a k requests=5/s approximate;",
     "infer_ratelimit_zone rl:1m;", "needs infer_ratelimit_redis"),
    ("infer_ratelimit_limit a k concurrency=5 approximate;", None,
     "cannot be approximate"),
    ("infer_ratelimit_limit a k requests=5/s approximate=1ms;", None,
     "a sync interval"),
])
def test_nginx_t_names_approximate_mistakes(nginx_factory, redis, limits,
                                            redis_line, message):
    line = redis_line or f"infer_ratelimit_redis {redis.addr};"
    n = nginx_factory(f"""
        {line}
        server {{ listen 127.0.0.1:{{port}}; infer_ratelimit on; {limits}
                  location / {{ }} }}""", start=False)
    ok, out = n.check_config()
    assert not ok
    assert message in out, out


def test_a_quitting_worker_syncs_what_it_used(nginx_factory, redis):
    """A sync interval of 5 s, and a reload after 10 requests: the old
    workers send what they admitted before they exit."""
    n = nginx_factory(conf(redis, "infer_ratelimit_limit a global "
                           "requests=1000/day approximate=5s;"))
    c = redis.client()
    s = requests.Session()
    for _ in range(10):
        assert get(n, s).status_code == 200
    s.close()
    n.reload()
    assert settle(c, f"infer:rl:{{global}}:a:{day()}", 10) == 10


def test_shadow_mode_charges_and_asks_the_exact_limits(nginx_factory,
                                                       redis):
    """In shadow mode an approximate refusal is only reported: the request
    goes on, it is charged, and its exact limits are still counted."""
    n = nginx_factory(conf(redis,
                           "infer_ratelimit_shadow on;"
                           "infer_ratelimit_limit exact global "
                           "requests=1000/day;"
                           "infer_ratelimit_limit approx global "
                           "requests=3/day approximate=100ms;"))
    c = redis.client()
    s = requests.Session()
    statuses = [get(n, s).headers["X-RL-Status"] for _ in range(8)]
    # this worker's share of 3 over 2 workers is 2 before the first sync
    assert statuses[:2] == ["passed"] * 2
    assert set(statuses[3:]) == {"shadow"}
    assert settle(c, f"infer:rl:{{global}}:approx:{day()}", 8) == 8
    assert int(c.get(f"infer:rl:{{global}}:exact:{day()}")) == 8
