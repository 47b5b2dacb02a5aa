"""ngx_infer_ratelimit, local mode: limits counted in a shared-memory zone.

Request and token limits (GCRA), several per request, exact across the two
workers; tokens reserved at admission and reconciled with the real usage in
LOG; 429 in the OpenAI envelope with Retry-After; the x-ratelimit-* headers
in OpenAI's formats; shadow mode; counters kept across a reload; the module
alone, keyed by the client address."""

import re
import threading
import time

import pytest
import requests

from harness.openai import chat, error_of

CHAT = {"messages": [{"role": "user", "content": "Hello there"}]}

STATUS_HEADERS = """
            add_header X-RL-Status $infer_ratelimit_status always;
            add_header X-RL-Requests $infer_ratelimit_remaining_requests always;
            add_header X-RL-Tokens $infer_ratelimit_remaining_tokens always;
            add_header X-RL-By $infer_ratelimit_limited_by always;"""

# Go's time.Duration format, as OpenAI writes resets: 20ms, 1s, 1.5s, 6m0s
RESET = re.compile(r"^(0s|\d+ms|(\d+h)?(\d+m)?\d+(\.\d+)?s)$")


def static_conf(limits, extra="", zone="infer_ratelimit_zone rl:1m;"):
    return f"""
    {zone}
    server {{
        listen 127.0.0.1:{{port}};
        infer_ratelimit on;
        {limits}
        {extra}
        location / {{ {STATUS_HEADERS} }}
    }}"""


def get(n, path="/ok.txt", session=None, **kw):
    return (session or requests).get(n.url + path, timeout=10, **kw)


def parallel(fn, n, threads=8):
    """fn() n times from several threads; the results."""
    out, lock = [], threading.Lock()
    todo = list(range(n))

    def work():
        while True:
            with lock:
                if not todo:
                    return
                todo.pop()
            r = fn()
            with lock:
                out.append(r)

    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    return out


def test_a_requests_limit_is_exact_across_two_workers(nginx_factory):
    n = nginx_factory(static_conf(
        "infer_ratelimit_limit all global requests=25/h;"))
    codes = parallel(lambda: get(n).status_code, 60)
    assert sorted(codes) == [200] * 25 + [429] * 35


def test_headers_in_openai_formats(nginx_factory):
    n = nginx_factory(static_conf(
        "infer_ratelimit_limit rpm global requests=10/m;"
        "infer_ratelimit_limit rph global2 requests=10/h;"))
    r = get(n)
    assert r.status_code == 200
    # the most constrained limit of the kind is reported: both have 9 left,
    # either is fine; the reset is one emission interval (6s or 6m)
    assert r.headers["x-ratelimit-limit-requests"] == "10"
    assert r.headers["x-ratelimit-remaining-requests"] == "9"
    assert r.headers["x-ratelimit-reset-requests"] in ("6s", "6m0s")
    assert r.headers["X-RL-Status"] == "passed"
    assert r.headers["X-RL-Requests"] == "9"
    assert "x-ratelimit-limit-tokens" not in r.headers

    r = get(n)
    assert r.headers["x-ratelimit-remaining-requests"] == "8"
    reset = r.headers["x-ratelimit-reset-requests"]
    assert RESET.match(reset), reset


def test_reset_formats(nginx_factory):
    n = nginx_factory(static_conf(
        "infer_ratelimit_limit fast global requests=50/s;", extra="""
        location /h { rewrite ^ /ok.txt break;
                      infer_ratelimit_limit slow k requests=1/h; }
        location /m { rewrite ^ /ok.txt break;
                      infer_ratelimit_limit mid k requests=60/h; }"""))
    assert get(n).headers["x-ratelimit-reset-requests"] == "20ms"
    assert get(n, "/h").headers["x-ratelimit-reset-requests"] == "1h0m0s"
    assert get(n, "/m").headers["x-ratelimit-reset-requests"] == "1m0s"
    r = get(n, "/m")
    assert r.headers["x-ratelimit-remaining-requests"] == "58"
    assert RESET.match(r.headers["x-ratelimit-reset-requests"])


def test_429_in_the_openai_envelope(nginx_factory):
    n = nginx_factory(static_conf(
        "infer_ratelimit_limit tenant_rpm global requests=2/h;"))
    assert get(n).status_code == 200
    assert get(n).status_code == 200
    r = get(n)
    assert r.status_code == 429
    e = error_of(r)
    assert e["code"] == "rate_limit_exceeded"
    assert e["type"] == "requests"
    assert "tenant_rpm" in e["message"]
    # one request every 30 minutes: the next one in about 1800 s
    assert 1700 <= int(r.headers["Retry-After"]) <= 1800
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert r.headers["X-RL-Status"] == "limited"
    assert r.headers["X-RL-By"] == "tenant_rpm"


