"""The four modules load into Debian's nginx alone and together, in any
load_module order; their enabling directives are checked by nginx -t; and
each runs in the phase the pipeline gives it, whatever the load order."""

import itertools
import re

import pytest
import requests

from harness.nginx import MODULES, REPO

DIRECTIVE = {m: f"infer_{m}" for m in MODULES}

# What turns each module on.  The route module answers 400 to a request
# that names no model, so these requests name one in a header; the auth
# module answers 401 to one without credentials, so they carry an API key
# (t/data/api-keys.json holds its hash).
ENABLE = {m: f"infer_{m} on;" for m in MODULES}
ENABLE["route"] += " infer_model_source header=X-Model;"
ENABLE["auth"] += f" infer_auth_api_keys {REPO}/t/data/api-keys.json;"
ENABLE_ALL = " ".join(ENABLE.values())
MODEL = {"x-model": "some-model",
         "authorization": "Bearer sk-ngx-infer-test-key-0001"}


STATIC = "try_files /ok.txt =404;"


def server(body=STATIC, extra=""):
    return f"""
    server {{
        listen 127.0.0.1:{{port}};
        {extra}
        location / {{ {body} }}
    }}"""


@pytest.mark.parametrize("module", MODULES)
def test_each_module_loads_alone_and_serves(nginx_factory, module):
    n = nginx_factory(ENABLE[module] + server(), modules=[module])
    ok, out = n.check_config()
    assert ok, out
    r = requests.get(n.url + "/", headers=MODEL, timeout=5)
    assert r.status_code == 200 and r.text == "ok"


@pytest.mark.parametrize("order", [MODULES, MODULES[::-1],
                                   ["auth", "metrics", "route", "ratelimit"]],
                         ids=["forward", "reverse", "mixed"])
def test_all_four_load_in_any_order(nginx_factory, order):
    n = nginx_factory(ENABLE_ALL + server(), modules=order)
    ok, out = n.check_config()
    assert ok, out
    for _ in range(4):
        r = requests.get(n.url + "/", headers=MODEL, timeout=5)
        assert r.status_code == 200 and r.text == "ok"


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("conf,message", [
    ("{d} maybe;", 'invalid value "maybe" in "{d}" directive, it must be "on" or "off"'),
    ("{d} on on;", 'invalid number of arguments in "{d}" directive'),
    ("{d};", 'invalid number of arguments in "{d}" directive'),
    ("{d} on; {d} off;", '"{d}" directive is duplicate'),
], ids=["bad-value", "two-args", "no-arg", "duplicate"])
def test_directive_mistakes_are_caught_by_nginx_t(nginx_factory, module, conf,
                                                  message):
    d = DIRECTIVE[module]
    n = nginx_factory(conf.format(d=d) + server(), start=False)
    ok, out = n.check_config()
    assert not ok
    if module == "auth" and conf == "{d} maybe;":
        # on, off, required (docs/auth.md): nginx's enum slot says less
        message = 'invalid value "maybe"'
    assert message.format(d=d) in out, out


@pytest.mark.parametrize("module", MODULES)
def test_directive_outside_http_is_refused(nginx_factory, module):
    d = DIRECTIVE[module]
    n = nginx_factory(server(), main=f"{d} on;", start=False)
    ok, out = n.check_config()
    assert not ok
    assert f'"{d}" directive is not allowed here' in out, out


@pytest.mark.parametrize("module", MODULES)
def test_directive_needs_its_module(nginx_factory, module):
    others = [m for m in MODULES if m != module]
    d = DIRECTIVE[module]
    n = nginx_factory(f"{d} on;" + server(), modules=others, start=False)
    ok, out = n.check_config()
    assert not ok
    assert f'unknown directive "{d}"' in out, out


# Each handler logs one debug line when it runs ("infer <module> <phase>
# handler"); Debian's nginx is built --with-debug.

HANDLER_LINE = re.compile(r"\*(\d+) infer (\w+) (\w+) handler")
EXPECTED_PHASES = [("route", "preaccess"), ("auth", "access"),
                   ("ratelimit", "precontent"), ("metrics", "log")]


def handler_runs(n, path):
    """(module, phase) in the order they ran for the one request to path."""
    requests.get(n.url + path, headers=MODEL, timeout=5)
    n.stop()  # flushes and closes the log
    text = n.log_text()
    conn = None
    for line in text.splitlines():
        if f'"GET {path} HTTP/1.1"' in line or f"http uri: \"{path}\"" in line:
            m = re.search(r"\*(\d+) ", line)
            conn = m and m.group(1)
            break
    assert conn, text[-2000:]
    return [(m.group(2), m.group(3)) for m in HANDLER_LINE.finditer(text)
            if m.group(1) == conn]


@pytest.mark.parametrize("order", list(itertools.permutations(MODULES))[::5],
                         ids="-".join)
@pytest.mark.debug_log
def test_each_module_runs_in_its_own_phase_whatever_the_load_order(
        nginx_factory, order):
    n = nginx_factory(ENABLE_ALL + server(), modules=order,
                      error_level="debug")
    assert handler_runs(n, "/phase") == EXPECTED_PHASES


@pytest.mark.debug_log
def test_off_in_a_location_turns_a_module_off_there(nginx_factory):
    http = ENABLE_ALL + f"""
    server {{
        listen 127.0.0.1:{{port}};
        location / {{ {STATIC} }}
        location /quiet {{ infer_route off; infer_metrics off; {STATIC} }}
    }}"""
    n = nginx_factory(http, error_level="debug")
    assert handler_runs(n, "/quiet") == [("auth", "access"),
                                         ("ratelimit", "precontent")]


@pytest.mark.debug_log
def test_modules_are_off_unless_enabled(nginx_factory):
    n = nginx_factory(server(), error_level="debug")
    assert handler_runs(n, "/idle") == []


def test_reload_keeps_serving(nginx_factory):
    n = nginx_factory(ENABLE_ALL + server())
    for _ in range(3):
        n.reload()
        r = requests.get(n.url + "/", headers=MODEL, timeout=5)
        assert r.status_code == 200 and r.text == "ok"
