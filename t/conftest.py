"""Fixtures shared by every test: a real nginx with the built modules,
a real redis-server, simulated model servers, and the official OpenAI SDK
as a client.  Every nginx a test started has its error log checked when
the test ends: an [alert], an [emerg] or a worker that exited on a signal
fails the test."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.nginx import MODULES, Nginx, has_debug, module_path
from harness.redis import RedisServer

REPO = Path(__file__).resolve().parents[1]
NODE_DIR = REPO / "t" / "node"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "debug_log: reads nginx's debug log, so needs an nginx "
        "built --with-debug (skipped on one without)")


def pytest_collection_modifyitems(config, items):
    if has_debug():
        return
    skip = pytest.mark.skip(reason="this nginx is built without --with-debug "
                            "(nginx.org's nginx-debug binary has it)")
    for item in items:
        if "debug_log" in item.keywords:
            item.add_marker(skip)


def pytest_sessionstart(session):
    missing = [str(module_path(m)) for m in MODULES
               if not module_path(m).exists()]
    if missing:
        pytest.exit("modules not built (run 'make'): " + ", ".join(missing),
                    returncode=2)


@pytest.fixture
def nginx_factory(tmp_path):
    """make(http=..., modules=..., start=True) -> a running Nginx."""
    made = []

    def make(http="", start=True, name=None, **kw):
        n = Nginx(tmp_path / (name or f"nginx{len(made)}"), http=http, **kw)
        made.append(n)
        if start:
            n.start()
        return n

    yield make

    problems = []
    for n in made:
        started = n.proc is not None
        n.stop()
        if started:
            problems += n.log_problems()
    if problems:
        pytest.fail("nginx error log:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    r = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield r
    r.stop()


@pytest.fixture
def redis(redis_server):
    """The session's redis-server, emptied for this test."""
    redis_server.client().flushall()
    return redis_server


@pytest.fixture
def own_redis(tmp_path):
    """make(port=None, extra_args=()) -> a redis-server of the test's own,
    to stop, pause and restart."""
    made = []

    def make(port=None, extra_args=()):
        r = RedisServer(tmp_path / f"redis{len(made)}", port=port,
                        extra_args=extra_args).start()
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()


@pytest.fixture
def sim_factory(tmp_path):
    """make(model, replica, **options) -> a running simulated replica."""
    made = []

    from harness.simproc import SimProcess

    def make(model="llama-3-8b", replica=None, **opts):
        replica = replica or f"{model}-{len(made)}"
        s = SimProcess(model, replica, tmp_path / f"sim-{replica}", **opts)
        made.append(s)
        s.start()
        return s

    yield make
    for s in made:
        s.stop()
    problems = [f"{s.replica}: {line}" for s in made
                if not s.opts.get("access_log")
                for line in s.log_text().splitlines()
                if not line.startswith("infer_sim listening on")]
    if problems:
        # a traceback or an asyncio warning: the simulator misbehaved
        pytest.fail("simulator log:\n" + "\n".join(problems), pytrace=False)


def _have_openai_sdk():
    return shutil.which("node") and (NODE_DIR / "node_modules" / "openai").is_dir()


@pytest.fixture
def openai_sdk():
    """call(base_url, op, params, api_key=..., **extra) -> the JSON line
    printed by t/node/openai_client.js (the official SDK as a client)."""
    if not _have_openai_sdk():
        pytest.skip("node or the openai npm package is missing (make deps)")

    def call(base_url, op, params=None, api_key="sk-test", **extra):
        req = {"op": op, "api_key": api_key, "params": params or {},
               "max_retries": 0, "timeout_ms": 10000, **extra}
        r = subprocess.run(["node", str(NODE_DIR / "openai_client.js"),
                            base_url, json.dumps(req)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])

    return call