def test_the_strictest_of_several_limits_refuses(nginx_factory):
    n = nginx_factory(static_conf(
        "infer_ratelimit_limit wide global requests=100/h;"
        "infer_ratelimit_limit narrow $http_x_user requests=2/h;"))
    users = [get(n, headers={"X-User": u}).status_code
             for u in ("a", "a", "a", "b", "b", "b")]
    assert users == [200, 200, 429, 200, 200, 429]
    # refused requests charge nothing, in no limit
    r = get(n, headers={"X-User": "c"})
    assert r.headers["x-ratelimit-remaining-requests"] == "1"
    r = get(n)   # no X-User: the narrow limit does not apply
    assert r.status_code == 200
    assert r.headers["x-ratelimit-remaining-requests"] == "94"


def test_limits_chosen_per_plan_through_map(nginx_factory):
    n = nginx_factory("""
    map $http_x_plan $free_key { free $http_x_user; default ""; }
    map $http_x_plan $pro_key  { pro  $http_x_user; default ""; }
    """ + static_conf("infer_ratelimit_limit free $free_key requests=1/h;"
                      "infer_ratelimit_limit pro $pro_key requests=3/h;"))
    free = [get(n, headers={"X-Plan": "free", "X-User": "u"}).status_code
            for _ in range(3)]
    pro = [get(n, headers={"X-Plan": "pro", "X-User": "u"}).status_code
           for _ in range(4)]
    assert free == [200, 429, 429]
    assert pro == [200, 200, 200, 429]


def test_shadow_mode_reports_and_never_refuses(nginx_factory):
    n = nginx_factory(static_conf(
        "infer_ratelimit_limit one global requests=1/h;",
        extra="infer_ratelimit_shadow on;"))
    r1, r2, r3 = get(n), get(n), get(n)
    assert [r.status_code for r in (r1, r2, r3)] == [200, 200, 200]
    assert r1.headers["X-RL-Status"] == "passed"
    assert r2.headers["X-RL-Status"] == "shadow"
    assert r2.headers["X-RL-By"] == "one"
    assert r3.headers["x-ratelimit-remaining-requests"] == "0"


def test_configurable_status_and_headers_off(nginx_factory):
    n = nginx_factory(static_conf(
        "infer_ratelimit_limit one global requests=1/h;",
        extra="infer_ratelimit_status 503; infer_ratelimit_headers off;"))
    assert get(n).status_code == 200
    r = get(n)
    assert r.status_code == 503
    assert error_of(r)["code"] == "rate_limit_exceeded"
    assert "x-ratelimit-remaining-requests" not in r.headers


def test_an_internal_redirect_is_counted_once(nginx_factory):
    n = nginx_factory(static_conf(
        "infer_ratelimit_limit two global requests=2/h;",
        extra="location /missing { error_page 404 = /ok.txt; }"))
    r = get(n, "/missing")
    assert r.status_code == 200 and r.text == "ok"
    assert r.headers["x-ratelimit-remaining-requests"] == "1"
    r = get(n, "/missing")
    assert r.status_code == 200
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert get(n, "/missing").status_code == 429


def test_on_with_no_limits_passes_everything(nginx_factory):
    n = nginx_factory(static_conf("", zone=""))
    for _ in range(5):
        r = get(n)
        assert r.status_code == 200
        assert "x-ratelimit-limit-requests" not in r.headers


def test_reload_keeps_the_counters(nginx_factory):
    n = nginx_factory(static_conf(
        "infer_ratelimit_limit three global requests=3/h;"))
    assert [get(n).status_code for _ in range(2)] == [200, 200]
    n.reload()
    assert [get(n).status_code for _ in range(2)] == [200, 429]


def test_the_module_alone_keyed_by_the_client_address(nginx_factory):
    n = nginx_factory(static_conf(
        "infer_ratelimit_limit per_ip $binary_remote_addr requests=2/h;"),
        modules=["ratelimit"])
    assert [get(n).status_code for _ in range(3)] == [200, 200, 429]


