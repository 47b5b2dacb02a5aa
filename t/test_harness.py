"""The harness itself: what it promises the other tests."""

import os
import signal
import time

import pytest
import requests


def test_a_worker_crash_is_caught_by_the_log_check(nginx_factory):
    n = nginx_factory("""
    server { listen 127.0.0.1:{port}; location / { return 200 'ok'; } }""")
    victim = n.worker_pids()[0]
    os.kill(victim, signal.SIGSEGV)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not n.log_problems():
        time.sleep(0.05)
    assert any("exited on signal 11" in l for l in n.log_problems())
    # the master replaced the worker; forget the crash we caused on purpose
    assert requests.get(n.url + "/", timeout=5).text == "ok"
    n.forget_log()


def test_two_workers_are_running(nginx_factory):
    n = nginx_factory("""
    server { listen 127.0.0.1:{port}; location / { return 200 'ok'; } }""")
    assert len(n.worker_pids()) == 2


def test_redis_is_real_and_empty(redis):
    c = redis.client()
    assert c.ping()
    assert c.dbsize() == 0
    c.set("k", "v")
    assert c.get("k") == "v"
