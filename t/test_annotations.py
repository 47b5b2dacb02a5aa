"""ingress-nginx annotations (ngx-infer.io/*) to the modules, without a
cluster: deploy/ingress-nginx/ngx-infer.tmpl is put into a stand-in of the
controller's template by the image's own insert-template.sh, rendered by
Go's text/template (t/go/render.go, with the controller's quote and
escapeLiteralDollar) from data typed as the controller's are, and the
result is run by nginx with Debian's lua module standing in for the
controller's Lua balancer (docs/kubernetes.md).

No annotation value, however hostile, reaches nginx but inside one quoted
string, nor fails nginx -t; an annotated Ingress is routed by model to its
registry pools through the Lua balancer, within its models and its
namespace; other Ingresses are untouched."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from harness import gotemplate
from harness.gotemplate import HOSTILE, HOSTILE_IDS, go_unquote, nginx_reads
from harness.gotemplate import render_bin  # noqa: F401 (a fixture)
from harness.kubectl import kubectl_dry_run
from harness.nginx import MODULES, NGINX_BIN, module_path
from harness.openai import chat, error_of

REPO = Path(__file__).resolve().parents[1]
FRAGMENT = REPO / "deploy" / "ingress-nginx" / "ngx-infer.tmpl"
INSERT = REPO / "deploy" / "ingress-nginx" / "insert-template.sh"
STAND_IN = REPO / "t" / "data" / "ingress-nginx-stand-in.tmpl"

LUA_MODULES = Path("/usr/lib/nginx/modules")
# Debian's: NDK first, then the lua module (lua-resty-core is found on
# the module's built-in /usr/share/lua/5.1 path)
LUA_MAIN = (f"load_module {LUA_MODULES}/ndk_http_module.so;\n"
            f"load_module {LUA_MODULES}/ngx_http_lua_module.so;")

# the ConfigMap's main-snippet as the values files write it: what the
# fragment looks at to know which modules are loaded
MAIN_SNIPPET = "\n".join(f"load_module {module_path(m)};" for m in MODULES)

KEYS = ("ngx-infer.io/route", "ngx-infer.io/models", "ngx-infer.io/auth",
        "ngx-infer.io/limit-plan", "ngx-infer.io/metrics",
        "ngx-infer.io/metrics-label")

HELLO = [{"role": "user", "content": "Hello there"}]


# ------------------------------------------------------------ the renderer

@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """The stand-in with ngx_infer's fragment inserted by the image's own
    script."""
    d = tmp_path_factory.mktemp("tmpl")
    t = d / "nginx.tmpl"
    shutil.copy(STAND_IN, t)
    r = subprocess.run(["sh", str(INSERT), str(t), str(FRAGMENT)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return t


def ing(namespace, name, annotations=None, service="svc", port="8000"):
    """The controller's ingressInformation of one location."""
    return {"Namespace": namespace, "Rule": name, "Service": service,
            "ServicePort": port, "Path": "/",
            "Annotations": annotations or {}}


def loc(path, backend, ingress):
    """A location of the Ingress at path, proxied to backend (the Lua
    backend namespace-service-port); $location_path is path."""
    return {"Path": path, "Backend": backend,
            "Ing": dict(ingress, Path=path)}