@pytest.mark.parametrize("limits, message", [
    ("infer_ratelimit_limit a k requests=10;", 'invalid rate "requests=10"'),
    ("infer_ratelimit_limit a k requests=0/m;",
     'invalid rate "requests=0/m"'),
    ("infer_ratelimit_limit a k requests=10/fortnight;",
     'invalid rate "requests=10/fortnight"'),
    ("infer_ratelimit_limit a k;", 'limit "a" has no rate'),
    ("infer_ratelimit_limit a k requests=1/s tokens=1/s;",
     'limit "a" has two rates'),
    ("infer_ratelimit_limit a k requests=1/s on_error=maybe;",
     'invalid on_error "on_error=maybe"'),
    ("infer_ratelimit_limit a k requests=1/s;"
     "infer_ratelimit_limit a k requests=2/s;",
     'limit "a" is declared with another rate'),
    ("infer_ratelimit_limit a/b k requests=1/s;", 'invalid limit name "a/b"'),
], ids=["rate-without-a-period", "rate-of-zero", "rate-of-an-unknown-period",
        "no-rate", "two-rates", "unknown-on-error", "redeclared-another-rate",
        "name-with-a-slash"])
def test_nginx_t_names_the_mistake(nginx_factory, limits, message):
    n = nginx_factory(static_conf(limits), start=False)
    ok, out = n.check_config()
    assert not ok
    assert message in out, out


def test_a_limit_needs_a_zone(nginx_factory):
    n = nginx_factory(static_conf(
        "infer_ratelimit_limit a k requests=1/s;", zone=""), start=False)
    ok, out = n.check_config()
    assert not ok
    assert "needs an infer_ratelimit_zone" in out, out


# ------------------------------------------------------------------ tokens

def proxy_conf(sim, limits, extra=""):
    return f"""
    infer_ratelimit_zone rl:1m;
    upstream llama {{ server {sim.addr}; keepalive 8; }}
    infer_model llama-3-8b upstream=llama;
    server {{
        listen 127.0.0.1:{{port}};
        infer_route on;
        infer_ratelimit on;
        {limits}
        {extra}
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


def streamed(stream):
    """chat()'s fields for a stream whose client asks for its usage."""
    return ({"stream": True, "stream_options": {"include_usage": True}}
            if stream else {})


def stream_usage(r):
    usage = None
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            import json
            u = json.loads(line[6:]).get("usage")
            usage = u or usage
    return usage


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_tokens_are_reserved_then_reconciled(nginx_factory, sim, stream):
    n = nginx_factory(proxy_conf(
        sim, "infer_ratelimit_limit tpd global tokens=10000/d;"))
    s = requests.Session()   # one connection: LOG ran before the next one

    r1 = chat(n, session=s, max_tokens=100, completion=7,
              **streamed(stream))
    assert r1.status_code == 200
    est1 = int(r1.headers["X-Estimate"]) + 100
    assert r1.headers["x-ratelimit-limit-tokens"] == "10000"
    assert r1.headers["x-ratelimit-remaining-tokens"] == str(10000 - est1)
    used1 = (stream_usage(r1) if stream else r1.json()["usage"])["total_tokens"]
    assert used1 < est1

    r2 = chat(n, session=s, max_tokens=50, completion=3,
              **streamed(stream))
    est2 = int(r2.headers["X-Estimate"]) + 50
    # the reservation of the first became its real usage
    assert r2.headers["x-ratelimit-remaining-tokens"] == \
        str(10000 - used1 - est2)
    assert r2.headers["X-RL-Tokens"] == str(10000 - used1 - est2)


def test_a_request_whose_estimate_does_not_fit_is_refused(nginx_factory, sim):
    n = nginx_factory(proxy_conf(
        sim, "infer_ratelimit_limit tpd global tokens=500/d;"))
    s = requests.Session()
    # reserves ~305, uses them all
    r = chat(n, session=s, max_tokens=300, completion=300)
    assert r.status_code == 200
    # ~305 more do not fit in ~195
    r = chat(n, session=s, max_tokens=300, completion=1)
    assert r.status_code == 429
    e = error_of(r)
    assert e["type"] == "tokens" and e["code"] == "rate_limit_exceeded"
    assert int(r.headers["Retry-After"]) >= 1
    r = chat(n, session=s, max_tokens=100, completion=1)   # ~105 do
    assert r.status_code == 200


