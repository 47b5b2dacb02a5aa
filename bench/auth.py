"""What ngx_infer_auth costs a proxied request: an RS256 JWT, an ES256 JWT
and an API key, each against plain proxy_pass.

    /usr/bin/python3 bench/auth.py               # ~2 min: 5 rounds x 5 s
    /usr/bin/python3 bench/auth.py --quick       # 2 rounds x 2 s, smoke run
    /usr/bin/python3 bench/auth.py --rounds 9 --only plain,auth-es256

Everything else is bench/run.py: its gateway (GATEWAY), its pinning, its
interleaved rounds, its checks (wrk errors, exact response sizes, crashes,
[alert]/[emerg]) and its report (medians, paired ratios, CPU µs/req added
to the baseline).  This file only adds configurations to run.CONFIGS and
the requests they need, then calls run.main():

  | config      | gateway                                                     | request                     |
  |-------------|-------------------------------------------------------------|-----------------------------|
  | plain       | plain proxy_pass (the baseline)                             | Authorization: Bearer <RS256 JWT> |
  | auth-rs256  | infer_auth on; infer_auth_jwt_key rsa2048.pem kid=...; iss, aud | Authorization: Bearer <RS256 JWT> |
  | auth-es256  | infer_auth on; infer_auth_jwt_key p256.pem kid=...; iss, aud    | Authorization: Bearer <ES256 JWT> |
  | auth-apikey | infer_auth on; infer_auth_api_keys keys.json (100 keys)     | Authorization: Bearer sk-...      |

Every request has the same size: the baseline receives the RS256 request,
and the shorter ES256 and API-key requests carry an X-Pad header that makes
up the difference, so that nginx parses as many bytes in every gateway (the
auth gateways forward fewer: they strip the Authorization header, which is
part of what the module does).  The keys, the key file (written by
scripts/infer-key) and the wrk scripts (chat.lua with its Authorization
header replaced) are made in a temporary directory.

Needs, beyond run.py's: python3-jwt and python3-cryptography (Debian), as
the tests do.  Results: printed, and bench/results/auth.json (--out).

run.py's preflight requests (run.post and run.raw_response_size) carry no
usable credentials; until run.py grows a hook for that (a per-config header
for its own requests), preflight_credentials() below adds them around those
two functions without changing their code.
"""

import argparse
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import run  # noqa: E402  (bench/run.py)

ISSUER = "https://idp.bench.invalid"
AUDIENCE = "inference"
KEYS_IN_FILE = 100          # the API key file holds this many keys
CONFIG_NAMES = ["plain", "auth-rs256", "auth-es256", "auth-rs256-nocache",
                "auth-es256-nocache", "auth-apikey"]

# chat.lua's header line, replaced in each request's copy of the script
LUA_AUTH = 'wrk.headers["Authorization"] = "Bearer bench-token"'


def public_pem(key):
    return key.public_key().public_bytes(
        serialization.Encoding.PEM,
        serialization.PublicFormat.SubjectPublicKeyInfo)


def token(alg, key, kid):
    now = int(time.time())
    return jwt.encode({"sub": "bench-user", "tenant": "bench", "plan": "pro",
                       "iss": ISSUER, "aud": AUDIENCE, "iat": now,
                       "exp": now + 24 * 3600},
                      key, algorithm=alg, headers={"kid": kid})


def lua_script(workdir, name, authorization, size):
    """bench/chat.lua with another Authorization header, and an X-Pad
    header that makes the request exactly as long as the others (size: the
    length of the longest Authorization value); an absolute path: run.py
    opens BENCH / script, which is then this file."""
    text = (BENCH / "chat.lua").read_text()
    if text.count(LUA_AUTH) != 1:
        sys.exit(f"bench/auth.py: bench/chat.lua no longer has the line "
                 f"{LUA_AUTH!r}")
    line = f'wrk.headers["Authorization"] = "{authorization}"'
    pad = size - len(authorization)
    if pad:
        # "X-Pad: " + value + CRLF replaces pad bytes of Authorization
        if pad < len("X-Pad: \r\n") + 1:
            sys.exit("bench/auth.py: Authorization values too close in size")
        line += f'\nwrk.headers["X-Pad"] = "{"p" * (pad - 9)}"'
    path = Path(workdir) / f"{name}.lua"
    path.write_text(text.replace(LUA_AUTH, line))
    return str(path)


