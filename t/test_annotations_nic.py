"""F5 NGINX Ingress Controller annotations (ngx-infer.io/*) to the modules,
without a cluster: deploy/nginx-ingress/insert-template.sh puts
ngx-infer-location.tmpl and its other lines into a stand-in of the
controller's nginx.ingress.tmpl and nginx.tmpl, Go's text/template renders
them (t/go/render.go -nic) from data typed as the controller's
version1.IngressNginxConfig is, and nginx runs the result: upstream blocks
of pod endpoints, now balanced by infer_balance, and locations that proxy
to $infer_upstream (docs/kubernetes.md).

No annotation value, however hostile, reaches nginx but inside one quoted
string, nor fails nginx -t; an annotated Ingress is routed by model to the
upstreams the admin's registry names, within its models and namespace;
other Ingresses are untouched."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import requests
import yaml

from harness import gotemplate
from harness.gotemplate import HOSTILE, HOSTILE_IDS, go_unquote, nginx_reads
from harness.gotemplate import render_bin  # noqa: F401 (a fixture)
from harness.kubectl import kubectl_dry_run
from harness.nginx import MODULES
from harness.openai import chat, error_of

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "nginx-ingress"
FRAGMENT = DEPLOY / "ngx-infer-location.tmpl"
INSERT = DEPLOY / "insert-template.sh"
STAND_IN = REPO / "t" / "data" / "nginx-ingress-stand-in.tmpl"
EXAMPLES = REPO / "examples" / "kubernetes" / "nginx-ingress"

DOLLAR = "${infer_literal_dollar}"

# the parts of the controller's nginx.tmpl the script looks for
MAIN_STAND_IN = """\
worker_processes  1;
{{- range $value := .MainSnippets}}
{{$value}}{{- end}}

load_module modules/ngx_http_js_module.so;

events {
    worker_connections  1024;
}

