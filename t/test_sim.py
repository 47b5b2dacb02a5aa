"""Tests of the simulated model server itself (sim/infer_sim.py): the
OpenAI / KServe v2 shapes, streaming, metrics under real load, failure
injection, request recording and the HTTP/1.1 details the gateway tests
rely on.  Only 127.0.0.1; every wait is bounded."""

import hashlib
import http.client
import json
import math
import socket
import threading
import time

import pytest



CHAT = {"model": "llama-3-8b",
        "messages": [{"role": "user", "content": "Say hello to the gateway"}]}


# ------------------------------------------------------------------ fixtures

@pytest.fixture
def make_sim(sim_factory):
    """sim_factory with fast tokens by default."""

    def make(model="llama-3-8b", replica=None, **opts):
        opts.setdefault("ttft_ms", 1)
        opts.setdefault("tpot_ms", 0.5)
        return sim_factory(model, replica, **opts)

    return make


@pytest.fixture
def sim(make_sim):
    return make_sim(replica="llama-a")


# ------------------------------------------------------------------- helpers

def post(s, path, body, headers=None, timeout=10):
    c = http.client.HTTPConnection(s.host, s.port, timeout=timeout)
    try:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        c.request("POST", path, data, {"content-type": "application/json",
                                       **(headers or {})})
        r = c.getresponse()
        return r, r.read()
    finally:
        c.close()


def get(s, path, timeout=10):
    c = http.client.HTTPConnection(s.host, s.port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r, r.read()
    finally:
        c.close()


def raw_exchange(s, data, timeout=10, chunks=None):
    """Send raw bytes, read until the server closes; returns (bytes, recvs)."""
    recvs = []
    with socket.create_connection((s.host, s.port), timeout=timeout) as sk:
        sk.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sk.sendall(data)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            b = sk.recv(65536)
            if not b:
                break
            recvs.append(b)
    return b"".join(recvs), recvs


def request_bytes(method, path, body=b"", headers=(), version="HTTP/1.1",
                  close=True):
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    lines = [f"{method} {path} {version}", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def split_response(raw):
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return status, hdrs, rest


def dechunk(data):
    """Strict chunked decoding: returns (body, chunk payloads)."""
    out, pieces = [], []
    while True:
        line, _, data = data.partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            assert data == b"\r\n", data[:50]
            return b"".join(out), pieces
        piece, data = data[:size], data[size:]
        assert data[:2] == b"\r\n"
        data = data[2:]
        out.append(piece)
        pieces.append(piece)


def sse_events(raw):
    assert raw.endswith(b"\n\n")
    events = []
    for block in raw.decode().split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        events.append(block[len("data: "):])
    return events


def stream_raw(s, body, headers=(), version="HTTP/1.1", timeout=10):
    raw, recvs = raw_exchange(s, request_bytes(
        "POST", "/v1/chat/completions", body,
        [("Content-Type", "application/json")] + list(headers), version),
        timeout=timeout)
    return raw, recvs


def deltas(events):
    out = []
    for e in events[:-1]:
        c = json.loads(e)
        out.append((c["choices"][0]["delta"], c["choices"][0]["finish_reason"])
                   if c["choices"] else ("usage", c["usage"]))
    return out


def metrics(s):
    from prometheus_client.parser import text_string_to_metric_families
    r, data = get(s, "/metrics")
    assert r.status == 200
    assert r.getheader("content-type") == "text/plain; version=0.0.4; charset=utf-8"
    fams = {f.name: f for f in text_string_to_metric_families(data.decode())}
    return fams


def sample(fams, fam, name=None, **labels):
    for smp in fams[fam].samples:
        if (name is None or smp.name == name) and all(
                smp.labels.get(k) == v for k, v in labels.items()):
            return smp.value
    raise KeyError((fam, name, labels))


def tokens(text):
    return math.ceil(len(text.encode()) / 4)


# --------------------------------------------------------------- JSON answers

def test_chat_completion_shape_and_usage(sim):
    msgs = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "héllo wörld, ça va?"}]
    r, data = post(sim, "/v1/chat/completions",
                   {"model": "whatever-the-client-said", "messages": msgs,
                    "max_tokens": 7})
    assert r.status == 200
    assert r.getheader("x-sim-replica") == "llama-a"
    assert r.getheader("content-type") == "application/json"
    b = json.loads(data)
    assert b["id"].startswith("chatcmpl-") and b["object"] == "chat.completion"
    assert b["model"] == "llama-3-8b"          # always the configured model
    assert isinstance(b["created"], int)
    ch = b["choices"][0]
    assert ch["message"]["role"] == "assistant"
    assert len(ch["message"]["content"].split()) == 7
    assert ch["finish_reason"] == "length"
    u = b["usage"]
    expect_prompt = 3 + sum(tokens(m["content"]) + 4 for m in msgs)
    assert u == {"prompt_tokens": expect_prompt, "completion_tokens": 7,
                 "total_tokens": expect_prompt + 7,
                 "prompt_tokens_details": {"cached_tokens": 0}}

    # no max_tokens: the default count, finished on its own
    b = json.loads(post(sim, "/v1/chat/completions", CHAT)[1])
    assert b["usage"]["completion_tokens"] == 16
    assert b["choices"][0]["finish_reason"] == "stop"
    # max_completion_tokens wins over max_tokens; deterministic text
    b2 = json.loads(post(sim, "/v1/chat/completions",
                         dict(CHAT, max_tokens=9, max_completion_tokens=4))[1])
    assert b2["usage"]["completion_tokens"] == 4
    assert b["choices"][0]["message"]["content"].split()[:4] == \
        b2["choices"][0]["message"]["content"].split()
    # forced count
    b = json.loads(post(sim, "/v1/chat/completions", CHAT,
                        {"x-sim-completion-tokens": "3"})[1])
    assert b["usage"]["completion_tokens"] == 3
    assert len(b["choices"][0]["message"]["content"].split()) == 3


