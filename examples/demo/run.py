#!/usr/bin/python3
"""The ngx_infer demo gateway (`make run`).

Starts on loopback: a redis-server, simulated model pools llama-3-8b (two
replicas) and mistral-7b (one replica), and nginx with the four modules,
configured from examples/demo/nginx.conf, on 127.0.0.1:$INFER_PORT (8080).
Prints how to call it, stays in the foreground, and stops everything it
started on Ctrl-C or SIGTERM.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "t"))

from harness.nginx import MODULES_DIR, NGINX_BIN, temp_paths  # noqa: E402
from harness.ports import wait_port  # noqa: E402
from harness.process import stop_process  # noqa: E402
from harness.redis import RedisServer  # noqa: E402
from harness.simproc import SimProcess  # noqa: E402

HERE = Path(__file__).resolve().parent
RUN = Path(os.environ.get("INFER_DEMO_DIR", REPO / "build" / "demo"))
PORT = int(os.environ.get("INFER_PORT", "8080"))


def render(template, values):
    text = template
    for k, v in values.items():
        text = text.replace("{{" + k + "}}", str(v))
    return text


# the demo's API keys (examples/demo/api-keys.json holds their hashes)
KEYS = {"acme": "sk-demo-acme-0123456789abcdef",
        "globex": "sk-demo-globex-0123456789abcdef"}


def demo_jwt_keys(run):
    """The RS256 key pair the demo's tokens are signed with, made once."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = run / "jwt-rs256.pem"
    if private.exists():
        return
    k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (run / "jwt-rs256.pub.pem").write_bytes(k.public_key().public_bytes(
        serialization.Encoding.PEM,
        serialization.PublicFormat.SubjectPublicKeyInfo))
    private.write_bytes(k.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    private.chmod(0o600)


def main():
    RUN.mkdir(parents=True, exist_ok=True)
    started = []
    stopping = False

    def stop(*_):
        nonlocal stopping
        if stopping:
            return
        stopping = True
        print("\nstopping the demo ...", flush=True)
        for p in reversed(started):
            p.stop()
        sys.exit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    try:
        redis = RedisServer(RUN / "redis").start()
        started.append(redis)
        sims = {}
        for model, replica in [("llama-3-8b", "llama-3-8b-a"),
                               ("llama-3-8b", "llama-3-8b-b"),
                               ("mistral-7b", "mistral-7b-a")]:
            s = SimProcess(model, replica, RUN / replica, ttft_ms=80,
                           tpot_ms=25)
            s.start()
            started.append(s)
            sims[replica] = s

        demo_jwt_keys(RUN)

        conf = render((HERE / "nginx.conf").read_text(), {
            "here": HERE,
            "modules": MODULES_DIR,
            "run": RUN,
            "port": PORT,
            "user": "user root;" if os.geteuid() == 0 else "",
            "llama_a": sims["llama-3-8b-a"].addr,
            "llama_b": sims["llama-3-8b-b"].addr,
            "mistral": sims["mistral-7b-a"].addr,
            "redis": redis.addr,
            # one per proxying module the nginx has (ingress-nginx's
            # build has no uwsgi or scgi)
            "temp_paths": "\n".join(temp_paths(RUN)).strip(),
        })
        (RUN / "nginx.conf").write_text(conf)

        nginx = NginxProcess(RUN)
        nginx.start()
        started.append(nginx)
    except Exception as e:  # say what failed, stop what did start
        print(f"demo: {e}", file=sys.stderr)
        for p in reversed(started):
            p.stop()
        sys.exit(1)

    base = f"http://127.0.0.1:{PORT}"
    acme, globex = KEYS["acme"], KEYS["globex"]
    print(f"""
ngx_infer demo gateway: {base}  (nginx, Redis {redis.addr}, 3 simulated GPU replicas)

  Tenants: acme may use every model (API key {acme}; plan pro: 600 requests
           and 200,000 tokens a minute),
           globex only mistral-7b (API key {globex}; plan free: 5 requests
           and 2,000 tokens a minute, then 429 with Retry-After).
           Limits are counted in Redis; see the x-ratelimit-* headers.

  A chat completion for acme (served by a llama-3-8b replica; see x-sim-replica):
    curl -i {base}/v1/chat/completions -H 'authorization: Bearer {acme}' \\
      -H 'content-type: application/json' \\
      -d '{{"model": "llama-3-8b", "messages": [{{"role": "user", "content": "Hello"}}]}}'

  Streamed, with usage at the end:
    curl -N {base}/v1/chat/completions -H 'authorization: Bearer {acme}' \\
      -H 'content-type: application/json' \\
      -d '{{"model": "llama-3-8b", "stream": true, "stream_options": {{"include_usage": true}},
           "messages": [{{"role": "user", "content": "Hello"}}]}}'

  The alias llama3, and the mistral-7b pool with a JWT instead of a key:
    curl -i {base}/v1/chat/completions -H 'x-api-key: {acme}' \\
      -d '{{"model": "llama3", "messages": [{{"role": "user", "content": "Hi"}}]}}'
    curl -i {base}/v1/chat/completions -H "authorization: Bearer $(make -s token TENANT=globex)" \\
      -d '{{"model": "mistral-7b", "messages": [{{"role": "user", "content": "Hi"}}]}}'

  What each tenant sees, and what globex may not use (404, as OpenAI answers):
    curl {base}/v1/models -H 'authorization: Bearer {acme}'
    curl {base}/v1/models -H 'authorization: Bearer {globex}'
    curl -i {base}/v1/chat/completions -H 'authorization: Bearer {globex}' \\
      -d '{{"model": "llama-3-8b", "messages": []}}'

  No key (401, WWW-Authenticate), an unknown model (404), both in the OpenAI error envelope:
    curl -i {base}/v1/chat/completions -d '{{"model": "llama-3-8b", "messages": []}}'
    curl -i {base}/v1/chat/completions -H 'authorization: Bearer {acme}' \\
      -d '{{"model": "gpt-nope", "messages": []}}'

  Metrics per model and tenant (Prometheus text), and the probes:
    curl {base}/metrics
    curl {base}/healthz; curl {base}/readyz

  How llama-3-8b's replicas are loaded (tokens in flight, queue, KV cache):
    curl {base}/balance

  A usage event per request (tenant, model, tokens, cost at the models' prices, status),
  in the Redis Stream infer:usage; examples/analytics/README.md stores them in PostgreSQL:
    redis-cli -h {redis.host} -p {redis.port} XRANGE infer:usage - + COUNT 5

  Config: {RUN}/nginx.conf   Logs: {RUN}/error.log, {RUN}/access.log
  (the access log shows each request's tenant, model, pool, tokens, time to first token and cost)
  Ctrl-C stops everything.
""", flush=True)
    print("demo ready", flush=True)

    while True:
        if nginx.proc.poll() is not None:
            print("demo: nginx exited; see " + str(RUN / "error.log"),
                  file=sys.stderr)
            stop()
        time.sleep(0.5)


class NginxProcess:
    """nginx in the foreground with the rendered demo config."""

    def __init__(self, run):
        self.run = run
        self.proc = None

    def start(self):
        cmd = [NGINX_BIN, "-p", str(self.run), "-c", str(self.run / "nginx.conf"),
               "-e", str(self.run / "error.log")]
        t = subprocess.run(cmd + ["-t", "-q"], capture_output=True, text=True)
        if t.returncode != 0:
            raise RuntimeError("nginx -t failed:\n" + t.stderr)
        self.proc = subprocess.Popen(cmd)
        if not wait_port("127.0.0.1", PORT, 10,
                         alive=lambda: self.proc.poll() is None):
            self.stop()
            raise RuntimeError(f"nginx did not start on 127.0.0.1:{PORT} "
                               f"(port taken?); see {self.run}/error.log")

    def stop(self):
        stop_process(self.proc, signal.SIGQUIT)


if __name__ == "__main__":
    main()
