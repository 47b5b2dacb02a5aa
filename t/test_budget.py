"""Spend budgets: prices per model in the registry (infer_model and the
registry file), $infer_cost, and the budget= limit kind, reserved at the
model's prices and reconciled with the answer's cost, in Redis and in the
zone; calendar windows (day, month in UTC) for every kind.

The oracle for a cost is the arithmetic of docs/route.md done here in
Python from the usage the client received; for a calendar window, Python's
own calendar.  The official OpenAI SDK sees insufficient_quota and does
not retry it."""

import calendar
import datetime
import json
import time

import pytest
import requests

from harness.openai import chat, error_of

PRICES = "input_price=2.5 output_price=10 cached_input_price=1.25"


def conf(sim, limits, redis=None, prices=PRICES, extra=""):
    store = (f"infer_ratelimit_redis {redis.addr} timeout=2s;" if redis
             else "infer_ratelimit_zone rl:1m;")
    return f"""
    {store}
    upstream pool-a {{ server {sim.addr}; keepalive 8; }}
    infer_model llama-3-8b upstream=pool-a {prices};
    infer_model free-model upstream=pool-a model=llama-3-8b;
    {extra}
    server {{
        listen 127.0.0.1:{{port}};
        location /v1/ {{
            infer_route on;
            infer_ratelimit on;
            {limits}
            proxy_pass http://$infer_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            add_header X-Cost $infer_cost always;
            add_header X-Price-In $infer_price_input always;
            add_header X-Price-Out $infer_price_output always;
            add_header X-Estimate $infer_prompt_tokens_estimate always;
        }}
    }}"""


@pytest.fixture
def sim(sim_factory):
    return sim_factory("llama-3-8b", "llama-a", ttft_ms=0, tpot_ms=0)


