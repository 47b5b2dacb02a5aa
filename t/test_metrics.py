"""ngx_infer_metrics: what /metrics says equals the traffic sent, across
two workers and a reload.  Oracles: prometheus_client's parsers (text
0.0.4 and OpenMetrics), `promtool check metrics`, a real Prometheus server
answering PromQL, and the simulated model server's own usage figures."""

import concurrent.futures
import json
import math
import os
import re
import shutil
import subprocess
import time

import pytest
import requests
from prometheus_client.openmetrics.parser import \
    text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from harness.openai import chat
from harness.ports import free_port, wait_port

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"

CHAT = "/v1/chat/completions"

PAGES = """
        location = /metrics { infer_metrics_export; }
        location = /healthz { infer_metrics_health; }
"""


def gateway(*sims, zone="infer_metrics_zone m 4m;", http="", location="",
            server=""):
    servers = "".join(f"server {s.addr}; " for s in sims)
    return f"""
    upstream llama {{ {servers} keepalive 8; }}
    infer_model llama-3-8b upstream=llama alias=llama3;
    {zone}
    {http}
    log_format workers '$pid $status';
    server {{
        listen 127.0.0.1:{{port}} reuseport;
        {server}
        location /v1/ {{
            infer_route on;
            infer_metrics on;
            infer_stream_include_usage on;
            access_log workers.log workers;
            proxy_pass http://$infer_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            {location}
        }}
        {PAGES}
    }}"""


def static(zone="infer_metrics_zone m 4m;", http="", location=""):
    """No upstream: html/ok.txt, labels from the request."""
    return f"""
    {zone}
    {http}
    server {{
        listen 127.0.0.1:{{port}} reuseport;
        location / {{
            infer_metrics on;
            {location}
            try_files /ok.txt =404;
        }}
        {PAGES}
    }}"""


