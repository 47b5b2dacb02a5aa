"""ngx_infer_route: the model a request names picks the backend pool.

The model comes from the JSON body (in memory, in a temp file, chunked, or
arriving slowly), from a KServe v2 path, or from a header; aliases resolve
to their model; the body reaches the backend intact; mistakes get the
OpenAI error envelope, which the official SDK maps to its exceptions."""

import hashlib
import json
import socket
import time

import pytest
import requests

from harness.nginx import REPO, nginx_version
from harness.openai import chat, error_of

CHAT = {"messages": [{"role": "user", "content": "Hello there"}]}

PROXY = """proxy_pass http://$infer_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            add_header X-Model $infer_model always;
            add_header X-Model-Target $infer_model_target always;
            add_header X-Upstream $infer_upstream always;
            add_header X-Stream $infer_stream always;
            add_header X-Max-Tokens $infer_max_tokens always;
            add_header X-Prompt-Tokens $infer_prompt_tokens_estimate always;
            add_header X-Prefix-Hash $infer_prefix_hash always;"""


def route_conf(llama, mistral, modules_on="infer_route on;", models=None):
    models = models if models is not None else """
    infer_model llama-3-8b upstream=llama alias=llama3,llama-3;
    infer_model mistral-7b upstream=mistral;"""
    return f"""
    upstream llama {{ server {llama.addr}; keepalive 8; }}
    upstream mistral {{ server {mistral.addr}; keepalive 8; }}
    {models}
    server {{
        listen 127.0.0.1:{{port}};
        client_max_body_size 16m;
        {modules_on}
        location / {{ {PROXY} }}
        location /h/ {{
            infer_model_source header=X-Model body path;
            rewrite ^/h(/.*)$ $1 break;
            {PROXY}
        }}
    }}"""


@pytest.fixture
def pools(sim_factory):
    return (sim_factory("llama-3-8b", "llama-a", ttft_ms=1, tpot_ms=1),
            sim_factory("mistral-7b", "mistral-a", ttft_ms=1, tpot_ms=1))


@pytest.fixture
def gw(nginx_factory, pools):
    return nginx_factory(route_conf(*pools), modules=["route"])


def recorded(*sims):
    return [q for s in sims for q in s.requests()
            if q["path"].startswith(("/v1/", "/v2/", "/api/"))]


# ----------------------------------------------------------------- routing

def test_the_model_in_the_body_picks_the_pool(gw, pools):
    r = chat(gw, "llama-3-8b")
    assert r.status_code == 200
    assert r.headers["x-sim-replica"] == "llama-a"
    assert r.headers["x-model"] == "llama-3-8b"
    assert r.headers["x-upstream"] == "llama"

    r = chat(gw, "mistral-7b")
    assert r.status_code == 200
    assert r.headers["x-sim-replica"] == "mistral-a"
    assert r.headers["x-upstream"] == "mistral"


def test_an_alias_resolves_to_its_model_and_the_backend_sees_the_model(
        gw, pools):
    body = json.dumps(dict(CHAT, model="llama3", max_tokens=2),
                      separators=(",", ":")).encode()
    r = requests.post(gw.url + "/v1/chat/completions", data=body,
                      headers={"content-type": "application/json"},
                      timeout=10)
    assert r.status_code == 200
    assert r.headers["x-sim-replica"] == "llama-a"
    assert r.headers["x-model"] == "llama3"
    assert r.headers["x-model-target"] == "llama-3-8b"
    # the backend serves "llama-3-8b": the forwarded body says so, and
    # nothing else in it changed
    got = recorded(*pools)[0]
    sent = body.replace(b'"model":"llama3"', b'"model":"llama-3-8b"')
    assert got["body"] == sent.decode()
    assert got["body_len"] == len(sent)


def test_model_names_are_case_sensitive(gw):
    r = chat(gw, "LLAMA3")
    assert r.status_code == 404
    assert error_of(r)["code"] == "model_not_found"


def test_a_name_in_mixed_case_is_found_in_that_case_only(nginx_factory,
                                                         pools):
    """nginx's hash keeps its keys in lower case: a model declared as
    Llama-3-8B must still be found, as Llama-3-8B and not as llama-3-8b."""
    gw = nginx_factory(route_conf(*pools, models="""
    infer_model Llama-3-8B upstream=llama alias=L3;
    infer_model mistral-7b upstream=mistral;"""), modules=["route"])
    for name in ("Llama-3-8B", "L3"):
        r = chat(gw, name)
        assert r.status_code == 200, r.text
        assert r.headers["x-sim-replica"] == "llama-a"
    for name in ("llama-3-8b", "LLAMA-3-8B", "l3"):
        r = chat(gw, name)
        assert r.status_code == 404, name
        assert error_of(r)["code"] == "model_not_found"


def test_names_that_differ_in_case_only_are_refused(nginx_factory, pools):
    n = nginx_factory(route_conf(*pools, models="""
    infer_model Llama upstream=llama;
    infer_model llama upstream=mistral;"""), modules=["route"],
                      start=False)
    ok, out = n.check_config()
    assert not ok
    assert 'model name or alias "llama" is declared twice' in out, out


def test_completions_embeddings_and_api_infer_route_too(gw):
    r = requests.post(gw.url + "/v1/completions", timeout=10,
                      json={"model": "mistral-7b", "prompt": "Hi"})
    assert r.headers["x-sim-replica"] == "mistral-a"
    r = requests.post(gw.url + "/v1/embeddings", timeout=10,
                      json={"model": "llama3", "input": ["a", "b"]})
    assert r.headers["x-sim-replica"] == "llama-a"
    r = requests.post(gw.url + "/api/infer", timeout=10,
                      json={"model": "mistral-7b", "payload": {"q": "hi"}})
    assert r.status_code == 200
    assert r.headers["x-sim-replica"] == "mistral-a"


def test_kserve_v2_takes_the_model_from_the_path(gw, pools):
    req = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32",
                       "data": [1.0, 2.0]}]}
    for path in ("/v2/models/mistral-7b/infer",
                 "/v2/models/mistral-7b/versions/3/infer"):
        r = requests.post(gw.url + path, json=req, timeout=10)
        assert r.status_code == 200, r.text
        assert r.headers["x-sim-replica"] == "mistral-a"
        assert r.headers["x-model"] == "mistral-7b"

    r = requests.post(gw.url + "/v2/models/nope/infer", json=req, timeout=10)
    assert r.status_code == 404
    assert error_of(r)["code"] == "model_not_found"