def make_configs(workdir):
    """The GatewayConfigs, and the Authorization header of each."""
    d = Path(workdir)
    rsa_key = rsa.generate_private_key(65537, 2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    (d / "rsa2048.pem").write_bytes(public_pem(rsa_key))
    (d / "p256.pem").write_bytes(public_pem(ec_key))
    rs = token("RS256", rsa_key, "bench-rsa")
    es = token("ES256", ec_key, "bench-ec")

    keyfile = d / "keys.json"
    infer_key = run.REPO / "scripts" / "infer-key"
    api_key = None
    for i in range(KEYS_IN_FILE):
        r = subprocess.run([str(infer_key), "create", "--file", str(keyfile),
                            "--tenant", f"tenant-{i}", "--id", f"key-{i}",
                            "--plan", "pro"], capture_output=True, text=True,
                           timeout=30)
        if r.returncode != 0:
            sys.exit(f"bench/auth.py: infer-key failed: {r.stderr}")
        if i == KEYS_IN_FILE // 2:
            api_key = r.stdout.strip()

    claims = f"infer_auth_issuer {ISSUER}; infer_auth_audience {AUDIENCE};"
    auth = {
        "plain": "Bearer " + rs,
        "auth-rs256": "Bearer " + rs,
        "auth-es256": "Bearer " + es,
        "auth-rs256-nocache": "Bearer " + rs,
        "auth-es256-nocache": "Bearer " + es,
        "auth-apikey": "Bearer " + api_key,
    }
    size = max(len(a) for a in auth.values())
    scripts = {"rs": lua_script(d, "rs256", auth["auth-rs256"], size),
               "es": lua_script(d, "es256", auth["auth-es256"], size),
               "key": lua_script(d, "apikey", auth["auth-apikey"], size)}
    configs = [
        run.GatewayConfig(
            name="auth-rs256",
            description="the auth module alone: an RS256 JWT (RSA 2048, "
                        "kid) checked against infer_auth_jwt_key, with "
                        "iss and aud; proxy_pass by name",
            modules=["auth"],
            http=f"infer_auth_jwt_key {d / 'rsa2048.pem'} kid=bench-rsa; "
                 + claims,
            location="infer_auth on;",
            script=scripts["rs"], default=False),
        run.GatewayConfig(
            name="auth-es256",
            description="the auth module alone: an ES256 JWT (P-256, kid) "
                        "checked against infer_auth_jwt_key, with iss and "
                        "aud; proxy_pass by name",
            modules=["auth"],
            http=f"infer_auth_jwt_key {d / 'p256.pem'} kid=bench-ec; "
                 + claims,
            location="infer_auth on;",
            script=scripts["es"], default=False),
        run.GatewayConfig(
            name="auth-rs256-nocache",
            description="auth-rs256 with infer_auth_token_cache off: every "
                        "request checks the signature",
            modules=["auth"],
            http=f"infer_auth_jwt_key {d / 'rsa2048.pem'} kid=bench-rsa; "
                 + claims + " infer_auth_token_cache off;",
            location="infer_auth on;",
            script=scripts["rs"], default=False),
        run.GatewayConfig(
            name="auth-es256-nocache",
            description="auth-es256 with infer_auth_token_cache off: every "
                        "request checks the signature",
            modules=["auth"],
            http=f"infer_auth_jwt_key {d / 'p256.pem'} kid=bench-ec; "
                 + claims + " infer_auth_token_cache off;",
            location="infer_auth on;",
            script=scripts["es"], default=False),
        run.GatewayConfig(
            name="auth-apikey",
            description=f"the auth module alone: an API key (Authorization: "
                        f"Bearer sk-...) looked up among {KEYS_IN_FILE} in "
                        "infer_auth_api_keys; proxy_pass by name",
            modules=["auth"],
            http=f"infer_auth_api_keys {keyfile};",
            location="infer_auth on;",
            script=scripts["key"], default=False),
    ]
    return configs, scripts["rs"], auth


# ---------------------------------------------------------------------------
# Credentials for run.py's own requests (see the docstring)

@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


class _RewritingSocket:
    """A socket whose sendall() replaces run.raw_response_size's
    placeholder Authorization header with the configuration's."""

    def __init__(self, sock, old, new):
        self._sock, self._old, self._new = sock, old, new

    def sendall(self, data, *args):
        return self._sock.sendall(data.replace(self._old, self._new, 1), *args)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._sock.close()

    def __getattr__(self, name):
        return getattr(self._sock, name)


def preflight_credentials(auth_by_config):
    """Wrap run.preflight and run.raw_response_size so that the requests
    they send carry the Authorization header of the gateway's config.
    run.preflight's name argument starts with the config's name; the
    gateway's address is remembered for raw_response_size, which Bench
    calls right after preflight on the same gateway."""
    by_addr = {}
    orig_preflight, orig_raw = run.preflight, run.raw_response_size
    orig_urlopen, orig_connect = urllib.request.urlopen, socket.create_connection

    def preflight(name, url, path, body):
        cfg = name.split(" ", 1)[0]
        auth = auth_by_config.get(cfg)
        by_addr[urllib.parse.urlsplit(url).netloc] = auth

        def urlopen(req, *a, **kw):
            if auth and isinstance(req, urllib.request.Request):
                req.add_header("Authorization", auth)
            return orig_urlopen(req, *a, **kw)

        with _patched(urllib.request, "urlopen", urlopen):
            return orig_preflight(name, url, path, body)

    def raw_response_size(addr, path, body):
        auth = by_addr.get(addr)

        def connect(*a, **kw):
            s = orig_connect(*a, **kw)
            if not auth:
                return s
            return _RewritingSocket(s, b"\r\nAuthorization: Bearer x\r\n",
                                    f"\r\nAuthorization: {auth}\r\n".encode())

        with _patched(socket, "create_connection", connect):
            return orig_raw(addr, path, body)

    run.preflight = preflight
    run.raw_response_size = raw_response_size


# ---------------------------------------------------------------------------

def recap(out, names):
    """The figures asked for, from run.py's JSON: per config, CPU µs/req
    added to plain and the paired ratios."""
    try:
        doc = json.loads(Path(out).read_text())
    except (OSError, ValueError):
        return
    case = doc["cases"][0]
    base = case["baseline"]
    print(f"\nngx_infer_auth, per request, against {base} "
          "(paired medians over rounds):")
    for name in names:
        r = case["ratios"].get(f"{name}/{base}")
        if r is None:
            continue
        s = case["summary"][name]
        p = r["paired_median"]
        lo, hi = r["cpu_us_per_req_added_range"]
        print(f"  {name:<12} {r['cpu_us_per_req_added']:+7.2f} CPU µs/req "
              f"(range {lo:+.2f}..{hi:+.2f}); CPU x{p['cpu_us_per_req']:.3f},"
              f" req/s x{p['rps']:.3f}, p50 x{p['p50_us']:.3f}, "
              f"p99 x{p['p99_us']:.3f}; {s['cpu_us_per_req']:.2f} µs/req "
              f"in all")


def main():
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Other options are run.py's (--rounds, --duration, --quick, "
               "--connections, --retries, --warmup, --keep).")
    ap.add_argument("--only", default=",".join(CONFIG_NAMES),
                    help="configs to run, the baseline first (default "
                         "%(default)s)")
    ap.add_argument("--out", default=str(BENCH / "results" / "auth.json"))
    args, rest = ap.parse_known_args()
    if "--body" in rest or any(a.startswith("--body=") for a in rest):
        ap.error("--body: the auth bench uses the small body only")
    only = [x.strip() for x in args.only.split(",") if x.strip()]

    workdir = tempfile.mkdtemp(prefix="ngx_infer_bench_auth.")
    try:
        configs, baseline_script, auth = make_configs(workdir)
        # plain, as run.py defines it, but sending the RS256 request
        plain = next(c for c in run.CONFIGS if c.name == "plain")
        plain.script = baseline_script
        run.CONFIGS.extend(configs)
        preflight_credentials(auth)
        sys.argv = [str(BENCH / "run.py"), "--body", "small",
                    "--only", ",".join(only), "--out", args.out, *rest]
        try:
            run.main()
        except SystemExit as e:
            if e.code not in (None, 0):
                raise
        recap(args.out, [n for n in only if n != only[0]])
    finally:
        if "--keep" in rest:
            print(f"bench/auth.py: keys and scripts kept in {workdir}",
                  file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
