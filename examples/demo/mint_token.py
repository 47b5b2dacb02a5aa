#!/usr/bin/python3
"""Prints a JWT for the demo gateway (`make token TENANT=acme`), signed
with the demo's RS256 key, which `make run` creates in build/demo/."""

import os
import sys
import time
from pathlib import Path

import jwt

REPO = Path(__file__).resolve().parents[2]
RUN = Path(os.environ.get("INFER_DEMO_DIR", REPO / "build" / "demo"))

# the models each demo tenant may use, as the token's "models" claim
MODELS = {"acme": None, "globex": ["mistral-7b"]}


def token(tenant, run=RUN, ttl=3600):
    key = (run / "jwt-rs256.pem").read_bytes()
    now = int(time.time())
    claims = {"iss": "ngx-infer-demo", "aud": "inference", "sub": f"{tenant}-user",
              "tenant": tenant, "plan": "pro" if tenant == "acme" else "free",
              "iat": now, "exp": now + ttl}
    if MODELS.get(tenant):
        claims["models"] = MODELS[tenant]
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "demo"})


if __name__ == "__main__":
    tenant = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else "acme"
    if not (RUN / "jwt-rs256.pem").exists():
        sys.exit("token: no demo key yet; start the demo with `make run` first")
    print(token(tenant))
