"""ngx_infer_route: models from a registry file (infer_model_registry).

The file (a JSON array of models, or {"models": [...]}, as a Kubernetes
ConfigMap would carry it) joins the models of infer_model; nginx -t
refuses a file that does not make a valid registry, naming the file and
the problem.  At run time each worker reads the file again when it
changes, without a reload of nginx: a good file replaces the registry in
every worker, a broken one keeps the last good registry and is reported
once, and a request that started before the change finishes on the
registry it started with."""

import http.client
import json
import os
import re
import time

import pytest
import requests

from harness.openai import chat, error_of

CHAT = {"messages": [{"role": "user", "content": "Hello there"}]}

PROXY = """proxy_pass http://$infer_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            add_header X-Pid $pid always;
            add_header X-Model-Target $infer_model_target always;
            add_header X-Upstream $infer_upstream always;"""

INTERVAL = 1.0          # interval=1s in the configurations below


def write_registry(path, models):
    """As Kubernetes updates a mounted ConfigMap: a new file renamed over
    the old one, so that nginx never reads half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(models if isinstance(models, str) else json.dumps(models))
    os.replace(tmp, path)


def registry_conf(path, pa, pb, models="", extra=""):
    # reuseport: each worker has its own socket and the kernel spreads the
    # connections over them, so that both workers answer the tests
    return f"""
    upstream pa {{ server {pa.addr}; keepalive 8; }}
    upstream pb {{ server {pb.addr}; keepalive 8; }}
    {models}
    infer_model_registry {path} interval=1s;
    {extra}
    server {{
        listen 127.0.0.1:{{port}} reuseport;
        infer_route on;
        location / {{ {PROXY} }}
        location /v1/models {{
            infer_route off;
            add_header X-Pid $pid always;
            infer_model_list;
        }}
    }}"""


@pytest.fixture
def pools(sim_factory):
    return (sim_factory("a", "sim-a", ttft_ms=1, tpot_ms=1),
            sim_factory("b", "sim-b", ttft_ms=1, tpot_ms=1))


@pytest.fixture
def reg(tmp_path):
    return tmp_path / "models.json"


def listed(gw):
    r = requests.get(gw.url + "/v1/models", timeout=10)
    assert r.status_code == 200
    return int(r.headers.get("x-pid", 0)), r.json()["data"]


def every_worker(gw, ask, want, timeout=15):
    """Asks on new connections until every worker gave an answer that
    want() accepts; a worker that switched to a new registry does not
    switch back.  Returns the pids that did, to compare with the
    workers."""
    pids = set(gw.worker_pids())
    good = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not pids <= good:
        r = ask()
        if want(r):
            good.add(int(r.headers["x-pid"]))
        else:
            time.sleep(0.05)
    return good


def routes_to(replica):
    return lambda r: (r.status_code == 200
                      and r.headers.get("x-sim-replica") == replica)


def registry_errors(gw):
    return [l for l in gw.log_text().splitlines()
            if "[error]" in l and "infer_model_registry" in l]


# ------------------------------------------------------------------ routing

def test_models_from_the_file_route_with_those_of_infer_model(
        nginx_factory, pools, reg):
    write_registry(reg, [
        {"name": "b-1", "upstream": "pb", "aliases": ["bee", "b1"],
         "model": "served-b"},
        {"name": "split", "targets": [
            {"upstream": "pa", "weight": 3},
            {"upstream": "pb", "weight": 1, "model": "split-canary"}]},
        {"name": "family", "upstream": "pb", "pattern": "^fam-[0-9]+$"},
        {"name": "old", "upstream": "pa", "state": "deprecated"},
        {"name": "off", "upstream": "pa", "state": "disabled"},
        {"name": "tiny", "upstream": "pa", "max_body_size": "100"},
        {"name": "tiny2", "upstream": "pa", "max_body_size": 100},
        {"name": "a-2", "upstream": "pa", "fallback": "a-1"},
    ])
    gw = nginx_factory(registry_conf(reg, *pools, models="""
    infer_model a-1 upstream=pa alias=ay fallback=b-1;"""),
                       modules=["route"])

    r = chat(gw, "ay")
    assert r.status_code == 200
    assert r.headers["x-sim-replica"] == "sim-a"
    assert r.headers["x-model-target"] == "a-1"

    r = chat(gw, "bee")
    assert r.status_code == 200
    assert r.headers["x-sim-replica"] == "sim-b"
    assert r.headers["x-upstream"] == "pb"
    # model: the id the backend is asked for
    assert r.headers["x-model-target"] == "served-b"

    # a split from the file keeps its weights: 3 to 1 in each worker's
    # rounds of 4, whatever the share of each worker
    seen = [chat(gw, "split") for _ in range(80)]
    assert abs([r.headers["x-sim-replica"] for r in seen].count("sim-b")
               - 20) <= 2
    assert {r.headers["x-model-target"] for r in seen} == {"split",
                                                          "split-canary"}

    r = chat(gw, "fam-42")
    assert r.headers["x-sim-replica"] == "sim-b"
    assert r.headers["x-model-target"] == "fam-42"
    assert chat(gw, "fam-x").status_code == 404

    r = chat(gw, "old")
    assert r.status_code == 200 and r.headers["deprecation"] == "true"

    r = chat(gw, "off")
    assert r.status_code == 404 and error_of(r)["code"] == "model_disabled"

    for name in ("tiny", "tiny2"):
        r = chat(gw, name, pad="x" * 200)
        assert r.status_code == 413
        assert error_of(r)["code"] == "request_too_large"

    _, data = listed(gw)
    # infer_model first, then the file, in its order; disabled left out
    assert [m["id"] for m in data] == ["a-1", "b-1", "split", "family",
                                       "old", "tiny", "tiny2", "a-2"]
    assert "infer_model_registry" not in gw.log_text()


def test_the_file_alone_makes_a_registry_even_when_empty(nginx_factory,
                                                         pools, reg):
    write_registry(reg, {"models": [{"name": "b-1", "upstream": "pb"}]})
    gw = nginx_factory(registry_conf(reg, *pools), modules=["route"])
    assert chat(gw, "b-1").headers["x-sim-replica"] == "sim-b"
    r = chat(gw, "nope")
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"

    # no model left: still a registry, so unknown models are 404, not
    # passed through with an empty $infer_upstream
    write_registry(reg, {"models": []})
    gone = every_worker(gw, lambda: chat(gw, "b-1"),
                        lambda r: r.status_code == 404)
    assert gone == set(gw.worker_pids())
    assert listed(gw)[1] == []


def test_a_fallback_in_mixed_case_is_found(nginx_factory, pools, reg):
    """A file's fallback naming a model in upper or mixed case, of the
    file or of infer_model, is that model (refused before as "not a
    declared model": found by the registry fuzzer)."""
    write_registry(reg, [
        {"name": "Big-B", "upstream": "pb", "fallback": "A-1"},
        {"name": "small", "upstream": "pa", "fallback": "Big-B"}])
    gw = nginx_factory(registry_conf(reg, *pools, models="""
    infer_model A-1 upstream=pa;"""), modules=["route"])
    assert [m["id"] for m in listed(gw)[1]] == ["A-1", "Big-B", "small"]
    assert chat(gw, "small").headers["x-sim-replica"] == "sim-a"
    assert "infer_model_registry" not in gw.log_text()

    write_registry(reg, [{"name": "Big-B", "upstream": "pb",
                          "fallback": "a-1"}])
    n = nginx_factory(registry_conf(reg, *pools, models="""
    infer_model A-1 upstream=pa;"""), modules=["route"], start=False)
    ok, out = n.check_config()
    assert not ok
    assert 'fallback "a-1" is not a declared model' in out, out


# ------------------------------------------------------------- nginx -t

BROKEN = [
    ('[{"name": "x", "upstream": "pa"}', "invalid JSON at line 1"),
    ('{"name": "x", "upstream": "pa"}', 'unknown key "name"'),
    ('{"models": {"x": {"upstream": "pa"}}}',
     'the file must hold a JSON array of models, or an object with a '
     '"models" array'),
    ('[{"name": "x", "upstream": "pa", "upsteam": "pb"}]',
     'model #1 ("x"): unknown key "upsteam"'),
    ('[{"name": "x", "upstream": "pa"}, {"name": "foo", "upstream": "bar"}]',
     'model #2 ("foo"): no upstream "bar" is defined'),
    ('[{"name": "x", "targets": [{"upstream": "pa"}, {"upstream": "no"}]}]',
     'model #1 ("x"): no upstream "no" is defined'),
    ('[{"name": "a-1", "upstream": "pb"}]',
     'model #1 ("a-1"): name or alias "a-1" is declared twice'),
    ('[{"name": "x", "upstream": "pb", "aliases": ["ay"]}]',
     'model #1 ("x"): name or alias "ay" is declared twice'),
    ('[{"name": "x", "upstream": "pb"}, {"name": "y", "upstream": "pb",'
     ' "aliases": ["x"]}]',
     'model #2 ("y"): name or alias "x" is declared twice'),
    ('[{"name": "x", "upstream": "pa", "fallback": "y"},'
     ' {"name": "y", "upstream": "pb", "fallback": "x"}]',
     'model #1 ("x"): its fallback chain comes back to it'),
    ('[{"name": "x", "upstream": "pa", "fallback": "nope"}]',
     'model #1 ("x"): fallback "nope" is not a declared model'),
    ('[{"name": "x", "upstream": "pa", "sticky": "$http_x_user"}]',
     'model #1 ("x"): "sticky" is not supported in a registry file'),
    ('[{"name": "x", "upstream": "pa"}, {"upstream": "pa"}]',
     'model #2: no "name"'),
    ('[{"name": "x\\ny", "upstream": "pa"}]',
     'model #1: "name" must be a string of 1 to 256 bytes'),
    ('[{"name": "' + "n" * 257 + '", "upstream": "pa"}]',
     'model #1: "name" must be a string of 1 to 256 bytes'),
    ('[{"name": "x"}]', 'model #1 ("x"): has no upstream'),
    ('[{"name": "x", "upstream": "pa", "targets": [{"upstream": "pb"}]}]',
     'model #1 ("x"): has both "upstream" and "targets"'),
    ('[{"name": "x", "targets": [{"upstream": "pa", "weight": 0}]}]',
     'model #1 ("x"): target #1: "weight" must be a whole number'),
    ('[{"name": "x", "targets": [{"upstream": "pa", "wieght": 2}]}]',
     'model #1 ("x"): target #1: unknown key "wieght"'),
    ('[{"name": "x", "upstream": "pa", "state": "retired"}]',
     'model #1 ("x"): "state" must be "active", "deprecated" or "disabled"'),
    ('[{"name": "x", "upstream": "pa", "max_body_size": "lots"}]',
     'model #1 ("x"): "max_body_size" must be a number of bytes'),
    ('[{"name": "x", "upstream": "pa", "pattern": "("}]',
     'model #1 ("x"): invalid pattern'),
    ('[{"name": "x", "upstream": "pa", "aliases": "y"}]',
     'model #1 ("x"): "aliases" must be an array of names'),
    ('[{"name": "x", "upstream": "pa", "aliases": [""]}]',
     'model #1 ("x"): "aliases": a name must have 1 to 256 bytes'),
    ('[{"name": "x", "upstream": "pa", "aliases": [7]}]',
     'model #1 ("x"): "aliases": a name must be a string'),
    ('[{"name": "x", "upstream": "pa", "alias": "y"}]',
     'model #1 ("x"): unknown key "alias"'),
    ('[{"name": "x", "upstream": "pa", "name": "y"}]',
     "invalid JSON at line 1"),
    ('[{"name": "x", "upstream": 7}]',
     'model #1 ("x"): "upstream" must be a non-empty string'),
    ("[1]", "model #1: not a JSON object"),
    ("", "invalid JSON"),
]


@pytest.mark.parametrize("text,message", BROKEN, ids=[
    "bad-json", "object-without-models", "not-a-list", "unknown-key",
    "no-upstream-block", "no-target-upstream-block", "dup-infer-model",
    "dup-alias-of-infer-model", "dup-in-file", "fallback-loop",
    "fallback-unknown", "sticky", "no-name", "control-char-name",
    "long-name", "no-upstream", "upstream-and-targets", "zero-weight",
    "target-unknown-key", "bad-state", "bad-size", "bad-pattern",
    "aliases-not-list", "empty-alias", "alias-not-string",
    "alias-is-not-a-file-key", "dup-key", "upstream-not-string",
    "not-an-object", "empty-file"])
def test_nginx_t_refuses_a_broken_file(nginx_factory, pools, reg, text,
                                       message):
    write_registry(reg, text)
    n = nginx_factory(registry_conf(reg, *pools, models="""
    infer_model a-1 upstream=pa alias=ay;"""), modules=["route"],
                      start=False)
    ok, out = n.check_config()
    assert not ok
    assert f'[emerg] infer_model_registry "{reg}": {message}' in out, out


def test_nginx_t_names_a_missing_file_and_bad_parameters(nginx_factory,
                                                         pools, reg):
    n = nginx_factory(registry_conf(reg, *pools), modules=["route"],
                      start=False)
    ok, out = n.check_config()
    assert not ok
    assert (f'infer_model_registry "{reg}": open() failed '
            f'(2: No such file or directory)') in out, out

    write_registry(reg, [])
    conf = registry_conf(reg, *pools)
    for bad, message in [
            ("interval=never", 'invalid parameter "interval=never"'),
            ("interval=0", 'invalid parameter "interval=0"'),
            ("every=1s", 'invalid parameter "every=1s"')]:
        n.http = conf.replace("interval=1s", bad)
        ok, out = n.check_config()
        assert not ok and message in out, out

    n.http = conf + f"\n    infer_model_registry {reg};"
    ok, out = n.check_config()
    assert not ok and '"infer_model_registry" directive is duplicate' in out

    # a directive model may fall back to a model of the file, and back
    write_registry(reg, [{"name": "x", "upstream": "pb",
                          "fallback": "a-1"}])
    n.http = registry_conf(reg, *pools, models="""
    infer_model a-1 upstream=pa fallback=x;""")
    ok, out = n.check_config()
    assert not ok
    assert (f'infer_model_registry "{reg}": model "a-1": its fallback '
            f'chain comes back to it') in out, out

    # a relative path is relative to the configuration's directory
    write_registry(n.workdir / "rel.json", [{"name": "x", "upstream": "pb"}])
    n.http = registry_conf("rel.json", *pools)
    ok, out = n.check_config()
    assert ok, out


# ------------------------------------------------------------ hot reload

def test_a_changed_file_reaches_every_worker_without_a_reload(
        nginx_factory, pools, reg):
    write_registry(reg, [{"name": "x", "upstream": "pa"}])
    gw = nginx_factory(registry_conf(reg, *pools, models="""
    infer_model a-1 upstream=pa;"""), modules=["route"])
    workers = set(gw.worker_pids())
    assert len(workers) == 2

    assert every_worker(gw, lambda: chat(gw, "x"),
                        routes_to("sim-a")) == workers
    assert chat(gw, "y").status_code == 404

    # x moves to the other pool, y is new
    write_registry(reg, [{"name": "x", "upstream": "pb"},
                         {"name": "y", "upstream": "pa", "aliases": ["why"],
                          "fallback": "a-1"}])
    assert every_worker(gw, lambda: chat(gw, "x"),
                        routes_to("sim-b")) == workers
    assert every_worker(gw, lambda: chat(gw, "why"),
                        routes_to("sim-a")) == workers
    assert set(gw.worker_pids()) == workers          # no reload
    assert chat(gw, "a-1").headers["x-sim-replica"] == "sim-a"

    # a change in place (same inode, same size: a new mtime) is seen too
    with open(reg, "r+") as f:
        text = f.read().replace('"pb"', '"pa"', 1)
        f.seek(0)
        f.write(text)
    assert every_worker(gw, lambda: chat(gw, "x"),
                        routes_to("sim-a")) == workers

    # worker 0 says so, once per change
    loaded = [l for l in gw.log_text().splitlines()
              if f'infer_model_registry "{reg}": 3 models loaded' in l]
    assert len(loaded) == 2 and all("[notice]" in l for l in loaded)
    assert registry_errors(gw) == []


def test_a_broken_file_keeps_the_last_good_registry_and_is_told_once(
        nginx_factory, pools, reg):
    write_registry(reg, [{"name": "x", "upstream": "pa"}])
    gw = nginx_factory(registry_conf(reg, *pools), modules=["route"])
    workers = set(gw.worker_pids())

    write_registry(reg, [{"name": "x", "upsteam": "pb"},
                         {"name": "y", "upstream": "pb"}])
    time.sleep(3.5 * INTERVAL)       # each worker checked three times

    for _ in range(20):
        assert chat(gw, "x").headers["x-sim-replica"] == "sim-a"
        assert chat(gw, "y").status_code == 404
    errors = registry_errors(gw)
    assert len(errors) == 1, errors
    assert re.search(
        r'\[error\] .*infer_model_registry "%s": model #1 \("x"\): unknown '
        r'key "upsteam", keeping the registry loaded at '
        r'\d{4}/\d\d/\d\d \d\d:\d\d:\d\d$' % re.escape(str(reg)),
        errors[0]), errors[0]

    # a file gone is one more failure, told once too
    reg.unlink()
    time.sleep(2.5 * INTERVAL)
    errors = registry_errors(gw)
    assert len(errors) == 2, errors
    assert ('stat() failed (2: No such file or directory), keeping the '
            'registry loaded at') in errors[1]
    assert chat(gw, "x").headers["x-sim-replica"] == "sim-a"

    # fixed: picked up, and nothing more is told
    write_registry(reg, [{"name": "x", "upstream": "pb"},
                         {"name": "y", "upstream": "pb"}])
    assert every_worker(gw, lambda: chat(gw, "y"),
                        routes_to("sim-b")) == workers
    assert every_worker(gw, lambda: chat(gw, "x"),
                        routes_to("sim-b")) == workers
    assert len(registry_errors(gw)) == 2


@pytest.mark.debug_log
def test_a_request_in_flight_finishes_on_its_registry(nginx_factory, pools,
                                                      reg, tmp_path):
    """The registry a request resolved its model in is freed when the
    request is, not when a newer one replaces it."""
    log = tmp_path / "models.log"
    write_registry(reg, [{"name": "x", "upstream": "pa", "model": "x-old"}])
    gw = nginx_factory(registry_conf(reg, *pools, extra=f"""
    log_format reg '$http_x_tag $infer_model $infer_upstream '
                   '$infer_model_target $status';
    access_log {log} reg;"""), modules=["route"], error_level="debug")
    workers = set(gw.worker_pids())

    # a registry of 2 models, loaded at run time (the configuration's own
    # is never freed)
    write_registry(reg, [{"name": "x", "upstream": "pa", "model": "x-old"},
                         {"name": "w", "upstream": "pb"}])
    assert every_worker(gw, lambda: chat(gw, "w"),
                        routes_to("sim-b")) == workers

    # 40 tokens, 100 ms apart: 4 s, over several checks of the file
    c = http.client.HTTPConnection(gw.host, gw.port, timeout=20)
    c.request("POST", "/v1/chat/completions",
              json.dumps(dict(CHAT, model="x", stream=True, max_tokens=40)),
              {"content-type": "application/json", "x-sim-tpot-ms": "100",
               "x-tag": "stream"})
    r = c.getresponse()
    assert r.status == 200
    assert r.getheader("x-sim-replica") == "sim-a"
    pid = int(r.getheader("x-pid"))
    first = r.readline()
    assert first.startswith(b"data: ")

    # x now means the other pool: a registry of 3 models
    write_registry(reg, [{"name": "z", "upstream": "pa"},
                         {"name": "x", "upstream": "pb", "fallback": "z"},
                         {"name": "w", "upstream": "pb"}])
    assert every_worker(gw, lambda: chat(gw, "x"),
                        routes_to("sim-b")) == workers

    freed = re.compile(r"\[debug\] %d#\d+: .*infer route: registry of 2 "
                       r"models freed" % pid)
    assert not freed.search(gw.log_text())

    rest = r.read().decode()
    assert rest.rstrip().endswith("data: [DONE]")
    chunks = [json.loads(l[6:]) for l in (first.decode() + rest).splitlines()
              if l.startswith("data: {")]
    assert len([ch for ch in chunks if ch["choices"]]) >= 40
    c.close()

    # freed once the request is, and its log line (written at its end)
    # still names what it used
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not freed.search(gw.log_text()):
        time.sleep(0.05)
    assert freed.search(gw.log_text())
    lines = log.read_text().splitlines()
    assert "stream x pa x-old 200" in lines, lines
    assert "- x pb x 200" in lines


def test_a_reload_reads_the_file_and_the_timer_does_not_hold_it(
        nginx_factory, pools, reg):
    write_registry(reg, [{"name": "x", "upstream": "pa"}])
    gw = nginx_factory(registry_conf(reg, *pools).replace("interval=1s",
                                                          "interval=60s"),
                       modules=["route"])
    assert chat(gw, "x").headers["x-sim-replica"] == "sim-a"

    # checked once a minute: not seen yet
    write_registry(reg, [{"name": "x", "upstream": "pb"}])
    assert chat(gw, "x").headers["x-sim-replica"] == "sim-a"

    # nginx -s reload reads it; the old workers, idle, leave at once: the
    # timer does not keep them
    start = time.monotonic()
    gw.reload(timeout=10)
    assert time.monotonic() - start < 5
    assert every_worker(gw, lambda: chat(gw, "x"),
                        routes_to("sim-b")) == set(gw.worker_pids())


# -------------------------------------------------------------- /v1/models

def test_v1_models_follows_the_file(nginx_factory, pools, reg):
    write_registry(reg, [{"name": "x", "upstream": "pa"}])
    gw = nginx_factory(registry_conf(reg, *pools, models="""
    infer_model a-1 upstream=pa;"""), modules=["route"])
    workers = set(gw.worker_pids())
    _, before = listed(gw)
    assert [m["id"] for m in before] == ["a-1", "x"]

    time.sleep(1.1)                  # a load time of its own
    write_registry(reg, {"models": [
        {"name": "y", "upstream": "pb"},
        {"name": "gone", "upstream": "pb", "state": "disabled"},
        {"name": "x", "upstream": "pb", "aliases": ["ex"]}]})

    assert every_worker(
        gw, lambda: requests.get(gw.url + "/v1/models", timeout=10),
        lambda r: [m["id"] for m in r.json()["data"]] == ["a-1", "y", "x"]
    ) == workers
    _, after = listed(gw)
    assert after[0]["created"] > before[0]["created"]

    one = requests.get(gw.url + "/v1/models/y", timeout=10)
    assert one.status_code == 200 and one.json()["id"] == "y"
    r = requests.get(gw.url + "/v1/models/gone", timeout=10)
    assert r.status_code == 404
