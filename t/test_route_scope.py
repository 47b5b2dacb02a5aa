"""What an ingress controller's annotations need from the route module
(docs/kubernetes.md): the model resolved in REWRITE (infer_route_phase), so
that a `set` of the same location, and a balancer that reads the variable it
sets at the end of that phase (ingress-nginx's Lua balancer), see the pool;
per-location model lists and namespaces from variables, checked on every
request (infer_route_models, infer_route_namespace, a model's namespaces=);
and pools that are names, not upstream blocks (infer_model_upstream_check
off).  Values from annotations are data: a bad one makes its location
answer 500 gateway_misconfigured, and nginx -t never fails on it."""

import json

import pytest
import requests

from harness.openai import chat, error_of

PROXY = """proxy_http_version 1.1; proxy_set_header Connection "";"""


@pytest.fixture
def pools(sim_factory):
    return (sim_factory("llama-3-8b", "sim-a", ttft_ms=1, tpot_ms=1),
            sim_factory("mistral-7b", "sim-b", ttft_ms=1, tpot_ms=1))


def conf(pa, pb, location, models=None, extra=""):
    models = models if models is not None else """
    infer_model llama-3-8b upstream=pa alias=llama3 namespaces=team-a;
    infer_model mistral-7b upstream=pb namespaces=team-b,team-c;
    infer_model shared upstream=pa model=llama-3-8b namespaces=*;
    infer_model unscoped upstream=pb model=mistral-7b;"""
    return f"""
    upstream pa {{ zone pa 64k; server {pa.addr}; keepalive 8; }}
    upstream pb {{ zone pb 64k; server {pb.addr}; keepalive 8; }}
    {models}
    {extra}
    server {{
        listen 127.0.0.1:{{port}} reuseport;
        location / {{ {location} }}
    }}"""


def replica(r):
    return r.headers.get("x-sim-replica")


# -------------------------------------------------------- infer_route_phase

def test_in_rewrite_a_set_of_the_same_location_sees_the_pool(nginx_factory,
                                                             pools):
    """As ingress-nginx's location: a `set` of the variable its balancer
    reads, and a proxy_pass through that variable."""
    gw = nginx_factory(conf(*pools, f"""
        infer_route on;
        infer_route_phase rewrite;
        set $backend_name $infer_upstream;
        add_header X-Backend $backend_name always;
        proxy_pass http://$backend_name;
        {PROXY}"""))
    for model, pool, rep in (("llama-3-8b", "pa", "sim-a"),
                             ("mistral-7b", "pb", "sim-b"),
                             ("llama3", "pa", "sim-a")):
        r = chat(gw, model)
        assert r.status_code == 200, r.text
        assert r.headers["x-backend"] == pool and replica(r) == rep
    # a body in a temp file and a chunked one are read there too
    big = "x" * 300000
    r = chat(gw, "mistral-7b", messages=[{"role": "user", "content": big}])
    assert r.status_code == 200 and replica(r) == "sim-b"
    body = json.dumps({"model": "mistral-7b",
                       "messages": [{"role": "user", "content": "hi"}]})
    r = requests.post(gw.url + "/v1/chat/completions",
                      data=iter([body[:10].encode(), body[10:].encode()]),
                      headers={"content-type": "application/json"},
                      timeout=10)
    assert r.status_code == 200 and replica(r) == "sim-b"


def test_in_preaccess_the_same_set_comes_too_early(nginx_factory, pools):
    gw = nginx_factory(conf(*pools, """
        infer_route on;
        set $backend_name "before:$infer_upstream";
        return 200 "$backend_name";"""))
    r = chat(gw, "mistral-7b")
    assert r.text == "before:"


def test_in_rewrite_an_error_is_the_envelope_not_the_locations_answer(
        nginx_factory, pools):
    gw = nginx_factory(conf(*pools, f"""
        infer_route on;
        infer_route_phase rewrite;
        set $backend_name $infer_upstream;
        proxy_pass http://pa;
        {PROXY}"""))
    r = chat(gw, "gpt-99")
    assert r.status_code == 404
    assert error_of(r)["code"] == "model_not_found"
    r = requests.post(gw.url + "/v1/chat/completions", data=b'{"model": ',
                      headers={"content-type": "application/json"},
                      timeout=10)
    assert r.status_code == 400 and error_of(r)["code"]