def test_a_header_source_comes_first_when_configured_so(gw, pools):
    r = requests.post(gw.url + "/h/v1/chat/completions", timeout=10,
                      headers={"x-model": "mistral-7b"},
                      json=dict(CHAT, model="mistral-7b"))
    assert r.headers["x-sim-replica"] == "mistral-a"
    # no header: the body, the next source
    r = requests.post(gw.url + "/h/v1/chat/completions", timeout=10,
                      json=dict(CHAT, model="llama-3-8b"))
    assert r.headers["x-sim-replica"] == "llama-a"
    # the header alone, with a body that names no model
    r = requests.post(gw.url + "/h/v1/chat/completions", timeout=10,
                      headers={"x-model": "llama3"}, json=CHAT)
    assert r.headers["x-sim-replica"] == "llama-a"


# -------------------------------- the model checked is the model that runs

SOURCES = {"body": "body", "path": "path", "header": "header=X-Model"}


def mismatch_conf(llama, mistral, order):
    return f"""
    upstream llama {{ server {llama.addr}; }}
    upstream mistral {{ server {mistral.addr}; }}
    infer_model llama-3-8b upstream=llama alias=llama3;
    infer_model mistral-7b upstream=mistral;
    server {{
        listen 127.0.0.1:{{port}};
        infer_route on;
        infer_model_source {" ".join(SOURCES[s] for s in order)};
        location / {{ {PROXY} }}
    }}"""


@pytest.mark.parametrize("order", [
    ("body", "path", "header"), ("body", "header", "path"),
    ("path", "body", "header"), ("path", "header", "body"),
    ("header", "body", "path"), ("header", "path", "body")],
    ids=lambda o: "-".join(o))
def test_two_sources_naming_two_models_get_400_in_every_order(
        nginx_factory, pools, order):
    """Whatever the order of the sources, a request whose path, header
    and body name different models is refused: it could otherwise pass
    the tenant's model check as one model and run as another."""
    gw = nginx_factory(mismatch_conf(*pools, order), modules=["route"])
    kserve = "/v2/models/llama-3-8b/infer"
    cases = [
        # (path, header, body model)
        (kserve, None, "mistral-7b"),
        ("/v1/chat/completions", "mistral-7b", "llama-3-8b"),
        (kserve, "mistral-7b", None),
        (kserve, "llama-3-8b", "mistral-7b"),
        # an alias is another name: the request names two
        (kserve, None, "llama3"),
    ]
    for path, header, model in cases:
        body = dict(CHAT) if model is None else dict(CHAT, model=model)
        r = requests.post(gw.url + path, json=body, timeout=10,
                          headers={"x-model": header} if header else {})
        assert r.status_code == 400, (path, header, model, r.text)
        assert error_of(r)["code"] == "model_mismatch"
    assert recorded(*pools) == []

    # every source present and naming the same model: routed
    r = requests.post(gw.url + kserve, timeout=10,
                      headers={"x-model": "llama-3-8b"},
                      json={"model": "llama-3-8b", "inputs": [
                          {"name": "x", "shape": [1], "datatype": "FP32",
                           "data": [1.0]}]})
    assert r.status_code == 200, r.text
    assert r.headers["x-sim-replica"] == "llama-a"


def test_a_model_from_a_header_is_the_one_the_body_carries(nginx_factory,
                                                           pools):
    """Routed by a header, the body still goes up naming the model id the
    backend serves (the target's model=), not the alias the client sent."""
    llama, mistral = pools
    gw = nginx_factory(mismatch_conf(llama, mistral, ("header", "body"))
                       .replace("infer_model llama-3-8b upstream=llama",
                                "infer_model llama-3-8b upstream=llama "
                                "model=meta-llama-3-8b"),
                       modules=["route"])
    r = requests.post(gw.url + "/v1/chat/completions", timeout=10,
                      headers={"x-model": "llama3"},
                      json=dict(CHAT, model="llama3"))
    assert r.status_code == 200, r.text
    got = recorded(*pools)
    assert len(got) == 1
    assert json.loads(got[0]["body"])["model"] == "meta-llama-3-8b"


def test_a_kserve_path_goes_up_with_the_model_id(nginx_factory, pools):
    """Routed by a KServe path, the path names the id the backend serves,
    as the body would: an alias or a model= id in the path is replaced;
    an id that is no single path segment leaves the path as it came."""
    llama, mistral = pools
    conf = mismatch_conf(llama, mistral, ("path", "body")).replace(
        "infer_model llama-3-8b upstream=llama alias=llama3;",
        "infer_model llama-3-8b upstream=llama alias=llama3 "
        "model=llama-3-8b-instruct;\n"
        "    infer_model odd upstream=llama model=org/odd;")
    gw = nginx_factory(conf, modules=["route"])
    req = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32",
                       "data": [1.0]}]}
    for path, sent, query in [
            ("/v2/models/llama3/infer?x=1",
             "/v2/models/llama-3-8b-instruct/infer", "x=1"),
            ("/v2/models/llama-3-8b/versions/2/infer",
             "/v2/models/llama-3-8b-instruct/versions/2/infer", ""),
            ("/v2/models/odd/infer", "/v2/models/odd/infer", "")]:
        llama.clear_requests()
        r = requests.post(gw.url + path, json=req, timeout=10)
        assert r.status_code == 200, r.text
        got = recorded(llama)
        assert [q["path"] for q in got] == [sent], got
        assert (got[0]["query"] or "") == query, got
    assert recorded(mistral) == []