def test_completions_embeddings_models_v2_api(make_sim):
    s = make_sim(max_tokens_cap=10)
    r, data = post(s, "/v1/completions",
                   {"model": "x", "prompt": "abcdefghi", "max_tokens": 50})
    b = json.loads(data)
    assert r.status == 200 and b["object"] == "text_completion"
    assert b["id"].startswith("cmpl-")
    assert len(b["choices"][0]["text"].split()) == 10       # capped
    assert b["usage"]["prompt_tokens"] == 3
    assert b["usage"]["completion_tokens"] == 10

    r, data = post(s, "/v1/embeddings", {"model": "x", "input": ["a", "bb", "a"]})
    b = json.loads(data)
    assert r.status == 200 and b["object"] == "list" and b["model"] == "llama-3-8b"
    vecs = [d["embedding"] for d in b["data"]]
    assert [d["index"] for d in b["data"]] == [0, 1, 2]
    assert all(len(v) == 8 for v in vecs) and vecs[0] == vecs[2] != vecs[1]
    assert b["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    b = json.loads(post(s, "/v1/embeddings", {"model": "x", "input": "one"})[1])
    assert len(b["data"]) == 1

    r, data = get(s, "/v1/models")
    b = json.loads(data)
    assert b["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in b["data"]] == \
        [("llama-3-8b", "model", "sim")]

    req = {"id": "rq-1", "inputs": [{"name": "input0", "shape": [2, 2],
                                     "datatype": "FP32", "data": [[1, 2], [3, 4]]}]}
    for path, ver in (("/v2/models/other/infer", "1"),
                      ("/v2/models/other/versions/7/infer", "7")):
        r, data = post(s, path, req)
        b = json.loads(data)
        assert r.status == 200
        assert b["model_name"] == "llama-3-8b" and b["model_version"] == ver
        assert b["id"] == "rq-1"
        assert b["outputs"][0]["shape"] == [4]
        assert b["outputs"][0]["datatype"] == "FP32"
        assert len(b["outputs"][0]["data"]) == 4
    r, data = post(s, "/v2/models/other/infer", b"{nope")
    assert r.status == 400 and isinstance(json.loads(data)["error"], str)

    r, data = post(s, "/api/infer", {"model": "m", "payload": {"q": "hi"}})
    b = json.loads(data)
    assert r.status == 200 and b["model"] == "llama-3-8b"
    assert b["output"]["echo"] == {"q": "hi"}
    assert b["usage"]["total_tokens"] == b["usage"]["prompt_tokens"] + \
        b["usage"]["completion_tokens"]

    for path in ("/health", "/v2/health/ready", "/v2/health/live"):
        r, data = get(s, path)
        assert r.status == 200 and data == b""
        assert r.getheader("x-sim-replica") == s.replica


def test_errors_bad_json_missing_model_404_405(sim):
    for body in (b"{not json", b"[1,2]"):
        r, data = post(sim, "/v1/chat/completions", body)
        assert r.status == 400
        err = json.loads(data)["error"]
        assert err["type"] == "invalid_request_error"
        assert set(err) == {"message", "type", "param", "code"}
        assert err["param"] is None
    r, data = post(sim, "/v1/chat/completions", {"messages": CHAT["messages"]})
    assert r.status == 400 and "model" in json.loads(data)["error"]["message"]
    r, data = get(sim, "/v1/nothing-here")
    assert r.status == 404 and "error" in json.loads(data)
    assert r.getheader("x-sim-replica") == "llama-a"
    r, data = get(sim, "/v1/chat/completions")
    assert r.status == 405 and "error" in json.loads(data)
    # a request of 65 MiB is refused before its body is read
    raw, _ = raw_exchange(sim, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Length: %d\r\n\r\n" % (65 * 1024 * 1024))
    status, _, body = split_response(raw)
    assert status == 413 and "error" in json.loads(body)


# ----------------------------------------------------------------- streaming

def test_stream_event_format_with_usage(sim):
    body = dict(CHAT, stream=True, max_tokens=5,
                stream_options={"include_usage": True})
    raw, _ = stream_raw(sim, body)
    status, hdrs, rest = split_response(raw)
    assert status == 200
    assert hdrs["content-type"] == "text/event-stream"
    assert hdrs["cache-control"] == "no-cache"
    assert hdrs["transfer-encoding"] == "chunked"
    assert hdrs["x-sim-replica"] == "llama-a"
    payload, _ = dechunk(rest)
    events = sse_events(payload)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 1 + 5 + 1
    assert all("usage" in c for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "llama-3-8b"
               for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    toks = chunks[1:6]
    assert [c["choices"][0]["finish_reason"] for c in toks] == [None] * 4 + ["length"]
    text = "".join(c["choices"][0]["delta"]["content"] for c in toks)
    assert len(text.split()) == 5
    nonstream = json.loads(post(sim, "/v1/chat/completions",
                                dict(CHAT, max_tokens=5))[1])
    assert text == nonstream["choices"][0]["message"]["content"]
    last = chunks[-1]
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 5
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 5

    # without include_usage: no usage key at all, no usage chunk
    raw, _ = stream_raw(sim, dict(CHAT, stream=True, max_tokens=2))
    events = sse_events(dechunk(split_response(raw)[2])[0])
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 3 and all("usage" not in c for c in chunks)

    # completions stream
    raw, _ = raw_exchange(sim, request_bytes(
        "POST", "/v1/completions", {"model": "m", "prompt": "p", "stream": True,
                                    "max_tokens": 3}))
    events = sse_events(dechunk(split_response(raw)[2])[0])
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["object"] for c in chunks] == ["text_completion"] * 3
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stream_http10_is_close_delimited(sim):
    raw, _ = stream_raw(sim, dict(CHAT, stream=True, max_tokens=3),
                        version="HTTP/1.0")
    status, hdrs, rest = split_response(raw)
    assert status == 200 and "transfer-encoding" not in hdrs
    assert hdrs.get("connection") == "close"
    events = sse_events(rest)
    assert events[-1] == "[DONE]" and len(events) == 1 + 3 + 1


def test_stream_timing_follows_ttft_and_tpot(make_sim):
    s = make_sim(ttft_ms=150, tpot_ms=30)
    t0 = time.monotonic()
    r, data = post(s, "/v1/chat/completions", dict(CHAT, max_tokens=10))
    el = time.monotonic() - t0
    assert r.status == 200
    assert 0.15 + 9 * 0.03 - 0.02 <= el < 2.0
    # per-request overrides
    t0 = time.monotonic()
    post(s, "/v1/chat/completions", dict(CHAT, max_tokens=10),
         {"x-sim-ttft-ms": "0", "x-sim-tpot-ms": "0"})
    assert time.monotonic() - t0 < 0.3


def test_split_writes_same_content_in_fragments(make_sim):
    s = make_sim(seed=7)
    body = dict(CHAT, stream=True, max_tokens=12,
                stream_options={"include_usage": True})
    raw_whole, _ = stream_raw(s, body)
    raw_split, recvs = stream_raw(s, body, [("x-sim-split-writes", "1")])
    whole, whole_pieces = dechunk(split_response(raw_whole)[2])
    split, split_pieces = dechunk(split_response(raw_split)[2])
    ev_whole, ev_split = sse_events(whole), sse_events(split)
    assert ev_split[-1] == "[DONE]"
    assert deltas(ev_split) == deltas(ev_whole)
    # every event of the plain run is one chunk; the split run cut them
    assert all(p.endswith(b"\n\n") for p in whole_pieces)
    assert len(split_pieces) > len(whole_pieces)
    assert any(not p.endswith(b"\n\n") for p in split_pieces)
    assert any(not p.startswith(b"data: ") for p in split_pieces)
    # and they left as separate segments
    assert len(recvs) > len(ev_split)
    # the same through the config flag
    s2 = make_sim(seed=7, split_writes=True)
    raw2, _ = stream_raw(s2, body)
    assert deltas(sse_events(dechunk(split_response(raw2)[2])[0])) == deltas(ev_whole)


# ------------------------------------------------------------ the OpenAI SDK

def test_openai_sdk_parses_everything(sim, openai_sdk):
    sdk = openai_sdk
    base = sim.url + "/v1"
    out = sdk(base, "chat", dict(CHAT, max_tokens=5))
    assert out["ok"], out
    assert out["result"]["usage"]["completion_tokens"] == 5
    assert out["headers"]["x-sim-replica"] == "llama-a"

    out = sdk(base, "chat_stream", dict(CHAT, max_tokens=7,
                                        stream_options={"include_usage": True}))
    assert out["ok"], out
    assert len(out["result"]["text"].split()) == 7
    assert out["result"]["usage"]["completion_tokens"] == 7
    assert out["result"]["finish_reason"] == "length"

    out = sdk(base, "chat_stream", dict(CHAT, max_tokens=4),
              headers={"x-sim-split-writes": "1"})
    assert out["ok"], out
    assert len(out["result"]["text"].split()) == 4

    out = sdk(base, "embeddings", {"model": "m", "input": ["a", "b"]})
    assert out["ok"], out
    assert [len(d["embedding"]) for d in out["result"]["data"]] == [8, 8]
    # the SDK asks for base64 and decodes it: same floats as a JSON answer
    plain = json.loads(post(sim, "/v1/embeddings", {"model": "m", "input": ["a", "b"]})[1])
    assert [d["embedding"] for d in out["result"]["data"]] == \
        [d["embedding"] for d in plain["data"]]

    out = sdk(base, "models")
    assert out["ok"], out
    assert out["result"]["data"][0]["id"] == "llama-3-8b"

    out = sdk(base, "completions", {"model": "m", "prompt": "hi", "max_tokens": 2})
    assert out["ok"] and out["result"]["usage"]["completion_tokens"] == 2

    out = sdk(base, "chat", dict(CHAT), headers={"x-sim-status": "429"})
    assert out["ok"] is False and out["error_class"] == "RateLimitError"
    assert out["status"] == 429 and out["error"]["type"] == "rate_limit_error"
    out = sdk(base, "chat", {"model": "m", "messages": []})
    assert out["ok"] is False and out["error_class"] == "BadRequestError"

    out = sdk(base, "chat_stream", dict(CHAT, max_tokens=20),
              headers={"x-sim-reset-after-chunks": "3"})
    assert out["ok"] is False
    assert len(out["partial"]["chunks"]) == 3


# ------------------------------------------------------------------- metrics

def test_metrics_parse_and_reflect_real_load(make_sim):
    s = make_sim(max_concurrency=2, ttft_ms=5, tpot_ms=20)
    fams = metrics(s)
    assert fams["vllm:num_requests_running"].type == "gauge"
    # counters keep their _total samples under a family the parser typed counter
    assert fams["vllm:prompt_tokens"].type == "counter"
    assert fams["vllm:generation_tokens"].type == "counter"
    assert fams["vllm:request_success"].type == "counter"
    assert fams["vllm:time_to_first_token_seconds"].type == "histogram"
    assert fams["vllm:e2e_request_latency_seconds"].type == "histogram"
    assert sample(fams, "vllm:kv_cache_usage_perc") == 0.0
    assert sample(fams, "vllm:num_requests_running", model_name="llama-3-8b") == 0

    body = dict(CHAT, stream=True, max_tokens=20)
    results = []

    def one():
        try:
            r, data = post(s, "/v1/chat/completions", body, timeout=15)
            results.append((r.status, data))
        except Exception as e:          # noqa: BLE001
            results.append((None, repr(e)))

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    seen = None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        fams = metrics(s)
        run = sample(fams, "vllm:num_requests_running")
        wait = sample(fams, "vllm:num_requests_waiting")
        if (run, wait) == (2, 4):
            seen = fams
            break
        time.sleep(0.01)
    assert seen is not None, "never saw running=2 waiting=4"
    assert 0 < sample(seen, "vllm:kv_cache_usage_perc") <= 1
    for t in threads:
        t.join(15)
    assert [st for st, _ in results] == [200] * 6, results

    fams = metrics(s)
    assert sample(fams, "vllm:num_requests_running") == 0
    assert sample(fams, "vllm:num_requests_waiting") == 0
    assert sample(fams, "vllm:kv_cache_usage_perc") == 0
    assert sample(fams, "vllm:generation_tokens") == 6 * 20
    assert sample(fams, "vllm:prompt_tokens") == 6 * (3 + tokens(CHAT["messages"][0]["content"]) + 4)
    assert sample(fams, "vllm:request_success", finished_reason="length") == 6
    assert sample(fams, "vllm:time_to_first_token_seconds",
                  "vllm:time_to_first_token_seconds_count") == 6
    # queueing counts toward latency: 3 rounds of 2, each >= 5 + 19 * 20 ms
    one = 0.005 + 19 * 0.02
    assert sample(fams, "vllm:e2e_request_latency_seconds",
                  "vllm:e2e_request_latency_seconds_sum") >= 0.8 * (2 + 4 + 6) * one


def parse_page(data):
    from prometheus_client.parser import text_string_to_metric_families
    return {f.name: f for f in text_string_to_metric_families(data.decode())}


def test_metrics_flavors_and_fake_load(make_sim):
    s = make_sim(metrics_flavor="sglang", fake_waiting=7, fake_running=3,
                 fake_kv_cache_usage=0.25)
    fams = metrics(s)
    assert not [n for n in fams if n.startswith("vllm:")], list(fams)
    for name, value in (("sglang:num_queue_reqs", 7), ("sglang:num_running_reqs", 3),
                        ("sglang:token_usage", 0.25)):
        assert fams[name].type == "gauge"
        assert sample(fams, name, model_name="llama-3-8b", tp_rank="0") == value
    assert fams["sglang:prompt_tokens"].type == "counter"
    assert fams["sglang:time_to_first_token_seconds"].type == "histogram"

    # switched at run time, the fake figures kept
    s.configure(metrics_flavor="tgi")
    r, data = get(s, "/metrics")
    assert r.status == 200
    assert b"# HELP" not in data and b"{model_name" not in data
    fams = parse_page(data)
    assert not [n for n in fams if not n.startswith("tgi_")], list(fams)
    assert sample(fams, "tgi_queue_size") == 7
    assert sample(fams, "tgi_batch_current_size") == 3
    assert b"\ntgi_queue_size 7\n" in data            # integers, as TGI writes them
    assert fams["tgi_request_count"].type == "counter"
    assert fams["tgi_request_duration"].type == "histogram"
    assert not [n for n in fams if "kv" in n or "cache" in n or "usage" in n]

    s.configure(metrics_flavor="vllm", fake_waiting=None, fake_running=5,
                fake_kv_cache_usage=None)
    fams = metrics(s)
    assert sample(fams, "vllm:num_requests_waiting") == 0
    assert sample(fams, "vllm:num_requests_running") == 5
    assert sample(fams, "vllm:kv_cache_usage_perc") == 0
    assert "vllm:lora_requests_info" not in fams      # max_lora=0: no family

    # real load shows in every flavor
    s.configure(fake_running=None, max_concurrency=1, metrics_flavor="tgi")
    body = dict(CHAT, stream=True, max_tokens=50)
    out = []
    ts = [threading.Thread(target=lambda: out.append(
        post(s, "/v1/chat/completions", body, timeout=15)[0].status)) for _ in range(3)]
    for t in ts:
        t.start()
    seen = None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and seen is None:
        fams = parse_page(get(s, "/metrics")[1])
        if (sample(fams, "tgi_batch_current_size"), sample(fams, "tgi_queue_size")) == (1, 2):
            seen = fams
        time.sleep(0.005)
    for t in ts:
        t.join(15)
    assert seen is not None, "never saw running=1 waiting=2"
    assert out == [200] * 3
    assert sample(parse_page(get(s, "/metrics")[1]), "tgi_request_count") == 3

    # bad values refused
    for bad in ({"metrics_flavor": "triton"}, {"metrics_status": 99},
                {"metrics_status": 700}, {"max_lora": -1}, {"lora_running": 'a"b'}):
        r, _ = post(s, "/_sim/config", bad)
        assert r.status == 400, bad


def test_metrics_failing_slow_and_garbage(make_sim):
    s = make_sim(metrics_status=503)
    assert s.stats()["metrics_requests"] == 0
    r, data = get(s, "/metrics")
    assert r.status == 503 and data.startswith(b"simulated /metrics failure")
    assert r.getheader("content-type") == "text/plain; charset=utf-8"
    # inference is not affected
    assert post(s, "/v1/chat/completions", dict(CHAT, max_tokens=1))[0].status == 200

    s.configure(metrics_status=200, metrics_garbage=True)
    r, data = get(s, "/metrics")
    assert r.status == 200 and b"\x00" in data and len(data) > 65536
    with pytest.raises(Exception):
        parse_page(data)
    assert b"vllm:" not in data and b"sglang:" not in data and b"tgi_" not in data

    s.configure(metrics_garbage=False, metrics_stall_ms=3000)
    t0 = time.monotonic()
    with pytest.raises((socket.timeout, TimeoutError)):
        get(s, "/metrics", timeout=0.3)
    assert time.monotonic() - t0 < 2
    s.configure(metrics_stall_ms=150)
    t0 = time.monotonic()
    assert get(s, "/metrics")[0].status == 200
    assert time.monotonic() - t0 >= 0.15
    assert s.stats()["metrics_requests"] == 4

    # from the command line, over HTTP/1.0 as a gateway scrapes
    s2 = make_sim(metrics_status=500, metrics_flavor="tgi")
    raw, _ = raw_exchange(s2, request_bytes("GET", "/metrics", version="HTTP/1.0",
                                            close=False))
    assert raw.startswith(b"HTTP/1.1 500 ")
    s2.configure(metrics_status=200)
    raw, _ = raw_exchange(s2, request_bytes("GET", "/metrics", version="HTTP/1.0",
                                            close=False))
    status, hdrs, rest = split_response(raw)
    assert status == 200 and hdrs["connection"] == "close"
    assert int(hdrs["content-length"]) == len(rest) and b"tgi_queue_size 0" in rest
    assert s2.stats()["metrics_requests"] == 2


def lora_samples(s):
    fams = metrics(s)
    assert fams["vllm:lora_requests_info"].type == "gauge"
    return [(smp.labels, smp.value) for smp in fams["vllm:lora_requests_info"].samples]


def test_lora_requests_info(make_sim):
    s = make_sim(max_lora=4, lora_running="sql-lora, chat-lora", fake_waiting=2)
    t0 = time.time()
    (labels, value), = lora_samples(s)
    assert labels == {"max_lora": "4", "running_lora_adapters": "sql-lora,chat-lora",
                      "waiting_lora_adapters": ""}
    assert abs(value - t0) < 5          # vLLM's value: a unix time
    assert sample(metrics(s), "vllm:num_requests_waiting") == 2

    s.configure(lora_running="sql-lora", lora_waiting=["chat-lora", "x"])
    smp = lora_samples(s)
    assert [lb for lb, _ in smp] == [
        {"max_lora": "4", "running_lora_adapters": "sql-lora,chat-lora",
         "waiting_lora_adapters": ""},
        {"max_lora": "4", "running_lora_adapters": "sql-lora",
         "waiting_lora_adapters": "chat-lora,x"}]
    # the current label set has the largest value
    assert smp[1][1] > smp[0][1]
    # an unrelated change keeps them as they are
    s.configure(fake_waiting=None)
    assert [lb for lb, _ in lora_samples(s)] == [lb for lb, _ in smp]

    # back to the first set: it is current again, first on the page as
    # vLLM writes them (first seen first), the second one older
    s.configure(lora_running="sql-lora,chat-lora", lora_waiting="")
    smp2 = lora_samples(s)
    assert [lb for lb, _ in smp2] == [lb for lb, _ in smp]
    assert smp2[0][1] > smp2[1][1] >= smp[1][1]

    # only the vllm flavor has it; max_lora=0 removes the family
    s.configure(metrics_flavor="sglang")
    assert b"lora" not in get(s, "/metrics")[1]
    s.configure(metrics_flavor="vllm", max_lora=0)
    assert "vllm:lora_requests_info" not in metrics(s)
    s.configure(max_lora=2, lora_running="", lora_waiting="")
    smp3 = lora_samples(s)
    cur = max(smp3, key=lambda x: x[1])[0]
    assert cur == {"max_lora": "2", "running_lora_adapters": "",
                   "waiting_lora_adapters": ""}


def test_queue_full_is_503_and_disconnect_releases_the_slot(make_sim):
    s = make_sim(max_concurrency=1, max_queue=1, ttft_ms=5, tpot_ms=50)
    slow = dict(CHAT, stream=True, max_tokens=100)
    # a streaming client that goes away after the first event
    sk = socket.create_connection((s.host, s.port), timeout=5)
    sk.sendall(request_bytes("POST", "/v1/chat/completions", slow,
                             [("Content-Type", "application/json")]))
    assert b"data: " in sk.recv(65536) or b"data: " in sk.recv(65536)
    # one waits in the queue, the next is refused
    waiter = socket.create_connection((s.host, s.port), timeout=5)
    waiter.sendall(request_bytes("POST", "/v1/chat/completions", CHAT,
                                 [("Content-Type", "application/json")]))
    deadline = time.monotonic() + 3
    while s.stats()["waiting"] != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    r, data = post(s, "/v1/chat/completions", CHAT)
    assert r.status == 503 and "error" in json.loads(data)
    waiter.close()
    sk.close()
    deadline = time.monotonic() + 3
    while (s.stats()["running"], s.stats()["waiting"]) != (0, 0) \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    st = s.stats()
    assert (st["running"], st["waiting"]) == (0, 0)
    assert st["success"]["abort"] >= 1
    r, _ = post(s, "/v1/chat/completions", dict(CHAT, max_tokens=1))
    assert r.status == 200


# --------------------------------------------------------- failure injection

def test_fail_ratio_and_status_header(make_sim):
    s = make_sim(fail_status=503, fail_ratio=1.0)
    r, data = post(s, "/v1/chat/completions", CHAT)
    assert r.status == 503
    err = json.loads(data)["error"]
    assert err["type"] == "server_error" and err["message"]
    # control endpoints and health are not subject to failures
    assert get(s, "/health")[0].status == 200
    assert s.config()["fail_ratio"] == 1.0

    s.configure(fail_ratio=0.5, fail_status=500, seed=3)
    got = [post(s, "/v1/chat/completions", dict(CHAT, max_tokens=1))[0].status
           for _ in range(40)]
    assert set(got) == {200, 500} and 8 < got.count(500) < 32
    s.configure(seed=3)
    again = [post(s, "/v1/chat/completions", dict(CHAT, max_tokens=1))[0].status
             for _ in range(40)]
    assert again == got                     # deterministic per seed

    s.configure(fail_ratio=0)
    r, data = post(s, "/v1/chat/completions", CHAT, {"x-sim-status": "429"})
    assert r.status == 429
    assert json.loads(data)["error"]["type"] == "rate_limit_error"
    r, data = post(s, "/v2/models/m/infer", {"inputs": []}, {"x-sim-status": "500"})
    assert r.status == 500 and isinstance(json.loads(data)["error"], str)

    r, data = post(s, "/_sim/config", {"no_such_option": 1})
    assert r.status == 400


def test_reset_mid_stream_is_an_incomplete_stream(make_sim):
    s = make_sim()
    body = dict(CHAT, stream=True, max_tokens=50)
    data = b""
    with socket.create_connection((s.host, s.port), timeout=5) as sk:
        sk.sendall(request_bytes("POST", "/v1/chat/completions", body,
                                 [("Content-Type", "application/json"),
                                  ("x-sim-reset-after-chunks", "3")]))
        with pytest.raises(ConnectionResetError):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                b = sk.recv(65536)
                if not b:
                    break           # a clean FIN: fails the raises() check
                data += b
    _, hdrs, rest = split_response(data)
    assert hdrs["transfer-encoding"] == "chunked"
    assert rest.count(b"data: ") == 3 and not rest.endswith(b"0\r\n\r\n")

    # the same seen by http.client
    c = http.client.HTTPConnection(s.host, s.port, timeout=5)
    c.request("POST", "/v1/chat/completions", json.dumps(body),
              {"x-sim-reset-after-chunks": "2"})
    r = c.getresponse()
    assert r.status == 200
    with pytest.raises((http.client.IncompleteRead, ConnectionResetError)):
        r.read()
    c.close()

    # a JSON answer cut after its headers and part of its body
    s.configure(reset_after_chunks=1)
    c = http.client.HTTPConnection(s.host, s.port, timeout=5)
    c.request("POST", "/v1/chat/completions", json.dumps(CHAT))
    r = c.getresponse()
    assert r.status == 200
    with pytest.raises((http.client.IncompleteRead, ConnectionResetError)):
        r.read()
    c.close()
    s.configure(reset_after_chunks=None)
    assert post(s, "/v1/chat/completions", CHAT)[0].status == 200


def test_stall_outlasts_a_client_timeout(make_sim):
    s = make_sim()
    t0 = time.monotonic()
    with pytest.raises((socket.timeout, TimeoutError)):
        post(s, "/v1/chat/completions", CHAT, {"x-sim-stall-ms": "3000"}, timeout=0.4)
    assert time.monotonic() - t0 < 2
    t0 = time.monotonic()
    r, _ = post(s, "/v1/chat/completions", dict(CHAT, max_tokens=1),
                {"x-sim-stall-ms": "200"})
    assert r.status == 200 and time.monotonic() - t0 >= 0.2
    s.configure(stall_ms=150)
    t0 = time.monotonic()
    assert post(s, "/v1/chat/completions", dict(CHAT, max_tokens=1))[0].status == 200
    assert time.monotonic() - t0 >= 0.15
    assert get(s, "/_sim/stats")[0].status == 200


# --------------------------------------------------- request bodies, records

def test_chunked_body_with_trailers_and_expect_100(sim):
    sim.clear_requests()
    body = json.dumps(dict(CHAT, max_tokens=2)).encode()
    with socket.create_connection((sim.host, sim.port), timeout=5) as sk:
        sk.sendall(b"POST /v1/chat/completions?a=1&b=2 HTTP/1.1\r\nHost: x\r\n"
                   b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
                   b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        assert sk.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        for i in range(0, len(body), 7):
            piece = body[i:i + 7]
            sk.sendall(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
        sk.sendall(b"0\r\nX-Trailer: yes\r\n\r\n")
        raw = b""
        while True:
            b = sk.recv(65536)
            if not b:
                break
            raw += b
    status, _, rest = split_response(raw)
    assert status == 200 and json.loads(rest)["usage"]["completion_tokens"] == 2
    rec = sim.requests()[-1]
    assert rec["chunked"] is True
    assert rec["path"] == "/v1/chat/completions" and rec["query"] == "a=1&b=2"
    assert rec["body_len"] == len(body)
    assert rec["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert rec["body"] == body.decode()
    assert rec["trailers"] == [["X-Trailer", "yes"]]


def test_large_body_and_recorded_headers(sim):
    sim.clear_requests()
    filler = "é" * (1024 * 1024)              # 2 MiB of UTF-8
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": filler}],
                       "max_tokens": 1}, ensure_ascii=False).encode()
    assert len(body) > 2 * 1024 * 1024
    r, data = post(sim, "/v1/chat/completions", body,
                   {"X-Request-Id": "req-42", "x-tenant": "acme", "X-Dup": "1"})
    assert r.status == 200
    assert json.loads(data)["usage"]["prompt_tokens"] == 3 + 4 + tokens(filler)
    post(sim, "/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 1})
    get(sim, "/_sim/config")                     # not recorded
    recs = sim.requests()
    assert [q["path"] for q in recs] == ["/v1/chat/completions", "/v1/completions"]
    q = recs[0]
    assert q["method"] == "POST" and q["http_version"] == "HTTP/1.1"
    assert q["body_len"] == len(body)
    assert q["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert q["body"] is None and q["chunked"] is False
    names = [k for k, _ in q["headers"]]
    assert names.index("X-Request-Id") < names.index("x-tenant") < names.index("X-Dup")
    assert dict(q["headers"])["X-Request-Id"] == "req-42"
    assert recs[1]["body"] == json.dumps({"model": "m", "prompt": "x", "max_tokens": 1})
    sim.clear_requests()
    assert sim.requests() == []


def test_keep_alive_and_connection_close(sim):
    before = sim.stats()["connections_total"]
    c = http.client.HTTPConnection(sim.host, sim.port, timeout=5)
    for i in range(5):
        c.request("POST", "/v1/chat/completions",
                  json.dumps(dict(CHAT, max_tokens=1 + i)),
                  {"content-type": "application/json"})
        r = c.getresponse()
        assert json.loads(r.read())["usage"]["completion_tokens"] == 1 + i
        c.request("GET", "/v1/models")
        r = c.getresponse()
        assert r.status == 200 and r.read()
    # a stream on the same connection, then JSON again
    c.request("POST", "/v1/chat/completions",
              json.dumps(dict(CHAT, stream=True, max_tokens=2)))
    r = c.getresponse()
    assert r.read().endswith(b"data: [DONE]\n\n")
    c.request("GET", "/health")
    assert c.getresponse().status == 200
    c.close()
    assert sim.stats()["connections_total"] == before + 2   # ours + stats()

    # pipelined requests answered in order
    reqs = b"".join(request_bytes("GET", "/health", close=False) for _ in range(3))
    reqs += request_bytes("GET", "/v1/models", close=True)
    raw, _ = raw_exchange(sim, reqs)
    assert raw.count(b"HTTP/1.1 200 OK") == 4

    # HTTP/1.0 closes unless asked; keep-alive when asked
    raw, _ = raw_exchange(sim, request_bytes("GET", "/health", version="HTTP/1.0",
                                             close=False))
    assert raw.startswith(b"HTTP/1.1 200") and b"connection: close" in raw
    with socket.create_connection((sim.host, sim.port), timeout=5) as sk:
        one = request_bytes("GET", "/v1/models", version="HTTP/1.0", close=False,
                            headers=[("Connection", "keep-alive")])
        for _ in range(2):
            sk.sendall(one)
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += sk.recv(65536)
            _, hdrs, rest = split_response(buf)
            assert hdrs["connection"] == "keep-alive"
            n = int(hdrs["content-length"])
            while len(rest) < n:
                rest += sk.recv(65536)


# ------------------------------------------------------ the engine model

def engine_chat(system, user, **extra):
    return {"model": "llama-3-8b", "max_tokens": 4, **extra,
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": user}]}


def expected_cached(first, second):
    """From sim/README.md alone: blocks of 16 tokens of 4 bytes of the
    messages' text (role, NUL, content, NUL); the leading blocks two
    prompts share are cached, never the last token of the second."""
    def blob(body):
        return b"".join(m["role"].encode() + b"\0" + m["content"].encode()
                        + b"\0" for m in body["messages"])
    a, b = blob(first), blob(second)
    same = 0
    while same < min(len(a), len(b)) and a[same] == b[same]:
        same += 1
    prompt = 3 + sum(tokens(m["content"]) + 4 for m in second["messages"])
    return min(same // 64, (prompt - 1) // 16, len(b) // 64) * 16


def usage_of(s, body):
    r, data = post(s, "/v1/chat/completions", body)
    assert r.status == 200, data
    return json.loads(data)["usage"]


def test_prefix_cache_hits_what_was_seen_and_counts_it(make_sim):
    s = make_sim(kv_cache_tokens=8192)
    system = "You are a careful assistant. " * 40           # 1160 bytes
    first = engine_chat(system, "What is a GPU?")
    assert usage_of(s, first)["prompt_tokens_details"]["cached_tokens"] == 0
    again = engine_chat(system, "And a TPU?")
    cached = expected_cached(first, again)
    assert cached >= 256
    assert usage_of(s, again)["prompt_tokens_details"]["cached_tokens"] \
        == cached
    # another system prompt of the same length: nothing in common
    other = engine_chat("You are a careless assistant." * 40, "What is a GPU?")
    assert usage_of(s, other)["prompt_tokens_details"]["cached_tokens"] == 0
    # the same prompt again: all of it but the last partial block
    u = usage_of(s, first)
    assert u["prompt_tokens_details"]["cached_tokens"] \
        == expected_cached(first, first) > 0
    stats = json.loads(get(s, "/_sim/stats")[1])
    fams = metrics(s)
    assert sample(fams, "vllm:prefix_cache_queries") \
        == stats["prefix_cache_queries"] == stats["prompt_tokens_total"]
    assert sample(fams, "vllm:prefix_cache_hits") \
        == stats["prefix_cache_hits"] == cached + u[
            "prompt_tokens_details"]["cached_tokens"]
    assert fams["vllm:prefix_cache_hits"].type == "counter"
    assert sample(fams, "vllm:num_preemptions") == 0
    assert stats["kv_blocks_held"] == 0
    assert sample(fams, "vllm:kv_cache_usage_perc") == 0


def test_prefix_cache_forgets_least_recently_used_first(make_sim):
    s = make_sim(kv_cache_tokens=2048)                   # 128 blocks
    prompts = [engine_chat(f"[{i}] " + "lorem ipsum dolor " * 100, "q")
               for i in range(4)]                        # ~460 tokens each
    for p in prompts:
        usage_of(s, p)
    # four prompts of 28 full blocks fit in 128: all still there
    full = []
    for p in prompts:
        full.append(usage_of(s, p)["prompt_tokens_details"]["cached_tokens"])
        assert full[-1] == 28 * 16
    # the first one used again, then two new ones push out the least
    # recently used: all of prompts[1], the tail of prompts[2]
    assert usage_of(s, prompts[0])["prompt_tokens_details"][
        "cached_tokens"] == full[0]
    for i in range(4, 6):
        usage_of(s, engine_chat(f"[{i}] " + "lorem ipsum dolor " * 100, "q"))
    cached = [usage_of(s, prompts[i])["prompt_tokens_details"][
        "cached_tokens"] for i in (0, 2, 1)]
    assert cached[0] == full[0]
    assert 0 < cached[1] < full[2]          # its start is kept longest
    assert cached[2] == 0
    # without prefix caching nothing is ever cached
    post(s, "/_sim/config", {"prefix_caching": False})
    usage_of(s, prompts[1])
    assert usage_of(s, prompts[1])["prompt_tokens_details"][
        "cached_tokens"] == 0


def test_prefill_takes_the_uncached_tokens_at_its_rate(make_sim):
    s = make_sim(kv_cache_tokens=16384, prefill_tokens_per_s=4000)
    body = engine_chat("x" * 8000, "q")                    # ~2010 tokens
    t0 = time.monotonic()
    assert usage_of(s, body)["prompt_tokens_details"]["cached_tokens"] == 0
    cold = time.monotonic() - t0
    assert cold >= 2000 / 4000                            # half a second
    assert usage_of(s, body)["prompt_tokens_details"]["cached_tokens"] \
        >= 1984
    # two cold prompts sent together: the second one's prefill waits for
    # the first one's, so the pair takes two prefills
    t0 = time.monotonic()
    done = []
    ts = [threading.Thread(target=lambda i=i: done.append(usage_of(
        s, engine_chat(f"[{i}]" + "y" * 8000, "q")))) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(15)
    assert len(done) == 2
    assert time.monotonic() - t0 >= 2 * 2000 / 4000


def test_a_full_kv_cache_queues_and_preempts(make_sim):
    s = make_sim(kv_cache_tokens=1024, tpot_ms=1)           # 64 blocks
    body = dict(engine_chat("z" * 1200, "q"), max_tokens=400, stream=True)
    results = []

    def one(i):
        b = dict(body, messages=[{"role": "system",
                                  "content": f"[{i}]" + "z" * 1200},
                                 body["messages"][1]])
        r, data = post(s, "/v1/chat/completions", b, timeout=30)
        events = [l for l in data.split(b"\n") if l.startswith(b"data: {")]
        results.append((r.status, len(events)))

    ts = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    # every answer whole (a role event and 400 tokens), after preemptions
    assert results == [(200, 401)] * 3
    stats = json.loads(get(s, "/_sim/stats")[1])
    assert stats["preemptions"] > 0
    assert stats["kv_blocks_held"] == 0 and stats["generation_tokens_total"] \
        == 1200
    assert sample(metrics(s), "vllm:num_preemptions") == stats["preemptions"]
    # a prompt larger than the whole cache
    r, data = post(s, "/v1/chat/completions", engine_chat("w" * 5000, "q"))
    assert r.status == 400
    assert json.loads(data)["error"]["code"] == "context_length_exceeded"


def test_a_cache_made_smaller_under_waiting_requests(make_sim):
    """A request admitted to a larger cache, waiting for its slot while the
    cache shrinks below its size, is served alone; so is the one behind."""
    s = make_sim(kv_cache_tokens=16384, max_concurrency=1, ttft_ms=300)
    results = []

    def one(size):
        r, _ = post(s, "/v1/chat/completions",
                    engine_chat("v" * size + str(size), "q"), timeout=20)
        results.append(r.status)

    ts = [threading.Thread(target=one, args=(n,)) for n in (400, 4000, 40)]
    for t in ts:
        t.start()
        time.sleep(0.05)
    post(s, "/_sim/config", {"kv_cache_tokens": 256})
    for t in ts:
        t.join(20)
    assert results == [200, 200, 200]
    assert json.loads(get(s, "/_sim/stats")[1])["kv_blocks_held"] == 0
