"""nginx's own cache in front of the model servers (issue 18): the route
module's $infer_cache_key (scope, pool, model served, the body in a
canonical form), $infer_cacheable, $infer_cache_bypass and
$infer_cache_no_store, with proxy_cache and POST.

What a client sees is checked: X-Cache ($upstream_cache_status), how many
requests reached the simulated replica (its own count), the answer's
body; the key's digest is recomputed in the test from Python's json and
hashlib, an oracle of its own."""

import hashlib
import json
import os
import re
import time

import pytest
import requests

from harness.openai import chat

LOCATION = """
            infer_route on;
            proxy_pass http://$infer_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache infer;
            proxy_cache_methods POST;
            proxy_cache_key $infer_cache_key;
            proxy_cache_bypass $infer_cache_bypass;
            proxy_no_cache $infer_cache_no_store;
            proxy_cache_valid 200 10m;
            add_header X-Cache $upstream_cache_status always;
            add_header X-Key "[$infer_cache_key]" always;
            add_header X-Cacheable $infer_cacheable always;"""


def cache_conf(sims, location="", http="", workdir="{workdir}", server=""):
    ups = "\n".join(
        f"upstream {name} {{ server {s.addr}; }}\n"
        f"    infer_model {name} upstream={name} model=llama-3-8b;"
        for name, s in sims.items())
    return f"""
    proxy_cache_path {workdir} keys_zone=infer:1m;
    {ups}
    {http}
    server {{
        listen 127.0.0.1:{{port}};
        {server}
        location / {{
            {LOCATION}
            {location}
        }}
        location /plain/ {{
            infer_route on;
            rewrite ^/plain(/.*)$ $1 break;
            proxy_pass http://$infer_upstream;
            add_header X-Key "[$infer_cache_key]" always;
            add_header X-Cacheable $infer_cacheable always;
        }}
    }}"""


@pytest.fixture
def sim(sim_factory):
    return sim_factory("llama-3-8b", "c", ttft_ms=1, tpot_ms=1)


@pytest.fixture
def gw(nginx_factory, sim, tmp_path):
    return nginx_factory(cache_conf({"m": sim}, workdir=tmp_path / "cache"),
                         modules=["route"])


def post(gw, body, path="/v1/chat/completions", headers=None, raw=None):
    data = raw if raw is not None else json.dumps(body)
    r = requests.post(gw.url + path, data=data, timeout=15, headers={
        "Content-Type": "application/json", **(headers or {})})
    if (r.status_code == 200 and r.headers.get("x-cacheable") == "1"
            and r.headers.get("x-cache") in ("MISS", "EXPIRED", "BYPASS")
            and "no-store" not in str(headers or {}).lower()):
        stored(gw, key(r))
    return r


def stored(gw, k):
    """Wait (2 s at most) for the answer just sent to be in the cache.
    nginx writes it once the backend's answer is read whole, which may be
    just after the client has it: with two workers, the next request could
    otherwise be a miss.  The file is named by the MD5 of the key."""
    name = hashlib.md5(k.encode()).hexdigest()
    dirs = re.findall(r"proxy_cache_path (\S+)", gw.conf_path.read_text())
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        if any(os.path.exists(os.path.join(d, name)) for d in dirs):
            time.sleep(0.02)    # the rename, then the zone's "exists"
            return
        time.sleep(0.005)


def served(sim):
    return sim.stats()["inference_total"]


ASK = {"model": "m", "temperature": 0, "max_tokens": 8,
       "messages": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "What is 2+2?"}]}


def canonical(v):
    """The canonical form of a JSON value, as docs/route.md defines it."""
    if v is None:
        return b"n"
    if v is True:
        return b"t"
    if v is False:
        return b"f"
    if isinstance(v, int):
        return b"i%d;" % v
    if isinstance(v, float):
        return b"r" + ("%.17g" % v).encode() + b";"
    if isinstance(v, str):
        return b"s" + part(v)
    if isinstance(v, list):
        return b"[" + b"".join(canonical(x) for x in v) + b"]"
    return b"{" + b"".join(b"s" + part(k) + canonical(v[k])
                           for k in sorted(v, key=str.encode)) + b"}"


