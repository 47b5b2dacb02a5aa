"""Request ids and W3C trace context (issue 17; docs/route.md, "Request ids
and trace context"): x-request-id on every answer of a location with
infer_trace on, the client's id kept when it is a sane one, a backend's
replaced; the id in every error envelope of the gateway (route, auth,
ratelimit, nginx's own pages rewritten by auth); traceparent to the
backend with the client's trace and the gateway's span, or a new trace;
the variables for logs.

The oracle is the W3C Trace Context text, in a regular expression of the
test's own, and what the simulated replica recorded it was sent."""

import json
import re

import pytest
import requests

from harness.openai import chat, error_of

TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
HEX32 = re.compile(r"[0-9a-f]{32}")

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def conf(sim, location="", http="", trace="infer_trace on;"):
    return f"""
    upstream pool {{ server {sim.addr}; keepalive 8; }}
    infer_model llama-3-8b upstream=pool;
    {http}
    log_format trace '$infer_request_id $infer_trace_id $infer_span_id '
                     '[$infer_parent_span_id] $infer_trace_flags '
                     '$infer_traceparent';
    server {{
        listen 127.0.0.1:{{port}} reuseport;
        access_log trace.log trace;     # under the prefix, the workdir
        {trace}
        location / {{
            infer_route on;
            proxy_pass http://$infer_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            add_header X-Trace "$infer_trace_id $infer_span_id" always;
            {location}
        }}
        location /off/ {{
            infer_trace off;
            infer_route on;
            rewrite ^/off(/.*)$ $1 break;
            proxy_pass http://$infer_upstream;
        }}
    }}"""


@pytest.fixture
def sim(sim_factory):
    return sim_factory("llama-3-8b", "t", ttft_ms=1, tpot_ms=1)


@pytest.fixture
def gw(nginx_factory, sim):
    return nginx_factory(conf(sim), modules=["route"])


