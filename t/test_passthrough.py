"""With all four modules loaded and enabled (and doing nothing yet), the
gateway passes inference traffic through untouched: JSON and streamed
answers, bodies in memory, in temp files or chunked, headers; backend
failures reach the client as the backend sent them, and nothing crashes."""

import hashlib
import http.client
import json

import pytest
import requests

from harness.nginx import REPO

CHAT = {"model": "llama-3-8b",
        "messages": [{"role": "user", "content": "Say hello to the gateway"}]}


def gateway_conf(*sims, extra=""):
    servers = "".join(f"server {s.addr}; " for s in sims)
    return f"""
    upstream pool {{ {servers} keepalive 8; }}
    infer_route on; infer_auth on; infer_ratelimit on; infer_metrics on;
    infer_auth_api_keys {REPO}/t/data/api-keys.json;
    # the auth module runs, and allow lets these key-less requests in
    satisfy any; allow 127.0.0.1; deny all;
    server {{
        listen 127.0.0.1:{{port}};
        client_max_body_size 16m;
        {extra}
        location / {{
            proxy_pass http://pool;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}"""


@pytest.fixture
def pool(sim_factory):
    return [sim_factory("llama-3-8b", "llama-a", ttft_ms=1, tpot_ms=1),
            sim_factory("llama-3-8b", "llama-b", ttft_ms=1, tpot_ms=1)]


@pytest.fixture
def gw(nginx_factory, pool):
    return nginx_factory(gateway_conf(*pool))


def sse_events(raw):
    """The data: payloads of an SSE body, in order."""
    events = []
    for block in raw.decode().split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
    return events


def stream(gw, body, headers=None):
    c = http.client.HTTPConnection(gw.host, gw.port, timeout=10)
    c.request("POST", "/v1/chat/completions", json.dumps(body),
              {"content-type": "application/json", **(headers or {})})
    r = c.getresponse()
    return r, r.read()


def test_chat_completion_passes_through_both_replicas(gw, pool):
    seen = set()
    for _ in range(6):
        r = requests.post(gw.url + "/v1/chat/completions", json=CHAT,
                          timeout=10)
        assert r.status_code == 200
        body = r.json()
        assert body["object"] == "chat.completion"
        assert body["model"] == "llama-3-8b"
        u = body["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        seen.add(r.headers["x-sim-replica"])
    assert seen == {"llama-a", "llama-b"}


def test_stream_passes_through_whole(gw):
    body = dict(CHAT, stream=True, max_tokens=12,
                stream_options={"include_usage": True})
    r, raw = stream(gw, body)
    assert r.status == 200
    assert r.getheader("content-type").startswith("text/event-stream")
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or ""
                   for c in chunks if c["choices"])
    assert len(text.split()) == 12
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 12


def test_stream_split_mid_line_by_the_backend_arrives_intact(gw):
    body = dict(CHAT, stream=True, max_tokens=20,
                stream_options={"include_usage": True})
    _, whole = stream(gw, body)
    _, split = stream(gw, body, {"x-sim-split-writes": "1"})

    def content(raw):
        return [(c["choices"][0]["delta"].get("content") if c["choices"]
                 else c["usage"]) for c in map(json.loads, sse_events(raw)[:-1])]

    assert sse_events(split)[-1] == "[DONE]"
    assert content(split) == content(whole)


def test_body_spilled_to_a_temp_file_reaches_the_backend_intact(gw, pool):
    filler = "x" * (1024 * 1024)
    body = json.dumps(dict(CHAT, messages=[{"role": "user", "content": filler}]))
    for s in pool:
        s.clear_requests()
    r = requests.post(gw.url + "/v1/chat/completions", data=body,
                      headers={"content-type": "application/json"}, timeout=20)
    assert r.status_code == 200
    got = [q for s in pool for q in s.requests()
           if q["path"] == "/v1/chat/completions"]
    assert len(got) == 1
    assert got[0]["body_len"] == len(body)
    assert got[0]["body_sha256"] == hashlib.sha256(body.encode()).hexdigest()
    assert "buffered to a temporary file" in gw.log_text()


def test_chunked_request_body_reaches_the_backend_intact(gw, pool):
    body = json.dumps(CHAT).encode() * 1
    parts = [body[i:i + 7] for i in range(0, len(body), 7)]
    for s in pool:
        s.clear_requests()
    r = requests.post(gw.url + "/v1/chat/completions", data=iter(parts),
                      headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 200
    got = [q for s in pool for q in s.requests()
           if q["path"] == "/v1/chat/completions"]
    assert len(got) == 1
    assert got[0]["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_request_headers_reach_the_backend(gw, pool):
    for s in pool:
        s.clear_requests()
    requests.post(gw.url + "/v1/chat/completions", json=CHAT, timeout=10,
                  headers={"x-request-id": "req-42", "x-tenant-hint": "acme"})
    got = [q for s in pool for q in s.requests()]
    assert len(got) == 1
    names = {k.lower(): v for k, v in got[0]["headers"]}
    assert names["x-request-id"] == "req-42"
    assert names["x-tenant-hint"] == "acme"


def test_backend_status_and_error_envelope_pass_through(gw, openai_sdk):
    r = requests.post(gw.url + "/v1/chat/completions", json=CHAT, timeout=10,
                      headers={"x-sim-status": "429"})
    assert r.status_code == 429
    assert "error" in r.json()

    out = openai_sdk(gw.url + "/v1", "chat", dict(CHAT),
                     headers={"x-sim-status": "429"})
    assert out["ok"] is False and out["error_class"] == "RateLimitError"


def test_backend_reset_mid_stream_cuts_the_stream_and_nothing_crashes(gw):
    body = dict(CHAT, stream=True, max_tokens=50)
    c = http.client.HTTPConnection(gw.host, gw.port, timeout=10)
    c.request("POST", "/v1/chat/completions", json.dumps(body),
              {"content-type": "application/json",
               "x-sim-reset-after-chunks": "3"})
    r = c.getresponse()
    assert r.status == 200
    with pytest.raises(http.client.IncompleteRead):
        r.read()
    # the gateway goes on serving
    r = requests.post(gw.url + "/v1/chat/completions", json=CHAT, timeout=10)
    assert r.status_code == 200
    assert "upstream prematurely closed" in gw.log_text() \
        or "reset by peer" in gw.log_text()


def test_openai_sdk_through_the_gateway(gw, openai_sdk):
    base = gw.url + "/v1"
    out = openai_sdk(base, "chat", dict(CHAT, max_tokens=5))
    assert out["ok"], out
    assert out["result"]["model"] == "llama-3-8b"
    assert out["result"]["usage"]["completion_tokens"] == 5

    out = openai_sdk(base, "chat_stream",
                     dict(CHAT, max_tokens=7,
                          stream_options={"include_usage": True}))
    assert out["ok"], out
    assert len(out["result"]["text"].split()) == 7
    assert out["result"]["usage"]["completion_tokens"] == 7

    out = openai_sdk(base, "embeddings", {"model": "llama-3-8b",
                                          "input": ["a", "b"]})
    assert out["ok"], out
    assert len(out["result"]["data"]) == 2


def test_kserve_v2_infer_passes_through(gw):
    req = {"inputs": [{"name": "input0", "shape": [3], "datatype": "FP32",
                       "data": [1.0, 2.0, 3.0]}]}
    r = requests.post(gw.url + "/v2/models/llama-3-8b/infer", json=req,
                      timeout=10)
    assert r.status_code == 200
    assert r.json()["model_name"] == "llama-3-8b"
    assert r.json()["outputs"][0]["shape"] == [3]