def render(render_bin, template, locations, http_snippet="",
           main_snippet=MAIN_SNIPPET, tmp=None, backends=""):
    data = {"All": {"Cfg": {"MainSnippet": main_snippet,
                            "HTTPSnippet": http_snippet}},
            "Locations": locations}
    f = Path(tmp or template.parent) / "data.json"
    f.write_text(json.dumps(data))
    r = subprocess.run([str(render_bin), str(template), str(f)],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return r.stdout.decode("utf-8").replace("@BACKENDS@", backends)


def fragment_of(text, path):
    """The lines the fragment rendered in location `path`: between the
    stand-in's set $proxy_alternative_upstream_name and its next line."""
    block = text.split(f"location {path} {{", 1)[1]
    block = block.split('set $proxy_alternative_upstream_name "";', 1)[1]
    block = block.split("proxy_http_version 1.1;", 1)[0]
    return [ln.strip() for ln in block.splitlines() if ln.strip()]


# ----------------------------------------------------------- the grammar

FIXED = gotemplate.FIXED | {
    "infer_route_phase rewrite;",
    "set $proxy_upstream_name $infer_lua_upstream;"}


def check_lines(lines):
    return gotemplate.check_lines(lines, FIXED)


def token_limit(key):
    return 4000 if key == "ngx-infer.io/models" else 256


@pytest.mark.parametrize("key", ["ngx-infer.io/models",
                                 "ngx-infer.io/limit-plan",
                                 "ngx-infer.io/metrics-label"])
@pytest.mark.parametrize("value", HOSTILE, ids=HOSTILE_IDS)
def test_a_value_reaches_nginx_only_inside_one_quoted_string(
        render_bin, template, tmp_path, key, value):
    ann = {"ngx-infer.io/route": "true", "ngx-infer.io/metrics": "true",
           key: value}
    text = render(render_bin, template,
                  [loc("/a/", "team-a-svc-8000", ing("team-a", "chat", ann))],
                  tmp=tmp_path)
    plain = render(render_bin, template,
                   [loc("/a/", "team-a-svc-8000", ing("team-a", "chat"))],
                   tmp=tmp_path)
    lines = fragment_of(text, "/a/")
    valued = check_lines(lines)

    directive = {"ngx-infer.io/models": "infer_route_models",
                 "ngx-infer.io/limit-plan": "set $infer_ingress_plan",
                 "ngx-infer.io/metrics-label": "set $infer_ingress_label"}[key]
    if value == "" and key != "ngx-infer.io/models":
        assert directive not in valued
    else:
        token = valued[directive]
        assert len(token) <= token_limit(key)
        quoted_len = len(json.dumps(value.replace("$", "${literal_dollar}")))
        if quoted_len + 64 < token_limit(key):
            # the value, and nothing but the value, in that one string
            assert go_unquote(token).replace("${literal_dollar}", "$") \
                == value
        elif quoted_len > token_limit(key) + 64:
            assert token.startswith('"!') and " is over " in token

    # nothing of it anywhere else: the rest of the configuration is the
    # configuration of an Ingress without annotations, line for line
    rest = [ln for ln in text.splitlines() if ln.strip() not in lines]
    assert rest == [ln for ln in plain.splitlines()
                    if ln.strip() not in lines]


@pytest.mark.parametrize("value", HOSTILE + ["TRUE", "True", "true ",
                                             " true", "yes", "1", "on"],
                         ids=HOSTILE_IDS + ["TRUE", "True", "true_", "_true",
                                            "yes", "1", "on"])
def test_a_choice_is_one_of_its_fixed_words(render_bin, template, tmp_path,
                                            value):
    """route, auth and metrics are compared with eq: a value that is not
    exactly one of the choices is never copied; route stays off, auth goes
    on (closed), metrics stays the admin's."""
    ann = {"ngx-infer.io/route": value, "ngx-infer.io/auth": value,
           "ngx-infer.io/metrics": value}
    lines = fragment_of(render(render_bin, template,
                               [loc("/a/", "b", ing("team-a", "chat", ann))],
                               tmp=tmp_path), "/a/")
    assert lines == (["infer_auth required;"] if value else [])


def test_a_route_annotation_renders_the_route_directives(render_bin,
                                                         template, tmp_path):
    ann = {"ngx-infer.io/route": "true",
           "ngx-infer.io/models": "llama-3-8b, mistral-7b",
           "ngx-infer.io/auth": "true", "ngx-infer.io/limit-plan": "gold",
           "ngx-infer.io/metrics": "true",
           "ngx-infer.io/metrics-label": "chat-team"}
    text = render(render_bin, template,
                  [loc("/a/", "team-a-chat-8000", ing("team-a", "chat", ann))],
                  tmp=tmp_path)
    assert fragment_of(text, "/a/") == [
        "infer_route on;",
        "infer_route_phase rewrite;",
        'infer_route_namespace "team-a";',
        'infer_route_models "llama-3-8b, mistral-7b";',
        "set $proxy_upstream_name $infer_lua_upstream;",
        "infer_auth required;",
        'set $infer_ingress_plan "gold";',
        "infer_ratelimit on;",
        "infer_metrics on;",
        'set $infer_ingress_label "chat-team";',
    ]
    http = text.split("upstream upstream_balancer", 1)[0]
    assert "map $infer_upstream $infer_lua_upstream {" in http
    assert 'map "" $infer_ingress_plan { default ""; }' in http


def test_off_choices_render_off(render_bin, template, tmp_path):
    ann = {"ngx-infer.io/route": "false", "ngx-infer.io/auth": "false",
           "ngx-infer.io/metrics": "false",
           "ngx-infer.io/models": "llama-3-8b"}
    assert fragment_of(render(render_bin, template,
                              [loc("/a/", "b", ing("team-a", "chat", ann))],
                              tmp=tmp_path), "/a/") \
        == ["infer_auth off;", "infer_metrics off;"]


def test_an_ingress_without_annotations_renders_nothing(render_bin, template,
                                                        tmp_path):
    ann = {"nginx.ingress.kubernetes.io/rewrite-target": "/$1",
           "ngx-infer.io/unknown": "true"}
    assert fragment_of(render(render_bin, template,
                              [loc("/a/", "b", ing("team-a", "chat", ann))],
                              tmp=tmp_path), "/a/") == []


def test_a_location_of_no_ingress_renders_nothing(render_bin, template,
                                                 tmp_path):
    """The controller's default-backend locations have no Ingress: its
    getIngressInformation gives an empty one, with no annotations."""
    text = render(render_bin, template,
                  [{"Path": "/", "Backend": "upstream-default-backend",
                    "Ing": None}], tmp=tmp_path)
    assert fragment_of(text, "/") == []


def test_a_namespace_is_quoted_and_an_empty_one_refuses(render_bin, template,
                                                        tmp_path):
    ann = {"ngx-infer.io/route": "true"}
    for ns, want in (("", '"!no namespace"'),
                     ('x"; y', '"x\\"; y"'),
                     ("$x", '"${literal_dollar}x"')):
        lines = fragment_of(render(render_bin, template,
                                   [loc("/a/", "b", ing(ns, "chat", ann))],
                                   tmp=tmp_path), "/a/")
        assert check_lines(lines)["infer_route_namespace"] == want


def test_snippet_annotations_are_never_read(render_bin, template, tmp_path):
    ann = {"ngx-infer.io/route": "true"}
    for i, k in enumerate(("ngx-infer.io/models-snippet",
                           "ngx-infer.io/route-snippet",
                           "ngx-infer.io/configuration-snippet",
                           "ngx-infer.io/snippet",
                           "nginx.ingress.kubernetes.io/configuration-snippet",
                           "nginx.ingress.kubernetes.io/server-snippet")):
        ann[k] = f"MARK{i} return 200;"
    text = render(render_bin, template,
                  [loc("/a/", "b", ing("team-a", "chat", ann))], tmp=tmp_path)
    assert "MARK" not in text
    # and the fragment names only its documented keys
    keys = set(re.findall(r'index \.Annotations "([^"]+)"',
                          FRAGMENT.read_text()))
    assert keys == set(KEYS)
    assert not any(k.endswith("snippet") for k in keys)


def test_modules_not_loaded_render_nothing_of_theirs(render_bin, template,
                                                     tmp_path):
    """An annotation never names a directive nginx would not know: each
    part renders only when main-snippet loads its module."""
    ann = {k: "true" for k in KEYS}
    only_metrics = f"load_module {module_path('metrics')};"
    text = render(render_bin, template,
                  [loc("/a/", "b", ing("team-a", "chat", ann))],
                  main_snippet=only_metrics, tmp=tmp_path)
    assert fragment_of(text, "/a/") == ["infer_metrics on;",
                                        'set $infer_ingress_label "true";']
    assert "$infer_lua_upstream" not in text
    text = render(render_bin, template,
                  [loc("/a/", "b", ing("team-a", "chat", ann))],
                  main_snippet="", tmp=tmp_path)
    assert fragment_of(text, "/a/") == []


def test_nginx_refuses_a_token_over_its_buffer_so_the_fragment_bounds_them(
        nginx_factory):
    """Why the fragment bounds each quoted string: nginx -t fails on a
    token over 4096 bytes, quoted or not."""
    for n, ok in ((4096, True), (4097, False), (65536, False)):
        gw = nginx_factory(
            "server { listen 127.0.0.1:{port}; location / { set $a \""
            + "x" * (n - 2) + "\"; } }", modules=[], start=False)
        good, out = gw.check_config()
        assert good == ok, (n, out[-300:])
        assert ok or "too long parameter" in out


# ----------------------------------------------------- insert-template.sh

def run_insert(t):
    return subprocess.run(["sh", str(INSERT), str(t), str(FRAGMENT)],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("change", ["no-http", "two-http", "no-location",
                                    "two-locations", "no-ing", "twice"])
def test_insert_template_stops_unless_each_anchor_is_there_once(tmp_path,
                                                               change):
    text = STAND_IN.read_text()
    http = "{{ if not (empty $cfg.HTTPSnippet) }}"
    location = 'set $proxy_alternative_upstream_name "";'
    assert text.count(http) == 1 and text.count(location) == 1
    text = {"no-http": text.replace(http, "{{ if $cfg.HTTPSnippet }}"),
            "two-http": text.replace(http, http + "\n{{ end }}\n" + http),
            "no-location": text.replace(location, "set $x 1;"),
            "two-locations": text.replace(location, location + "\n"
                                          + location),
            "no-ing": text.replace(
                '{{ $ing := (getIngressInformation $location.Ing "_" "/") }}',
                "{{ $ing := $location.Ing }}"),
            "twice": text}[change]
    t = tmp_path / "nginx.tmpl"
    t.write_text(text)
    if change == "twice":
        assert run_insert(t).returncode == 0
        text = t.read_text()
    r = run_insert(t)
    assert r.returncode != 0 and "insert-template.sh" in r.stderr, r.stderr
    assert t.read_text() == text


INGRESS_NGINX_GIT = os.environ.get("INGRESS_NGINX_GIT")


@pytest.mark.skipif(not INGRESS_NGINX_GIT,
                    reason="INGRESS_NGINX_GIT (a clone of kubernetes/"
                    "ingress-nginx) not set")
def test_the_controller_s_own_templates_take_the_fragment(render_bin,
                                                          tmp_path):
    """At every release tag of the lines docs/kubernetes.md claims, the
    controller's nginx.tmpl takes the fragment, and the result parses in
    text/template with the controller's other functions stubbed (an
    undefined $ing or $all would not)."""
    tags = subprocess.run(["git", "-C", INGRESS_NGINX_GIT, "tag", "-l",
                           "controller-v1.1[2-5].*"], capture_output=True,
                          text=True, check=True, timeout=60).stdout.split()
    tags = [t for t in tags if re.fullmatch(r"controller-v1\.1[2-5]\.\d+", t)]
    assert "controller-v1.15.1" in tags and "controller-v1.12.0" in tags
    for tag in tags:
        t = tmp_path / f"{tag}.tmpl"
        t.write_bytes(subprocess.run(
            ["git", "-C", INGRESS_NGINX_GIT, "show",
             f"{tag}:rootfs/etc/nginx/template/nginx.tmpl"],
            capture_output=True, check=True, timeout=60).stdout)
        r = run_insert(t)
        assert r.returncode == 0, (tag, r.stderr)
        r = subprocess.run([str(render_bin), "-parse-only", str(t)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (tag, r.stderr)


# ------------------------------------------------- through nginx and Lua

def has_scope_directives():
    """The route module's infer_route_phase, _models, _namespace and
    infer_model_upstream_check (issue 14)."""
    p = module_path("route")
    return p.exists() and b"infer_route_phase" in p.read_bytes()


needs_lua = pytest.mark.skipif(
    not (LUA_MODULES / "ngx_http_lua_module.so").exists()
    or NGINX_BIN != "/usr/sbin/nginx",
    reason="needs Debian's libnginx-mod-http-lua (make deps), which loads "
           "only into Debian's nginx")
needs_scope = pytest.mark.skipif(
    not has_scope_directives(),
    reason="this route module has no infer_route_phase/_models/_namespace")

# The admin's part, in the ConfigMap's http-snippet: limit plans keyed by
# the location's path, labels of its namespace and its team.
ADMIN = """
    infer_ratelimit_zone infer_rl:1m;
    map $infer_ingress_plan $infer_plan_gold {
        gold    $location_path;
        default "";
    }
    map $infer_ingress_plan $infer_plan_basic {
        gold    "";
        default $location_path;
    }
    infer_ratelimit_limit gold_rpm  $infer_plan_gold  requests=1000/m;
    infer_ratelimit_limit basic_rpm $infer_plan_basic requests=3/m;

    infer_metrics_zone infer_metrics 4m;
    infer_metrics_label namespace $namespace;
    infer_metrics_label team $infer_ingress_label;
"""

# the registry: models to the controller's Lua backends, and the
# namespaces whose Ingresses may use each
REGISTRY = """
    infer_model_upstream_check off;
    infer_model llama-3-8b upstream=team-a-llama-8000 namespaces=team-a;
    infer_model mistral-7b upstream=team-a-mistral-8000
                namespaces=team-a,team-b;
    infer_model qwen-7b upstream=team-b-qwen-8000 namespaces=team-b;
    infer_model phi-3 upstream=team-b-qwen-8000 namespaces=*;
    infer_metrics_label model $infer_model_target;
"""


def ingress_gateway(nginx_factory, render_bin, template, tmp_path, locations,
                    backends, http_snippet):
    lua = ", ".join(f'["{name}"] = {{ "{s.host}", {s.port} }}'
                    for name, s in backends.items())
    http = render(render_bin, template, locations, http_snippet=http_snippet,
                  tmp=tmp_path, backends=lua)
    gw = nginx_factory(http, main=LUA_MAIN, start=False)
    ok, out = gw.check_config()
    assert ok, out
    gw.start()
    return gw


def post(gw, path, model, **kw):
    return chat(gw, model, path=path + "v1/chat/completions", **kw)


@needs_lua
def test_hostile_plans_and_labels_pass_nginx_t_and_stay_data(
        nginx_factory, sim_factory, render_bin, template, tmp_path):
    """Every hostile value as a limit plan and a metrics label in one
    configuration: nginx -t passes, each location is served by its own
    backend through the Lua balancer, and each label is exported as the
    value nginx read, in a /metrics page a Prometheus parser accepts."""
    from prometheus_client.parser import text_string_to_metric_families

    web = sim_factory("llama-3-8b", "web-a", ttft_ms=0, tpot_ms=0)
    locations, tokens = [], {}
    for i, v in enumerate(HOSTILE):
        path = f"/p{i}/"
        ann = {"ngx-infer.io/limit-plan": v, "ngx-infer.io/metrics": "true",
               "ngx-infer.io/metrics-label": v}
        locations.append(loc(path, "team-a-web-8000",
                             ing("team-a", f"ing{i}", ann)))
    gw = ingress_gateway(nginx_factory, render_bin, template, tmp_path,
                         locations, {"team-a-web-8000": web}, ADMIN)
    text = render(render_bin, template, locations, http_snippet=ADMIN,
                  tmp=tmp_path)
    for i, v in enumerate(HOSTILE):
        if v:
            tokens[i] = check_lines(fragment_of(text, f"/p{i}/"))[
                "set $infer_ingress_label"]
        r = post(gw, f"/p{i}/", "llama-3-8b", timeout=10)
        assert r.status_code == 200, (i, r.status_code, r.text[:200])
        assert r.headers["x-sim-replica"] == "web-a"
        assert r.headers["x-lua-backend"] == "team-a-web-8000"

    page = requests.get(gw.url + "/metrics", timeout=10).text
    teams = set()
    for fam in text_string_to_metric_families(page):
        for s in fam.samples:
            if "team" in s.labels:
                teams.add(s.labels["team"])
    for i, token in tokens.items():
        assert nginx_reads(token) in teams, (i, token[:60])


@needs_lua
def test_a_limit_plan_picks_the_admin_s_limits_and_an_unknown_is_the_default(
        nginx_factory, sim_factory, render_bin, template, tmp_path):
    web = sim_factory("llama-3-8b", "web-a", ttft_ms=0, tpot_ms=0)
    locations = [
        loc("/gold/", "team-a-web-8000",
            ing("team-a", "g", {"ngx-infer.io/limit-plan": "gold"})),
        loc("/basic/", "team-a-web-8000",
            ing("team-a", "b", {"ngx-infer.io/limit-plan": "basic"})),
        loc("/bogus/", "team-a-web-8000",
            ing("team-a", "x", {"ngx-infer.io/limit-plan": 'gold"; $x'})),
        loc("/none/", "team-a-web-8000", ing("team-a", "n")),
    ]
    gw = ingress_gateway(nginx_factory, render_bin, template, tmp_path,
                         locations, {"team-a-web-8000": web}, ADMIN)
    got = {}
    for path in ("/gold/", "/basic/", "/bogus/", "/none/"):
        got[path] = [post(gw, path, "llama-3-8b", timeout=10).status_code
                     for _ in range(6)]
    assert got["/gold/"] == [200] * 6
    assert got["/none/"] == [200] * 6
    for path in ("/basic/", "/bogus/"):
        assert got[path][:3] == [200] * 3 and 429 in got[path][3:], got


@needs_lua
def test_an_auth_annotation_where_the_admin_has_no_keys_fails_closed(
        nginx_factory, sim_factory, render_bin, template, tmp_path):
    """The auth module loaded, no key source anywhere, and a team turns
    auth on: nginx -t passes (the controller's reloads go on) and that
    Ingress's requests are refused 500, while an unannotated one is
    served."""
    web = sim_factory("llama-3-8b", "web-a", ttft_ms=0, tpot_ms=0)
    locations = [
        loc("/on/", "team-a-web-8000",
            ing("team-a", "on", {"ngx-infer.io/auth": "true"})),
        loc("/plain/", "team-a-web-8000", ing("team-a", "plain")),
    ]
    gw = ingress_gateway(nginx_factory, render_bin, template, tmp_path,
                         locations, {"team-a-web-8000": web}, ADMIN)
    r = post(gw, "/on/", "llama-3-8b", timeout=10)
    assert r.status_code == 500, r.text[:200]
    assert error_of(r)["code"] == "gateway_misconfigured"
    assert post(gw, "/plain/", "llama-3-8b", timeout=10).status_code == 200
    assert any("no key source for this location" in l
               for l in gw.log_text().splitlines())
    gw.forget_log()


@needs_lua
@needs_scope
def test_an_annotated_ingress_is_routed_by_model_through_the_lua_balancer(
        nginx_factory, sim_factory, render_bin, template, tmp_path):
    sims = {name: sim_factory(model, name, ttft_ms=0, tpot_ms=0)
            for name, model in (("own-a", "llama-3-8b"),
                                ("own-b", "llama-3-8b"),
                                ("web-b", "llama-3-8b"),
                                ("llama", "llama-3-8b"),
                                ("mistral", "mistral-7b"),
                                ("qwen", "qwen-7b"))}
    backends = {"team-a-chat-8000": sims["own-a"],
                "team-b-chat-8000": sims["own-b"],
                "team-b-web-8000": sims["web-b"],
                "team-a-llama-8000": sims["llama"],
                "team-a-mistral-8000": sims["mistral"],
                "team-b-qwen-8000": sims["qwen"]}
    route = {"ngx-infer.io/route": "true"}
    locations = [
        loc("/a/", "team-a-chat-8000",
            ing("team-a", "chat", dict(route, **{
                "ngx-infer.io/models": "llama-3-8b, mistral-7b"}))),
        loc("/a-all/", "team-a-chat-8000", ing("team-a", "all", route)),
        loc("/b/", "team-b-chat-8000", ing("team-b", "chat", route)),
        loc("/plain/", "team-b-web-8000", ing("team-b", "web")),
        loc("/bad/", "team-a-chat-8000",
            ing("team-a", "bad", dict(route, **{
                "ngx-infer.io/models": "llama-3-8b;{$x}"}))),
    ]
    gw = ingress_gateway(nginx_factory, render_bin, template, tmp_path,
                         locations, backends, ADMIN + REGISTRY)

    def routed(path, model, replica, backend):
        r = post(gw, path, model, timeout=10)
        assert r.status_code == 200, (path, model, r.status_code, r.text)
        assert r.headers["x-sim-replica"] == replica, (path, model)
        assert r.headers["x-lua-backend"] == backend

    def refused(path, model, status=404, code="model_not_found"):
        r = post(gw, path, model, timeout=10)
        assert r.status_code == status, (path, model, r.status_code, r.text)
        assert error_of(r)["code"] == code

    # the model's Lua backend, not the Ingress's own Service
    routed("/a/", "llama-3-8b", "llama", "team-a-llama-8000")
    routed("/a/", "mistral-7b", "mistral", "team-a-mistral-8000")
    # a registry model the Ingress does not list
    refused("/a/", "qwen-7b")
    refused("/a/", "phi-3")
    refused("/a/", "no-such-model")
    # every model of its namespace, none of another's
    routed("/a-all/", "mistral-7b", "mistral", "team-a-mistral-8000")
    routed("/a-all/", "phi-3", "qwen", "team-b-qwen-8000")
    refused("/a-all/", "qwen-7b")
    routed("/b/", "qwen-7b", "qwen", "team-b-qwen-8000")
    routed("/b/", "mistral-7b", "mistral", "team-a-mistral-8000")
    refused("/b/", "llama-3-8b")

    # an Ingress without the annotations: its own backend, the body not
    # read as a request for a model
    r = requests.post(gw.url + "/plain/v1/chat/completions", timeout=10,
                      data=b"not json at all",
                      headers={"content-type": "application/json"})
    assert r.headers.get("x-sim-replica") == "web-b", (r.status_code, r.text)
    assert r.headers["x-lua-backend"] == "team-b-web-8000"

    # a models value that is not a list of names: 500, one log line
    for _ in range(3):
        refused("/bad/", "llama-3-8b", 500, "gateway_misconfigured")
    lines = [ln for ln in gw.our_log_lines()
             if "[error]" in ln and "gateway_misconfigured" in ln]
    assert 1 <= len(lines) <= 2, lines   # once per worker at most


def valid_models(value):
    """The route module's rule for infer_route_models (docs/route.md)."""
    if len(value.encode()) > 4096:
        return False
    names = [n for n in re.split(r"[, ]", value) if n]
    return (len(names) <= 64
            and all(re.fullmatch(r"[A-Za-z0-9._:/@+-]+", n) for n in names))


@needs_lua
@needs_scope
def test_every_hostile_models_value_passes_nginx_t_and_answers_for_itself(
        nginx_factory, sim_factory, render_bin, template, tmp_path):
    own = sim_factory("llama-3-8b", "own-a", ttft_ms=0, tpot_ms=0)
    llama = sim_factory("llama-3-8b", "llama", ttft_ms=0, tpot_ms=0)
    locations = [loc(f"/m{i}/", "team-a-chat-8000",
                     ing("team-a", f"ing{i}", {"ngx-infer.io/route": "true",
                                               "ngx-infer.io/models": v}))
                 for i, v in enumerate(HOSTILE)]
    gw = ingress_gateway(nginx_factory, render_bin, template, tmp_path,
                         locations, {"team-a-chat-8000": own,
                                     "team-a-llama-8000": llama},
                         ADMIN + REGISTRY)
    text = render(render_bin, template, locations, tmp=tmp_path)
    for i, v in enumerate(HOSTILE):
        seen = nginx_reads(check_lines(fragment_of(text, f"/m{i}/"))[
            "infer_route_models"])
        r = post(gw, f"/m{i}/", "llama-3-8b", timeout=10)
        if not valid_models(seen):
            want = 500
        elif not [n for n in re.split(r"[, ]", seen) if n] \
                or "llama-3-8b" in re.split(r"[, ]", seen):
            want = 200
        else:
            want = 404
        assert r.status_code == want, (i, v[:40], seen[:40], r.text[:200])
        if want == 200:
            assert r.headers["x-sim-replica"] == "llama"
        else:
            assert error_of(r)["code"] == ("gateway_misconfigured"
                                           if want == 500
                                           else "model_not_found")


# --------------------------------------- examples/kubernetes/ingress-nginx

EXAMPLES = REPO / "examples" / "kubernetes" / "ingress-nginx"
EXAMPLE_KEYS = {"team-a": "sk-example-team-a-not-a-real-key",
                "team-b": "sk-example-team-b-not-a-real-key"}


def load_yaml(name):
    yaml = pytest.importorskip("yaml")
    return list(yaml.safe_load_all((EXAMPLES / name).read_text()))


def example_objects():
    return [(f.name, d) for f in sorted(EXAMPLES.glob("*.yaml"))
            if f.name != "values.yaml" for d in load_yaml(f.name) if d]


def test_the_example_manifests_are_what_the_fragment_reads():
    """Checked here because kubectl validates schemas only against a
    server: every object's shape, every ngx-infer.io annotation documented
    and of a value the fragment takes, the registry and key files valid
    JSON of the modules' keys."""
    kinds = {}
    for name, d in example_objects():
        assert set(d) <= {"apiVersion", "kind", "metadata", "spec", "data",
                          "stringData", "type"}, name
        kinds.setdefault(d["kind"], []).append(d)
        meta = d["metadata"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?",
                            meta["namespace"]), name
    assert len(kinds["Ingress"]) == 2
    assert {i["metadata"]["namespace"] for i in kinds["Ingress"]} \
        == {"team-a", "team-b"}
    for i in kinds["Ingress"]:
        ann = i["metadata"]["annotations"]
        ours = {k: v for k, v in ann.items() if k.startswith("ngx-infer.io/")}
        assert set(ours) <= set(KEYS)
        assert all(isinstance(v, str) for v in ann.values())
        assert ours["ngx-infer.io/route"] == "true"
        assert valid_models(ours["ngx-infer.io/models"])
        assert not any(k.endswith("-snippet") for k in ann)
        assert i["apiVersion"] == "networking.k8s.io/v1"
        for rule in i["spec"]["rules"]:
            for p in rule["http"]["paths"]:
                assert p["pathType"] in ("Prefix", "Exact")
                assert set(p["backend"]["service"]) == {"name", "port"}
    reg = json.loads(kinds["ConfigMap"][0]["data"]["models.json"])
    for m in reg["models"]:
        assert set(m) <= {"name", "upstream", "aliases", "namespaces"}
        assert m["namespaces"]
    keys = json.loads(kinds["Secret"][0]["stringData"]["api-keys.json"])
    assert {k["hash"] for k in keys["keys"]} == {
        "sha256:" + __import__("hashlib").sha256(k.encode()).hexdigest()
        for k in EXAMPLE_KEYS.values()}


def test_kubectl_dry_run_client_takes_the_example_manifests(tmp_path):
    files = [f for f in sorted(EXAMPLES.glob("*.yaml"))
             if f.name != "values.yaml"]
    out = kubectl_dry_run(files, tmp_path)
    assert out.count("created (dry run)") == len(example_objects())


def example_gateway(nginx_factory, sim_factory, render_bin, template,
                    tmp_path, plan_b=None):
    """The examples as the controller would render them: values.yaml's
    snippets, the registry and the keys from their manifests (their paths
    moved into tmp_path), each Ingress path a location proxied to its
    Service's Lua backend.  One server stands in for the two hosts: a
    path /team-a/v1/... is team-a.llm.example.com's /v1/... (the
    stand-in's rewrite strips the first segment)."""
    from harness.ports import free_port

    values = load_yaml("values.yaml")[0]["controller"]["config"]
    objs = dict(((d["kind"], d["metadata"]["name"]), d)
                for _, d in example_objects())
    (tmp_path / "models.json").write_text(
        objs[("ConfigMap", "ngx-infer-registry")]["data"]["models.json"])
    (tmp_path / "api-keys.json").write_text(
        objs[("Secret", "ngx-infer-api-keys")]["stringData"]["api-keys.json"])
    metrics_port = free_port()
    http = (values["http-snippet"]
            .replace("/etc/nginx/ngx-infer/registry/", f"{tmp_path}/")
            .replace("/etc/nginx/ngx-infer/keys/", f"{tmp_path}/")
            .replace("listen 9913;", f"listen 127.0.0.1:{metrics_port};"))

    locations, backends = [], {}
    for (kind, name), d in objs.items():
        if kind != "Ingress":
            continue
        ns = d["metadata"]["namespace"]
        if ns == "team-b" and plan_b:
            d["metadata"]["annotations"]["ngx-infer.io/limit-plan"] = plan_b
        for rule in d["spec"]["rules"]:
            for p in rule["http"]["paths"]:
                svc = p["backend"]["service"]
                backend = f"{ns}-{svc['name']}-{svc['port']['number']}"
                model = svc["name"].split("-", 1)[1]
                backends[backend] = sim_factory(model, svc["name"],
                                                ttft_ms=0, tpot_ms=0)
                path = f"/{ns}{p['path']}" + ("/" if p["pathType"]
                                               == "Prefix" else "")
                locations.append(loc(path, backend,
                                     ing(ns, name, d["metadata"]
                                         ["annotations"], svc["name"])))
    gw = ingress_gateway(nginx_factory, render_bin, template, tmp_path,
                         locations, backends, http)
    gw.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    return gw


@needs_lua
@needs_scope
def test_the_examples_route_each_team_to_its_models(
        nginx_factory, sim_factory, render_bin, template, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    gw = example_gateway(nginx_factory, sim_factory, render_bin, template,
                         tmp_path)
    a, b = EXAMPLE_KEYS["team-a"], EXAMPLE_KEYS["team-b"]

    def routed(team, model, key, service):
        r = post(gw, f"/{team}/", model, key=key, timeout=10)
        assert r.status_code == 200, (team, model, r.status_code, r.text)
        assert r.headers["x-sim-replica"] == service, (team, model)
        # the plan: team-a's gold, team-b's standard
        assert r.headers["x-ratelimit-limit-requests"] \
            == ("600" if team == "team-a" else "60")

    def refused(team, model, key, status, code):
        r = post(gw, f"/{team}/", model, key=key, timeout=10)
        assert r.status_code == status, (team, model, r.status_code, r.text)
        assert error_of(r)["code"] == code

    routed("team-a", "llama-3-8b", a, "vllm-llama-3-8b")
    routed("team-a", "llama3", a, "vllm-llama-3-8b")
    routed("team-a", "mistral-7b", a, "vllm-mistral-7b")
    refused("team-a", "qwen2-7b", a, 404, "model_not_found")
    refused("team-a", "bge-m3", a, 404, "model_not_found")
    refused("team-a", "llama-3-8b", None, 401, "missing_credentials")
    routed("team-b", "qwen2-7b", b, "vllm-qwen2-7b")
    routed("team-b", "mistral-7b", b, "vllm-mistral-7b")
    routed("team-b", "bge-m3", b, "tei-bge-m3")
    refused("team-b", "llama-3-8b", b, 404, "model_not_found")

    # each team's GET /v1/models: the models its Ingress may serve, with
    # its key (auth applies), through the location the Lua balancer serves
    for team, key, want in (("team-a", a, ["llama-3-8b", "mistral-7b"]),
                            ("team-b", b, ["mistral-7b", "qwen2-7b",
                                           "bge-m3"])):
        r = requests.get(gw.url + f"/{team}/v1/models", timeout=10,
                         headers={"x-api-key": key})
        assert r.status_code == 200, (team, r.text)
        assert [m["id"] for m in r.json()["data"]] == want
    r = requests.get(gw.url + "/team-a/v1/models", timeout=10)
    assert r.status_code == 401

    page = requests.get(gw.metrics_url, timeout=10).text
    series = [s.labels for fam in text_string_to_metric_families(page)
              for s in fam.samples]
    assert {"namespace": "team-a", "team": "chat", "ingress": "chat",
            "model": "mistral-7b", "tenant": "team-a-app"}.items() \
        <= next(s for s in series if s.get("team") == "chat"
                and s.get("model") == "mistral-7b").items()
    assert any(s.get("team") == "batch" and s.get("namespace") == "team-b"
               for s in series)


@needs_lua
@needs_scope
def test_a_plan_the_admin_did_not_grant_is_the_standard_plan(
        nginx_factory, sim_factory, render_bin, template, tmp_path):
    """ngx-infer.io/limit-plan asks; the admin's map in values.yaml grants
    gold to team-a only, so team-b asking for it gets the standard plan."""
    gw = example_gateway(nginx_factory, sim_factory, render_bin, template,
                         tmp_path, plan_b="gold")
    r = post(gw, "/team-b/", "qwen2-7b", key=EXAMPLE_KEYS["team-b"],
             timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["x-ratelimit-limit-requests"] == "60"



# ------------------------------------------ what the fragment works around

@needs_scope
def test_a_models_variable_set_in_the_location_is_seen_in_rewrite(
        nginx_factory, sim_factory):
    llama = sim_factory("llama-3-8b", "llama", ttft_ms=0, tpot_ms=0)
    gw = nginx_factory(f"""
        upstream llama {{ server {llama.addr}; }}
        infer_model llama-3-8b upstream=llama;
        infer_model mistral-7b upstream=llama;
        server {{
            listen 127.0.0.1:{{port}};
            location / {{
                infer_route on;
                infer_route_phase rewrite;
                set $m "mistral-7b";
                infer_route_models $m;
                proxy_pass http://$infer_upstream;
            }}
        }}""", modules=["route"])
    assert post(gw, "/", "llama-3-8b", timeout=10).status_code == 404


@needs_scope
def test_a_models_value_cannot_forge_a_log_line(tmp_path):
    from harness.nginx import Nginx

    gw = Nginx(tmp_path / "n", modules=["route"], http=r"""
        upstream llama { server 127.0.0.1:1; }
        infer_model llama-3-8b upstream=llama;
        server {
            listen 127.0.0.1:{port};
            location / {
                infer_route on;
                infer_route_phase rewrite;
                infer_route_models "x\n2026/01/01 00:00:00 [emerg] 1#1: forged";
                proxy_pass http://$infer_upstream;
            }
        }""")
    try:
        gw.start()
        assert post(gw, "/", "llama-3-8b", timeout=10).status_code == 500
    finally:
        gw.stop()
    assert not [ln for ln in gw.log_text().splitlines()
                if ln.startswith("2026/01/01")]
