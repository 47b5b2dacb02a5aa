"""Reload is a normal event: ingress controllers reload nginx on every
change.  With every module configured with what lives from one reload to
the next (a PEM key, a JWKS file and an API key file followed by timers, a
model registry file, a balanced pool with its zone, the limit and metrics
zones), fifty reloads under load, with glibc told to fill freed memory
with garbage (MALLOC_PERTURB_), leave the master alive, no worker dead on
a signal, and every request answered: a pool or key set that logs to the
old cycle's freed log, or a timer that outlives its configuration, shows
here as a crash."""

import json
import os
import threading
import time

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwcrypto import jwk

from harness.nginx import REPO, nginx_version
from harness.ports import free_port

# fewer under valgrind (make test's second pass), where each is slower
RELOADS = int(os.environ.get("INFER_RELOADS", "50"))
API_KEY = "sk-ngx-infer-test-key-0001"  # its hash is in t/data/api-keys.json


@pytest.fixture(scope="module")
def key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def files(tmp_path, key):
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM,
        serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "pub.pem").write_bytes(pub)
    j = json.loads(jwk.JWK.from_pem(pub).export_public())
    j["kid"] = "k1"
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [j]}))
    (tmp_path / "models.json").write_text(json.dumps(
        [{"name": "llama-3-8b", "upstream": "pool", "aliases": ["llama"]}]))


def conf(tmp_path, backend_port):
    # The backend is a server of the nginx that reloads: its quitting
    # workers close their idle connections, and a POST sent on one of them
    # just then is a 502 (nginx retries no POST).  Since nginx 1.29.7 an
    # upstream keeps connections alive unless told not to.
    no_keepalive = "keepalive 0;" if nginx_version() >= (1, 29, 7) else ""
    return f"""
    upstream pool {{
        zone pool 64k;
        server 127.0.0.1:{backend_port};
        infer_balance least_tokens prefix_affinity;
        {no_keepalive}
    }}
    infer_model_registry {tmp_path}/models.json interval=100ms;
    infer_ratelimit_zone limits:1m;
    infer_ratelimit_limit per_tenant $infer_tenant requests=100000/m;
    infer_metrics_zone metrics 1m;

    server {{
        listen 127.0.0.1:{backend_port};
        location / {{ return 200 "ok"; }}
    }}

    server {{
        listen 127.0.0.1:{{port}};
        infer_route on;
        infer_auth on;
        infer_auth_jwt_key {tmp_path}/pub.pem kid=pem;
        infer_auth_jwks {tmp_path}/jwks.json interval=100ms;
        infer_auth_api_keys {REPO}/t/data/api-keys.json interval=100ms;
        infer_ratelimit on;
        infer_metrics on;
        location / {{ proxy_pass http://$infer_upstream; }}
        location = /metrics {{
            infer_route off; infer_auth off; infer_ratelimit off;
            infer_metrics_export;
        }}
    }}"""


@pytest.mark.timeout(600)
def test_fifty_reloads_under_load_with_a_perturbing_allocator(
        nginx_factory, tmp_path, key, monkeypatch):
    files(tmp_path, key)
    monkeypatch.setenv("MALLOC_PERTURB_", "255")
    n = nginx_factory(conf(tmp_path, free_port()))

    now = int(time.time())
    token = jwt.encode({"sub": "u", "tenant": "acme", "iat": now,
                        "exp": now + 600}, key, algorithm="RS256",
                       headers={"kid": "k1"})
    credentials = ["Bearer " + token, "Bearer " + API_KEY]
    body = {"model": "llama", "messages": [{"role": "user", "content": "hi"}]}

    answers, failures = [], []
    stop = threading.Event()

    def load(i):
        s = requests.Session()
        deadline = time.monotonic() + 300
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                r = s.post(n.url + "/v1/chat/completions", json=body,
                           timeout=10,
                           headers={"authorization": credentials[i % 2]})
                answers.append(r.status_code)
            except requests.RequestException as e:
                failures.append(repr(e))
                s = requests.Session()

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(RELOADS):
            if i % 10 == 5:
                # a file each timer follows changes between reloads
                (tmp_path / "models.json").write_text(json.dumps(
                    [{"name": "llama-3-8b", "upstream": "pool",
                      "aliases": ["llama", f"l{i}"]}]))
            n.reload()
            assert n.proc.poll() is None, "the master died"
    finally:
        stop.set()
        for t in threads:
            t.join(30)

    assert n.proc.poll() is None, "the master died"
    assert not n.log_problems(), n.log_problems()
    assert answers and set(answers) == {200}, sorted(set(answers))
    # a connection a quitting worker closed between two requests is a
    # client's retry, not a lost request; nothing else may fail
    assert all("RemoteDisconnected" in f or "ConnectionReset" in f
               or "Connection aborted" in f for f in failures), failures[:5]
    assert len(failures) <= RELOADS * len(threads), len(failures)
    r = requests.get(n.url + "/metrics", timeout=5)
    assert r.status_code == 200 and "infer_requests_total" in r.text