def test_without_max_tokens_the_default_is_reserved(nginx_factory, sim):
    n = nginx_factory(proxy_conf(
        sim, "infer_ratelimit_limit tpd global tokens=5000/d;",
        extra="infer_ratelimit_default_max_tokens 2000;"))
    body = dict(CHAT, model="llama-3-8b")
    r = requests.post(n.url + "/v1/chat/completions", json=body,
                      headers={"x-sim-completion-tokens": "1"}, timeout=10)
    assert r.status_code == 200
    est = int(r.headers["X-Estimate"]) + 2000
    assert r.headers["x-ratelimit-remaining-tokens"] == str(5000 - est)


def test_a_request_without_a_model_spends_no_tokens(nginx_factory, sim):
    """With the route module loaded, GET /v1/models names no model: token
    limits leave it alone (requests limits still count it)."""
    n = nginx_factory(proxy_conf(
        sim, "infer_ratelimit_limit tpd global tokens=1500/d; "
             "infer_ratelimit_limit rpd global requests=100/d;",
        extra="location /v1/models { infer_model_list; }"))
    s = requests.Session()
    for left in ("99", "98", "97"):
        r = s.get(n.url + "/v1/models", timeout=10)
        assert r.status_code == 200
        assert r.headers["x-ratelimit-remaining-requests"] == left
        assert "x-ratelimit-remaining-tokens" not in r.headers
    # ~1005 fit only if nothing was spent
    r = chat(n, session=s, max_tokens=1000, completion=1)
    assert r.status_code == 200
    assert int(r.headers["x-ratelimit-remaining-tokens"]) > 400


def test_a_failed_answer_gives_its_reservation_back(nginx_factory, sim):
    n = nginx_factory(proxy_conf(
        sim, "infer_ratelimit_limit tpd global tokens=1000/d;"))
    s = requests.Session()
    body = dict(CHAT, model="llama-3-8b", max_tokens=100)
    r = s.post(n.url + "/v1/chat/completions", json=body,
               headers={"x-sim-status": "500"}, timeout=10)
    assert r.status_code == 500
    r = chat(n, session=s, max_tokens=100, completion=1)
    est = int(r.headers["X-Estimate"]) + 100
    assert r.headers["x-ratelimit-remaining-tokens"] == str(1000 - est)


def test_requests_and_tokens_headers_together(nginx_factory, sim):
    n = nginx_factory(proxy_conf(
        sim, "infer_ratelimit_limit rpm global requests=60/m;"
             "infer_ratelimit_limit tpm global tokens=60000/m;"))
    r = chat(n, max_tokens=10, completion=1)
    assert r.headers["x-ratelimit-limit-requests"] == "60"
    assert r.headers["x-ratelimit-remaining-requests"] == "59"
    assert r.headers["x-ratelimit-reset-requests"] == "1s"
    assert r.headers["x-ratelimit-limit-tokens"] == "60000"
    est = int(r.headers["X-Estimate"]) + 10
    assert r.headers["x-ratelimit-remaining-tokens"] == str(60000 - est)
    assert RESET.match(r.headers["x-ratelimit-reset-tokens"])


def test_the_openai_sdk_raises_its_rate_limit_error(nginx_factory, sim,
                                                    openai_sdk):
    n = nginx_factory(proxy_conf(
        sim, "infer_ratelimit_limit one global requests=1/h;"))
    params = dict(CHAT, model="llama-3-8b", max_tokens=3)
    out = openai_sdk(n.url + "/v1", "chat", params)
    assert out["ok"], out
    out = openai_sdk(n.url + "/v1", "chat", params)
    assert not out["ok"]
    assert out["error_class"] == "RateLimitError", out
    assert out["status"] == 429
    assert out["error"]["code"] == "rate_limit_exceeded"
    assert out["headers"]["retry-after"]


def test_our_headers_replace_the_backends(nginx_factory, sim):
    n = nginx_factory(proxy_conf(
        sim, "infer_ratelimit_limit rpm global requests=60/m;"))
    body = dict(CHAT, model="llama-3-8b", max_tokens=3)
    r = requests.post(n.url + "/v1/chat/completions", json=body, timeout=10,
                      headers={"x-sim-add-header":
                               "x-ratelimit-limit-requests: 999"})
    assert r.status_code == 200
    assert r.headers["x-ratelimit-limit-requests"] == "60"   # one, ours