def part(s):
    b = s.encode()
    return str(len(b)).encode() + b":" + b


def canonical_key(body, upstream="m", target="llama-3-8b", scope="\n"):
    """What $infer_cache_key should be, from Python alone: of the body as
    sent to the backend, whose "model" is the model served."""
    body = {**body, "model": target}
    return hashlib.sha256(b"ngx_infer cache 2\n" + part(scope)
                          + part(upstream) + part(target)
                          + canonical(body)).hexdigest()


def key(r):
    return r.headers["x-key"].strip("[]")


# ------------------------------------------------------------ hits, misses

def test_the_same_question_is_answered_once(gw, sim):
    r1 = post(gw, ASK)
    assert r1.status_code == 200 and r1.headers["x-cache"] == "MISS"
    assert r1.headers["x-cacheable"] == "1"
    r2 = post(gw, ASK)
    assert r2.headers["x-cache"] == "HIT", r2.headers
    assert r2.json() == r1.json()
    assert served(sim) == 1
    assert key(r1) == key(r2) == canonical_key(ASK)


def test_member_order_whitespace_and_escapes_do_not_matter(gw, sim):
    first = post(gw, ASK)
    assert first.headers["x-cache"] == "MISS"
    shuffled = {"messages": [{"content": "Be brief.", "role": "system"},
                             {"content": "What is 2+2?", "role": "user"}],
                "max_tokens": 8, "temperature": 0, "model": "m"}
    spaced = json.dumps(ASK, indent=4)
    escaped = json.dumps(ASK, ensure_ascii=True).replace(
        "Be brief", "\\u0042e brief")
    for raw in (json.dumps(shuffled), spaced, escaped):
        r = post(gw, None, raw=raw)
        assert r.headers["x-cache"] == "HIT", (raw, r.headers)
        assert key(r) == key(first)
    assert served(sim) == 1


@pytest.mark.parametrize("change", [
    {"max_tokens": 9},
    {"messages": [{"role": "user", "content": "What is 2+3?"}]},
    {"temperature": 0.0},          # a real, not the integer 0: another key
    {"n": 2},
], ids=["max-tokens", "messages", "real-zero", "n"])
def test_another_question_is_another_key(gw, sim, change):
    """Also: the key of every request is the one Python computes."""
    post(gw, ASK)
    r = post(gw, {**ASK, **change})
    assert r.headers["x-cache"] == "MISS", r.headers
    assert key(r) == canonical_key({**ASK, **change})
    assert served(sim) == 2


def test_the_model_served_is_in_the_key(nginx_factory, sim_factory,
                                        tmp_path):
    a = sim_factory("llama-3-8b", "a", ttft_ms=1, tpot_ms=1)
    b = sim_factory("llama-3-8b", "b", ttft_ms=1, tpot_ms=1)
    gw = nginx_factory(cache_conf({"ma": a, "mb": b},
                                  workdir=tmp_path / "cache"),
                       modules=["route"])
    ra = post(gw, {**ASK, "model": "ma"})
    rb = post(gw, {**ASK, "model": "mb"})
    assert ra.headers["x-cache"] == rb.headers["x-cache"] == "MISS"
    assert key(ra) == canonical_key({**ASK, "model": "ma"},
                                                upstream="ma")
    assert served(a) == served(b) == 1


# ------------------------------------------------------------------ scope

def test_by_default_clients_with_other_credentials_never_share(gw, sim):
    for who in ("Bearer sk-alice", "Bearer sk-bob"):
        r = post(gw, ASK, headers={"Authorization": who})
        assert r.headers["x-cache"] == "MISS", (who, r.headers)
        r = post(gw, ASK, headers={"Authorization": who})
        assert r.headers["x-cache"] == "HIT", (who, r.headers)
    r = post(gw, ASK, headers={"x-api-key": "sk-alice"})
    assert r.headers["x-cache"] == "MISS"
    assert key(r) == canonical_key(ASK, scope="\nsk-alice")
    assert served(sim) == 3