def test_max_body_size_holds_for_a_chunked_body_routed_by_path(
        nginx_factory, pools):
    """max_body_size= is held to the bytes read when the body is chunked
    (no Content-Length), whatever source named the model."""
    llama, mistral = pools
    conf = mismatch_conf(llama, mistral, ("path", "header")).replace(
        "infer_model llama-3-8b upstream=llama alias=llama3;",
        "infer_model llama-3-8b upstream=llama max_body_size=1k;")
    gw = nginx_factory(conf, modules=["route"])
    big = b"x" * 4096
    r = requests.post(gw.url + "/v2/models/llama-3-8b/infer",
                      data=iter([big[:1000], big[1000:]]), timeout=10,
                      headers={"content-type": "application/octet-stream"})
    assert r.status_code == 413, r.text
    assert error_of(r)["code"] == "request_too_large"
    small = json.dumps({"inputs": [{"name": "x", "shape": [1],
                                    "datatype": "FP32",
                                    "data": [1.0]}]}).encode()
    r = requests.post(gw.url + "/v2/models/llama-3-8b/infer",
                      data=iter([small[:10], small[10:]]), timeout=10,
                      headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    assert recorded(llama)[-1]["body_len"] == len(small)


# ------------------------------------------------------ bodies of every kind

def test_a_body_in_a_temp_file_is_routed_and_reaches_the_backend_intact(
        gw, pools):
    body = json.dumps(dict(model="mistral-7b", messages=[
        {"role": "user", "content": "y" * (2 * 1024 * 1024)}])).encode()
    r = requests.post(gw.url + "/v1/chat/completions", data=body, timeout=20,
                      headers={"content-type": "application/json"})
    assert r.status_code == 200
    assert r.headers["x-sim-replica"] == "mistral-a"
    assert "buffered to a temporary file" in gw.log_text()
    got = recorded(*pools)
    assert len(got) == 1
    assert got[0]["body_sha256"] == hashlib.sha256(body).hexdigest()
    # the model sits near the end, after 2 MiB of prompt
    body = body.replace(b'{"model": "mistral-7b", ', b"{")[:-1] + \
        b', "model": "llama3"}'
    r = requests.post(gw.url + "/v1/chat/completions", data=body, timeout=20,
                      headers={"content-type": "application/json"})
    assert r.headers["x-sim-replica"] == "llama-a"


def test_a_chunked_body_is_routed_and_reaches_the_backend_intact(gw, pools):
    body = json.dumps(dict(CHAT, model="mistral-7b")).encode()
    parts = [body[i:i + 5] for i in range(0, len(body), 5)]
    r = requests.post(gw.url + "/v1/chat/completions", data=iter(parts),
                      headers={"content-type": "application/json"},
                      timeout=10)
    assert r.status_code == 200
    assert r.headers["x-sim-replica"] == "mistral-a"
    got = recorded(*pools)
    assert got[0]["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_a_body_that_arrives_slowly_is_waited_for(gw, pools):
    """The body comes in three pieces, 150 ms apart: the handler must wait
    for it without blocking, then go on."""
    body = json.dumps(dict(CHAT, model="mistral-7b")).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}"
            f"\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection((gw.host, gw.port), timeout=10) as s:
        s.sendall(head)
        third = len(body) // 3
        for piece in (body[:third], body[third:2 * third], body[2 * third:]):
            time.sleep(0.15)
            s.sendall(piece)
        answer = b""
        while True:
            data = s.recv(65536)
            if not data:
                break
            answer += data
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert b"x-sim-replica: mistral-a" in answer
    got = recorded(*pools)
    assert got[0]["body_sha256"] == hashlib.sha256(body).hexdigest()


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("body,code", [
    (b'{"model": "llama-3-8b", "messages": [}', "invalid_json"),
    (b'{"model": "llama-3-8b"', "invalid_json"),
    (b'not json at all', "invalid_json"),
    (b'["model", "llama-3-8b"]', "invalid_json"),
    (b'{"model": 42}', "invalid_json"),
    (b'{"model": "llama-3-8b", "model": "mistral-7b"}', "invalid_json"),
    (b'{"messages": []}', "missing_model"),
    (b'{}', "missing_model"),
], ids=["broken", "truncated", "not-json", "array", "model-not-string",
        "duplicate-model", "no-model", "empty-object"])
def test_bad_bodies_get_400_in_the_openai_envelope(gw, pools, body, code):
    r = requests.post(gw.url + "/v1/chat/completions", data=body, timeout=10,
                      headers={"content-type": "application/json"})
    assert r.status_code == 400
    e = error_of(r)
    assert e["code"] == code
    assert e["type"] == "invalid_request_error"
    assert recorded(*pools) == []


def test_an_unknown_model_is_404_and_reaches_no_backend(gw, pools):
    r = chat(gw, "gpt-nope")
    assert r.status_code == 404
    e = error_of(r)
    assert e["code"] == "model_not_found"
    assert "gpt-nope" in e["message"]
    assert recorded(*pools) == []


def test_a_hostile_model_name_is_escaped_in_the_error(gw):
    name = 'x"}\\<script>\u00e9'
    r = chat(gw, name)
    assert r.status_code == 404
    assert name in error_of(r)["message"]


@pytest.mark.parametrize("name", ["llama3\r\nX-Evil: 1", "llama3\u0000",
                                  "\u007f"],
                         ids=["crlf-header-injection", "nul", "del"])
def test_control_characters_in_a_model_name_are_refused(gw, pools, name):
    r = chat(gw, name)
    assert r.status_code == 400
    assert error_of(r)["code"] == "invalid_model"
    assert "x-evil" not in r.headers
    assert recorded(*pools) == []


def test_the_openai_sdk_sees_the_right_exceptions(gw, openai_sdk):
    base = gw.url + "/v1"
    out = openai_sdk(base, "chat", dict(CHAT, model="llama3", max_tokens=3))
    assert out["ok"], out
    assert out["result"]["model"] == "llama-3-8b"

    out = openai_sdk(base, "chat", dict(CHAT, model="gpt-nope"))
    assert not out["ok"] and out["error_class"] == "NotFoundError"
    assert out["status"] == 404

    out = openai_sdk(base, "chat_stream",
                     dict(CHAT, model="mistral-7b", max_tokens=4,
                          stream_options={"include_usage": True}))
    assert out["ok"], out
    assert out["result"]["usage"]["completion_tokens"] == 4


def test_no_body_and_no_other_source_is_400(gw):
    r = requests.get(gw.url + "/v1/chat/completions", timeout=10)
    assert r.status_code == 400
    assert error_of(r)["code"] == "missing_model"


# --------------------------------------------------------------- variables

def test_request_variables(gw):
    r = chat(gw, "llama3", stream=False, max_tokens=7)
    assert r.headers["x-stream"] == "0"
    assert r.headers["x-max-tokens"] == "7"
    # "Hello there": 11 bytes -> 3 tokens, plus 4 for the one message
    assert r.headers["x-prompt-tokens"] == "7"

    r = chat(gw, "llama3", stream=True, max_completion_tokens=9,
             max_tokens=5)
    assert r.headers["x-stream"] == "1"
    assert r.headers["x-max-tokens"] == "9"

    r = chat(gw, "llama3")
    assert "x-max-tokens" not in r.headers


def test_the_prefix_hash_follows_the_prompt_prefix(nginx_factory, pools):
    conf = route_conf(*pools).replace("infer_route on;",
                                      "infer_route on; "
                                      "infer_prefix_hash_length 64;")
    gw = nginx_factory(conf, modules=["route"])
    system = {"role": "system", "content": "You are a helpful assistant. " * 4}

    def h(*msgs):
        r = requests.post(gw.url + "/v1/chat/completions", timeout=10,
                          json={"model": "llama3", "messages": list(msgs)})
        return r.headers["x-prefix-hash"]

    a = h(system, {"role": "user", "content": "first question"})
    b = h(system, {"role": "user", "content": "another question"})
    c = h({"role": "system", "content": "You are a pirate."},
          {"role": "user", "content": "first question"})
    assert a == b != c
    assert len(a) == 16 and int(a, 16) >= 0


# ------------------------------------------------- without a model registry

def test_without_a_registry_the_model_is_only_reported(nginx_factory, pools):
    llama, _ = pools
    gw = nginx_factory(f"""
    upstream llama {{ server {llama.addr}; }}
    server {{
        listen 127.0.0.1:{{port}};
        infer_route on;
        location / {{
            proxy_pass http://llama;
            add_header X-Model $infer_model always;
            add_header X-Upstream $infer_upstream always;
        }}
    }}""", modules=["route"])
    r = chat(gw, "anything-at-all")
    assert r.status_code == 200
    assert r.headers["x-model"] == "anything-at-all"
    assert "x-upstream" not in r.headers


def test_all_four_modules_route_the_same(nginx_factory, pools):
    gw = nginx_factory(route_conf(*pools, modules_on="infer_route on; "
                                  "infer_auth on; infer_ratelimit on; "
                                  "infer_metrics on; infer_auth_api_keys "
                                  f"{REPO}/t/data/api-keys.json; "
                                  "satisfy any; allow 127.0.0.1;"))
    assert chat(gw, "mistral-7b").headers["x-sim-replica"] == "mistral-a"


# ----------------------------------------------------- configuration errors

@pytest.mark.parametrize("models,message", [
    ("infer_model llama-3-8b upstream=nowhere;",
     'model "llama-3-8b": no upstream "nowhere" is defined'),
    ("infer_model llama-3-8b alias=l3;",
     'model "llama-3-8b": has no upstream: give it upstream= or an '
     'infer_model_target'),
    ("infer_model llama-3-8b upstream=llama weight=3;",
     'invalid parameter "weight=3" for model "llama-3-8b"'),
    ("infer_model a upstream=llama alias=b; infer_model b upstream=llama;",
     'model name or alias "b" is declared twice'),
    ("infer_model a upstream=llama alias=,x;",
     'model "a": "alias": a name must have 1 to 256 bytes'),
    ("infer_model a upstream=llama upstream=mistral;",
     'model "a": "upstream" is given twice'),
    ("infer_model;", 'invalid number of arguments in "infer_model"'),
    ("infer_model_target a llama;",
     'unknown model "a": declare it with infer_model first'),
    ("infer_model a upstream=llama; infer_model_target a mistral;",
     'model "a" has upstream= already'),
    ("infer_model a; infer_model_target a llama weight=0;",
     'model "a": target #1: "weight" must be a whole number from 1 to'),
    ("infer_model a; infer_model_target a nowhere;",
     'model "a": no upstream "nowhere" is defined'),
    ("infer_model a upstream=llama state=retired;",
     'model "a": "state" must be "active", "deprecated" or "disabled"'),
    ("infer_model a upstream=llama pattern=(;",
     'model "a": invalid pattern'),
    ("infer_model a upstream=llama max_body_size=lots;",
     'model "a": "max_body_size" must be a number of bytes'),
    ("infer_model_source body cookie;",
     'invalid model source "cookie": use body, path or header=NAME'),
    ("infer_model_source body body;", 'model source "body" is listed twice'),
], ids=["no-such-upstream", "no-upstream", "unknown-param", "dup-name",
        "empty-alias", "two-upstreams", "no-args", "target-unknown-model",
        "upstream-and-target", "zero-weight", "target-no-upstream",
        "bad-state", "bad-pattern", "bad-size", "bad-source", "dup-source"])
def test_config_mistakes_are_caught_by_nginx_t(nginx_factory, pools, models,
                                              message):
    n = nginx_factory(route_conf(*pools, models=models), modules=["route"],
                      start=False)
    ok, out = n.check_config()
    assert not ok
    assert message in out, out


# ------------------------------------------------ splits, states, patterns

def split_conf(a, b, extra_model="", extra=""):
    return f"""
    upstream stable {{ server {a.addr}; keepalive 8; }}
    upstream canary {{ server {b.addr}; keepalive 8; }}
    infer_model llama-3-8b alias=llama3 {extra_model};
    infer_model_target llama-3-8b stable weight=90;
    infer_model_target llama-3-8b canary weight=10 model=llama-3.1-8b;
    {extra}
    server {{
        listen 127.0.0.1:{{port}};
        infer_route on;
        location / {{ {PROXY} }}
    }}"""


@pytest.fixture
def split_pools(sim_factory):
    return (sim_factory("llama-3-8b", "stable-a", ttft_ms=0, tpot_ms=0),
            sim_factory("llama-3.1-8b", "canary-a", ttft_ms=0, tpot_ms=0))


def test_a_weighted_split_holds_its_weights_over_1000_requests(
        nginx_factory, split_pools):
    gw = nginx_factory(split_conf(*split_pools), modules=["route"])
    counts = {"stable-a": 0, "canary-a": 0}
    s = requests.Session()
    for _ in range(1000):
        r = s.post(gw.url + "/v1/chat/completions", timeout=10,
                   json=dict(CHAT, model="llama-3-8b", max_tokens=1))
        assert r.status_code == 200
        counts[r.headers["x-sim-replica"]] += 1
    assert abs(counts["canary-a"] - 100) <= 30, counts


def test_the_canary_gets_its_own_model_id_in_the_body(nginx_factory,
                                                      split_pools):
    gw = nginx_factory(split_conf(*split_pools), modules=["route"])
    seen = {}
    for _ in range(20):
        r = chat(gw, "llama3", max_tokens=1)
        seen[r.headers["x-sim-replica"]] = r.headers["x-model-target"]
    assert seen == {"stable-a": "llama-3-8b", "canary-a": "llama-3.1-8b"}
    canary = split_pools[1]
    for q in recorded(canary):
        assert json.loads(q["body"])["model"] == "llama-3.1-8b"
        assert q["body_len"] == len(q["body"].encode())


def test_a_sticky_key_keeps_a_user_on_one_variant(nginx_factory,
                                                  split_pools):
    gw = nginx_factory(split_conf(*split_pools,
                                  extra_model="sticky=$http_x_user"),
                       modules=["route"])
    s = requests.Session()

    def variant(user):
        return s.post(gw.url + "/v1/chat/completions", timeout=10,
                      headers={"x-user": user},
                      json=dict(CHAT, model="llama3", max_tokens=1)
                      ).headers["x-sim-replica"]

    users = [f"user-{i}" for i in range(300)]
    first = {u: variant(u) for u in users}
    for u in users[:50]:
        assert variant(u) == first[u]
    canary = sum(v == "canary-a" for v in first.values())
    assert 10 <= canary <= 60, canary      # ~10% of 300 users


def test_a_deprecated_model_still_answers_with_a_warning(nginx_factory,
                                                         pools):
    gw = nginx_factory(route_conf(*pools, models="""
    infer_model llama-3-8b upstream=llama state=deprecated;
    infer_model mistral-7b upstream=mistral;"""), modules=["route"])
    r = chat(gw, "llama-3-8b")
    assert r.status_code == 200
    assert r.headers["deprecation"] == "true"
    assert "llama-3-8b" in r.headers["warning"]
    assert "deprecation" not in chat(gw, "mistral-7b").headers


def test_our_warning_beside_the_backends_is_one_more_of_that_name(
        nginx_factory, pools, tmp_path):
    """Headers we add start a chain of their own (h->next, nginx 1.23+):
    with the backend's own Warning, the client gets both and nginx's
    $sent_http_warning, which walks the headers of one name, joins both."""
    log = tmp_path / "warning.log"
    conf = route_conf(*pools, models="""
    infer_model llama-3-8b upstream=llama state=deprecated;
    infer_model mistral-7b upstream=mistral;
    log_format warning '$sent_http_warning|$sent_http_deprecation';""")
    conf = conf.replace("location / {",
                        f"location / {{ access_log {log} warning;", 1)
    gw = nginx_factory(conf, modules=["route"])
    r = chat(gw, "llama-3-8b",
             headers={"x-sim-add-header": 'Warning: 199 - "from the backend"'})
    assert r.status_code == 200
    warnings = r.raw.headers.getlist("Warning")
    assert len(warnings) == 2, warnings
    assert '199 - "from the backend"' in warnings
    assert any("llama-3-8b" in w for w in warnings), warnings
    gw.stop()
    line = log.read_text().strip()
    assert "llama-3-8b" in line and line.endswith("|true"), line
    if nginx_version() >= (1, 23, 0):       # before, the first one only
        assert line.count("from the backend") == 1, line
        assert ", " in line, line


def test_a_disabled_model_is_refused_clearly(nginx_factory, pools):
    gw = nginx_factory(route_conf(*pools, models="""
    infer_model llama-3-8b upstream=llama state=disabled alias=llama3;
    infer_model mistral-7b upstream=mistral;"""), modules=["route"])
    r = chat(gw, "llama3")
    assert r.status_code == 404
    e = error_of(r)
    assert e["code"] == "model_disabled"
    assert "disabled" in e["message"]
    assert recorded(*pools) == []


def test_a_per_model_body_limit(nginx_factory, pools):
    gw = nginx_factory(route_conf(*pools, models="""
    infer_model llama-3-8b upstream=llama max_body_size=1k;
    infer_model mistral-7b upstream=mistral;"""), modules=["route"])
    big = [{"role": "user", "content": "z" * 2000}]
    r = requests.post(gw.url + "/v1/chat/completions", timeout=10,
                      json={"model": "llama-3-8b", "messages": big})
    assert r.status_code == 413
    assert error_of(r)["code"] == "request_too_large"
    r = requests.post(gw.url + "/v1/chat/completions", timeout=10,
                      json={"model": "mistral-7b", "messages": big})
    assert r.status_code == 200
    assert chat(gw, "llama-3-8b").status_code == 200


def test_patterns_route_families_of_names(nginx_factory, pools):
    gw = nginx_factory(route_conf(*pools, models=r"""
    infer_model llama-3-8b upstream=llama "pattern=^llama-3(\.1)?-8b";
    infer_model mistral-7b upstream=mistral;"""), modules=["route"])
    for name in ("llama-3-8b-instruct", "llama-3.1-8b"):
        r = chat(gw, name)
        assert r.status_code == 200
        assert r.headers["x-sim-replica"] == "llama-a"
        # a pattern match forwards the name as the client sent it
        assert r.headers["x-model-target"] == name
    assert chat(gw, "llama-3.2-8b").status_code == 404


# ---------------------------------------------------------------- /v1/models

def models_conf(llama, mistral, listing="infer_model_list;"):
    return f"""
    upstream llama {{ server {llama.addr}; }}
    upstream mistral {{ server {mistral.addr}; }}
    infer_model llama-3-8b upstream=llama alias=llama3;
    infer_model mistral-7b upstream=mistral;
    infer_model old-model upstream=mistral state=disabled;
    server {{
        listen 127.0.0.1:{{port}};
        infer_route on;
        location /v1/models {{ {listing} }}
    }}"""


def test_v1_models_lists_the_registry_for_the_sdk(nginx_factory, pools,
                                                  openai_sdk):
    gw = nginx_factory(models_conf(*pools), modules=["route"])
    r = requests.get(gw.url + "/v1/models", timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["llama-3-8b", "mistral-7b"]
    assert all(m["object"] == "model" for m in body["data"])

    one = requests.get(gw.url + "/v1/models/mistral-7b", timeout=10).json()
    assert one["id"] == "mistral-7b"
    r = requests.get(gw.url + "/v1/models/old-model", timeout=10)
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"

    out = openai_sdk(gw.url + "/v1", "models")
    assert out["ok"], out
    assert recorded(*pools) == []


def test_v1_models_is_filtered_by_a_variable(nginx_factory, pools):
    gw = nginx_factory(models_conf(*pools,
                                   listing="infer_model_list $http_x_allowed;"),
                       modules=["route"])

    def ids(allowed):
        r = requests.get(gw.url + "/v1/models", timeout=10,
                         headers={"x-allowed": allowed})
        return [m["id"] for m in r.json()["data"]]

    assert ids("mistral-7b") == ["mistral-7b"]
    assert ids("llama3, mistral-7b") == ["llama-3-8b", "mistral-7b"]
    assert ids("*") == ["llama-3-8b", "mistral-7b"]
    assert ids("nothing") == []
    assert ids("old-model") == []


# ---------------------------------------------------------------- failover

FAILOVER_PROXY = PROXY + """
            proxy_intercept_errors on;
            error_page 429 500 502 503 504 = @fallback;"""


def failover_conf(llama, mistral, models=None):
    models = models or """
    infer_model llama-3-8b upstream=llama alias=llama3 fallback=mistral-7b;
    infer_model mistral-7b upstream=mistral;"""
    return f"""
    upstream llama {{ server {llama}; }}
    upstream mistral {{ server {mistral}; }}
    {models}
    server {{
        listen 127.0.0.1:{{port}};
        infer_route on;
        recursive_error_pages on;
        location / {{ {FAILOVER_PROXY} }}
        location @fallback {{ {FAILOVER_PROXY} }}
    }}"""


def test_a_failing_pool_falls_back_to_the_next_model(nginx_factory, pools):
    llama, mistral = pools
    gw = nginx_factory(failover_conf(llama.addr, mistral.addr),
                       modules=["route"])
    llama.configure(fail_status=503, fail_ratio=1.0)
    r = chat(gw, "llama3", max_tokens=2)
    assert r.status_code == 200
    assert r.headers["x-sim-replica"] == "mistral-a"
    assert r.headers["x-model-target"] == "mistral-7b"
    # the fallback's backend is asked for its own model, by the body
    got = recorded(mistral)
    assert len(got) == 1
    assert json.loads(got[0]["body"])["model"] == "mistral-7b"
    assert len(recorded(llama)) == 1
    assert "falling back to model \"mistral-7b\"" in gw.log_text()

    # a 429 from the pool too
    llama.configure(fail_status=429)
    assert chat(gw, "llama-3-8b").headers["x-sim-replica"] == "mistral-a"

    # and when the pool answers, no fallback
    llama.configure(fail_ratio=0.0)
    assert chat(gw, "llama-3-8b").headers["x-sim-replica"] == "llama-a"


def test_a_pool_that_refuses_connections_falls_back(nginx_factory, pools):
    from harness.ports import free_port
    _, mistral = pools
    gw = nginx_factory(failover_conf(f"127.0.0.1:{free_port()}",
                                     mistral.addr), modules=["route"])
    r = chat(gw, "llama-3-8b")
    assert r.status_code == 200
    assert r.headers["x-sim-replica"] == "mistral-a"


def test_when_every_fallback_fails_the_client_gets_the_last_status(
        nginx_factory, pools, openai_sdk):
    llama, mistral = pools
    gw = nginx_factory(failover_conf(llama.addr, mistral.addr),
                       modules=["route"])
    llama.configure(fail_status=503, fail_ratio=1.0)
    mistral.configure(fail_status=500, fail_ratio=1.0)
    r = chat(gw, "llama-3-8b")
    assert r.status_code == 500
    e = error_of(r)
    assert e["code"] == "model_unavailable"
    assert "no fallback is left" in e["message"]
    assert len(recorded(llama)) == 1 and len(recorded(mistral)) == 1

    out = openai_sdk(gw.url + "/v1", "chat", dict(CHAT, model="llama-3-8b"))
    assert out["error_class"] == "InternalServerError"


def test_a_chain_of_fallbacks(nginx_factory, sim_factory):
    a = sim_factory("a", "a-1", ttft_ms=0, fail_status=503, fail_ratio=1.0)
    b = sim_factory("b", "b-1", ttft_ms=0, fail_status=502, fail_ratio=1.0)
    c = sim_factory("c", "c-1", ttft_ms=0)
    gw = nginx_factory(f"""
    upstream pa {{ server {a.addr}; }}
    upstream pb {{ server {b.addr}; }}
    upstream pc {{ server {c.addr}; }}
    infer_model a upstream=pa fallback=b;
    infer_model b upstream=pb fallback=c;
    infer_model c upstream=pc;
    server {{
        listen 127.0.0.1:{{port}};
        infer_route on;
        recursive_error_pages on;
        location / {{ {FAILOVER_PROXY} }}
        location @fallback {{ {FAILOVER_PROXY} }}
    }}""", modules=["route"])
    r = chat(gw, "a")
    assert r.status_code == 200
    assert r.headers["x-sim-replica"] == "c-1"
    assert [len(recorded(s)) for s in (a, b, c)] == [1, 1, 1]


def test_a_fallback_in_mixed_case_is_found(nginx_factory, sim_factory):
    """fallback= names a model declared in upper or mixed case: it is
    looked up in the case it was declared in, as a request's model is
    (it was refused as "not a declared model": found by the registry
    fuzzer)."""
    a = sim_factory("a", "a-1", ttft_ms=0, fail_status=503, fail_ratio=1.0)
    b = sim_factory("b", "b-1", ttft_ms=0)
    gw = nginx_factory(f"""
    upstream pa {{ server {a.addr}; }}
    upstream pb {{ server {b.addr}; }}
    infer_model Small-A upstream=pa fallback=Big-B;
    infer_model Big-B upstream=pb;
    server {{
        listen 127.0.0.1:{{port}};
        infer_route on;
        location / {{ {FAILOVER_PROXY} }}
        location @fallback {{ {FAILOVER_PROXY} }}
    }}""", modules=["route"])
    r = chat(gw, "Small-A")
    assert r.status_code == 200, r.text
    assert r.headers["x-sim-replica"] == "b-1"
    assert [len(recorded(s)) for s in (a, b)] == [1, 1]

    n = nginx_factory(f"""
    upstream pa {{ server {a.addr}; }}
    infer_model small upstream=pa fallback=big-b;
    infer_model Big-B upstream=pa;
    server {{ listen 127.0.0.1:{{port}}; }}""", modules=["route"],
                      start=False)
    ok, out = n.check_config()
    assert not ok
    assert 'fallback "big-b" is not a declared model' in out, out


def test_a_redirect_the_pool_asked_for_is_no_failover(nginx_factory, pools):
    """An X-Accel-Redirect from the pool (a 200) also lands in a location
    with infer_route on: it must not be taken for a failure."""
    llama, mistral = pools
    conf = failover_conf(llama.addr, mistral.addr).replace(
        "location @fallback {",
        "location /internal/ { internal; try_files /ok.txt =404; "
        "add_header X-Model-Target $infer_model_target always; }\n"
        "        location @fallback {")
    gw = nginx_factory(conf, modules=["route"])
    r = requests.post(gw.url + "/v1/chat/completions", timeout=10,
                      headers={"x-sim-add-header":
                               "X-Accel-Redirect: /internal/done"},
                      json=dict(CHAT, model="llama-3-8b"))
    assert r.status_code == 200
    assert r.text == "ok"                   # html/ok.txt, after the redirect
    assert r.headers["x-model-target"] == "llama-3-8b"
    assert recorded(mistral) == []
    assert "falling back" not in gw.log_text()


def test_no_fallback_once_the_stream_has_started(nginx_factory, pools):
    llama, mistral = pools
    gw = nginx_factory(failover_conf(llama.addr, mistral.addr),
                       modules=["route"])
    import http.client
    c = http.client.HTTPConnection(gw.host, gw.port, timeout=10)
    c.request("POST", "/v1/chat/completions",
              json.dumps(dict(CHAT, model="llama-3-8b", stream=True,
                              max_tokens=30)),
              {"content-type": "application/json",
               "x-sim-reset-after-chunks": "3"})
    r = c.getresponse()
    assert r.status == 200
    assert r.getheader("x-sim-replica") == "llama-a"
    with pytest.raises(http.client.IncompleteRead):
        r.read()
    assert recorded(mistral) == []


@pytest.mark.parametrize("models,message", [
    ("infer_model llama-3-8b upstream=llama fallback=nope;",
     'model "llama-3-8b": fallback "nope" is not a declared model'),
    ("infer_model a upstream=llama fallback=b; "
     "infer_model b upstream=llama fallback=a;",
     "its fallback chain comes back to it"),
    ("infer_model a upstream=llama alias=x fallback=x;",
     'fallback "x" is not a declared model'),
], ids=["unknown", "loop", "alias"])
def test_fallback_mistakes_are_caught_by_nginx_t(nginx_factory, pools,
                                                 models, message):
    n = nginx_factory(route_conf(*pools, models=models), modules=["route"],
                      start=False)
    ok, out = n.check_config()
    assert not ok
    assert message in out, out


# ------------------------------------------------------ usage from answers

USAGE_LOG = ("$infer_model|$infer_usage_prompt_tokens|"
             "$infer_usage_completion_tokens|$infer_usage_total_tokens|"
             "$infer_usage_cached_tokens|$infer_usage_estimated|$infer_ttft|"
             "$request_time")


@pytest.fixture
def ugw(nginx_factory, pools):
    conf = route_conf(*pools).replace(
        "infer_route on;",
        f"infer_route on; access_log {{usage_log}} usage;")
    conf = f"log_format usage '{USAGE_LOG}';\n" + conf
    n = nginx_factory("", start=False, modules=["route"])
    n.http = conf.replace("{usage_log}", str(n.workdir / "usage.log"))
    return n.start()


def usage_lines(gw, count):
    """The usage log's lines, once count of them are there (the log line
    is written when the request ends, just after the answer)."""
    path = gw.workdir / "usage.log"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return [dict(zip(["model", "prompt", "completion", "total",
                              "cached", "estimated", "ttft", "time"],
                             line.split("|"))) for line in lines]
        time.sleep(0.02)
    raise AssertionError(f"{count} usage lines expected")


def sse_chunks(raw):
    out = []
    for block in raw.decode().split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


def stream_raw(gw, body, headers=None):
    import http.client
    c = http.client.HTTPConnection(gw.host, gw.port, timeout=10)
    c.request("POST", "/v1/chat/completions", json.dumps(body),
              {"content-type": "application/json", **(headers or {})})
    r = c.getresponse()
    return r, r.read()


def test_usage_of_a_json_answer_is_what_the_client_received(ugw):
    r = chat(ugw, "llama3", max_tokens=11)
    u = r.json()["usage"]
    got = usage_lines(ugw, 1)[0]
    assert got["model"] == "llama3"
    assert int(got["prompt"]) == u["prompt_tokens"]
    assert int(got["completion"]) == u["completion_tokens"] == 11
    assert int(got["total"]) == u["total_tokens"]
    assert got["cached"] == "0"
    assert got["estimated"] == "0"


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_usage_of_a_stream_is_its_usage_chunk(ugw, split):
    body = dict(CHAT, model="mistral-7b", stream=True, max_tokens=13,
                stream_options={"include_usage": True})
    _, raw = stream_raw(ugw, body, {"x-sim-split-writes": "1"} if split
                        else None)
    usage = [c["usage"] for c in sse_chunks(raw) if c.get("usage")][-1]
    got = usage_lines(ugw, 1)[0]
    assert int(got["prompt"]) == usage["prompt_tokens"]
    assert int(got["completion"]) == usage["completion_tokens"] == 13
    assert int(got["total"]) == usage["total_tokens"]
    assert got["estimated"] == "0"


def test_a_stream_without_usage_is_estimated_from_its_content(ugw):
    body = dict(CHAT, model="mistral-7b", stream=True, max_tokens=9)
    _, raw = stream_raw(ugw, body)
    chunks = sse_chunks(raw)
    assert not any(c.get("usage") for c in chunks)
    content = [c for c in chunks
               if c["choices"] and c["choices"][0]["delta"].get("content")]
    got = usage_lines(ugw, 1)[0]
    assert got["estimated"] == "1"
    assert int(got["completion"]) == len(content) == 9
    # the prompt estimate from the request body: "Hello there" + 1 message
    assert got["prompt"] == "7"
    assert int(got["total"]) == 16


def test_embeddings_usage(ugw):
    r = requests.post(ugw.url + "/v1/embeddings", timeout=10,
                      json={"model": "llama3", "input": ["abc", "defgh"]})
    u = r.json()["usage"]
    got = usage_lines(ugw, 1)[0]
    assert int(got["prompt"]) == u["prompt_tokens"]
    assert int(got["total"]) == u["total_tokens"]
    assert got["completion"] == "-"


def test_time_to_first_token_reflects_the_backend(ugw):
    body = dict(CHAT, model="mistral-7b", stream=True, max_tokens=3)
    stream_raw(ugw, body, {"x-sim-ttft-ms": "300", "x-sim-tpot-ms": "100"})
    got = usage_lines(ugw, 1)[0]
    ttft, total = float(got["ttft"]), float(got["time"])
    # the first byte (the role chunk) leaves the backend after its ttft;
    # the request ends about 3 tokens later
    assert 0.29 <= ttft <= total
    assert total >= ttft + 0.15


def test_a_stream_cut_midway_keeps_what_it_saw(ugw):
    import http.client
    body = dict(CHAT, model="mistral-7b", stream=True, max_tokens=40)
    c = http.client.HTTPConnection(ugw.host, ugw.port, timeout=10)
    c.request("POST", "/v1/chat/completions", json.dumps(body),
              {"content-type": "application/json",
               "x-sim-reset-after-chunks": "6"})
    r = c.getresponse()
    with pytest.raises(http.client.IncompleteRead):
        r.read()
    got = usage_lines(ugw, 1)[0]
    assert got["estimated"] == "1"
    assert 1 <= int(got["completion"]) <= 6


def test_no_usage_for_errors_of_our_own(ugw):
    chat(ugw, "gpt-nope")
    got = usage_lines(ugw, 1)[0]
    assert got["prompt"] == got["completion"] == got["ttft"] == "-"


# ------------------------------------------ include_usage: inject and strip

@pytest.fixture
def igw(nginx_factory, pools):
    conf = route_conf(*pools).replace(
        "infer_route on;",
        "infer_route on; infer_stream_include_usage on; "
        "access_log {usage_log} usage;")
    conf = f"log_format usage '{USAGE_LOG}';\n" + conf
    n = nginx_factory("", start=False, modules=["route"])
    n.http = conf.replace("{usage_log}", str(n.workdir / "usage.log"))
    return n.start()


def sent_body(*sims):
    got = recorded(*sims)
    assert len(got) == 1
    return json.loads(got[0]["body"])


def raw_events(raw):
    return [e for e in raw.decode().split("\n\n") if e.strip()]


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_usage_is_asked_for_and_removed_from_the_clients_stream(
        igw, pools, split):
    _, mistral = pools
    body = dict(CHAT, model="mistral-7b", stream=True, max_tokens=12)
    r, raw = stream_raw(igw, body, {"x-sim-split-writes": "1"} if split
                        else None)
    assert r.status == 200
    # the backend was asked for usage
    assert sent_body(mistral)["stream_options"] == {"include_usage": True}
    # the client gets every content event and [DONE], and no usage chunk
    events = raw_events(raw)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["choices"] for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or ""
                   for c in chunks)
    assert len(text.split()) == 12
    # and the gateway knows the real usage
    got = usage_lines(igw, 1)[0]
    assert got["estimated"] == "0"
    assert got["completion"] == "12"


def test_the_sdk_streams_normally_through_injection(igw, openai_sdk):
    out = openai_sdk(igw.url + "/v1", "chat_stream",
                     dict(CHAT, model="llama3", max_tokens=6))
    assert out["ok"], out
    assert len(out["result"]["text"].split()) == 6
    assert out["result"]["usage"] is None
    got = usage_lines(igw, 1)[0]
    assert got["completion"] == "6" and got["estimated"] == "0"


def test_a_client_that_asks_for_usage_gets_it_untouched(igw, pools):
    _, mistral = pools
    body = dict(CHAT, model="mistral-7b", stream=True, max_tokens=3,
                stream_options={"include_usage": True})
    _, raw = stream_raw(igw, body)
    assert any(c.get("usage") for c in sse_chunks(raw))
    got = recorded(mistral)[0]
    assert json.loads(got["body"]) == body


@pytest.mark.parametrize("options,expected", [
    ({}, {"include_usage": True}),
    ({"continuous_usage_stats": False},
     {"include_usage": True, "continuous_usage_stats": False}),
], ids=["empty", "other-option"])
def test_injection_into_existing_stream_options(igw, pools, options,
                                                expected):
    _, mistral = pools
    body = dict(CHAT, model="mistral-7b", stream=True, max_tokens=2,
                stream_options=options)
    _, raw = stream_raw(igw, body)
    assert sent_body(mistral)["stream_options"] == expected
    assert not any(c.get("usage") for c in sse_chunks(raw))


@pytest.mark.parametrize("options", [{"include_usage": False}, None],
                         ids=["explicit-false", "null"])
def test_an_explicit_choice_is_left_alone(igw, pools, options):
    _, mistral = pools
    body = dict(CHAT, model="mistral-7b", stream=True, max_tokens=4,
                stream_options=options)
    stream_raw(igw, body)
    assert sent_body(mistral) == body
    assert usage_lines(igw, 1)[0]["estimated"] == "1"


def test_no_injection_without_streaming(igw, pools):
    _, mistral = pools
    chat(igw, "mistral-7b", max_tokens=2)
    assert "stream_options" not in sent_body(mistral)


def test_an_alias_and_injection_together(igw, pools):
    llama, _ = pools
    body = dict(CHAT, model="llama3", stream=True, max_tokens=2)
    stream_raw(igw, body)
    sent = sent_body(llama)
    assert sent["model"] == "llama-3-8b"
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["messages"] == CHAT["messages"]


def test_registry_models_counts_the_registry_in_use(nginx_factory, tmp_path):
    """$infer_registry_models, for a readiness probe: the models of the
    registry a worker uses (infer_model and the registry file), followed
    as the file changes."""
    f = tmp_path / "models.json"
    f.write_text(json.dumps({"models": [{"name": "extra-a",
                                         "upstream": "pool"}]}))
    n = nginx_factory(f"""
    upstream pool {{ server 127.0.0.1:9; }}
    infer_model base upstream=pool;
    infer_model_registry {f} interval=100ms;
    server {{
        listen 127.0.0.1:{{port}};
        location / {{
            try_files /ok.txt =404;
            add_header X-Models $infer_registry_models always;
        }}
    }}""", modules=["route"])
    assert requests.get(n.url + "/", timeout=5).headers["X-Models"] == "2"
    f.write_text(json.dumps({"models": [
        {"name": m, "upstream": "pool"} for m in ("x", "y", "z")]}))
    deadline = time.monotonic() + 5
    seen = set()
    while time.monotonic() < deadline and seen != {"4"}:
        seen = {requests.get(n.url + "/", timeout=5,
                             headers={"Connection": "close"})
                .headers["X-Models"] for _ in range(4)}
        time.sleep(0.1)
    assert seen == {"4"}