def test_tokens_alone_reserve_the_default(nginx_factory):
    n = nginx_factory(static_conf(
        "infer_ratelimit_limit tpd global tokens=1000/d;",
        extra="infer_ratelimit_default_max_tokens 300;"),
        modules=["ratelimit"])
    r = get(n)
    assert r.headers["x-ratelimit-remaining-tokens"] == "700"
    # a static answer carries no usage: a success keeps its reservation
    assert get(n).headers["x-ratelimit-remaining-tokens"] == "400"
    assert get(n).headers["x-ratelimit-remaining-tokens"] == "100"
    r = get(n)
    assert r.status_code == 429 and error_of(r)["type"] == "tokens"


def slow_chats(n, k, ttft_ms=600):
    body = dict(CHAT, model="llama-3-8b", max_tokens=2)

    def one():
        return requests.post(n.url + "/v1/chat/completions", json=body,
                             headers={"x-sim-ttft-ms": str(ttft_ms)},
                             timeout=10).status_code

    return parallel(one, k, threads=k)


def test_a_concurrency_limit(nginx_factory, sim):
    n = nginx_factory(proxy_conf(
        sim, "infer_ratelimit_limit inflight global concurrency=2;"))
    assert sorted(slow_chats(n, 5)) == [200, 200, 429, 429, 429]
    # every request left the count when it ended
    assert sorted(slow_chats(n, 2, ttft_ms=50)) == [200, 200]
    s = requests.Session()
    for _ in range(3):
        r = chat(n, session=s, max_tokens=2, completion=1)
        assert r.status_code == 200
        assert "x-ratelimit-limit-requests" not in r.headers


@pytest.mark.debug_log
def test_keys_are_never_logged(nginx_factory):
    n = nginx_factory(static_conf(
        "infer_ratelimit_limit per_key $http_x_api_key requests=1/h;"),
        error_level="debug")
    h = {"X-Api-Key": "sk-very-secret-42"}
    assert get(n, headers=h).status_code == 200
    r = get(n, headers=h)
    assert r.status_code == 429
    assert "sk-very-secret-42" not in r.text
    n.stop()
    log = n.log_text()
    assert 'limit "per_key" refused' in log
    # the request's own header line is nginx's debug output, not ours;
    # ours hold the module's debug lines, where a key printed would be
    ours = n.our_log_lines()
    assert any("[debug]" in l and "infer ratelimit" in l for l in ours)
    assert not any("sk-very-secret-42" in l for l in ours)


def debt_after_a_long_answer(n):
    """A reservation of a few tokens whose bucket is full again before
    the answer ends (1,000 tokens a second; the answer takes 300 ms and
    uses 500): the debt is charged from the reconciliation on."""
    s = requests.Session()
    body = dict(CHAT, model="llama-3-8b", max_tokens=1)   # the sim goes on
    r = s.post(n.url + "/v1/chat/completions", json=body, timeout=10,
               headers={"x-sim-completion-tokens": "500",
                        "x-sim-ttft-ms": "300"})
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] == 500
    time.sleep(0.05)   # the reconciliation runs as the answer ends
    r = chat(n, session=s, max_tokens=1, completion=1)
    assert r.status_code == 200
    return int(r.headers["x-ratelimit-remaining-tokens"])


def test_a_debt_outlives_a_refilled_bucket(nginx_factory, sim):
    n = nginx_factory(proxy_conf(
        sim, "infer_ratelimit_limit tps global tokens=1000/s;",
        extra="infer_ratelimit_default_max_tokens 1;"))
    # without the debt about 990 would be left; with it about 500, less
    # what refilled (1 token a millisecond) between the two requests
    assert debt_after_a_long_answer(n) < 750


def test_limits_are_inherited_unless_a_context_declares_its_own(
        nginx_factory):
    n = nginx_factory(static_conf(
        "infer_ratelimit_limit outer global requests=1/h;", extra="""
        location /own { rewrite ^ /ok.txt break;
                        infer_ratelimit_limit inner global requests=2/h; }
        location /same { rewrite ^ /ok.txt break; }"""))
    assert [get(n, "/own").status_code for _ in range(3)] == [200, 200, 429]
    assert [get(n, "/same").status_code for _ in range(2)] == [200, 429]
    assert get(n).status_code == 429     # /same counted in "outer"


# ------------------------------------------------ requests that never fit

def too_large(r, limit, window_words):
    """A request whose estimate is more than the whole limit: 400 in the
    envelope, no Retry-After (waiting cannot help), a message that says
    why in words, and nothing charged."""
    assert r.status_code == 400, (r.status_code, dict(r.headers), r.text)
    assert "Retry-After" not in r.headers
    e = error_of(r)
    assert e["type"] == "invalid_request_error"
    assert e["code"] == "request_too_large"
    msg = e["message"]
    assert f"{limit} tokens per {window_words}" in msg, msg
    assert "max_tokens" in msg and "try again" not in msg, msg
    assert r.headers["X-RL-Status"] == "limited"
    return e