def test_a_scope_of_the_operator_shares_within_it(nginx_factory, sim,
                                                  tmp_path):
    gw = nginx_factory(cache_conf(
        {"m": sim}, workdir=tmp_path / "cache",
        location="infer_cache_scope $http_x_tenant;"), modules=["route"])
    r = post(gw, ASK, headers={"x-tenant": "acme",
                               "Authorization": "Bearer sk-1"})
    assert r.headers["x-cache"] == "MISS"
    r = post(gw, ASK, headers={"x-tenant": "acme",
                               "Authorization": "Bearer sk-2"})
    assert r.headers["x-cache"] == "HIT"
    r = post(gw, ASK, headers={"x-tenant": "globex",
                               "Authorization": "Bearer sk-1"})
    assert r.headers["x-cache"] == "MISS"
    assert key(r) == canonical_key(ASK, scope="globex")


# ------------------------------------------------------ never cached

@pytest.mark.parametrize("body", [
    {**ASK, "stream": True},
    {**ASK, "temperature": 0.7},
    {k: v for k, v in ASK.items() if k != "temperature"},
    {**ASK, "temperature": 0.7, "seed": "7"},
], ids=["stream", "sampled", "no-temperature", "seed-not-an-integer"])
def test_a_stream_or_a_sampled_answer_is_never_cached(gw, sim, body):
    for _ in range(2):
        r = post(gw, body)
        assert r.status_code == 200
        assert r.headers["x-cache"] == "BYPASS", r.headers
        assert r.headers["x-cacheable"] == "0"
    assert served(sim) == 2


def test_a_seed_or_an_embeddings_request_is_cached(gw, sim):
    seeded = {**ASK, "temperature": 0.9, "seed": 7}
    assert post(gw, seeded).headers["x-cache"] == "MISS"
    assert post(gw, seeded).headers["x-cache"] == "HIT"
    emb = {"model": "m", "input": ["a cat", "a dog"]}
    assert post(gw, emb, path="/v1/embeddings").headers["x-cache"] == "MISS"
    r = post(gw, emb, path="/v1/embeddings")
    assert r.headers["x-cache"] == "HIT" and r.json()["data"]
    assert served(sim) == 2


def test_listed_members_make_it_uncacheable(nginx_factory, sim, tmp_path):
    gw = nginx_factory(cache_conf(
        {"m": sim}, workdir=tmp_path / "cache",
        location="infer_cache_uncacheable user metadata;"),
        modules=["route"])
    for extra in ({"user": "u-1"}, {"metadata": {"a": "b"}}):
        for _ in range(2):
            assert post(gw, {**ASK, **extra}).headers["x-cache"] == "BYPASS"
    assert post(gw, ASK).headers["x-cache"] == "MISS"
    assert post(gw, ASK).headers["x-cache"] == "HIT"
    assert served(sim) == 5


def test_the_clients_cache_control_is_honoured(gw, sim):
    assert post(gw, ASK).headers["x-cache"] == "MISS"
    # no-cache: a fresh answer, which replaces the stored one
    r = post(gw, ASK, headers={"Cache-Control": "no-cache"})
    assert r.headers["x-cache"] == "BYPASS"
    assert post(gw, ASK, headers={"Pragma": "no-cache"}).headers[
        "x-cache"] == "BYPASS"
    assert served(sim) == 3
    assert post(gw, ASK).headers["x-cache"] == "HIT"
    # no-store: neither taken from the cache nor kept
    other = {**ASK, "max_tokens": 5}
    r = post(gw, other, headers={"Cache-Control": "max-age=0, no-store"})
    assert r.headers["x-cache"] == "BYPASS"
    assert post(gw, other).headers["x-cache"] == "MISS"
    assert served(sim) == 5


@pytest.mark.parametrize("raw", [
    '{"model": "m", "temperature": 0, "x": 1e999, "messages": %s}',
    '{"model": "m", "temperature": 0, "a": 1, "a": 2, "messages": %s}',
    '{"model": "m", "temperature": 0, "x": {"a\\u0000b": 1, "a": 2}, '
    '"messages": %s}',
], ids=["number-out-of-range", "duplicate-member", "nul-in-a-name"])
def test_what_the_canonical_form_cannot_hold_is_not_cached(gw, sim, raw):
    r = post(gw, None, raw=raw % json.dumps(ASK["messages"]))
    assert r.status_code == 200, r.text     # routed, answered, not cached
    assert r.headers["x-cacheable"] == "0"
    assert key(r) == ""