def test_nginx_t_refuses_an_unknown_phase(nginx_factory, pools):
    gw = nginx_factory(conf(*pools, "infer_route on; infer_route_phase access;"),
                       start=False)
    ok, out = gw.check_config()
    assert not ok and 'invalid value "access"' in out


# ------------------------------------------------------- infer_route_models

def models_gw(nginx_factory, pools, value='"$http_x_models"'):
    return nginx_factory(conf(*pools, f"""
        infer_route on;
        infer_route_models {value};
        proxy_pass http://$infer_upstream;
        {PROXY}"""))


def test_a_location_serves_the_models_it_lists(nginx_factory, pools):
    gw = models_gw(nginx_factory, pools)
    only = {"x-models": "mistral-7b, shared"}
    assert chat(gw, "mistral-7b", headers=only).status_code == 200
    assert chat(gw, "shared", headers=only).status_code == 200
    r = chat(gw, "llama-3-8b", headers=only)
    assert r.status_code == 404
    assert error_of(r)["code"] == "model_not_found"
    # the list names registry models: an alias is its model
    assert chat(gw, "llama3", headers={"x-models": "llama-3-8b"}) \
        .status_code == 200
    assert chat(gw, "llama3", headers={"x-models": "llama3"}).status_code == 404
    # empty: every model
    assert chat(gw, "llama-3-8b").status_code == 200
    assert chat(gw, "llama-3-8b", headers={"x-models": ", ,"}) \
        .status_code == 200


@pytest.mark.parametrize("value", [
    'llama-3-8b"; proxy_pass http://evil;',
    "llama-3-8b;mistral-7b",
    "llama-3-8b {",
    "${infer_upstream}",
    "$infer_upstream",
    "a\\b",
    "llama-3-8b\tmistral-7b",
    "x" * 5000,
    ",".join(f"m{i}" for i in range(65)),
])
def test_a_value_that_is_no_list_of_names_is_the_locations_500(
        nginx_factory, pools, value):
    gw = models_gw(nginx_factory, pools)
    for _ in range(6):
        r = chat(gw, "llama-3-8b", headers={"x-models": value})
        assert r.status_code == 500, r.text
        e = error_of(r)
        assert e["code"] == "gateway_misconfigured"
        assert e["type"] == "server_error"
        assert value not in r.text
    # another location, or no value, is untouched
    assert chat(gw, "llama-3-8b").status_code == 200
    lines = [l for l in gw.log_text().splitlines()
             if "gateway_misconfigured (logged" in l]
    # one line per worker and interval, naming the directive's variable
    assert 1 <= len(lines) <= 2, lines
    assert all('"$http_x_models"' in l and "[error]" in l for l in lines)
    assert not any(value[:20] in l for l in lines)


def test_64_names_are_a_list(nginx_factory, pools):
    gw = models_gw(nginx_factory, pools)
    names = ",".join([f"m{i}" for i in range(63)] + ["mistral-7b"])
    assert chat(gw, "mistral-7b", headers={"x-models": names}) \
        .status_code == 200


# ---------------------------------------------------- infer_route_namespace

def ns_gw(nginx_factory, pools, models=None):
    return nginx_factory(conf(*pools, f"""
        infer_route on;
        infer_route_namespace $http_x_ns;
        proxy_pass http://$infer_upstream;
        {PROXY}""", models=models))