def nano(prompt, completion, cached=0, pin=2.5, pout=10, pcached=1.25):
    """The cost in nano-dollars, as docs/route.md defines it."""
    def part(tokens, price):
        micro = round(price * 1e6)              # per million tokens
        return tokens * (micro // 1000) + tokens * (micro % 1000) // 1000
    return (part(prompt - cached, pin) + part(cached, pcached)
            + part(completion, pout))


def usd(n):
    s = f"{n // 10**9}.{n % 10**9:09d}".rstrip("0").rstrip(".")
    return s


def test_cost_and_prices(nginx_factory, sim):
    n = nginx_factory(conf(sim, ""))
    r = chat(n, completion=9)
    u = r.json()["usage"]
    assert r.headers["X-Price-In"] == "2.5"
    assert r.headers["X-Price-Out"] == "10"
    # add_header runs before the body: the cost is known in the log only;
    # the usage events carry it (t/test_usage_events.py)
    r = chat(n, model="free-model")
    assert "X-Price-In" not in r.headers


def test_prices_from_the_registry_file(nginx_factory, sim, tmp_path):
    reg = tmp_path / "models.json"
    reg.write_text(json.dumps({"models": [
        {"name": "llama-3-8b", "upstream": "pool-a",
         "input_price": 0.15, "output_price": "0.6"}]}))
    n = nginx_factory(conf(sim, "", prices="").replace(
        "infer_model llama-3-8b upstream=pool-a ;",
        f"infer_model_registry {reg};").replace(
        "infer_model free-model upstream=pool-a model=llama-3-8b;", ""))
    r = chat(n)
    assert r.status_code == 200
    assert r.headers["X-Price-In"] == "0.15"
    assert r.headers["X-Price-Out"] == "0.6"


@pytest.mark.parametrize("price, message", [
    ("input_price=-1", "input_price"),
    ("input_price=0.1234567", "at most 6 decimals"),
    ("output_price=abc", "output_price"),
    ("output_price=2000000", "0 to 1000000"),
    ("input_price=1 input_price=2", "given twice"),
])
def test_bad_prices(nginx_factory, sim, price, message):
    n = nginx_factory(conf(sim, "", prices=price), start=False)
    ok, out = n.check_config()
    assert not ok
    assert message in out, out


def monthly_key(tenant, name):
    return f"infer:rl:{{{tenant}}}:{name}:" + \
        datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m")


def test_budget_reserved_then_reconciled_in_redis(nginx_factory, redis,
                                                  sim):
    n = nginx_factory(conf(sim, "infer_ratelimit_limit monthly "
                           "$http_x_tenant budget=50/month;", redis=redis))
    c = redis.client()
    r = chat(n, max_tokens=100, completion=9, headers={"X-Tenant": "acme"})
    assert r.status_code == 200
    u = r.json()["usage"]
    key = monthly_key("acme", "monthly")
    want = nano(u["prompt_tokens"], u["completion_tokens"])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and c.get(key) != str(want):
        time.sleep(0.02)
    assert c.get(key) == str(want)
    # the key lives until the month ends (and a minute more)
    now = datetime.datetime.now(datetime.timezone.utc)
    y, m = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    end = calendar.timegm((y, m, 1, 0, 0, 0))
    left = (end - time.time()) * 1000
    assert left < c.pttl(key) <= left + 61000


def test_budget_spent_gives_insufficient_quota(nginx_factory, redis, sim):
    # one answer of 9 tokens costs about 0.0001 USD: a budget of 0.0003
    n = nginx_factory(conf(sim, "infer_ratelimit_limit monthly "
                           "$http_x_tenant budget=0.0003/month;",
                           redis=redis))
    h = {"X-Tenant": "acme"}
    codes = []
    for _ in range(10):
        r = chat(n, max_tokens=10, completion=9, headers=h)
        codes.append(r.status_code)
        if r.status_code != 200:
            break
    assert codes[0] == 200 and codes[-1] == 429
    e = error_of(r)
    assert e["type"] == "insufficient_quota"
    assert e["code"] == "insufficient_quota"
    assert 'budget "monthly"' in e["message"]
    assert r.headers["x-should-retry"] == "false"
    assert int(r.headers["Retry-After"]) > 0
    # another tenant has its own
    assert chat(n, max_tokens=10, headers={"X-Tenant": "globex"}) \
        .status_code == 200
    # a model without prices spends no budget
    assert chat(n, model="free-model", headers=h).status_code == 200


def test_budget_too_large_is_400(nginx_factory, redis, sim):
    n = nginx_factory(conf(sim, "infer_ratelimit_limit monthly "
                           "$http_x_tenant budget=0.01/month;", redis=redis))
    r = chat(n, max_tokens=100000, headers={"X-Tenant": "acme"})
    assert r.status_code == 400
    e = error_of(r)
    assert e["code"] == "request_too_large"
    assert 'budget "monthly"' in e["message"]


def test_budget_rolling_window_in_the_zone(nginx_factory, sim):
    n = nginx_factory(conf(sim, "infer_ratelimit_limit daily "
                           "$http_x_tenant budget=0.0003/24h;"))
    h = {"X-Tenant": "acme"}
    codes = [chat(n, max_tokens=10, completion=9, headers=h).status_code
             for _ in range(8)]
    assert codes[0] == 200 and 429 in codes
    assert codes.index(429) >= 2


def test_calendar_day_in_the_zone(nginx_factory, sim):
    n = nginx_factory(conf(sim, "infer_ratelimit_limit rpd "
                           "$http_x_tenant requests=3/day;"))
    h = {"X-Tenant": "acme"}
    codes = [chat(n, headers=h).status_code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    r = chat(n, headers=h)
    now = time.time()
    left = 86400 - now % 86400
    assert abs(int(r.headers["Retry-After"]) - left) <= 2
    assert r.headers["x-ratelimit-limit-requests"] == "3"
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert "per day" in error_of(r)["message"]


def test_calendar_day_in_redis(nginx_factory, redis, sim):
    n = nginx_factory(conf(sim, "infer_ratelimit_limit rpd "
                           "$http_x_tenant requests=2/day;", redis=redis))
    h = {"X-Tenant": "acme"}
    codes = [chat(n, headers=h).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    c = redis.client()
    key = f"infer:rl:{{acme}}:rpd:{day}"
    assert c.get(key) == "2"
    left = (86400 - time.time() % 86400) * 1000
    assert left < c.pttl(key) <= left + 61000


def test_sdk_does_not_retry_insufficient_quota(nginx_factory, redis, sim,
                                               openai_sdk):
    n = nginx_factory(conf(sim, "infer_ratelimit_limit monthly "
                           "global budget=0.0001/month;", redis=redis))
    params = {"model": "llama-3-8b", "max_tokens": 5,
              "messages": [{"role": "user", "content": "hello"}]}
    for _ in range(5):
        out = openai_sdk(n.url + "/v1", "chat", params)
        if not out["ok"]:
            break
    assert out["error_class"] == "RateLimitError"
    assert out["error"]["code"] == "insufficient_quota"
    c = redis.client()
    c.config_resetstat()
    out = openai_sdk(n.url + "/v1", "chat", params, max_retries=3)
    assert out["error"]["code"] == "insufficient_quota"
    stats = c.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1     # not retried


@pytest.mark.parametrize("rate", ["budget=x/month", "budget=0/day",
                                  "budget=1.0000000001/month",
                                  "requests=5/week"])
def test_bad_budgets(nginx_factory, sim, rate):
    n = nginx_factory(conf(sim, f"infer_ratelimit_limit b k {rate};"),
                      start=False)
    ok, out = n.check_config()
    assert not ok
    assert "invalid rate" in out, out



def test_a_budget_finer_than_a_nanosecond_in_the_zone(nginx_factory, sim):
    """budget=40/m is 4e10 nano-dollars in 6e10 ns: 1.5 ns a unit, which
    whole ns would make 1 and admit 50 % more.  At a dollar a token, the
    first answer uses about 16 and the second reserves its 7 prompt
    tokens' and max_tokens' 20: 43 of 40, refused (of 60, admitted)."""
    n = nginx_factory(conf(sim, "infer_ratelimit_limit m $http_x_tenant "
                           "budget=40/m;",
                           prices="input_price=1000000 output_price=1000000"))
    h = {"X-Tenant": "acme"}
    r = chat(n, max_tokens=20, completion=9, headers=h)
    assert r.status_code == 200
    used = r.json()["usage"]["total_tokens"]
    est = int(r.headers["X-Estimate"]) + 20
    assert 40 < used + est <= 60, (used, est)
    r = chat(n, max_tokens=20, completion=9, headers=h)
    assert r.status_code == 429, r.headers
    assert error_of(r)["code"] == "insufficient_quota"