def test_a_request_that_can_never_fit_says_so(nginx_factory, sim):
    n = nginx_factory(proxy_conf(
        sim, "infer_ratelimit_limit tpm global tokens=100000/m;"
             "infer_ratelimit_limit rph global requests=1/h;"))
    s = requests.Session()
    r = chat(n, session=s, max_tokens=2147483647, completion=1)
    too_large(r, 100000, "minute")
    # a request that fits goes through, the refused one charged nothing
    r = chat(n, session=s, max_tokens=10, completion=1)
    assert r.status_code == 200
    # a limit that only has to wait is refused as such, with Retry-After
    r = chat(n, session=s, max_tokens=10, completion=1)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 60
    # and a request that can never fit says so even then: waiting for the
    # requests limit would not help it
    r = chat(n, session=s, max_tokens=2147483647, completion=1)
    too_large(r, 100000, "minute")


def test_a_refusal_names_its_period_in_words(nginx_factory):
    n = nginx_factory(static_conf(
        "infer_ratelimit_limit rpm global requests=1/m;", extra="""
        location /ten { rewrite ^ /ok.txt break;
                        infer_ratelimit_limit r10 global requests=1/10s; }"""))
    assert get(n).status_code == 200
    msg = error_of(get(n))["message"]
    assert msg.startswith("Rate limit reached for requests per minute "), msg
    assert get(n, "/ten").status_code == 200
    msg = error_of(get(n, "/ten"))["message"]
    assert msg.startswith("Rate limit reached for requests per 10s "), msg


# ------------------------------------------------------- runaway usage

def runaway_conf(limits, zone="infer_ratelimit_zone rl:1m;", redis=""):
    """A gateway whose backend (a server of the same nginx) reports four
    billion tokens for every answer."""
    from harness.ports import free_port
    backend = free_port()
    usage = ('{"id": "x", "object": "chat.completion", "model": '
             '"llama-3-8b", "choices": [{"index": 0, "message": {"role": '
             '"assistant", "content": "hi"}, "finish_reason": "stop"}], '
             '"usage": {"prompt_tokens": 5, "completion_tokens": '
             '4000000000, "total_tokens": 4000000005}}')
    return f"""
    {zone}
    {redis}
    upstream llama {{ server 127.0.0.1:{backend}; }}
    infer_model llama-3-8b upstream=llama;
    server {{
        listen 127.0.0.1:{backend};
        location / {{ default_type application/json; return 200 '{usage}'; }}
    }}
    server {{
        listen 127.0.0.1:{{port}};
        infer_route on;
        infer_ratelimit on;
        {limits}
        location / {{
            proxy_pass http://$infer_upstream;
            {STATUS_HEADERS}
        }}
    }}"""


def runaway_answer_charges_at_most_the_limit(n, after_first=None):
    """After an answer that reported 4e9 tokens against 100,000 a minute,
    the bucket is empty, not years in debt: it refills from there at once
    (1,667 tokens a second), and is full again within the window."""
    s = requests.Session()
    r = chat(n, session=s, max_tokens=10)
    assert r.status_code == 200
    assert r.json()["usage"]["total_tokens"] == 4000000005
    if after_first:
        after_first()
    time.sleep(0.3)        # ~500 tokens refill: enough for a small request
    r = chat(n, session=s, max_tokens=10)
    assert r.status_code == 200, (r.headers, r.text)
    assert r.headers["X-RL-Status"] == "passed"
    reset = r.headers["x-ratelimit-reset-tokens"]
    assert RESET.match(reset) and seconds(reset) <= 60, reset


def seconds(duration):
    """A reset as OpenAI writes it (Go's time.Duration), in seconds."""
    if duration.endswith("ms"):
        return int(duration[:-2]) / 1000
    total = 0.0
    for value, unit in re.findall(r"([\d.]+)([hms])", duration):
        total += float(value) * {"h": 3600, "m": 60, "s": 1}[unit]
    return total


def test_a_runaway_usage_charges_at_most_the_limit(nginx_factory):
    n = nginx_factory(runaway_conf(
        "infer_ratelimit_limit tpm global tokens=100000/m;"))
    runaway_answer_charges_at_most_the_limit(n)