def test_a_namespace_uses_only_the_models_the_registry_gives_it(
        nginx_factory, pools):
    gw = ns_gw(nginx_factory, pools)
    cases = [("team-a", "llama-3-8b", 200), ("team-a", "llama3", 200),
             ("team-a", "mistral-7b", 404), ("team-b", "mistral-7b", 200),
             ("team-c", "mistral-7b", 200), ("team-b", "llama-3-8b", 404),
             ("team-b", "shared", 200), ("other", "shared", 200),
             # a model that lists no namespace is for no namespace
             ("team-a", "unscoped", 404), ("team-b", "unscoped", 404)]
    for ns, model, status in cases:
        r = chat(gw, model, headers={"x-ns": ns})
        assert r.status_code == status, (ns, model, r.text)
        if status == 404:
            assert error_of(r)["code"] == "model_not_found"
    # no namespace: no check (a location that is not a controller's)
    assert chat(gw, "unscoped").status_code == 200


@pytest.mark.parametrize("ns", ["Team-A", "team_a", "-team", "team-",
                                "a" * 64, "team a", "team-a;", "*"])
def test_a_value_that_is_no_namespace_is_the_locations_500(nginx_factory,
                                                           pools, ns):
    gw = ns_gw(nginx_factory, pools)
    r = chat(gw, "shared", headers={"x-ns": ns})
    assert r.status_code == 500
    assert error_of(r)["code"] == "gateway_misconfigured"


def test_namespaces_from_the_registry_file(nginx_factory, pools, tmp_path):
    reg = tmp_path / "models.json"
    reg.write_text(json.dumps([
        {"name": "llama-3-8b", "upstream": "pa", "namespaces": ["team-a"]},
        {"name": "mistral-7b", "upstream": "pb", "namespaces": ["*"]}]))
    gw = ns_gw(nginx_factory, pools,
               models=f"infer_model_registry {reg} interval=1s;")
    assert chat(gw, "llama-3-8b", headers={"x-ns": "team-a"}).status_code \
        == 200
    assert chat(gw, "llama-3-8b", headers={"x-ns": "team-b"}).status_code \
        == 404
    assert chat(gw, "mistral-7b", headers={"x-ns": "team-b"}).status_code \
        == 200


@pytest.mark.parametrize("models, said", [
    ("infer_model m upstream=pa namespaces=Team-A;", "not a Kubernetes"),
    ("infer_model m upstream=pa namespaces=a,,b;", "not a Kubernetes"),
    ("FILE", "not a Kubernetes"),
    ("FILE-NOT-A-LIST", "must be an array"),
])
def test_nginx_t_refuses_a_bad_namespace_in_the_registry(nginx_factory, pools,
                                                         tmp_path, models,
                                                         said):
    if models.startswith("FILE"):
        reg = tmp_path / "models.json"
        ns = "team-a" if models.endswith("LIST") else ["team-a", "B"]
        reg.write_text(json.dumps([{"name": "m", "upstream": "pa",
                                    "namespaces": ns}]))
        models = f"infer_model_registry {reg};"
    gw = nginx_factory(conf(*pools, "infer_route on;", models=models),
                       start=False)
    ok, out = gw.check_config()
    assert not ok and said in out, out


# -------------------------------------------------- infer_model_upstream_check

def test_a_pool_may_be_a_name_when_the_check_is_off(nginx_factory, pools):
    """ingress-nginx's pools are its Lua balancer's backends, named
    namespace-service-port: no upstream block has that name."""
    models = """
    infer_model llama-3-8b upstream=team-a-llama-svc-8000;"""
    gw = nginx_factory(conf(*pools, """
        infer_route on;
        infer_route_phase rewrite;
        set $proxy_upstream_name $infer_upstream;
        return 200 "$proxy_upstream_name";""", models=models,
        extra="infer_model_upstream_check off;"))
    r = chat(gw, "llama-3-8b")
    assert r.status_code == 200 and r.text == "team-a-llama-svc-8000"

    strict = nginx_factory(conf(*pools, "infer_route on;", models=models),
                           start=False, name="strict")
    ok, out = strict.check_config()
    assert not ok and 'no upstream "team-a-llama-svc-8000"' in out


