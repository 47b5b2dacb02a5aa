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

import ast
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from harness.nginx import MODULES, module_path
from harness.openai import chat, error_of

REPO = Path(__file__).resolve().parents[1]
FRAGMENT = REPO / "deploy" / "ingress-nginx" / "ngx-infer.tmpl"
INSERT = REPO / "deploy" / "ingress-nginx" / "insert-template.sh"
STAND_IN = REPO / "t" / "data" / "ingress-nginx-stand-in.tmpl"
RENDER_GO = REPO / "t" / "go" / "render.go"

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
def render_bin(tmp_path_factory):
    go = shutil.which("go")
    if go is None:
        pytest.skip("go is not installed (Debian's golang-go; make deps "
                    "installs it)")
    d = tmp_path_factory.mktemp("render")
    env = dict(os.environ, GOCACHE=str(d / "cache"), GOPATH=str(d / "gopath"),
               GO111MODULE="off", GOFLAGS="")
    r = subprocess.run([go, "build", "-o", str(d / "render"), str(RENDER_GO)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return d / "render"


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
    return {"Path": path, "Backend": backend, "Ing": ingress}


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

QUOTED = r'"(?:[^"\\]|\\.)*"'
FIXED = {"infer_route on;", "infer_route_phase rewrite;",
         "set $proxy_upstream_name $infer_lua_upstream;",
         "infer_auth on;", "infer_auth off;", "infer_ratelimit on;",
         "infer_metrics on;", "infer_metrics off;"}
VALUED = re.compile(r"(infer_route_namespace|infer_route_models"
                    r"|set \$infer_ingress_plan|set \$infer_ingress_label) "
                    rf"({QUOTED});")


def go_unquote(token):
    """What Go's %q wrote, read back: Go's escapes (\\" \\\\ \\n \\t \\xNN
    \\uNNNN \\UNNNNNNNN \\a...) are Python's too."""
    assert token[0] == '"' and token[-1] == '"'
    inner = token[1:-1]
    assert not re.search(r"[\x00-\x1f\x7f]", inner), token
    return ast.literal_eval(token)


def nginx_reads(token):
    """The value nginx gives the quoted token once parsed (\\" \\' \\\\ \\t
    \\r \\n unescaped, any other backslash kept) and its ${literal_dollar}
    evaluated."""
    inner, out, i = token[1:-1], [], 0
    while i < len(inner):
        c = inner[i]
        if c == "\\" and i + 1 < len(inner):
            n = inner[i + 1]
            if n in "\"'\\":
                out.append(n)
                i += 2
                continue
            if n in "trn":
                out.append({"t": "\t", "r": "\r", "n": "\n"}[n])
                i += 2
                continue
        out.append(c)
        i += 1
    return "".join(out).replace("${literal_dollar}", "$")


def check_lines(lines):
    """Every line is a fixed one or a valued one whose value is one quoted
    string in which "$" appears only as ${literal_dollar}; returns
    {directive: token}."""
    valued = {}
    for ln in lines:
        if ln in FIXED:
            continue
        m = VALUED.fullmatch(ln)
        assert m, f"a line that is not the fragment's: {ln[:200]!r}"
        assert "$" not in m.group(2).replace("${literal_dollar}", ""), ln
        valued[m.group(1)] = m.group(2)
    return valued


HOSTILE = [
    "", "a", 'a"b', '"', '\\', 'a\\', '\\"', "$", "$host", "${host}",
    "${literal_dollar}", "a$", "${", "}", "a;b", "; return 200 hacked;",
    "{", "} server { listen 9999; }", "a\nb", "\n}\n", "a\rb", "a\tb",
    "a\x00b", "\x00", "'single'", "#comment", "a b", "llama-3-8b,$x",
    "\u2028", "\u00e9t\u00e9", "\U0001f600", "\x7f", "\\x41",
    "x" * 65536, "$" * 4096, '"' * 3000, "llama-3-8b;" * 400,
    '"; } } http { #',
]

HOSTILE_IDS = [repr(v[:12]) + (f"..{len(v)}" if len(v) > 12 else "")
               for v in HOSTILE]


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
    assert lines == (["infer_auth on;"] if value else [])


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
        "infer_auth on;",
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
