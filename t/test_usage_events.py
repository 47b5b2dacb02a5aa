"""Usage events: one record per finished request, appended to a Redis
Stream over the rate-limit module's connection (infer_usage_events).

The record's fields are checked against what the client saw (its answer,
its usage, its x-request-id) and what the simulated backend reported;
redis-py reads the stream.  Redis down and Redis slow: the requests do not
wait, what is lost is counted on the metrics page; the queue's bound;
reload; the events of a worker told to quit are written first."""

import json
from pathlib import Path
import signal
import time

import pytest
import requests

from harness.openai import chat

FIELDS = ["v", "time", "request_id", "trace_id", "gateway", "tenant",
          "key_id", "subject", "model", "model_served", "pool", "endpoint",
          "status", "stream", "prompt_tokens", "completion_tokens",
          "cached_tokens", "reasoning_tokens", "estimated", "ttft_ms",
          "duration_ms", "request_bytes", "response_bytes", "cost"]


def conf(redis_addr, sim, stream="infer_usage_events_stream infer:usage "
         "flush=20ms;", redis_opts="timeout=500ms", extra="", location=""):
    return f"""
    infer_ratelimit_redis {redis_addr} {redis_opts};
    {stream}
    infer_metrics_zone m 1m;
    upstream pool-a {{ server {sim.addr}; keepalive 8; }}
    infer_model llama-3-8b upstream=pool-a model=llama-served;
    {extra}
    server {{
        listen 127.0.0.1:{{port}};
        location /v1/ {{
            infer_route on;
            infer_trace on;
            infer_usage_events on;
            proxy_pass http://$infer_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            {location}
        }}
        location /quiet/ {{
            infer_usage_events off;
            return 200 "quiet\\n";
        }}
        location = /metrics {{ infer_metrics off; infer_metrics_export; }}
    }}"""


@pytest.fixture
def sim(sim_factory):
    return sim_factory("llama-served", "llama-a", ttft_ms=0, tpot_ms=0)


