"""`make run`'s demo: it answers a chat completion from a llama-3-8b
replica through the gateway, and stops everything it started on SIGTERM."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis
import requests

from harness.openai import error_of
from harness.ports import free_port

REPO = Path(__file__).resolve().parents[1]

# the demo's keys, as it prints them
ACME = {"authorization": "Bearer sk-demo-acme-0123456789abcdef"}
GLOBEX = {"x-api-key": "sk-demo-globex-0123456789abcdef"}


def test_demo_answers_and_stops_cleanly(tmp_path):
    port = free_port()
    env = dict(os.environ, INFER_PORT=str(port), INFER_DEMO_DIR=str(tmp_path))
    p = subprocess.Popen([sys.executable, str(REPO / "examples/demo/run.py")],
                         env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    out = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            out.append(line)
            if line.strip() == "demo ready":
                break
        assert out and out[-1].strip() == "demo ready", "".join(out)
        text = "".join(out)
        assert f"http://127.0.0.1:{port}" in text and "curl" in text
        rhost, rport = re.search(r"Redis (\S+):(\d+)", text).groups()
        assert f"redis-cli -h {rhost} -p {rport} XRANGE infer:usage - + " \
            "COUNT 5" in text
        assert "examples/analytics/README.md" in text

        base = f"http://127.0.0.1:{port}"
        r = requests.post(base + "/v1/chat/completions", timeout=10,
                          headers=ACME, json={
            "model": "llama-3-8b",
            "messages": [{"role": "user", "content": "Hello"}]})
        assert r.status_code == 200
        assert r.json()["model"] == "llama-3-8b"
        assert r.headers["x-sim-replica"].startswith("llama-3-8b-")
        first = r

        r = requests.post(base + "/v1/chat/completions", timeout=10,
                          headers=ACME, json={
            "model": "mistral-7b",
            "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200
        assert r.headers["x-sim-replica"] == "mistral-7b-a"

        r = requests.post(base + "/v1/chat/completions", timeout=10,
                          headers=ACME, json={
            "model": "llama3", "messages": []})
        assert r.headers["x-sim-replica"].startswith("llama-3-8b-")

        r = requests.post(base + "/v1/chat/completions", timeout=10,
                          headers=ACME, json={
            "model": "gpt-nope", "messages": []})
        assert r.status_code == 404
        assert error_of(r)["code"] == "model_not_found"

        # over client_max_body_size: nginx's own 413, in the envelope
        r = requests.post(base + "/v1/chat/completions", timeout=10,
                          data=b"x" * (17 * 1024 * 1024),
                          headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert error_of(r)["code"] == "request_too_large"
        too_large = r

        r = requests.get(base + "/v1/models", timeout=10, headers=ACME)
        assert [m["id"] for m in r.json()["data"]] == ["llama-3-8b",
                                                       "mistral-7b"]

        # globex may use mistral-7b only, and sees only it
        r = requests.get(base + "/v1/models", timeout=10, headers=GLOBEX)
        assert [m["id"] for m in r.json()["data"]] == ["mistral-7b"]
        r = requests.post(base + "/v1/chat/completions", timeout=10,
                          headers=GLOBEX, json={"model": "llama-3-8b",
                                                "messages": []})
        assert r.status_code == 404
        assert error_of(r)["code"] == "model_not_found"

        # no key: 401 with WWW-Authenticate; a token from `make token`
        r = requests.post(base + "/v1/chat/completions", timeout=10,
                          json={"model": "mistral-7b", "messages": []})
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer realm=")
        tok = subprocess.run(
            [sys.executable, str(REPO / "examples/demo/mint_token.py"), "globex"],
            env=env, capture_output=True, text=True, check=True).stdout
        r = requests.post(base + "/v1/chat/completions", timeout=10,
                          headers={"authorization": "Bearer " + tok.strip()},
                          json={"model": "mistral-7b", "messages": [
                              {"role": "user", "content": "Hi"}]})
        assert r.status_code == 200
        assert r.headers["x-sim-replica"] == "mistral-7b-a"

        # a stream: usage is read (asked for) and the log says so
        r = requests.post(base + "/v1/chat/completions", timeout=10,
                          headers=ACME, json={
            "model": "llama-3-8b", "stream": True, "max_tokens": 3,
            "messages": [{"role": "user", "content": "Hi"}]})
        assert r.text.rstrip().endswith("data: [DONE]")
        deadline = time.monotonic() + 5
        log = ""
        while "completion=3 estimated=0" not in log \
                and time.monotonic() < deadline:
            time.sleep(0.05)
            log = (tmp_path / "access.log").read_text()
        assert "completion=3 estimated=0" in log, log

        # globex's plan allows 5 requests a minute: then 429, as OpenAI
        statuses = []
        for _ in range(8):
            r = requests.get(base + "/v1/models", timeout=10, headers=GLOBEX)
            statuses.append(r.status_code)
            if r.status_code == 429:
                break
        assert statuses[-1] == 429, statuses
        assert error_of(r)["code"] == "rate_limit_exceeded"
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["x-ratelimit-limit-requests"] == "5"
        r = requests.get(base + "/v1/models", timeout=10, headers=ACME)
        assert r.status_code == 200
        assert r.headers["x-ratelimit-limit-requests"] == "600"

        # what was sent shows in /metrics, per model and tenant
        from prometheus_client.parser import text_string_to_metric_families
        r = requests.get(base + "/metrics", timeout=10)
        assert r.status_code == 200
        served = {(s.labels.get("model"), s.labels.get("tenant")): s.value
                  for f in text_string_to_metric_families(r.text)
                  for s in f.samples if s.name == "infer_requests_total"
                  and s.labels.get("code") == "2xx"}
        assert served[("llama-3-8b", "acme")] >= 2
        assert served[("mistral-7b", "globex")] >= 1
        assert requests.get(base + "/healthz", timeout=10).status_code == 200
        # ready once Redis answers in the worker asked (each connects when
        # first asked)
        deadline = time.monotonic() + 5
        r = requests.get(base + "/readyz", timeout=10)
        while r.status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
            r = requests.get(base + "/readyz", timeout=10)
        assert r.status_code == 200, r.text

        # llama-3-8b's replicas are balanced and scraped
        deadline = time.monotonic() + 5
        while True:
            pools = requests.get(base + "/balance", timeout=10).json()["pools"]
            ends = {p["upstream"]: p["endpoints"] for p in pools}
            if all(e["fresh"] for e in ends["llama-3-8b"]) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert list(ends) == ["llama-3-8b"], pools
        assert all(e["fresh"] and e["queue"] == 0 for e in ends["llama-3-8b"])
        assert sum(e["picks"] for e in ends["llama-3-8b"]) >= 2

        # a usage event per API request, in the stream it prints, with
        # the cost at the demo's prices (0.15 and 0.6 dollars per million
        # tokens); the 413 too
        c = redis.Redis(host=rhost, port=int(rport), decode_responses=True)
        deadline = time.monotonic() + 5
        while True:
            events = {f["request_id"]: f
                      for _, f in c.xrange("infer:usage")}
            if too_large.headers["x-request-id"] in events \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        e = events[first.headers["x-request-id"]]
        u = first.json()["usage"]
        assert (e["tenant"], e["key_id"], e["model"], e["status"],
                e["stream"]) == ("acme", "acme-demo", "llama-3-8b", "200",
                                 "0")
        assert (int(e["prompt_tokens"]), int(e["completion_tokens"])) == \
            (u["prompt_tokens"], u["completion_tokens"])
        nano = (u["prompt_tokens"] * 150000
                + u["completion_tokens"] * 600000) // 1000
        assert e["cost"] == f"{nano / 1e9:.9f}".rstrip("0").rstrip(".")
        assert events[too_large.headers["x-request-id"]]["status"] == "413"

        master = int((tmp_path / "nginx.pid").read_text())
    finally:
        p.send_signal(signal.SIGTERM)
        rest, _ = p.communicate(timeout=30)

    assert p.returncode == 0, "".join(out) + rest
    # nginx is gone, and nothing listens on the port any more
    time.sleep(0.2)
    assert not Path(f"/proc/{master}").exists()
    try:
        requests.get(f"http://127.0.0.1:{port}/", timeout=1)
        assert False, "something still listens on the demo port"
    except requests.ConnectionError:
        pass
    log = (tmp_path / "error.log").read_text()
    assert "[alert]" not in log and "[emerg]" not in log