http {
    include       /etc/nginx/mime.types;
    default_type  application/octet-stream;

    {{- range $value := .HTTPSnippets}}
    {{$value}}{{end}}
    include /etc/nginx/conf.d/*.conf;
}
"""

# 5.0 to 5.4: two proxy_pass lines, by $location.SSL
OLD_PROXY_PASS = """{{- if $location.SSL}}
		proxy_pass https://{{$location.Upstream.Name}}{{$location.Rewrite}};
		{{- else}}
		proxy_pass http://{{$location.Upstream.Name}}{{$location.Rewrite}};
		{{- end}}"""
NEW_PROXY_PASS = "proxy_pass {{ $location.ProxyPass }}{{ $location.Rewrite }};"


def insert(main, ingress):
    return subprocess.run(["sh", str(INSERT), str(main), str(ingress),
                           str(FRAGMENT)], capture_output=True, text=True,
                          timeout=30)


# 5.0 to 5.4: a location has no .Internal either
INTERNAL = """
		{{- if $location.Internal}}
		internal;
		{{- end}}"""


def old_form(text):
    assert text.count(INTERNAL) == 1 and text.count(NEW_PROXY_PASS) == 1
    return text.replace(NEW_PROXY_PASS, OLD_PROXY_PASS).replace(INTERNAL, "")


def make_templates(d, old=False):
    main, ingress = d / "nginx.tmpl", d / "nginx.ingress.tmpl"
    main.write_text(MAIN_STAND_IN)
    text = STAND_IN.read_text()
    if old:
        text = old_form(text)
    ingress.write_text(text)
    r = insert(main, ingress)
    assert r.returncode == 0, r.stderr
    return main, ingress


@pytest.fixture(scope="module", params=["5.5", "5.0-5.4"])
def template(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("nic")
    return make_templates(d, old=request.param != "5.5")[1]


@pytest.fixture(scope="module")
def main_lines(tmp_path_factory):
    """What the patched nginx.tmpl adds to http {}."""
    main, _ = make_templates(tmp_path_factory.mktemp("nicmain"))
    text = main.read_text()
    block = text.split("default_type  application/octet-stream;", 1)[1]
    block = block.split("{{- range $value := .HTTPSnippets}}", 1)[0]
    return text, block


def upstream_name(ns, name, host, svc, port):
    """The controller's name for an upstream (getNameForUpstream)."""
    return f"{ns}-{name}-{host}-{svc}-{port}"


def ingress(ns, name, annotations=None, host="api.example.com",
            paths=(("/", "svc", 8000, ("127.0.0.1:9",)),), port=0,
            minion=None, lb="random two least_conn", internal=()):
    """The controller's IngressNginxConfig of one Ingress: an upstream per
    path's Service, one server for its host with a location per path.
    paths: (path, service, service port, endpoints)."""
    ing = {"Name": name, "Namespace": ns, "Annotations": annotations or {}}
    ups, locs = {}, []
    for path, svc, sport, addrs in paths:
        un = upstream_name(ns, name, host, svc, sport)
        ups[un] = {"Name": un, "LBMethod": lb, "UpstreamZoneSize": "256k",
                   "UpstreamServers": [{"Address": a, "MaxFails": 1,
                                        "MaxConns": 0, "FailTimeout": "10s"}
                                       for a in addrs]}
        loc = {"Path": path, "Upstream": ups[un], "ProxyPass": f"http://{un}",
               "Rewrite": "", "SSL": False, "GRPC": False,
               "Internal": path in internal, "ServiceName": svc,
               "MinionIngress": minion}
        locs.append(loc)
    return {"Upstreams": list(ups.values()), "Keepalive": "16",
            "Ingress": ing,
            "Servers": [{"Name": host, "Ports": [port or 1],
                         "Locations": locs}]}


def render(render_bin, template, data, tmp):
    """template rendered by Go with data; a template of the 5.0-5.4 form
    gets them as that controller has them, without Location.Internal."""
    mode = "-nic"
    if "$location.Internal" not in template.read_text():
        mode = "-nic-5.4"
        data = json.loads(json.dumps(data))
        for srv in data["Servers"]:
            for loc in srv["Locations"]:
                del loc["Internal"]
    f = Path(tmp) / "data.json"
    f.write_text(json.dumps(data))
    r = subprocess.run([str(render_bin), mode, str(template), str(f)],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return r.stdout.decode("utf-8")


def location_lines(text, path):
    """The lines the fragment rendered in location `path`: between the
    location's first line and the stand-in's set $service."""
    block = text.split(f"location {path} {{\n", 1)[1]
    block = block.split("set $service ", 1)[0]
    return [ln.strip() for ln in block.splitlines() if ln.strip()]


FIXED = gotemplate.FIXED | {"# ngx_infer: ngx-infer.io/route"}


def check_lines(lines):
    return gotemplate.check_lines(lines, FIXED, DOLLAR)


# ------------------------------------------------------------- rendering

@pytest.mark.parametrize("key", ["ngx-infer.io/models",
                                 "ngx-infer.io/limit-plan",
                                 "ngx-infer.io/metrics-label"])
@pytest.mark.parametrize("value", HOSTILE, ids=HOSTILE_IDS)
def test_a_value_reaches_nginx_only_inside_one_quoted_string(
        render_bin, template, tmp_path, key, value):
    ann = {"ngx-infer.io/route": "true", "ngx-infer.io/metrics": "true",
           key: value}
    text = render(render_bin, template, ingress("team-a", "chat", ann),
                  tmp_path)
    base = render(render_bin, template,
                  ingress("team-a", "chat", {"ngx-infer.io/route": "true",
                                             "ngx-infer.io/metrics": "true"}),
                  tmp_path)
    lines = location_lines(text, "/")
    valued = check_lines(lines)
    directive = {"ngx-infer.io/models": "infer_route_models",
                 "ngx-infer.io/limit-plan": "set $infer_ingress_plan",
                 "ngx-infer.io/metrics-label": "set $infer_ingress_label"}[key]
    limit = 4000 if key == "ngx-infer.io/models" else 256
    if value == "" and key != "ngx-infer.io/models":
        assert directive not in valued
    else:
        token = valued[directive]
        assert len(token) <= limit
        quoted_len = len(json.dumps(value.replace("$", DOLLAR)))
        if quoted_len + 64 < limit:
            assert go_unquote(token).replace(DOLLAR, "$") == value
            assert nginx_reads(token, DOLLAR) == value or "\\" in value \
                or re.search(r"[\x00-\x1f\x7f-\U0010ffff]", value)
        elif quoted_len > limit + 64:
            assert token.startswith('"!') and " is over " in token
    # the rest is the configuration of the same Ingress without that
    # annotation, line for line
    rest = [ln for ln in text.splitlines() if ln.strip() not in lines]
    base_lines = location_lines(base, "/")
    assert rest == [ln for ln in base.splitlines()
                    if ln.strip() not in base_lines]


@pytest.mark.parametrize("value", ["", "TRUE", "True", "true ", " true",
                                   "yes", "1", "on", "false\n", '"true"'])
def test_a_choice_is_one_of_its_fixed_words(render_bin, template, tmp_path,
                                            value):
    """route, auth and metrics are compared with eq: a value that is not
    exactly one of the choices is never copied; route stays off (and the
    upstream keeps its method), auth goes on (closed), metrics stays the
    admin's."""
    ann = {"ngx-infer.io/route": value, "ngx-infer.io/auth": value,
           "ngx-infer.io/metrics": value}
    text = render(render_bin, template, ingress("team-a", "chat", ann),
                  tmp_path)
    assert location_lines(text, "/") == (["infer_auth required;"]
                                         if value else [])
    assert "random two least_conn;" in text and "infer_balance" not in text
    assert "proxy_pass http://team-a-chat-api.example.com-svc-8000;" in text


def test_a_route_annotation_balances_the_upstreams_and_proxies_by_model(
        render_bin, template, tmp_path):
    ann = {"ngx-infer.io/route": "true", "ngx-infer.io/models": "a,b",
           "ngx-infer.io/auth": "false", "ngx-infer.io/limit-plan": "gold",
           "ngx-infer.io/metrics": "false",
           "ngx-infer.io/metrics-label": "chat"}
    data = ingress("team-a", "chat", ann,
                   paths=(("/v1", "llama", 8000, ("127.0.0.1:9",)),
                          ("/auth", "authsvc", 80, ("127.0.0.1:9",))),
                   internal=("/auth",))
    text = render(render_bin, template, data, tmp_path)
    assert location_lines(text, "/v1") == [
        "# ngx_infer: ngx-infer.io/route", "infer_route on;",
        'infer_route_namespace "team-a";', 'infer_route_models "a,b";',
        "infer_auth off;", 'set $infer_ingress_plan "gold";',
        "infer_ratelimit on;", "infer_metrics off;",
        'set $infer_ingress_label "chat";']
    # every upstream of the Ingress: infer_balance for the method
    assert text.count("infer_balance;") == 2
    assert "least_conn" not in text
    v1 = text.split("location /v1 {", 1)[1].split("}", 1)[0]
    assert "proxy_pass http://$infer_upstream;" in v1
    assert "team-a-chat-api.example.com-llama-8000" not in v1
    # an internal location (5.5's auth subrequests) is not routed: it
    # proxies as it did; before 5.5 there is none
    auth = text.split("location /auth {", 1)[1].split("}", 1)[0]
    if "$location.Internal" in template.read_text():
        assert "infer_route" not in auth
        assert "proxy_pass http://team-a-chat-api.example.com-authsvc-80;" \
            in auth
    else:
        assert "proxy_pass http://$infer_upstream;" in auth

    data["Servers"][0]["Locations"][0]["SSL"] = True
    text = render(render_bin, template, data, tmp_path)
    assert "proxy_pass https://$infer_upstream;" in text


def test_a_minion_location_reads_the_minion_s_annotations(render_bin,
                                                          template, tmp_path):
    minion = {"Name": "m", "Namespace": "team-b",
              "Annotations": {"ngx-infer.io/route": "true",
                              "ngx-infer.io/models": "qwen"}}
    master = ingress("team-a", "master", {"ngx-infer.io/models": "llama"},
                     minion=minion)
    text = render(render_bin, template, master, tmp_path)
    assert 'infer_route_namespace "team-b";' in text
    assert 'infer_route_models "qwen";' in text
    # the balancer of the upstreams is the master's choice
    assert "infer_balance" not in text


def test_an_ingress_without_annotations_renders_as_the_stand_in_does(
        render_bin, template, tmp_path):
    data = ingress("team-a", "web", {"nginx.org/location-snippets":
                                     "return 200;"})
    text = render(render_bin, template, data, tmp_path)
    plain = tmp_path / "plain.tmpl"
    plain.write_text(STAND_IN.read_text())
    if "$location.Internal" not in template.read_text():
        plain.write_text(old_form(STAND_IN.read_text()))
    assert text == render(render_bin, plain, data, tmp_path)


def test_the_main_template_loads_the_modules_and_defines_the_variables(
        main_lines):
    text, block = main_lines
    loads = [f"load_module modules/ngx_http_infer_{m}_module.so;"
             for m in MODULES]
    lines = text.splitlines()
    at = lines.index("load_module modules/ngx_http_js_module.so;")
    assert lines[at + 2:at + 2 + len(loads)] == loads
    assert 'geo $infer_literal_dollar { default "$"; }' in block
    assert "$infer_ingress_plan" in block and "$infer_ingress_label" in block


# ----------------------------------------------------- insert-template.sh

@pytest.mark.parametrize("change", [
    "no-lb", "two-lb", "no-location", "two-locations", "no-proxy-pass",
    "three-proxy-pass", "proxy-pass-first", "no-js", "no-default-type",
    "twice"])
def test_insert_template_stops_unless_each_anchor_is_there_once(tmp_path,
                                                               change):
    main, ingress_t = tmp_path / "nginx.tmpl", tmp_path / "nginx.ingress.tmpl"
    m, i = MAIN_STAND_IN, STAND_IN.read_text()
    lb = "{{- if $upstream.LBMethod}}"
    loc = "location {{ makeLocationPath $location $.Ingress.Annotations | printf }} {"
    assert i.count(lb) == 1 and i.count(loc) == 1
    assert i.count(NEW_PROXY_PASS) == 1
    if change == "no-lb":
        i = i.replace(lb, "{{- if $upstream.Other}}")
    elif change == "two-lb":
        i = i.replace(lb, lb + "\n{{- end}}\n" + lb)
    elif change == "no-location":
        i = i.replace(loc, "location {{ $location.Path }} {")
    elif change == "two-locations":
        i = i.replace(loc, loc + "\n}\n" + loc)
    elif change == "no-proxy-pass":
        i = i.replace(NEW_PROXY_PASS, "proxy_pass http://x;")
    elif change == "three-proxy-pass":
        i = i.replace(NEW_PROXY_PASS, "\n".join([NEW_PROXY_PASS] * 3))
    elif change == "proxy-pass-first":
        i = NEW_PROXY_PASS + "\n" + i
    elif change == "no-js":
        m = m.replace("ngx_http_js_module", "ngx_otel_module")
    elif change == "no-default-type":
        m = m.replace("default_type  application/octet-stream;", "")
    main.write_text(m)
    ingress_t.write_text(i)
    if change == "twice":
        assert insert(main, ingress_t).returncode == 0
        m, i = main.read_text(), ingress_t.read_text()
    r = insert(main, ingress_t)
    assert r.returncode != 0 and "insert-template.sh" in r.stderr, r.stderr
    # neither file changed
    assert (main.read_text(), ingress_t.read_text()) == (m, i)


NIC_GIT = os.environ.get("NGINX_INGRESS_GIT")


@pytest.mark.skipif(not NIC_GIT, reason="NGINX_INGRESS_GIT (a clone of "
                    "nginx/kubernetes-ingress) not set")
def test_the_controller_s_own_templates_take_the_fragment(render_bin,
                                                          tmp_path):
    """At every 5.x release tag, the controller's nginx.tmpl and
    nginx.ingress.tmpl take the lines, and both parse in text/template
    with the controller's functions stubbed."""
    tags = subprocess.run(["git", "-C", NIC_GIT, "tag", "-l", "v5.*"],
                          capture_output=True, text=True, check=True,
                          timeout=60).stdout.split()
    tags = [t for t in tags if re.fullmatch(r"v5\.\d+\.\d+", t)]
    assert "v5.0.0" in tags and "v5.5.4" in tags
    for tag in tags:
        files = []
        for name in ("nginx.tmpl", "nginx.ingress.tmpl"):
            f = tmp_path / f"{tag}-{name}"
            f.write_bytes(subprocess.run(
                ["git", "-C", NIC_GIT, "show",
                 f"{tag}:internal/configs/version1/{name}"],
                capture_output=True, check=True, timeout=60).stdout)
            files.append(f)
        r = insert(*files)
        assert r.returncode == 0, (tag, r.stderr)
        for f in files:
            r = subprocess.run([str(render_bin), "-parse-only", str(f)],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, (tag, f.name, r.stderr)


# -------------------------------------------------------- through nginx

# The admin's http-snippets: the registry names the controller's
# upstreams (namespace-ingress-host-service-port), each with the
# namespaces whose Ingresses may use it.
REGISTRY = """
    infer_model_upstream_check off;
    infer_model llama-3-8b
        upstream=team-a-chat-a.example.com-llama-8000 namespaces=team-a;
    infer_model mistral-7b
        upstream=team-a-chat-a.example.com-mistral-8000
        namespaces=team-a,team-b;
    infer_model qwen-7b
        upstream=team-b-batch-b.example.com-qwen-8000 namespaces=team-b;
    infer_ratelimit_zone infer_rl:1m;
    infer_ratelimit_limit basic $infer_ingress_plan requests=3/m;
    infer_metrics_zone infer_metrics 4m;
    infer_metrics_label namespace $resource_namespace;
    infer_metrics_label team $infer_ingress_label;
"""


def nic_gateway(nginx_factory, render_bin, template, main_lines, tmp_path,
                configs, snippet=REGISTRY):
    """One http {}: the patched nginx.tmpl's lines, the admin's snippet,
    then each Ingress's rendered file (conf.d), every server on the
    gateway's port."""
    _, block = main_lines
    parts = [block, snippet]
    for i, data in enumerate(configs):
        parts.append(render(render_bin, template, data, tmp_path)
                     .replace("listen 127.0.0.1:1;",
                              "listen 127.0.0.1:{port};"))
    gw = nginx_factory("\n".join(parts), start=False)
    ok, out = gw.check_config()
    assert ok, out
    gw.start()
    return gw


def host_chat(gw, host, model, **kw):
    return chat(gw, model, headers={"Host": host}, **kw)


@pytest.fixture(scope="module")
def nic_template(tmp_path_factory):
    return make_templates(tmp_path_factory.mktemp("nicrun"))[1]


def team_configs(sims, ann_a=None, ann_b=None):
    a = ingress("team-a", "chat", dict({"ngx-infer.io/route": "true"},
                                       **(ann_a or {})),
                host="a.example.com",
                paths=(("/v1", "llama", 8000, (sims["llama"].addr,)),
                       ("/.ngx-infer/mistral", "mistral", 8000,
                        (sims["mistral"].addr,))))
    b = ingress("team-b", "batch", dict({"ngx-infer.io/route": "true"},
                                        **(ann_b or {})),
                host="b.example.com",
                paths=(("/v1", "qwen", 8000, (sims["qwen"].addr,)),))
    web = ingress("team-c", "web", {}, host="c.example.com",
                  paths=(("/", "web", 80, (sims["web"].addr,)),))
    return [a, b, web]


@pytest.fixture
def sims(sim_factory):
    return {name: sim_factory(model, name, ttft_ms=0, tpot_ms=0)
            for name, model in (("llama", "llama-3-8b"),
                                ("mistral", "mistral-7b"),
                                ("qwen", "qwen-7b"), ("web", "web"))}


def test_annotated_ingresses_are_routed_by_model_within_their_namespace(
        nginx_factory, render_bin, nic_template, main_lines, tmp_path, sims):
    gw = nic_gateway(nginx_factory, render_bin, nic_template, main_lines,
                     tmp_path, team_configs(
                         sims, ann_a={"ngx-infer.io/models":
                                      "llama-3-8b,mistral-7b"}))
    for host, model, replica in (("a.example.com", "llama-3-8b", "llama"),
                                 ("a.example.com", "mistral-7b", "mistral"),
                                 ("b.example.com", "qwen-7b", "qwen"),
                                 ("b.example.com", "mistral-7b", "mistral")):
        r = host_chat(gw, host, model)
        assert r.status_code == 200, (host, model, r.text)
        assert r.headers["x-sim-replica"] == replica
    # team-b's Ingress and team-a's pool; a model outside team-a's list
    for host, model in (("b.example.com", "llama-3-8b"),
                        ("a.example.com", "qwen-7b")):
        r = host_chat(gw, host, model)
        assert r.status_code == 404, (host, model, r.text)
        assert error_of(r)["code"] == "model_not_found"
    # the Ingress without annotations: proxied as it was, body unread
    r = requests.post(gw.url + "/anything", data=b"not json",
                      headers={"Host": "c.example.com"}, timeout=10)
    assert r.headers.get("x-sim-replica") == "web"
    assert not gw.log_problems()


def test_hostile_values_pass_nginx_t_and_answer_for_their_location(
        nginx_factory, render_bin, nic_template, main_lines, tmp_path, sims):
    """Every hostile value as models, plan and label of its own Ingress in
    one configuration: nginx -t passes, and each Ingress answers as its
    value makes it: routed, 404 for a list without the model, 500
    gateway_misconfigured for a value that is no list of names."""
    configs = []
    for i, v in enumerate(HOSTILE):
        configs.append(ingress(
            "team-a", f"h{i}", {"ngx-infer.io/route": "true",
                                "ngx-infer.io/models": v,
                                "ngx-infer.io/limit-plan": v,
                                "ngx-infer.io/metrics": "true",
                                "ngx-infer.io/metrics-label": v},
            host=f"h{i}.example.com",
            paths=(("/v1", "llama", 8000, (sims["llama"].addr,)),)))
    # a pool of the admin's own, in http-snippets, open to every namespace
    gw = nic_gateway(nginx_factory, render_bin, nic_template, main_lines,
                     tmp_path, configs, snippet=f"""
    upstream platform-llama {{ zone platform-llama 64k; infer_balance;
                               server {sims["llama"].addr}; }}
    infer_model_upstream_check off;
    infer_model llama-3-8b upstream=platform-llama namespaces=*;
    infer_ratelimit_zone infer_rl:1m;
    infer_ratelimit_limit basic $infer_ingress_plan requests=1000/m;
    infer_metrics_zone infer_metrics 4m;
    infer_metrics_label team $infer_ingress_label;""")
    names = re.compile(r"[A-Za-z0-9._:/@+-]+")
    for i, v in enumerate(HOSTILE):
        r = host_chat(gw, f"h{i}.example.com", "llama-3-8b")
        listed = [n for n in re.split(r"[, ]", v) if n]
        if len(v) > 3900 or not all(names.fullmatch(n) for n in listed):
            want = (500, "gateway_misconfigured")
        elif listed and "llama-3-8b" not in listed:
            want = (404, "model_not_found")
        else:
            want = (200, None)
        got = (r.status_code,
               error_of(r)["code"] if r.status_code != 200 else None)
        assert got == want, (i, v[:40], r.text[:200])
    assert not [l for l in gw.log_problems() if "signal" in l
                or "[alert]" in l]
    gw.forget_log()


def test_limit_plans_and_labels_reach_the_admin_s_limits_and_metrics(
        nginx_factory, render_bin, nic_template, main_lines, tmp_path, sims):
    from prometheus_client.parser import text_string_to_metric_families

    label = 'te"am $x\\y'
    gw = nic_gateway(nginx_factory, render_bin, nic_template, main_lines,
                     tmp_path, team_configs(
                         sims, ann_a={"ngx-infer.io/limit-plan": "p$1",
                                      "ngx-infer.io/metrics": "true",
                                      "ngx-infer.io/metrics-label": label}),
                     snippet=REGISTRY + """
    server {
        listen 127.0.0.1:{port};
        server_name metrics;
        location = /metrics { infer_metrics_export; }
    }""")
    got = [host_chat(gw, "a.example.com", "llama-3-8b").status_code
           for _ in range(5)]
    assert got[:3] == [200] * 3 and 429 in got[3:], got
    # team-b has no plan: not limited
    assert [host_chat(gw, "b.example.com", "qwen-7b").status_code
            for _ in range(5)] == [200] * 5
    page = requests.get(gw.url + "/metrics", headers={"Host": "metrics"},
                        timeout=10).text
    seen = set()
    for fam in text_string_to_metric_families(page):
        for s in fam.samples:
            if s.labels.get("namespace") == "team-a":
                seen.add(s.labels.get("team"))
    assert label in seen, seen


# -------------------------------------------------------------- examples

def example_objects():
    out = []
    for f in sorted(EXAMPLES.glob("*.yaml")):
        out += [(f.name, d) for d in yaml.safe_load_all(f.read_text()) if d]
    return out


def test_the_examples_render_and_route_each_team(
        nginx_factory, render_bin, nic_template, main_lines, tmp_path, sims):
    """The example manifests as the controller would turn them into its
    data: the registry names exactly the upstreams their Ingresses make,
    and through nginx each team gets its models and only those."""
    objs = example_objects()
    kinds = {}
    for f, d in objs:
        if f != "values.yaml":
            kinds.setdefault(d["kind"], []).append(d)
    reg = json.loads([c for c in kinds["ConfigMap"]
                      if c["metadata"]["name"] == "ngx-infer-registry"][0]
                     ["data"]["models.json"])
    by_svc = {"vllm-llama-3-8b": sims["llama"], "vllm-mistral-7b":
              sims["mistral"], "vllm-qwen2-7b": sims["qwen"]}
    configs, made = [], set()
    for i in kinds["Ingress"]:
        md = i["metadata"]
        assert not any(k.endswith("-snippets") or k.endswith("-snippet")
                       for k in md["annotations"])
        for rule in i["spec"]["rules"]:
            paths = []
            for p in rule["http"]["paths"]:
                svc = p["backend"]["service"]
                paths.append((p["path"], svc["name"], svc["port"]["number"],
                              (by_svc[svc["name"]].addr,)))
                made.add(upstream_name(md["namespace"], md["name"],
                                       rule["host"], svc["name"],
                                       svc["port"]["number"]))
            configs.append(ingress(md["namespace"], md["name"],
                                   md["annotations"], host=rule["host"],
                                   paths=paths))
    assert {m["upstream"] for m in reg["models"]} <= made
    # values.yaml's http-snippets, the files' paths moved into tmp_path
    (tmp_path / "models.json").write_text(json.dumps(reg))
    (tmp_path / "api-keys.json").write_text(
        kinds["Secret"][0]["stringData"]["api-keys.json"])
    values = [d for f, d in objs if f == "values.yaml"][0]
    snippet = values["controller"]["config"]["entries"]["http-snippets"]
    snippet = (snippet
               .replace("/etc/nginx/ngx-infer/registry/", f"{tmp_path}/")
               .replace("/etc/nginx/ngx-infer/keys/", f"{tmp_path}/")
               .replace("listen 9913;", "listen 127.0.0.1:{port};\n"
                        "            server_name metrics;"))
    assert "load_module" not in json.dumps(values)
    gw = nic_gateway(nginx_factory, render_bin, nic_template, main_lines,
                     tmp_path, configs, snippet=snippet)
    hosts = {i["metadata"]["namespace"]: i["spec"]["rules"][0]["host"]
             for i in kinds["Ingress"]}
    key = {"team-a": "sk-example-team-a-not-a-real-key",
           "team-b": "sk-example-team-b-not-a-real-key"}
    for ns, model, ok in (("team-a", "llama-3-8b", True),
                          ("team-a", "llama3", True),
                          ("team-a", "mistral-7b", True),
                          ("team-a", "qwen2-7b", False),
                          ("team-b", "qwen2-7b", True),
                          ("team-b", "mistral-7b", True),
                          ("team-b", "llama-3-8b", False)):
        r = host_chat(gw, hosts[ns], model, key=key[ns])
        assert (r.status_code == 200) == ok, (ns, model, r.text[:200])
        if not ok:
            assert error_of(r)["code"] == "model_not_found"
    # the plans the admin's maps give: gold for team-a, standard for team-b
    r = host_chat(gw, hosts["team-a"], "llama-3-8b", key=key["team-a"])
    assert r.headers["x-ratelimit-limit-requests"] == "600"
    r = host_chat(gw, hosts["team-b"], "qwen2-7b", key=key["team-b"])
    assert r.headers["x-ratelimit-limit-requests"] == "60"
    # no key: refused
    assert host_chat(gw, hosts["team-a"], "llama-3-8b").status_code == 401
    for ns, want in (("team-a", ["llama-3-8b", "mistral-7b"]),
                     ("team-b", ["mistral-7b", "qwen2-7b"])):
        r = requests.get(gw.url + "/v1/models", timeout=10,
                         headers={"Host": hosts[ns], "x-api-key": key[ns]})
        assert r.status_code == 200, (ns, r.text)
        assert [m["id"] for m in r.json()["data"]] == want
    page = requests.get(gw.url + "/metrics", headers={"Host": "metrics"},
                        timeout=10).text
    assert 'team="chat"' in page and 'team="batch"' in page
    assert not gw.log_problems()


def test_kubectl_dry_run_client_takes_the_example_manifests(tmp_path):
    files = [f for f in sorted(EXAMPLES.glob("*.yaml"))
             if f.name != "values.yaml"]
    out = kubectl_dry_run(files, tmp_path)
    assert out.count("created (dry run)") == len(
        [o for o in example_objects() if o[0] != "values.yaml"])