def page(n, **headers):
    r = requests.get(n.url + "/metrics", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    return r


def settled_page(n):
    """The page once two reads 20 ms apart agree on the requests counted
    (at most 1 s): a worker logs a request just after its last byte left,
    and the next request may reach the other worker first."""
    text = page(n).text
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:
        time.sleep(0.02)
        again = page(n).text
        if requests_lines(again) == requests_lines(text):
            return again
        text = again
    return text


def requests_lines(text):
    return [line for line in text.splitlines()
            if line.startswith("infer_requests_total")]


def scrape(n):
    """[(name, labels, value)] of every sample, through prometheus_client,
    once promtool found nothing wrong with the page."""
    text = settled_page(n)
    promtool(text)
    return [(s.name, s.labels, s.value)
            for f in text_string_to_metric_families(text) for s in f.samples]


def promtool(text):
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def total(samples, name, **labels):
    return sum(v for n, l, v in samples if n == name
               and all(l.get(k) == w for k, w in labels.items()))


def series(samples, name, **labels):
    return [(l, v) for n, l, v in samples if n == name
            and all(l.get(k) == w for k, w in labels.items())]


def check_histograms(samples):
    """Every histogram series: buckets cumulative, +Inf equals _count."""
    buckets = {}
    for name, labels, value in samples:
        if name.endswith("_bucket"):
            key = (name[:-7], tuple(sorted((k, v) for k, v in labels.items()
                                           if k != "le")))
            buckets.setdefault(key, []).append((float(labels["le"]), value))
    counts = {(name[:-6], tuple(sorted(labels.items()))): value
              for name, labels, value in samples if name.endswith("_count")}
    assert buckets
    for key, bs in buckets.items():
        values = [v for _, v in sorted(bs)]
        assert values == sorted(values), key
        assert sorted(bs)[-1][0] == math.inf
        assert values[-1] == counts[key], key
    return buckets


def workers_seen(n):
    log = (n.workdir / "workers.log").read_text().split()
    return set(log[0::2])


# --------------------------------------------------------------- counting

def test_n_requests_are_n_across_two_workers(nginx_factory, sim_factory):
    sim = sim_factory("llama-3-8b", "a", ttft_ms=20, tpot_ms=1)
    n = nginx_factory(gateway(sim))
    N = 48

    def one(i):
        # a new connection each: reuseport spreads them over the workers
        s = requests.Session()
        try:
            return s.post(n.url + CHAT, json={
                "model": "llama3" if i % 2 else "llama-3-8b",
                "stream": i % 3 == 0,
                "messages": [{"role": "user", "content": "hi"}]},
                timeout=30).status_code
        finally:
            s.close()

    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        statuses = list(ex.map(one, range(N)))
    assert statuses == [200] * N
    assert len(workers_seen(n)) == 2

    s = scrape(n)
    assert total(s, "infer_requests_total") == N
    assert total(s, "infer_requests_total", model="llama-3-8b",
                 code="2xx") == N
    for h in ("infer_request_duration_seconds",
              "infer_upstream_response_time_seconds",
              "infer_gateway_overhead_seconds"):
        assert total(s, h + "_count", model="llama-3-8b") == N
    assert total(s, "infer_time_to_first_token_seconds_count") == N // 3
    assert total(s, "infer_endpoint_requests_total", endpoint=sim.addr,
                 code="2xx") == N
    assert total(s, "infer_requests_in_flight") == 0
    check_histograms(s)

    # each answer took at least the simulated 20 ms: so did the sums
    assert total(s, "infer_request_duration_seconds_sum") >= N * 0.02
    assert total(s, "infer_upstream_response_time_seconds_sum") >= N * 0.02
    # nginx times a request on the wall clock and a try on the monotonic
    # one, both to the millisecond: a request may read 1 ms shorter
    assert (total(s, "infer_request_duration_seconds_sum")
            >= total(s, "infer_upstream_response_time_seconds_sum")
            - N * 0.001)

    # bytes: what the access log's own counters say, summed
    assert total(s, "infer_request_bytes_total") > N * 100
    assert total(s, "infer_response_bytes_total") > N * 100


def test_status_classes_per_model_and_endpoint(nginx_factory, sim_factory):
    sim = sim_factory("llama-3-8b", "a", ttft_ms=1, tpot_ms=1)
    n = nginx_factory(gateway(sim))
    for status in (200, 200, 503, 500, 429):
        r = chat(n, headers={"x-sim-status": str(status)})
        assert r.status_code == status
    assert chat(n, model="no-such-model").status_code == 404

    s = scrape(n)
    assert total(s, "infer_requests_total", model="llama-3-8b",
                 code="2xx") == 2
    assert total(s, "infer_requests_total", model="llama-3-8b",
                 code="5xx") == 2
    assert total(s, "infer_requests_total", model="llama-3-8b",
                 code="4xx") == 1
    # refused by route: no model target, and no upstream
    assert total(s, "infer_requests_total", model="", code="4xx") == 1
    assert total(s, "infer_endpoint_requests_total", code="5xx") == 2
    assert total(s, "infer_endpoint_requests_total") == 5
    assert total(s, "infer_upstream_response_time_seconds_count") == 5
    assert total(s, "infer_request_duration_seconds_count") == 6


def test_time_to_first_token_and_per_output_token(nginx_factory,
                                                   sim_factory):
    sim = sim_factory("llama-3-8b", "a")
    n = nginx_factory(gateway(sim))
    hdrs = {"x-sim-ttft-ms": "150", "x-sim-tpot-ms": "25",
            "x-sim-completion-tokens": "5"}
    for _ in range(3):
        r = chat(n, stream=True, headers=hdrs)
        assert r.status_code == 200 and "[DONE]" in r.text
    chat(n, headers=hdrs)     # not a stream: no time to first token

    s = scrape(n)
    name = "infer_time_to_first_token_seconds"
    assert total(s, name + "_count") == 3
    ttft = total(s, name + "_sum")
    assert 3 * 0.150 <= ttft < 3 * 10
    assert total(s, name + "_bucket", le="0.1") == 0
    # the first token came before the 4 others, 25 ms apart
    assert ttft + 3 * 0.075 <= total(s, "infer_request_duration_seconds_sum")
    assert total(s, name + "_bucket", le="+Inf") == 3

    # 4 tokens after the first, 25 ms apart
    name = "infer_time_per_output_token_seconds"
    assert total(s, name + "_count") == 3
    assert 3 * 0.024 <= total(s, name + "_sum") < 3 * 5.0
    assert total(s, name + "_bucket", le="0.015") == 0
    check_histograms(s)


def stream_usage(r):
    """The usage of the last SSE event that carries one."""
    usage = None
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            usage = json.loads(line[6:]).get("usage") or usage
    return usage


def test_token_counters_equal_the_simulated_usage(nginx_factory,
                                                  sim_factory):
    sim = sim_factory("llama-3-8b", "a", ttft_ms=1, tpot_ms=1)
    n = nginx_factory(gateway(sim))
    want = {"prompt": 0, "completion": 0}

    def add(u):
        for k in want:
            want[k] += u[k + "_tokens"]

    for i in range(4):
        msgs = [{"role": "user", "content": "abcd " * (i * 13)}]
        hdrs = {"x-sim-completion-tokens": str(i + 2)}
        # JSON
        add(chat(n, headers=hdrs, messages=msgs).json()["usage"])
        # a stream whose client asks for usage
        r = chat(n, stream=True, headers=hdrs, messages=msgs,
                 stream_options={"include_usage": True})
        add(stream_usage(r))
        # a stream whose usage the gateway asks for and removes: the
        # simulator's figures are those of the same request in JSON, which
        # is then counted too
        r = chat(n, stream=True, headers=hdrs, messages=msgs)
        assert r.status_code == 200 and stream_usage(r) is None
        u = chat(n, headers=hdrs, messages=msgs).json()["usage"]
        add(u)
        add(u)

    s = scrape(n)
    for k, v in want.items():
        assert total(s, "infer_tokens_total", model="llama-3-8b",
                     type=k) == v, k
    assert total(s, "infer_requests_total") == 16
    assert total(s, "infer_tokens_total", type="cached") == 0


def test_in_flight_counts_a_request_until_it_ends(nginx_factory,
                                                  sim_factory):
    sim = sim_factory("llama-3-8b", "a", tpot_ms=1)
    n = nginx_factory(gateway(sim))
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        slow = [ex.submit(chat, n, headers={"x-sim-ttft-ms": "1500"})
                for _ in range(2)]
        deadline = time.monotonic() + 5
        seen = 0
        while time.monotonic() < deadline and seen < 2:
            seen = total(scrape(n), "infer_requests_in_flight",
                         model="llama-3-8b")
            time.sleep(0.05)
        assert seen == 2
        assert [f.result().status_code for f in slow] == [200, 200]
    assert total(scrape(n), "infer_requests_in_flight") == 0


# ------------------------------------------------------------- the store

def test_the_series_cap_folds_into_one_overflow_series_per_family(
        nginx_factory):
    n = nginx_factory(static(zone="infer_metrics_zone m 1m max_series=20;",
                             location="infer_metrics_label model "
                                      "$http_x_model;"))
    N = 30
    for i in range(N):
        r = requests.get(n.url + "/", headers={"x-model": f"m{i}"}, timeout=5)
        assert r.status_code == 200
    s = scrape(n)
    assert total(s, "infer_metrics_series") == 20
    assert total(s, "infer_metrics_series_max") == 20
    # nothing lost: every request is in a series of its own or folded
    assert total(s, "infer_requests_total") == N
    over = total(s, "infer_requests_total", infer_overflow="true")
    assert over > 0
    assert total(s, "infer_metrics_overflow_total",
                 family="infer_requests") == over
    assert len(series(s, "infer_requests_total",
                      infer_overflow="true")) == 1
    assert total(s, "infer_request_duration_seconds_count") == N
    check_histograms(s)


def test_reload_keeps_counters(nginx_factory, sim_factory):
    sim = sim_factory("llama-3-8b", "a", ttft_ms=1, tpot_ms=1)
    n = nginx_factory(gateway(sim))
    for _ in range(5):
        assert chat(n).status_code == 200
    n.reload()
    for _ in range(3):
        assert chat(n).status_code == 200
    s = scrape(n)
    assert total(s, "infer_requests_total", code="2xx") == 8
    assert total(s, "infer_request_duration_seconds_count") == 8

    # new buckets: new series for that histogram, never two of one name
    n.http = n.http.replace(
        "infer_metrics_zone m 4m;",
        "infer_metrics_zone m 4m; "
        "infer_metrics_buckets request_duration 0.5 1 2s 1m;")
    n.reload()
    assert chat(n).status_code == 200
    s = scrape(n)
    assert total(s, "infer_requests_total", code="2xx") == 9
    assert total(s, "infer_request_duration_seconds_count") == 1
    les = {l["le"] for l, _ in series(s, "infer_request_duration_seconds"
                                         "_bucket")}
    assert les == {"0.5", "1", "2", "60", "+Inf"}
    check_histograms(s)


def test_label_values_are_escaped(nginx_factory):
    n = nginx_factory(static(location=r'''
            infer_metrics_label weird "a\"b\\c
d";
            infer_metrics_label raw $http_x_raw;'''))
    r = requests.get(n.url + "/", headers={"x-raw": b"caf\xc3\xa9 \xff!"},
                     timeout=5)
    assert r.status_code == 200
    text = settled_page(n)
    assert r'weird="a\"b\\c\nd"' in text
    s = scrape(n)
    [(labels, value)] = series(s, "infer_requests_total")
    assert labels["weird"] == 'a"b\\c\nd'
    # invalid UTF-8 is replaced, valid UTF-8 kept
    assert labels["raw"] == "caf\u00e9 ?!"
    assert value == 1


@pytest.mark.parametrize("raw,shown", [
    (b"\xed\xa0\x80x", "???x"),            # a surrogate
    (b"\xc3\xc3x", "??x"),                  # a lead byte for a continuation
    (b"\xf9\x80\x80\x80x", "????x"),        # a lead byte past U+10FFFF
    (b"\xe0\x80\x80x", "???x"),            # an overlong form
    (b"\xf0\x9f\x98\x80x", "\U0001f600x"),  # a good 4-byte character
], ids=["surrogate", "bad-continuation", "past-10ffff", "overlong", "emoji"])
def test_only_well_formed_utf8_reaches_the_page(nginx_factory, raw, shown):
    """What Prometheus's parser (Go's utf8.Valid) accepts, nothing looser:
    one client header must not make every scrape fail."""
    n = nginx_factory(static(location="""
            infer_metrics_label raw $http_x_raw;"""))
    assert requests.get(n.url + "/", headers={"x-raw": raw},
                        timeout=5).status_code == 200
    text = settled_page(n)
    promtool(text)
    [(labels, _)] = series(scrape(n), "infer_requests_total")
    assert labels["raw"] == shown


def test_a_long_label_value_is_cut(nginx_factory):
    n = nginx_factory(static(location="infer_metrics_label raw "
                                      "$http_x_raw;"))
    requests.get(n.url + "/", headers={"x-raw": "\u00e9".encode() * 100},
                 timeout=5)
    [(labels, _)] = series(scrape(n), "infer_requests_total")
    assert labels["raw"] == "\u00e9" * 64


# -------------------------------------------------------------- the page

def test_openmetrics_when_asked(nginx_factory, sim_factory):
    sim = sim_factory("llama-3-8b", "a", ttft_ms=1, tpot_ms=1)
    n = nginx_factory(gateway(sim))
    chat(n, stream=True)
    settled_page(n)
    r = page(n, Accept="application/openmetrics-text; version=1.0.0,"
                       "text/plain;q=0.5")
    assert r.headers["content-type"].startswith(
        "application/openmetrics-text; version=1.0.0")
    assert r.text.endswith("# EOF\n")
    fams = {f.name: f for f in openmetrics_families(r.text)}
    assert fams["infer_requests"].type == "counter"
    assert fams["infer_time_to_first_token_seconds"].type == "histogram"
    plain = page(n)
    assert plain.headers["content-type"] == \
        "text/plain; version=0.0.4; charset=utf-8"
    assert "# EOF" not in plain.text
    assert requests.head(n.url + "/metrics", timeout=5).status_code == 200
    assert requests.post(n.url + "/metrics", timeout=5).status_code == 405


def test_auth_and_ratelimit_outcomes_from_any_variable(nginx_factory):
    n = nginx_factory(static(location="""
            infer_metrics_auth_status $http_x_auth;
            infer_metrics_ratelimit_status $http_x_rl;"""))
    for auth, rl in (("ok", "allowed"), ("ok", "rejected"),
                     ("invalid_token", ""), ("ok", "allowed")):
        requests.get(n.url + "/", headers={"x-auth": auth, "x-rl": rl},
                     timeout=5)
    s = scrape(n)
    assert total(s, "infer_auth_outcomes_total", outcome="ok") == 3
    assert total(s, "infer_auth_outcomes_total",
                 outcome="invalid_token") == 1
    assert total(s, "infer_ratelimit_decisions_total",
                 decision="allowed") == 2
    assert total(s, "infer_ratelimit_decisions_total",
                 decision="rejected") == 1
    assert total(s, "infer_ratelimit_decisions_total") == 3


def test_the_module_alone_with_its_default_zone(nginx_factory):
    """Without route (so no model) and without infer_metrics_zone."""
    n = nginx_factory(static(zone=""), modules=["metrics"])
    for _ in range(3):
        requests.get(n.url + "/", timeout=5)
    s = scrape(n)
    assert series(s, "infer_requests_total") == [({"code": "2xx"}, 3.0)]
    assert total(s, "infer_metrics_series_max") == 10000
    assert total(s, "infer_build_info") == 1


def test_healthz_and_readyz(nginx_factory):
    n = nginx_factory(static(http="""
        map $http_x_redis $redis_ok { default 1; down 0; }""").replace(
        PAGES, PAGES + """
        location = /readyz {
            infer_metrics_ready;
            infer_metrics_ready_condition redis $redis_ok;
            infer_metrics_ready_condition registry $http_x_registry;
        }
        location = /readyz-plain { infer_metrics_ready; }"""))
    r = requests.get(n.url + "/healthz", timeout=5)
    assert (r.status_code, r.text) == (200, "ok\n")
    r = requests.get(n.url + "/readyz", headers={"x-registry": "yes"},
                     timeout=5)
    assert (r.status_code, r.text) == (200, "ready\n")
    r = requests.get(n.url + "/readyz", headers={"x-redis": "down"},
                     timeout=5)
    assert (r.status_code, r.text) == (503, "not ready: redis registry\n")
    assert requests.get(n.url + "/readyz-plain",
                        timeout=5).status_code == 200


@pytest.mark.parametrize("directive, message", [
    ("infer_metrics_zone m 4m max_series=0;", 'invalid max_series "0"'),
    ("infer_metrics_zone m 4m foo=1;", 'invalid parameter "foo=1"'),
    ("infer_metrics_zone m 1k;", 'invalid zone size "1k"'),
    ("infer_metrics_zone m 32k max_series=100000;",
     'infer_metrics_zone "m" is too small for max_series=100000'),
    ("infer_metrics_zone m 4m; infer_metrics_zone n 4m;", "is duplicate"),
    ("infer_metrics_buckets ttft 1 2;", 'unknown histogram "ttft"'),
    ("infer_metrics_buckets time_to_first_token 1 0.5;",
     'invalid bucket "0.5"'),
    ("infer_metrics_buckets time_to_first_token 1 2 x;",
     'invalid bucket "x"'),
    ("infer_metrics_label 9lives $uri;", 'invalid name "9lives"'),
    ("infer_metrics_label __x $uri;", 'invalid name "__x"'),
    ("infer_metrics_label code $status;", 'label name "code" is reserved'),
    ("infer_metrics_label a $uri; infer_metrics_label a $uri;",
     'duplicate name "a"'),
    ("infer_metrics_label a $no_such_variable;",
     'unknown "no_such_variable" variable'),
    ("infer_metrics_counter hits_total $uri;",
     'invalid counter name "hits_total"'),
    ("infer_metrics_counter infer_hits $uri;",
     'invalid counter name "infer_hits"'),
    ("infer_metrics_counter 9hits $uri;", 'invalid counter name "9hits"'),
    ("infer_metrics_counter hits $uri; infer_metrics_counter hits $uri;",
     'duplicate counter "hits"'),
], ids=["zone-max-series-zero", "zone-unknown-parameter", "zone-too-small",
        "zone-too-small-for-max-series", "a-second-zone",
        "buckets-of-an-unknown-histogram", "buckets-not-increasing",
        "bucket-not-a-number", "label-name-starts-with-a-digit",
        "label-name-starts-with-two-underscores", "label-name-code-reserved",
        "label-twice", "label-of-an-unknown-variable",
        "counter-name-ends-in-total", "counter-name-starts-with-infer",
        "counter-name-starts-with-a-digit", "counter-twice"])
def test_config_mistakes_are_caught_by_nginx_t(nginx_factory, directive,
                                               message):
    n = nginx_factory(static(zone="", http=directive), start=False)
    ok, out = n.check_config()
    assert not ok
    assert message in out, out
    assert "[crit]" not in out and "[alert]" not in out, out


# ------------------------------------------------------ a real Prometheus

def test_a_real_prometheus_scrapes_the_gateway(nginx_factory, sim_factory,
                                               tmp_path):
    sim = sim_factory("llama-3-8b", "a", ttft_ms=1, tpot_ms=1)
    n = nginx_factory(gateway(sim))
    for status in (200, 200, 200, 500):
        chat(n, headers={"x-sim-status": str(status)})

    port = free_port()
    conf = tmp_path / "prometheus.yml"
    conf.write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: gateway
    static_configs: [{{targets: ["{n.host}:{n.port}"]}}]
""")
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={conf}",
         f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        assert wait_port("127.0.0.1", port, 20,
                         alive=lambda: proc.poll() is None)
        q = 'sum by (model) (infer_requests_total{code="5xx"})'
        deadline = time.monotonic() + 30
        result = None
        while time.monotonic() < deadline:
            r = requests.get(f"http://127.0.0.1:{port}/api/v1/query",
                             params={"query": q}, timeout=5)
            # 503 while it starts
            if r.status_code == 200 and r.json()["data"]["result"]:
                result = r.json()["data"]["result"]
                break
            time.sleep(0.3)
        assert result, (tmp_path / "prometheus.log").read_text()[-2000:]
        assert [(x["metric"], x["value"][1]) for x in result] == \
            [({"model": "llama-3-8b"}, "1")]
        r = requests.get(f"http://127.0.0.1:{port}/api/v1/query", params={
            "query": 'sum(infer_requests_total{job="gateway"})'},
            timeout=5).json()
        assert r["data"]["result"][0]["value"][1] == "4"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def test_labels_in_another_order_make_the_same_series(nginx_factory):
    n = nginx_factory(static(location="""
            infer_metrics_label zone "z";
            infer_metrics_label app "a";""").replace(
        "location / {", """location /other {
            infer_metrics on;
            infer_metrics_label app "a";
            infer_metrics_label zone "z";
            try_files /ok.txt =404;
        }
        location / {"""))
    for path in ("/", "/other", "/"):
        assert requests.get(n.url + path, timeout=5).status_code == 200
    text = settled_page(n)
    assert 'infer_requests_total{app="a",zone="z",code="2xx"} 3' in text


# ------------------------------------------------------ examples and docs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OBS = os.path.join(REPO, "examples", "observability")
DOC = os.path.join(REPO, "docs", "metrics.md")


def test_the_examples_pass_promtool():
    for args in (["check", "config", os.path.join(OBS, "prometheus.yml")],
                 ["check", "rules", os.path.join(OBS, "alerts.yml")]):
        r = subprocess.run([PROMTOOL, *args], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr


def test_the_examples_query_only_documented_families():
    doc = open(DOC).read()
    families = set(re.findall(r"^\| `(infer_\w+)` \|", doc, re.M))
    assert "infer_requests_total" in families
    dash = json.load(open(os.path.join(OBS, "grafana-dashboard.json")))
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(dash["panels"]) >= 8
    alerts = open(os.path.join(OBS, "alerts.yml")).read()
    rules = re.findall(r"^\s+expr: >?\n?((?:.*\n)+?)(?=\s+(?:for|labels|-)"
                       r"[ :])", alerts, re.M)
    assert len(rules) == alerts.count("expr:") == 6
    text = " ".join(exprs + rules)
    used = {re.sub(r"_(bucket|sum|count)$", "", m)
            for m in re.findall(r"\b(infer_\w+)", text)}
    used = {u for u in used if not u.startswith("infer_overflow")}
    assert used and used <= families, used - families


def test_every_name_the_module_uses_is_documented():
    """Every infer_ name in the module's sources (its directives, families
    and the variables it reads) appears in docs/metrics.md; that each
    directive has its Syntax/Default/Context block, for every module, is
    t/test_docs.py's."""
    doc = open(DOC).read()
    src = ""
    for name in os.listdir(os.path.join(REPO, "ngx_infer_metrics")):
        src += open(os.path.join(REPO, "ngx_infer_metrics", name)).read()
    names = set(re.findall(r'ngx_string\("(infer_\w+)"\)', src))
    assert {"infer_metrics_zone", "infer_requests"} <= names
    missing = sorted(n for n in names if n not in doc)
    assert not missing, missing


def test_series_created_at_once_by_both_workers_are_one(nginx_factory):
    """Many new label values at once from both workers: each series is
    created once (the lookup is repeated under the lock), and counts are
    exact."""
    n = nginx_factory(static(location="infer_metrics_label model "
                                      "$http_x_model;"))
    per, values = 12, 25

    def one(i):
        with requests.Session() as s:
            return s.get(n.url + "/", headers={"x-model": f"m{i % values}"},
                         timeout=10).status_code

    with concurrent.futures.ThreadPoolExecutor(32) as ex:
        assert set(ex.map(one, range(per * values))) == {200}
    s = scrape(n)
    got = series(s, "infer_requests_total")
    assert len(got) == values
    assert len({l["model"] for l, _ in got}) == values
    assert all(v == per for _, v in got)
    assert len(series(s, "infer_request_duration_seconds_count")) == values
    assert total(s, "infer_metrics_series") == values * 5
    check_histograms(s)


def test_user_defined_counters_over_any_variable(nginx_factory):
    n = nginx_factory(static(
        http="""
        map $http_x_cache $cache_hit { HIT 1; default 0; }
        infer_metrics_counter gateway_prompt_estimate $http_x_n;
        infer_metrics_counter inf $http_x_n;
        infer_metrics_counter cache_hits $cache_hit;""",
        location="infer_metrics_label model $http_x_model;"))
    for model, x_n, cache in (("a", "5", "HIT"), ("a", "7", "MISS"),
                              ("a", "", "HIT"), ("b", "abc", ""),
                              ("b", "0", "HIT"), ("b", "30", "")):
        requests.get(n.url + "/", headers={"x-model": model, "x-n": x_n,
                                           "x-cache": cache}, timeout=5)
    s = scrape(n)
    def by_model(name):
        return {l["model"]: v for l, v in series(s, name)}

    assert by_model("gateway_prompt_estimate_total") == {"a": 12, "b": 30}
    assert by_model("cache_hits_total") == {"a": 2, "b": 1}
    assert total(s, "infer_metrics_overflow_total",
                 family="cache_hits") == 0
    assert "# HELP gateway_prompt_estimate_total Sum of $http_x_n" in \
        page(n).text

    # a reload keeps them; a counter added at the end keeps the others
    n.http = n.http.replace(
        "infer_metrics_counter cache_hits $cache_hit;",
        "infer_metrics_counter cache_hits $cache_hit; "
        "infer_metrics_counter more $http_x_n;")
    n.reload()
    requests.get(n.url + "/", headers={"x-model": "a", "x-n": "1",
                                       "x-cache": "HIT"}, timeout=5)
    s = scrape(n)
    assert total(s, "gateway_prompt_estimate_total", model="a") == 13
    assert total(s, "cache_hits_total", model="a") == 3
    assert total(s, "more_total") == 1
    assert total(s, "inf_total") == 43
    om = page(n, Accept="application/openmetrics-text").text
    assert {f.name for f in openmetrics_families(om)} >= {
        "gateway_prompt_estimate", "cache_hits", "more"}


def test_an_internal_redirect_is_one_request_in_flight_and_in_log(
        nginx_factory, sim_factory):
    sim = sim_factory("llama-3-8b", "a", ttft_ms=1, tpot_ms=1)
    n = nginx_factory(gateway(sim, location="""
            proxy_intercept_errors on;
            error_page 503 = @again;""", server="""
        location @again {
            infer_metrics on;
            proxy_pass http://$infer_upstream;
        }"""), modules=["route", "metrics"])
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        slow = ex.submit(chat, n, headers={"x-sim-status": "503",
                                           "x-sim-stall-ms": "700"})
        seen = []
        deadline = time.monotonic() + 10
        while not slow.done() and time.monotonic() < deadline:
            seen.append(total(scrape(n), "infer_requests_in_flight"))
            time.sleep(0.05)
        assert slow.result().status_code == 503
    # both tries (about 1.4 s) counted the request once; how many samples
    # that is depends on how busy the machine is
    assert max(seen) == 1 and seen.count(1) >= 3, seen
    s = scrape(n)
    assert total(s, "infer_requests_total") == 1
    assert total(s, "infer_endpoint_requests_total", code="5xx") == 2
    assert total(s, "infer_upstream_response_time_seconds_count") == 1
    assert series(s, "infer_requests_in_flight") == [
        ({"model": "llama-3-8b"}, 0.0)]


def test_the_page_can_be_gzipped(nginx_factory):
    n = nginx_factory(static().replace(
        "location = /metrics { infer_metrics_export; }",
        "location = /metrics { gzip on; gzip_types text/plain "
        "application/openmetrics-text; charset utf-8; "
        "infer_metrics_export; }"), modules=["metrics"])
    requests.get(n.url + "/", timeout=5)
    settled_page(n)
    for accept, ctype in (
            ("text/plain", "text/plain; version=0.0.4; charset=utf-8"),
            ("application/openmetrics-text",
             "application/openmetrics-text; version=1.0.0; charset=utf-8")):
        r = requests.get(n.url + "/metrics", timeout=5, headers={
            "Accept": accept, "Accept-Encoding": "gzip"})
        assert r.headers["content-encoding"] == "gzip"
        assert r.headers["content-type"] == ctype
        assert 'infer_requests_total{code="2xx"} 1' in r.text


def test_a_client_gone_before_the_answer_still_counts_its_try(nginx_factory,
                                                              sim_factory):
    """The client gives up (499) while the model server still queues its
    request: the try has no status, but it took its time, and the endpoint
    families count it (code "oth")."""
    sim = sim_factory("llama-3-8b", "a", ttft_ms=1, tpot_ms=1)
    n = nginx_factory(gateway(sim), modules=["route", "metrics"])
    with pytest.raises(requests.exceptions.Timeout):
        requests.post(n.url + CHAT, timeout=0.4, headers={
            "x-sim-stall-ms": "1500"}, json={
            "model": "llama-3-8b",
            "messages": [{"role": "user", "content": "Hi"}]})
    deadline = time.monotonic() + 5
    s = scrape(n)
    while total(s, "infer_requests_total") < 1 \
            and time.monotonic() < deadline:
        time.sleep(0.1)
        s = scrape(n)
    assert total(s, "infer_requests_total", code="4xx") == 1
    assert total(s, "infer_endpoint_requests_total", code="oth") == 1
    assert total(s, "infer_upstream_response_time_seconds_count") == 1
    assert total(s, "infer_upstream_response_time_seconds_sum") >= 0.3