def test_without_routing_nothing_is_cacheable(nginx_factory, sim,
                                              tmp_path):
    gw = nginx_factory(f"""
    proxy_cache_path {tmp_path / "cache"} keys_zone=infer:1m;
    server {{
        listen 127.0.0.1:{{port}};
        location / {{
            proxy_pass http://{sim.addr};
            add_header X-Key "[$infer_cache_key]" always;
            add_header X-Cacheable $infer_cacheable always;
            add_header X-Bypass $infer_cache_bypass always;
            add_header X-No-Store $infer_cache_no_store always;
        }}
    }}""", modules=["route"])
    r = post(gw, ASK)
    assert r.status_code == 200
    assert (key(r), r.headers["x-cacheable"],
            r.headers["x-bypass"], r.headers["x-no-store"]) == \
        ("", "0", "1", "1")


# ------------------------------------------------- limits and metrics

def test_a_hit_is_not_charged_to_token_limits(nginx_factory, sim, tmp_path):
    def conf(charge):
        return cache_conf(
            {"m": sim}, workdir=tmp_path / f"cache-{charge}",
            http="infer_ratelimit_zone rl:1m;",
            location=f"""infer_ratelimit on;
            infer_ratelimit_limit tpd global tokens=100000/d;
            infer_ratelimit_charge_cache_hits {charge};""")

    for charge in ("off", "on"):
        gw = nginx_factory(conf(charge), modules=["route", "ratelimit"])
        s = requests.Session()
        miss = s.post(gw.url + "/v1/chat/completions", json=ASK, timeout=15)
        assert miss.headers["x-cache"] == "MISS"
        used = miss.json()["usage"]["total_tokens"]
        hit = s.post(gw.url + "/v1/chat/completions", json=ASK, timeout=15)
        assert hit.headers["x-cache"] == "HIT"
        probe = s.post(gw.url + "/v1/chat/completions",
                       json={**ASK, "stream": True}, timeout=15)
        # what is left before the probe's own reservation
        left = int(probe.headers["x-ratelimit-remaining-tokens"])
        reserved = 100000 - used - left
        if charge == "off":
            # the hit's reservation came back: only the miss was charged
            # (and the probe reserved its own estimate)
            assert 0 < reserved < used, (used, left)
        else:
            assert reserved >= used, (used, left)
        gw.stop()


def test_hits_are_counted_in_the_metrics(nginx_factory, sim, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families
    gw = nginx_factory(cache_conf(
        {"m": sim}, workdir=tmp_path / "cache", http="""
    infer_metrics_zone mz 4m;
    map $upstream_cache_status $infer_cache_hit { HIT 1; default 0; }
    infer_metrics_counter cache_hits $infer_cache_hit;""",
        location="infer_metrics on;",
        server="location = /metrics { infer_metrics_export; }"),
        modules=["route", "metrics"])
    for _ in range(3):
        post(gw, ASK)

    def hits():
        text = requests.get(gw.url + "/metrics", timeout=5).text
        return sum(s.value for f in text_string_to_metric_families(text)
                   for s in f.samples if s.name == "cache_hits_total")

    deadline = time.monotonic() + 3
    while hits() < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert hits() == 2


def test_the_variables_without_proxy_cache(nginx_factory, sim, tmp_path):
    gw = nginx_factory(cache_conf({"m": sim}, workdir=tmp_path / "cache"),
                       modules=["route"])
    r = post(gw, ASK, path="/plain/v1/chat/completions")
    assert r.status_code == 200
    assert r.headers["x-cacheable"] == "1"
    assert key(r) == canonical_key(ASK)


def test_nginx_t_refuses_an_empty_member_name(nginx_factory, sim, tmp_path):
    gw = nginx_factory(cache_conf(
        {"m": sim}, workdir=tmp_path / "cache",
        location='infer_cache_uncacheable user "";'),
        modules=["route"], start=False)
    ok, out = gw.check_config()
    assert not ok and 'invalid member name ""' in out, out