def events(client, n, key="infer:usage", timeout=5):
    """The stream's first n entries, waited for (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = client.xrange(key)
        if len(got) >= n:
            return [fields for _, fields in got]
        time.sleep(0.02)
    return [fields for _, fields in client.xrange(key)]


def counts(n):
    """infer_usage_events_total by outcome, from the metrics page."""
    text = requests.get(n.url + "/metrics", timeout=5).text
    out = {}
    for line in text.splitlines():
        if line.startswith("infer_usage_events_total{"):
            outcome = line.split('"')[1]
            out[outcome] = int(float(line.rsplit(" ", 1)[1]))
    return out


def test_one_record_per_request_with_the_schema(nginx_factory, redis, sim):
    n = nginx_factory(conf(redis.addr, sim))
    c = redis.client()
    t0 = int(time.time() * 1000)
    r = chat(n, completion=7, headers={"X-Request-Id": "req-1"})
    assert r.status_code == 200
    usage = r.json()["usage"]
    (e,) = events(c, 1)
    assert list(e) == FIELDS
    assert e["v"] == "1"
    assert t0 <= int(e["time"]) <= int(time.time() * 1000)
    assert e["request_id"] == "req-1" == r.headers["x-request-id"]
    assert len(e["trace_id"]) == 32
    assert e["gateway"]
    assert e["model"] == "llama-3-8b" and e["model_served"] == "llama-served"
    assert e["pool"] == "pool-a" and e["endpoint"] == sim.addr
    assert e["status"] == "200" and e["stream"] == "0"
    assert int(e["prompt_tokens"]) == usage["prompt_tokens"]
    assert int(e["completion_tokens"]) == usage["completion_tokens"] == 7
    assert e["estimated"] == "0"
    assert e["ttft_ms"].isdigit() and e["duration_ms"].isdigit()
    assert int(e["ttft_ms"]) <= int(e["duration_ms"]) + 1
    assert int(e["request_bytes"]) > 100
    assert int(e["response_bytes"]) > len(r.content)
    assert e["tenant"] == e["key_id"] == e["subject"] == ""
    assert e["cost"] == ""
    assert counts(n) == {"written": 1, "dropped": 0, "failed": 0}


def test_streamed_failed_and_refused_requests(nginx_factory, redis, sim):
    n = nginx_factory(conf(redis.addr, sim))
    c = redis.client()
    r = chat(n, completion=5, stream=True,
             stream_options={"include_usage": True})
    assert r.status_code == 200
    r2 = chat(n, model="no-such-model")
    assert r2.status_code == 404
    r3 = requests.post(n.url + "/v1/chat/completions", data=b"{not json",
                       timeout=5)
    assert r3.status_code == 400
    requests.get(n.url + "/quiet/", timeout=5)
    got = events(c, 3)
    assert len(got) == 3
    by_id = {e["request_id"]: e for e in got}
    s = by_id[r.headers["x-request-id"]]
    assert s["stream"] == "1" and s["completion_tokens"] == "5"
    e404 = by_id[r2.headers["x-request-id"]]
    # a model the registry does not have is not repeated (any string a
    # client sends would become a value: see $infer_model)
    assert e404["status"] == "404" and e404["model"] == ""
    assert e404["prompt_tokens"] == "" and e404["endpoint"] == ""
    e400 = by_id[r3.headers["x-request-id"]]
    assert e400["status"] == "400"
    time.sleep(0.1)
    assert len(c.xrange("infer:usage")) == 3      # not /quiet/


def test_batched_in_pipelines(nginx_factory, redis, sim):
    n = nginx_factory(conf(redis.addr, sim,
                           stream="infer_usage_events_stream infer:usage "
                                  "batch=8 flush=5s;"))
    c = redis.client()
    s = requests.Session()
    chat(n, session=s)        # connects: the first flush waits 5 s
    c.config_resetstat()
    for _ in range(40):
        assert chat(n, session=s).status_code == 200
    # 2 workers, batches of 8: each holds at most 7 until its 5 s flush
    got = events(c, 41 - 2 * 7, timeout=3)
    assert 41 - 2 * 7 <= len(got) <= 41
    got = events(c, 41, timeout=10)
    assert len(got) == 41
    assert c.info("commandstats")["cmdstat_xadd"]["calls"] == 41


def test_maxlen_trims_the_stream(nginx_factory, redis, sim):
    n = nginx_factory(conf(redis.addr, sim,
                           stream="infer_usage_events_stream infer:usage "
                                  "maxlen=10 batch=1;"))
    c = redis.client()
    s = requests.Session()
    for _ in range(300):
        chat(n, session=s)
    deadline = time.monotonic() + 5
    while counts(n).get("written", 0) < 300 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counts(n)["written"] == 300
    # MAXLEN ~: trimmed by whole nodes, so about 10, never 300
    assert c.xlen("infer:usage") < 200


def test_redis_down_requests_do_not_wait_and_drops_are_counted(
        nginx_factory, own_redis, sim):
    rs = own_redis()
    n = nginx_factory(conf(rs.addr, sim,
                           stream="infer_usage_events_stream infer:usage "
                                  "queue=16k flush=20ms;",
                           redis_opts="timeout=200ms connect_timeout=100ms"))
    s = requests.Session()
    assert chat(n, session=s).status_code == 200
    assert events(rs.client(), 1)
    port = rs.port
    rs.stop()
    t0 = time.monotonic()
    for _ in range(200):
        assert chat(n, session=s).status_code == 200
    assert time.monotonic() - t0 < 20
    c = counts(n)
    assert c["written"] == 1
    assert c["dropped"] > 0
    # what was not dropped waits in the queue and goes once Redis is back
    rs2 = own_redis(port=port)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        chat(n, session=s)
        c = counts(n)
        if c["written"] > 1:
            break
        time.sleep(0.2)
    assert c["written"] > 1
    assert rs2.client().xlen("infer:usage") == c["written"] - 1


def test_redis_slow_drops_are_counted(nginx_factory, own_redis, sim):
    rs = own_redis()
    n = nginx_factory(conf(rs.addr, sim,
                           stream="infer_usage_events_stream infer:usage "
                                  "queue=16k flush=20ms;",
                           redis_opts="timeout=300ms"))
    s = requests.Session()
    assert chat(n, session=s).status_code == 200
    events(rs.client(), 1)
    rs.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        for _ in range(100):
            assert chat(n, session=s).status_code == 200
        assert time.monotonic() - t0 < 20
    finally:
        rs.proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 10
    total = 0
    while time.monotonic() < deadline:
        c = counts(n)
        total = c["written"] + c["dropped"] + c["failed"]
        if total == 101:
            break
        time.sleep(0.1)
    assert total == 101, c
    assert c["dropped"] > 0


def test_needs_redis(nginx_factory, sim):
    n = nginx_factory(f"""
        infer_usage_events_stream infer:usage;
        server {{ listen 127.0.0.1:{{port}}; }}""", start=False)
    ok, out = n.check_config()
    assert not ok
    assert "infer_usage_events_stream needs infer_ratelimit_redis" in out


def test_events_need_a_stream(nginx_factory, redis):
    n = nginx_factory(f"""
        infer_ratelimit_redis {redis.addr};
        server {{ listen 127.0.0.1:{{port}};
                  location / {{ infer_usage_events on; }} }}""", start=False)
    ok, out = n.check_config()
    assert not ok
    assert "infer_usage_events needs infer_usage_events_stream" in out, out


def test_refused_requests_have_records_too(nginx_factory, redis, sim):
    n = nginx_factory(conf(redis.addr, sim, extra="",
                           location="infer_ratelimit on; "
                           "infer_ratelimit_limit one global requests=1/h;"))
    c = redis.client()
    assert chat(n).status_code == 200
    r = chat(n)
    assert r.status_code == 429
    got = events(c, 2)
    assert sorted(e["status"] for e in got) == ["200", "429"]
    (e,) = [e for e in got if e["status"] == "429"]
    assert e["request_id"] == r.headers["x-request-id"]
    assert e["prompt_tokens"] == "" and e["endpoint"] == ""


@pytest.mark.parametrize("param", ["queue=1k", "batch=0", "flush=0",
                                   "flush=2m", "maxlen=x", "nope=1"])
def test_bad_parameters(nginx_factory, redis, param):
    n = nginx_factory(f"""
        infer_ratelimit_redis {redis.addr};
        infer_usage_events_stream infer:usage {param};
        server {{ listen 127.0.0.1:{{port}}; }}""", start=False)
    ok, out = n.check_config()
    assert not ok
    assert "infer_usage_events_stream" in out and "[emerg]" in out, out


def test_reload_and_quit_write_what_is_queued(nginx_factory, redis, sim):
    n = nginx_factory(conf(redis.addr, sim,
                           stream="infer_usage_events_stream infer:usage "
                                  "batch=1000 flush=60s;"))
    c = redis.client()
    s = requests.Session()
    for _ in range(10):
        assert chat(n, session=s).status_code == 200
    s.close()
    n.reload()
    # the old workers quit: they send what they held before they exit
    got = events(c, 10, timeout=10)
    assert len(got) == 10
    for _ in range(5):
        assert chat(n).status_code == 200
    n.stop()
    got = events(c, 15, timeout=5)
    assert len(got) == 15
    assert len({e["request_id"] for e in got}) == 15


def test_cost_at_the_models_prices(nginx_factory, redis, sim):
    n = nginx_factory(conf(redis.addr, sim).replace(
        "model=llama-served;",
        "model=llama-served input_price=0.15 output_price=0.6 "
        "cached_input_price=0.075;"))
    c = redis.client()
    r = chat(n, completion=7)
    u = r.json()["usage"]
    (e,) = events(c, 1)
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    want = ((u["prompt_tokens"] - cached) * 150000 + cached * 75000
            + 7 * 600000) // 1000                       # nano-dollars
    assert e["cost"] == f"{want / 1e9:.9f}".rstrip("0").rstrip(".")


def recipe():
    """The JSON access log recipe of docs/route.md, as written there."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "route.md") \
        .read_text()
    start = text.index("    log_format infer_json escape=json")
    end = text.index("    access_log /var/log/nginx/infer.json infer_json;")
    return text[start:end]


def test_json_access_log_recipe_agrees_with_the_events(nginx_factory,
                                                        redis, sim):
    n = nginx_factory(conf(redis.addr, sim, extra=recipe(),
                           location="access_log infer.json infer_json;")
                      .replace("model=llama-served;",
                               "model=llama-served input_price=1 "
                               "output_price=3;"))
    c = redis.client()
    chat(n, completion=4)
    chat(n, completion=3, stream=True,
         stream_options={"include_usage": True})
    chat(n, model="nope")
    got = {e["request_id"]: e for e in events(c, 3)}
    assert len(got) == 3
    log = n.workdir / "infer.json"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and \
            len(log.read_text().splitlines()) < 3:
        time.sleep(0.02)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == 3
    for line in lines:
        e = got[line["request_id"]]
        assert set(line) == set(e) - {"ttft_ms", "duration_ms"} \
            | {"ttft", "duration"}
        for k in line:
            if k in ("time", "ttft", "duration"):
                continue
            assert line[k] == e[k], k
        assert abs(float(line["time"]) * 1000 - int(e["time"])) < 50
        if e["ttft_ms"]:
            assert round(float(line["ttft"]) * 1000) == int(e["ttft_ms"])
    assert any(line["cost"] for line in lines)