def test_in_rewrite_the_locations_own_set_lines_are_seen(nginx_factory,
                                                         pools):
    """The model is found before the location's set lines, and what it
    may serve is checked after them: ingress-nginx sets $namespace in
    the location itself."""
    gw = nginx_factory(conf(*pools, f"""
        infer_route on;
        infer_route_phase rewrite;
        set $namespace "team-b";
        set $served "mistral-7b shared";
        infer_route_namespace $namespace;
        infer_route_models $served;
        set $backend_name $infer_upstream;
        proxy_pass http://$backend_name;
        {PROXY}"""))
    assert chat(gw, "mistral-7b").status_code == 200
    r = chat(gw, "llama-3-8b")
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
    assert replica(r) is None
    r = chat(gw, "unscoped")
    assert r.status_code == 404


def test_each_misconfigured_location_is_logged(nginx_factory, pools):
    gw = nginx_factory(conf(*pools, f"""
        infer_route on;
        proxy_pass http://$infer_upstream;
        {PROXY}
        location /a/ {{ infer_route on; infer_route_models "x;y"; }}
        location /b/ {{ infer_route on; infer_route_namespace "B"; }}"""))
    for path in ("/a/v1/chat/completions", "/b/v1/chat/completions"):
        for _ in range(4):
            r = chat(gw, "shared", path=path)
            assert r.status_code == 500
    lines = [l for l in gw.log_text().splitlines()
             if "gateway_misconfigured (logged" in l]
    assert any('"x;y"' in l for l in lines), lines
    assert any('"B"' in l for l in lines), lines


# ---------------------------------- NGF: routing by header, checked by body

def test_ngf_by_header_recipe(nginx_factory, pools):
    """deploy/nginx-gateway-fabric/snippetsfilter-by-header.yaml: NGF's
    HTTPRoute rules match X-Model, each rule's location (here /llama/ and
    /mistral/, where NGF's header match would send the request) keeps NGF's
    own proxy_pass and gets its SnippetsFilter's lines: the body must name
    the header's model, and only the rule's model is served."""
    def rule(model, pool):
        return f"""
        location /{model.split('-')[0]}/ {{
            infer_route on;
            infer_model_source header=X-Model body;
            infer_route_models "{model}";
            proxy_pass http://{pool}/;
            {PROXY}
        }}"""
    gw = nginx_factory(conf(*pools, "return 404;")
                       .replace("location / { return 404; }",
                                rule("llama-3-8b", "pa")
                                + rule("mistral-7b", "pb")))
    llama = "/llama/v1/chat/completions"
    r = chat(gw, "llama-3-8b", path=llama, headers={"X-Model": "llama-3-8b"})
    assert r.status_code == 200 and replica(r) == "sim-a"
    # a header that says one model and a body that says another
    r = chat(gw, "mistral-7b", path=llama, headers={"X-Model": "llama-3-8b"})
    assert r.status_code == 400
    assert error_of(r)["code"] == "model_mismatch"
    # no header: the body's model must be the rule's
    r = chat(gw, "mistral-7b", path=llama)
    assert r.status_code == 404 and replica(r) is None
    r = chat(gw, "mistral-7b", path="/mistral/v1/chat/completions",
             headers={"X-Model": "mistral-7b"})
    assert r.status_code == 200 and replica(r) == "sim-b"


# ------------------------------------------------------------- fallbacks

FAILOVER = PROXY + """
            proxy_pass http://$infer_upstream/v1/chat/completions;
            proxy_intercept_errors on;
            error_page 502 503 = @fallback;"""