def sent(sim):
    """The headers of the last request the replica received, lowercased."""
    rec = [r for r in sim.requests() if r["path"].startswith("/v1/")][-1]
    out = {}
    for k, v in rec["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return out


def log_lines(gw):
    return (gw.workdir / "trace.log").read_text().splitlines()


# ------------------------------------------------------------ request ids

def test_an_answer_has_a_new_request_id_the_backend_gets_too(gw, sim):
    r = chat(gw)
    assert r.status_code == 200, r.text
    rid = r.headers["x-request-id"]
    assert HEX32.fullmatch(rid), rid
    assert sent(sim)["x-request-id"] == [rid]
    # another request, another id
    assert chat(gw).headers["x-request-id"] != rid
    assert log_lines(gw)[0].split()[0] == rid


@pytest.mark.parametrize("given", [
    "req_8f3b2c", "0b6e4f2a-1c3d-4e5f-8a9b-0c1d2e3f4a5b", "a" * 128,
    "trace:abc/def=+@.-_"])
def test_a_clients_sane_id_is_kept(gw, sim, given):
    r = chat(gw, headers={"X-Request-Id": given})
    assert r.headers["x-request-id"] == given
    assert sent(sim)["x-request-id"] == [given]


@pytest.mark.parametrize("given", [
    "", "a" * 129, "has space", "quote\"", "semi;colon", "é", "tab\tin",
    "$infer_model"], ids=["empty", "129-bytes", "space", "quote",
                          "semicolon", "utf8", "tab", "dollar"])
def test_a_clients_odd_id_is_replaced(gw, sim, given):
    r = chat(gw, headers={"X-Request-Id": given.encode()})
    rid = r.headers["x-request-id"]
    assert HEX32.fullmatch(rid), (given, rid)
    # the backend sees the id the client is told, once
    assert sent(sim)["x-request-id"] == [rid]


def test_a_backends_own_id_is_replaced(gw, sim):
    r = chat(gw, headers={"x-sim-add-header": "X-Request-Id: backend-1"})
    assert r.status_code == 200
    assert HEX32.fullmatch(r.headers["x-request-id"])
    assert r.raw.headers.getlist("x-request-id") == \
        [r.headers["x-request-id"]]


def test_without_infer_trace_nothing_is_added(gw, sim):
    r = chat(gw, path="/off/v1/chat/completions",
             headers={"x-sim-add-header": "X-Request-Id: backend-1"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "backend-1"     # the backend's
    assert "x-request-id" not in sent(sim)
    assert "traceparent" not in sent(sim)


def test_an_error_envelope_carries_the_id(gw, sim):
    for body, status in (({"model": "nope", "messages": []}, 404),
                         ({"messages": []}, 400)):
        r = requests.post(gw.url + "/v1/chat/completions", json=body,
                          timeout=10)
        assert r.status_code == status
        e = error_of(r)
        assert e["request_id"] == r.headers["x-request-id"]
    r = requests.post(gw.url + "/v1/chat/completions", timeout=10,
                      json={"model": "nope"},
                      headers={"X-Request-Id": "client-7"})
    assert error_of(r)["request_id"] == "client-7" == \
        r.headers["x-request-id"]


def test_the_envelope_has_the_id_without_infer_trace(nginx_factory, sim):
    gw = nginx_factory(conf(sim, trace=""), modules=["route"])
    r = requests.post(gw.url + "/v1/chat/completions", json={"model": "x"},
                      timeout=10)
    assert "x-request-id" not in r.headers
    assert HEX32.fullmatch(error_of(r)["request_id"])


def test_auth_and_ratelimit_errors_carry_the_id(nginx_factory, sim,
                                                tmp_path):
    gw = nginx_factory(conf(sim, location="""
            infer_auth on;
            infer_ratelimit on;
            infer_ratelimit_limit per_ip $binary_remote_addr requests=1/m;""",
        http=f"""
    infer_auth_api_keys {tmp_path / 'keys.json'};
    infer_ratelimit_zone rl:1m;"""), modules=["route", "auth",
                                                 "ratelimit"],
        start=False)
    (tmp_path / "keys.json").write_text(json.dumps({"keys": [{
        "id": "k1", "tenant": "acme",
        "hash": "sha256:" + __import__("hashlib").sha256(
            b"sk-test-1").hexdigest()}]}))
    gw.start()
    # auth's refusal: nginx's own 401 page, rewritten into the envelope
    r = chat(gw, headers={"X-Request-Id": "auth-1"})
    assert r.status_code == 401
    assert error_of(r)["request_id"] == "auth-1" == r.headers["x-request-id"]
    assert int(r.headers["content-length"]) == len(r.content)
    assert chat(gw, key="sk-test-1").status_code == 200
    r = chat(gw, key="sk-test-1")
    assert r.status_code == 429
    assert error_of(r)["request_id"] == r.headers["x-request-id"]


# ---------------------------------------------------------- trace context

def test_a_clients_trace_is_continued_with_the_gateways_span(gw, sim):
    tp = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    r = chat(gw, headers={"traceparent": tp, "tracestate": "vendor=x"})
    got = sent(sim)
    assert len(got["traceparent"]) == 1
    trace, span, flags = TRACEPARENT.fullmatch(got["traceparent"][0]).groups()
    assert trace == CLIENT_TRACE and flags == "01"
    assert span != CLIENT_SPAN and span != "0" * 16
    assert got["tracestate"] == ["vendor=x"]
    assert r.headers["x-trace"] == f"{trace} {span}"
    line = log_lines(gw)[-1].split()
    assert line[1:] == [trace, span, f"[{CLIENT_SPAN}]", "01",
                        got["traceparent"][0]]


def test_an_unsampled_trace_stays_unsampled(gw, sim):
    chat(gw, headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"})
    assert TRACEPARENT.fullmatch(sent(sim)["traceparent"][0]).group(3) == \
        "00"


@pytest.mark.parametrize("bad", [
    "", "00-" + "0" * 32 + f"-{CLIENT_SPAN}-01",           # zero trace
    f"00-{CLIENT_TRACE}-" + "0" * 16 + "-01",              # zero span
    f"00-{CLIENT_TRACE.upper()}-{CLIENT_SPAN}-01",         # uppercase
    f"ff-{CLIENT_TRACE}-{CLIENT_SPAN}-01",                 # version ff
    f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01-extra",           # 00 is 55 bytes
    f"00-{CLIENT_TRACE}-{CLIENT_SPAN}",                    # short
    f"00_{CLIENT_TRACE}_{CLIENT_SPAN}_01",
], ids=["empty", "zero-trace", "zero-span", "uppercase", "version-ff",
        "00-too-long", "short", "separators"])
def test_an_invalid_traceparent_starts_a_new_trace(gw, sim, bad):
    r = chat(gw, headers={"traceparent": bad})
    got = sent(sim)["traceparent"]
    assert len(got) == 1
    trace, span, flags = TRACEPARENT.fullmatch(got[0]).groups()
    assert trace != CLIENT_TRACE and trace != "0" * 32
    assert flags == "01"
    assert r.headers["x-trace"] == f"{trace} {span}"
    assert log_lines(gw)[-1].split()[3] == "[-]"    # not found


def test_a_later_version_is_read_by_its_first_fields(gw, sim):
    chat(gw, headers={
        "traceparent": f"01-{CLIENT_TRACE}-{CLIENT_SPAN}-01-future"})
    trace, _, _ = TRACEPARENT.fullmatch(sent(sim)["traceparent"][0]).groups()
    assert trace == CLIENT_TRACE


def test_no_traceparent_a_new_trace_each_request(gw, sim):
    traces = set()
    for _ in range(5):
        chat(gw)
        trace, span, flags = TRACEPARENT.fullmatch(
            sent(sim)["traceparent"][0]).groups()
        traces.add(trace)
        assert flags == "01"
    assert len(traces) == 5


def test_a_streamed_answer_has_the_id_too(gw, sim):
    r = requests.post(gw.url + "/v1/chat/completions", timeout=10,
                      json={"model": "llama-3-8b", "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]},
                      stream=True)
    assert HEX32.fullmatch(r.headers["x-request-id"])
    assert b"[DONE]" in r.content


def test_fuzz_the_traceparent_parser(tmp_path):
    """libFuzzer, ASan and UBSan over the parser for 5 s, its verdict
    checked against an oracle of the harness's own (t/unit)."""
    from harness.cunit import REPO, UNIT, fuzz
    tokens = ["00-", "01-", "ff-", "-", "-01", "-00", "0" * 16, "0" * 32,
              CLIENT_TRACE, CLIENT_SPAN, "A", "g"]
    fuzz(tmp_path, [UNIT / "route_traceparent_fuzz.c",
                    REPO / "ngx_infer_route"
                    / "ngx_http_infer_route_traceparent.c"],
         UNIT / "traceparent_corpus",
         "".join("t%d=%s\n" % (i, json.dumps(t))
                 for i, t in enumerate(tokens)), seconds=5)


@pytest.mark.parametrize("flags,sent_flags", [("03", "01"), ("02", "00"),
                                              ("ff", "01"), ("00", "00")])
def test_only_the_sampled_flag_is_passed_on(gw, sim, flags, sent_flags):
    chat(gw, headers={
        "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-{flags}"})
    assert TRACEPARENT.fullmatch(sent(sim)["traceparent"][0]).group(3) == \
        sent_flags


def test_proxy_set_header_replaces_what_infer_trace_adds(nginx_factory,
                                                         sim):
    """The headers infer_trace adds for the backend are ones
    proxy_set_header replaces, as it does the client's own."""
    gw = nginx_factory(conf(sim, location="""
            proxy_set_header X-Request-Id "gw-$request_id";
            proxy_set_header traceparent $infer_traceparent;"""),
        modules=["route"])
    for headers in ({}, {"X-Request-Id": "client-1"}):
        r = chat(gw, headers=headers)
        got = sent(sim)
        assert got["x-request-id"] == [f"gw-{got['x-request-id'][0][3:]}"]
        assert len(got["traceparent"]) == 1
        assert r.headers["x-request-id"] == headers.get(
            "X-Request-Id", got["x-request-id"][0][3:])


def test_new_ids_are_unique_across_requests_and_workers(gw):
    """Trace and span ids come from a generator seeded in each worker:
    300 requests over fresh connections (both workers, reuseport) give
    600 distinct ids, none all zero, and no two workers the same
    sequence."""
    traces, spans = set(), set()
    for _ in range(300):
        r = requests.get(gw.url + "/v1/models", timeout=5,
                         headers={"Connection": "close"})
        t, s = r.headers["X-Trace"].split()
        assert HEX32.fullmatch(t) and re.fullmatch("[0-9a-f]{16}", s)
        assert t != "0" * 32 and s != "0" * 16
        traces.add(t)
        spans.add(s)
    assert len(traces) == 300 and len(spans) == 300
    assert not {t[:16] for t in traces} & spans