@pytest.mark.parametrize("phase", ["rewrite", "preaccess"])
def test_a_fallback_is_held_to_the_limits_of_the_location(nginx_factory,
                                                          sim_factory, phase):
    """A model's fallback= is served only if the models and namespace the
    model asked was checked against allow it too: a failing team-a pool
    whose fallback belongs to team-b is model_unavailable on team-a's
    location, and falls back where team-b's namespace allows it."""
    bad = sim_factory("llama-3-8b", "bad", ttft_ms=0, fail_status=503,
                      fail_ratio=1.0)
    good = sim_factory("mistral-7b", "good", ttft_ms=0)
    gw = nginx_factory(f"""
    upstream pa {{ server {bad.addr}; }}
    upstream pb {{ server {good.addr}; }}
    infer_model llama-3-8b upstream=pa fallback=mistral-7b
                namespaces=team-a,team-b;
    infer_model mistral-7b upstream=pb namespaces=team-b;
    server {{
        listen 127.0.0.1:{{port}} reuseport;
        infer_route on;
        infer_route_phase {phase};
        recursive_error_pages on;
        location /a/ {{
            infer_route_namespace "team-a";
            {FAILOVER}
        }}
        location /b/ {{
            infer_route_namespace "team-b";
            {FAILOVER}
        }}
        location /listed/ {{
            infer_route_models "llama-3-8b";
            {FAILOVER}
        }}
        location @fallback {{ {FAILOVER} }}
    }}""")
    for path, ok in (("/a/", False), ("/listed/", False), ("/b/", True)):
        r = chat(gw, "llama-3-8b", path=path + "v1/chat/completions")
        if ok:
            assert r.status_code == 200, r.text
            assert replica(r) == "good"
        else:
            assert r.status_code == 503, (path, r.status_code, r.text)
            assert error_of(r)["code"] == "model_unavailable"
    assert gw.log_text().count('fallback "mistral-7b" of model '
                               '"llama-3-8b" is not served here') == 2


# --------------------------------------------------------------- GET models

@pytest.mark.parametrize("phase", ["rewrite", "preaccess"])
def test_a_limited_location_lists_what_it_may_serve(nginx_factory, pools,
                                                    phase):
    """GET .../models on a location limited by infer_route_models or
    infer_route_namespace (an annotated Ingress's path) is the list of the
    models it may serve, in OpenAI's shape; the models it may not serve are
    404 as one model, as a chat for them is."""
    gw = nginx_factory(conf(*pools, f"""
        infer_route on;
        infer_route_phase {phase};
        proxy_pass http://$infer_upstream;
        {PROXY}""", extra=f"""
    server {{
        listen 127.0.0.1:{{port}};
        server_name limited;
        infer_route on;
        infer_route_phase {phase};
        location /ns/ {{
            infer_route_namespace "team-b";
            proxy_pass http://$infer_upstream/v1/chat/completions;
        }}
        location /both/ {{
            infer_route_namespace "team-b";
            infer_route_models "unscoped mistral-7b";
            proxy_pass http://$infer_upstream;
        }}
        location /bad/ {{
            infer_route_models "a;b";
            proxy_pass http://$infer_upstream;
        }}
    }}"""))

    def get(path, host="limited"):
        return requests.get(gw.url + path, headers={"Host": host},
                            timeout=10)

    def ids(path):
        r = get(path)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["object"] == "list"
        return [m["id"] for m in doc["data"]]

    assert ids("/ns/v1/models") == ["mistral-7b", "shared"]
    assert ids("/both/v1/models") == ["mistral-7b"]
    r = get("/ns/v1/models/shared")
    assert r.status_code == 200 and r.json()["id"] == "shared"
    for path in ("/ns/v1/models/llama-3-8b", "/ns/v1/models/unscoped",
                 "/both/v1/models/shared"):
        r = get(path)
        assert r.status_code == 404, (path, r.text)
        assert error_of(r)["code"] == "model_not_found"
    # KServe's /v2/models/{id} is no OpenAI list: a request to route (by
    # the body here, so it names no model)
    r = get("/ns/v2/models/mistral-7b")
    assert r.status_code == 400, r.text
    assert error_of(r)["code"] == "missing_model"
    r = get("/bad/v1/models")
    assert r.status_code == 500
    assert error_of(r)["code"] == "gateway_misconfigured"
    # a POST there is routed as before
    r = chat(gw, "mistral-7b", path="/ns/v1/chat/completions",
             headers={"Host": "limited"})
    assert r.status_code == 200 and replica(r) == "sim-b"
    # a location without limits: a GET names no model, as before
    r = get("/v1/models", host="other")
    assert r.status_code == 400
    assert error_of(r)["code"] == "missing_model"
    gw.forget_log()
