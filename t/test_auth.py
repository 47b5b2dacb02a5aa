"""ngx_infer_auth (docs/auth.md): JWTs checked against pinned keys (PEM
files, a JWKS file, a JWKS URL fetched through a subrequest and cached in
shared memory), hashed API keys from a file written by scripts/infer-key,
tenants, per-tenant model access with the route module, credentials kept
away from the model servers and the logs, and nginx's own access modules
(allow / deny / satisfy) around it.

Keys are generated in temporary directories for each run; tokens are
minted with PyJWT (and by hand where PyJWT refuses to forge them)."""

import base64
import concurrent.futures
import hashlib
import hmac
import json
import os
import re
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwcrypto import jwk

from harness.openai import chat, error_of
from harness.ports import free_port

REPO = Path(__file__).resolve().parents[1]
INFER_KEY = REPO / "scripts" / "infer-key"

STATIC = "try_files /ok.txt =404;"

# What the module decided, as response headers (an empty value adds no
# header: an absent header is an empty variable).
SHOW = """
        add_header X-Auth-Status $infer_auth_status always;
        add_header X-Auth-Method $infer_auth_method always;
        add_header X-Tenant $infer_tenant always;
        add_header X-Subject $infer_subject always;
        add_header X-Key-Id $infer_key_id always;
        add_header X-Plan $infer_plan always;
        add_header X-Allowed $infer_allowed_models always;"""

WWW_INVALID = re.compile(r'^Bearer realm="ngx_infer", error="invalid_token", '
                         r'error_description="[^"\r\n]*"$')

CHAT = {"messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 2}


# --------------------------------------------------------------- keys, JWTs

ALGS = ["HS256", "HS384", "HS512", "RS256", "RS384", "RS512",
        "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]
CURVE = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}
HS_LEN = {"HS256": 32, "HS384": 48, "HS512": 64}
# a PEM key needs alg= except for these (docs: RSA -> RS256, EC by curve,
# Ed25519 -> EdDSA; HMAC secrets always name theirs)
PEM_DEFAULT = {"RS256", "ES256", "ES384", "ES512", "EdDSA"}
# a JWK needs "alg" except for these (oct -> HS256 too)
JWK_DEFAULT = PEM_DEFAULT | {"HS256"}


def b64u(data):
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def pem_of(public_key):
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


class Keyring:
    """Private keys for every algorithm, a second ("other") set to forge
    with, and their public halves as files nginx reads."""

    def __init__(self, d):
        self.dir = Path(d)
        self.rsa = [rsa.generate_private_key(65537, 2048) for _ in range(2)]
        self.ec = {alg: [ec.generate_private_key(c()) for _ in range(2)]
                   for alg, c in CURVE.items()}
        self.ed = [ed25519.Ed25519PrivateKey.generate() for _ in range(2)]
        self.hs = {alg: [os.urandom(n).hex()[:n].encode() for _ in range(2)]
                   for alg, n in HS_LEN.items()}
        self.files = {}
        for alg in ALGS:
            path = self.dir / f"{alg}.{'secret' if alg in HS_LEN else 'pem'}"
            if alg in HS_LEN:
                # the secret's bytes, less one trailing newline (HS256's
                # file has one, the others not)
                path.write_bytes(self.hs[alg][0] +
                                 (b"\n" if alg == "HS256" else b""))
            else:
                path.write_bytes(pem_of(self.private(alg).public_key()))
            self.files[alg] = path
        # the other RSA key's public half, for a gateway that trusts both
        (self.dir / "rsa-other.pem").write_bytes(pem_of(self.rsa[1].public_key()))

    def private(self, alg, other=False):
        i = 1 if other else 0
        if alg in HS_LEN:
            return self.hs[alg][i]
        if alg[:2] in ("RS", "PS"):
            return self.rsa[i]
        if alg in CURVE:
            return self.ec[alg][i]
        return self.ed[i]

    def public_pem(self, alg):
        return pem_of(self.private(alg).public_key())

    def jwk(self, alg, kid, with_alg=None, other=False, use=None):
        """The public JWK (oct: the secret) of alg's key, pinned by "alg"
        unless the type's default pins it (with_alg=None) or with_alg says."""
        if alg in HS_LEN:
            d = {"kty": "oct", "k": b64u(self.private(alg, other))}
        else:
            d = jwk.JWK.from_pyca(self.private(alg, other).public_key()) \
                .export_public(as_dict=True)
        d["kid"] = kid
        if with_alg is None:
            with_alg = alg not in JWK_DEFAULT
        if with_alg:
            d["alg"] = alg
        if use is not None:
            d["use"] = use
        return d

    def token(self, alg, kid=None, other=False, headers=None, **claims):
        h = dict(headers or {})
        if kid is not None:
            h["kid"] = kid
        return jwt.encode(payload(**claims), self.private(alg, other),
                          algorithm=alg, headers=h)


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    return Keyring(tmp_path_factory.mktemp("auth-keys"))


DROP = object()


def payload(**claims):
    """Default claims of a good token, updated by claims (DROP removes one)."""
    now = int(time.time())
    p = {"sub": "user-1", "tenant": "acme", "iat": now, "exp": now + 600}
    p.update(claims)
    return {k: v for k, v in p.items() if v is not DROP}


def raw_token(header, body, sig=b""):
    """A token built by hand: header and body are dicts (as JSON) or raw
    bytes, the signature is raw bytes."""
    seg = [h if isinstance(h, bytes) else json.dumps(h).encode()
           for h in (header, body)]
    return ".".join([b64u(seg[0]), b64u(seg[1]), b64u(sig)])


def hmac_token(alg, secret, header=None, **claims):
    """An HMAC-signed token built by hand, whatever the secret (PyJWT
    refuses PEM keys as HMAC secrets, rightly)."""
    h = {"alg": alg, "typ": "JWT", **(header or {})}
    signing_input = b64u(json.dumps(h)) + "." + b64u(json.dumps(payload(**claims)))
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384,
              "HS512": hashlib.sha512}[alg]
    sig = hmac.new(secret, signing_input.encode(), digest).digest()
    return signing_input + "." + b64u(sig)


def pem_directives(keys, algs=ALGS, kid=True):
    out = []
    for alg in algs:
        d = f"infer_auth_jwt_key {keys.files[alg]}"
        if alg not in PEM_DEFAULT:
            d += f" alg={alg}"
        if kid:
            d += f" kid=k-{alg}"
        out.append(d + ";")
    return "\n        ".join(out)


def write_json(path, doc):
    """Replace path atomically (what an identity provider's sync job or
    infer-key does): nginx never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


# ----------------------------------------------------------------- API keys

def infer_key(*args, check=True):
    r = subprocess.run([str(INFER_KEY), *map(str, args)], capture_output=True,
                       text=True, timeout=30)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def create_key(path, tenant="acme", kid="acme-1", plan=None, models=None):
    args = ["create", "--file", path, "--tenant", tenant, "--id", kid]
    if plan is not None:
        args += ["--plan", plan]
    if models is not None:
        args += ["--models", models]
    key = infer_key(*args).stdout.strip()
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{43}", key), key
    return key


# ------------------------------------------------------------------ gateways

def server(auth="", location="", body=STATIC, server_extra="", http=""):
    """An http block: one server whose location / authenticates and shows
    the decision; auth goes at server level."""
    return f"""
    {http}
    server {{
        # reuseport: the kernel spreads connections over both workers, so
        # that "every worker" checks (new connection each) reach both
        listen 127.0.0.1:{{port}} reuseport;
        large_client_header_buffers 4 32k;
        {auth}
        {server_extra}
        location / {{
            infer_auth on;
            {location}
            {SHOW}
            {body}
        }}
    }}"""


def start(nginx_factory, auth="", modules=("auth",), **kw):
    return nginx_factory(server(auth, **kw), modules=list(modules))


def get(gw, token=None, path="/", headers=None, api_key=None, **kw):
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = "Bearer " + token
    if api_key is not None:
        h["x-api-key"] = api_key
    return requests.get(gw.url + path, headers=h, timeout=10, **kw)


def assert_ok(r, tenant="acme"):
    assert r.status_code == 200, (r.status_code, r.headers, r.text[:500])
    assert r.headers.get("x-auth-status") == "ok"
    if tenant is not None:
        assert r.headers.get("x-tenant") == tenant


def assert_invalid(r, code="invalid_token", status="invalid"):
    """401 for presented credentials that are no good (docs: Errors)."""
    assert r.status_code == 401, (r.status_code, r.headers, r.text[:500])
    assert error_of(r)["code"] == code
    www = r.headers.get("www-authenticate", "")
    assert WWW_INVALID.match(www), www
    if status is not None:
        assert r.headers.get("x-auth-status") == status


def assert_missing(r, realm="ngx_infer"):
    assert r.status_code == 401, (r.status_code, r.headers, r.text[:500])
    assert error_of(r)["code"] == "missing_credentials"
    assert r.headers.get("www-authenticate") == f'Bearer realm="{realm}"'
    assert r.headers.get("x-auth-status") == "missing"
    assert "x-auth-method" not in r.headers


def wait_for(fn, timeout=6.0, interval=0.1, what="condition"):
    """fn() until it returns something true; bounded in time."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(interval)


def wait_status(fn, status, timeout=6.0, what=None):
    last = {}

    def check():
        last["r"] = fn()
        return last["r"].status_code == status

    try:
        wait_for(check, timeout, what=what or f"status {status}")
    except AssertionError:
        r = last["r"]
        raise AssertionError(f"{what or ''}: still {r.status_code} after "
                             f"{timeout} s: {r.text[:300]}") from None
    return last["r"]


# ============================================================ the key tool

def test_infer_key_prints_the_key_once_and_stores_only_its_hash(tmp_path):
    f = tmp_path / "keys.json"
    r = infer_key("create", "--file", f, "--tenant", "acme", "--id", "acme-1",
                  "--plan", "pro", "--models", "llama-*, mistral-7b")
    key = r.stdout.strip()
    assert r.stdout == key + "\n"              # the key and nothing else
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{43}", key)
    text = f.read_text()
    assert key not in text and key[3:] not in text
    doc = json.loads(text)
    assert doc == {"keys": [{
        "id": "acme-1", "tenant": "acme", "plan": "pro",
        "models": ["llama-*", "mistral-7b"], "disabled": False,
        "hash": "sha256:" + hashlib.sha256(key.encode()).hexdigest()}]}
    # a second key is appended, and differs
    key2 = create_key(f, tenant="globex", kid="globex-1")
    assert key2 != key
    recs = json.loads(f.read_text())["keys"]
    assert [r["id"] for r in recs] == ["acme-1", "globex-1"]
    assert "plan" not in recs[1] and "models" not in recs[1]
    # no temporary file left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.json"]


def test_infer_key_refuses_a_duplicate_id_and_a_broken_file(tmp_path):
    f = tmp_path / "keys.json"
    create_key(f, kid="a")
    before = f.read_bytes()
    r = infer_key("create", "--file", f, "--tenant", "other", "--id", "a",
                  check=False)
    assert r.returncode != 0 and r.stdout == ""
    assert "a" in r.stderr
    assert f.read_bytes() == before
    f.write_text("{not json")
    r = infer_key("create", "--file", f, "--tenant", "t", "--id", "b",
                  check=False)
    assert r.returncode != 0 and r.stdout == ""
    assert f.read_text() == "{not json"      # never written over


def test_infer_key_disable_and_list(tmp_path):
    f = tmp_path / "keys.json"
    create_key(f, kid="acme-1", plan="pro", models="llama-*")
    assert f.stat().st_mode & 0o777 == 0o644     # nginx's workers read it
    f.chmod(0o640)
    create_key(f, tenant="globex", kid="globex-1")
    infer_key("disable", "--file", f, "--id", "globex-1")
    assert f.stat().st_mode & 0o777 == 0o640     # a rewrite keeps the mode
    recs = {r["id"]: r for r in json.loads(f.read_text())["keys"]}
    assert recs["globex-1"]["disabled"] is True
    assert recs["acme-1"]["disabled"] is False
    r = infer_key("disable", "--file", f, "--id", "nope", check=False)
    assert r.returncode != 0

    out = infer_key("list", "--file", f).stdout
    for rec in recs.values():
        h = rec["hash"].split(":", 1)[1]
        assert h not in out                 # never the whole hash
        assert h[:8] in out                 # its first 8 characters
        assert rec["id"] in out and rec["tenant"] in out
    lines = {l.split()[0]: l for l in out.splitlines()[1:]}
    assert "pro" in lines["acme-1"] and "llama-*" in lines["acme-1"]
    assert "yes" in lines["globex-1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.json"]


# ======================================================= JWT: algorithms

@pytest.mark.parametrize("source", ["pem", "jwks"])
@pytest.mark.parametrize("alg", ALGS)
def test_every_algorithm_is_accepted(nginx_factory, keys, tmp_path, alg,
                                     source):
    """All 13 keys configured at once, each pinned to its algorithm and
    named by its kid: the token's kid picks its key."""
    if source == "pem":
        auth = pem_directives(keys)
    else:
        f = tmp_path / "jwks.json"
        write_json(f, {"keys": [keys.jwk(a, f"k-{a}") for a in ALGS]})
        auth = f"infer_auth_jwks {f};"
    gw = start(nginx_factory, auth)
    tok = keys.token(alg, kid=f"k-{alg}", plan="gold")
    r = get(gw, tok)
    assert_ok(r)
    assert r.text == "ok"
    assert r.headers["x-auth-method"] == "jwt"
    assert r.headers["x-key-id"] == f"k-{alg}"
    assert r.headers["x-subject"] == "user-1"
    assert r.headers["x-plan"] == "gold"
    assert r.headers["x-allowed"] == "*"


def test_without_alg_a_key_is_pinned_by_its_type(nginx_factory, keys):
    """RSA -> RS256 (PS256 must be named), EC by curve, Ed25519 -> EdDSA:
    the same key under another algorithm is refused."""
    gw = start(nginx_factory, f"""
        infer_auth_jwt_key {keys.files['RS256']} kid=rsa;
        infer_auth_jwt_key {keys.files['ES384']} kid=ec;
        infer_auth_jwt_key {keys.files['EdDSA']} kid=ed;""")
    assert_ok(get(gw, keys.token("RS256", kid="rsa")))
    assert_ok(get(gw, keys.token("ES384", kid="ec")))
    assert_ok(get(gw, keys.token("EdDSA", kid="ed")))
    for alg in ("RS384", "RS512", "PS256", "PS512"):
        assert_invalid(get(gw, keys.token(alg, kid="rsa")))


def test_a_jwk_alg_pins_it(nginx_factory, keys, tmp_path):
    f = tmp_path / "jwks.json"
    write_json(f, {"keys": [keys.jwk("PS256", "ps", with_alg=True),
                            keys.jwk("RS256", "rs", with_alg=False)]})
    gw = start(nginx_factory, f"infer_auth_jwks {f};")
    assert_ok(get(gw, keys.token("PS256", kid="ps")))
    assert_ok(get(gw, keys.token("RS256", kid="rs")))
    assert_invalid(get(gw, keys.token("RS256", kid="ps")))
    assert_invalid(get(gw, keys.token("PS256", kid="rs")))


def test_keys_without_kid(nginx_factory, keys):
    """A key without kid matches tokens without one; with no kid, every
    key pinned to the token's alg is tried."""
    gw = start(nginx_factory, f"""
        infer_auth_jwt_key {keys.files['ES256']};
        infer_auth_jwt_key {keys.files['RS256']};
        infer_auth_jwt_key {keys.dir / 'rsa-other.pem'};""")
    assert_ok(get(gw, keys.token("RS256")))
    assert_ok(get(gw, keys.token("RS256", other=True)))
    assert_ok(get(gw, keys.token("ES256")))
    # a kid no key has
    assert_invalid(get(gw, keys.token("RS256", kid="unknown")))


def test_a_jwks_key_for_encryption_is_skipped(nginx_factory, keys, tmp_path):
    f = tmp_path / "jwks.json"
    write_json(f, {"keys": [keys.jwk("RS256", "enc", use="enc"),
                            keys.jwk("ES256", "sig", use="sig")]})
    gw = start(nginx_factory, f"infer_auth_jwks {f};")
    assert_invalid(get(gw, keys.token("RS256", kid="enc")))
    assert_ok(get(gw, keys.token("ES256", kid="sig")))


# =========================================================== JWT: refusals

@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256", "ES512", "EdDSA",
                                 "HS256", "HS512"])
def test_a_token_signed_by_another_key_is_invalid(nginx_factory, keys, alg):
    gw = start(nginx_factory, pem_directives(keys, [alg]))
    tok = keys.token(alg, kid=f"k-{alg}", other=True)
    r = get(gw, tok)
    assert_invalid(r)
    assert tok not in r.text and tok not in r.headers["www-authenticate"]


def test_a_tampered_payload_is_invalid(nginx_factory, keys):
    gw = start(nginx_factory, pem_directives(keys, ["RS256"]))
    h, _, s = keys.token("RS256", kid="k-RS256").split(".")
    forged = h + "." + b64u(json.dumps(payload(tenant="globex"))) + "." + s
    assert_invalid(get(gw, forged))


def test_missing_credentials(nginx_factory, keys):
    gw = start(nginx_factory, pem_directives(keys, ["RS256"]))
    r = get(gw)
    assert_missing(r)
    assert error_of(r)["code"] == "missing_credentials"


def test_the_realm_is_configurable(nginx_factory, keys):
    gw = start(nginx_factory, pem_directives(keys, ["RS256"]) +
               ' infer_auth_realm "inference api";')
    assert_missing(get(gw), realm="inference api")
    r = get(gw, keys.token("RS256", kid="k-RS256", other=True))
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith(
        'Bearer realm="inference api", error="invalid_token", '
        'error_description="')


@pytest.mark.parametrize("aud,status", [("a", 401), (["a", "b"], 200)])
def test_a_redirect_to_a_location_configured_otherwise_decides_again(
        nginx_factory, keys, aud, status):
    """/a accepts audience a, then try_files sends the request to @b, which
    accepts audience b only: @b decides again, with the same token (the
    credentials were removed from the headers by then)."""
    gw = start(nginx_factory, pem_directives(keys, ["RS256"]),
               body="try_files /nonexistent @b;",
               location="infer_auth_audience a;",
               server_extra=f"""
        location @b {{
            infer_auth on;
            infer_auth_audience b;
            {SHOW}
            {STATIC}
        }}""")
    r = get(gw, keys.token("RS256", kid="k-RS256", aud=aud), "/a")
    assert r.status_code == status, (r.status_code, r.text[:300])
    if status == 401:
        assert "audience" in r.headers["www-authenticate"]
    else:
        assert r.headers["x-auth-status"] == "ok"


@pytest.fixture
def rsa_gw(nginx_factory, keys):
    return start(nginx_factory, pem_directives(keys, ["RS256"]))


def test_an_expired_token(rsa_gw, keys):
    r = get(rsa_gw, keys.token("RS256", kid="k-RS256",
                               exp=int(time.time()) - 60))
    assert_invalid(r, status="expired")


def test_a_token_not_valid_yet(rsa_gw, keys):
    r = get(rsa_gw, keys.token("RS256", kid="k-RS256",
                               nbf=int(time.time()) + 120))
    assert_invalid(r)


def test_leeway(nginx_factory, keys):
    gw = start(nginx_factory, pem_directives(keys, ["RS256"]) +
               " infer_auth_leeway 30s;")
    now = int(time.time())
    assert_ok(get(gw, keys.token("RS256", kid="k-RS256", exp=now - 5)))
    assert_ok(get(gw, keys.token("RS256", kid="k-RS256", nbf=now + 5)))
    assert_invalid(get(gw, keys.token("RS256", kid="k-RS256", exp=now - 90)),
                   status="expired")
    assert_invalid(get(gw, keys.token("RS256", kid="k-RS256", nbf=now + 90)))


def test_no_leeway_by_default(rsa_gw, keys):
    r = get(rsa_gw, keys.token("RS256", kid="k-RS256",
                               exp=int(time.time()) - 5))
    assert_invalid(r, status="expired")


def test_issuer(nginx_factory, keys):
    gw = start(nginx_factory, pem_directives(keys, ["RS256"]) +
               " infer_auth_issuer https://idp.example.com "
               "https://idp2.example.com;")

    def tok(**kw):
        return keys.token("RS256", kid="k-RS256", **kw)

    assert_ok(get(gw, tok(iss="https://idp.example.com")))
    assert_ok(get(gw, tok(iss="https://idp2.example.com")))
    assert_invalid(get(gw, tok(iss="https://evil.example.com")))
    assert_invalid(get(gw, tok(iss="https://idp.example.com/")))
    assert_invalid(get(gw, tok()))                       # no iss


@pytest.mark.parametrize("aud,ok", [
    ("inference", True),
    (["other", "inference"], True),
    (["batch"], True),
    ("other", False),
    (["other", "more"], False),
    ([], False),
    (DROP, False),
], ids=["string", "array", "array-second-audience", "wrong-string",
        "wrong-array", "empty-array", "no-aud"])
def test_audience(nginx_factory, keys, aud, ok):
    gw = start(nginx_factory, pem_directives(keys, ["RS256"]) +
               " infer_auth_audience inference batch;")
    r = get(gw, keys.token("RS256", kid="k-RS256", aud=aud))
    if ok:
        assert_ok(r)
    else:
        assert_invalid(r)


def test_required_claims(nginx_factory, keys):
    gw = start(nginx_factory, pem_directives(keys, ["RS256"]) +
               " infer_auth_require_claim email org;")

    def tok(**kw):
        return keys.token("RS256", kid="k-RS256", **kw)

    assert_ok(get(gw, tok(email="a@example.com", org="acme")))
    assert_ok(get(gw, tok(email="a@example.com", org=0)))
    assert_invalid(get(gw, tok(email="a@example.com")))
    assert_invalid(get(gw, tok(email="a@example.com", org=None)))
    assert_invalid(get(gw, tok()))


def test_the_tenant_claim(nginx_factory, keys):
    gw = start(nginx_factory, pem_directives(keys, ["RS256"]))
    assert_invalid(get(gw, keys.token("RS256", kid="k-RS256", tenant=DROP)))
    assert_invalid(get(gw, keys.token("RS256", kid="k-RS256", tenant=42)))
    assert_ok(get(gw, keys.token("RS256", kid="k-RS256", tenant="globex")),
              tenant="globex")

    gw = start(nginx_factory, pem_directives(keys, ["RS256"]) +
               " infer_auth_tenant_claim sub;")
    r = get(gw, keys.token("RS256", kid="k-RS256", tenant=DROP, sub="alice"))
    assert_ok(r, tenant="alice")


def test_jwt_variables(nginx_factory, keys):
    gw = start(nginx_factory, pem_directives(keys, ["ES256"]) +
               " infer_auth_plan_claim tier;", location="""
            add_header X-C-Email $infer_claim_email always;
            add_header X-C-N $infer_claim_n always;
            add_header X-C-Flag $infer_claim_flag always;
            add_header X-C-Groups $infer_claim_groups always;
            add_header X-C-None $infer_claim_nothing always;""")
    r = get(gw, keys.token("ES256", kid="k-ES256", sub="u-42", tier="pro",
                           plan="ignored", email="a@example.com", n=42,
                           flag=True, groups=["x", "y"]))
    assert_ok(r)
    assert r.headers["x-auth-method"] == "jwt"
    assert r.headers["x-subject"] == "u-42"
    assert r.headers["x-key-id"] == "k-ES256"
    assert r.headers["x-plan"] == "pro"
    assert r.headers["x-c-email"] == "a@example.com"
    assert r.headers["x-c-n"] == "42"
    assert r.headers["x-c-flag"] == "true"
    assert r.headers["x-c-groups"] == "x y"
    assert "x-c-none" not in r.headers


# ---------------------------------------------------------------- forgeries

@pytest.mark.parametrize("header,sig", [
    ({"alg": "none", "typ": "JWT"}, b""),
    ({"alg": "none", "kid": "k-RS256"}, b""),
    ({"alg": "None"}, b""),
    ({"alg": "NONE"}, b""),
    ({"alg": "none", "kid": "k-RS256"}, b"x" * 256),
], ids=["none", "none-with-kid", "None", "NONE", "none-with-signature"])
def test_alg_none_is_refused(rsa_gw, header, sig):
    assert_invalid(get(rsa_gw, raw_token(header, payload(), sig)))


def test_an_rsa_public_key_is_never_an_hmac_secret(nginx_factory, keys):
    """The classic HS/RS confusion: an HS256 token whose HMAC secret is
    the RSA public key the gateway holds, in every encoding an attacker
    would try, with and without the key's kid."""
    pem = keys.files["RS256"].read_bytes()
    der = keys.rsa[0].public_key().public_bytes(
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo)
    gw = start(nginx_factory, f"""
        infer_auth_jwt_key {keys.files['RS256']} kid=rsa;
        infer_auth_jwt_key {keys.files['RS256']};
        infer_auth_jwt_key {keys.files['ES256']} kid=ec;""")
    assert_ok(get(gw, keys.token("RS256", kid="rsa")))     # the key works
    for secret in (pem, pem.rstrip(b"\n"), der):
        for alg in ("HS256", "HS384", "HS512"):
            for header in ({"kid": "rsa"}, {}):
                assert_invalid(get(gw, hmac_token(alg, secret, header)))
    ec_pem = keys.files["ES256"].read_bytes()
    assert_invalid(get(gw, hmac_token("HS256", ec_pem, {"kid": "ec"})))


def test_a_kid_names_a_key_of_another_algorithm(nginx_factory, keys):
    """kid picks the RSA key: an HS256 token naming it is refused even when
    its HMAC is right for the HS256 key the gateway also has, and the other
    way round."""
    gw = start(nginx_factory, f"""
        infer_auth_jwt_key {keys.files['RS256']} kid=rsa;
        infer_auth_jwt_key {keys.files['HS256']} alg=HS256 kid=hs;""")
    hs = keys.private("HS256")
    assert_ok(get(gw, hmac_token("HS256", hs, {"kid": "hs"})))
    assert_invalid(get(gw, hmac_token("HS256", hs, {"kid": "rsa"})))
    assert_invalid(get(gw, keys.token("RS256", kid="hs")))


def test_an_empty_hmac_key_is_never_used(nginx_factory, keys):
    gw = start(nginx_factory, f"""
        infer_auth_jwt_key {keys.files['HS256']} alg=HS256;
        infer_auth_jwt_key {keys.files['HS512']} alg=HS512 kid=h5;""")
    assert_ok(get(gw, hmac_token("HS256", keys.private("HS256"))))
    assert_invalid(get(gw, hmac_token("HS256", b"")))
    assert_invalid(get(gw, hmac_token("HS512", b"", {"kid": "h5"})))


def test_an_hmac_secret_file_loses_only_one_trailing_newline(nginx_factory,
                                                             keys, tmp_path):
    s = os.urandom(24).hex()[:40].encode()
    f = tmp_path / "s.secret"
    f.write_bytes(s + b"\n\n")
    gw = start(nginx_factory, f"infer_auth_jwt_key {f} alg=HS256;")
    assert_ok(get(gw, hmac_token("HS256", s + b"\n")))
    assert_invalid(get(gw, hmac_token("HS256", s)))


# ---------------------------------------------------------------- malformed

def _malformed(keys):
    good = keys.token("RS256", kid="k-RS256")
    h, p, s = good.split(".")
    big = keys.token("RS256", kid="k-RS256", pad="x" * 20000)
    return {
        "bad-base64": "eyJ!!!.eyJ@@@.abc$",
        "bad-base64-header": "%%%%" + h[4:] + "." + p + "." + s,
        "non-json-header": b64u(b"not json") + "." + p + "." + s,
        "header-array": b64u(b"[]") + "." + p + "." + s,
        "alg-not-a-string": b64u(b'{"alg":256,"kid":"k-RS256"}') + "." + p
                            + "." + s,
        "non-json-payload": h + "." + b64u(b"{oops") + "." + s,
        "payload-array": h + "." + b64u(b"[1,2]") + "." + s,
        "garbage-header": b64u(os.urandom(48)) + "." + p + "." + s,
        "2-segments": h + "." + p,
        "4-segments": good + "." + s,
        "5-segments": good + "." + s + "." + s,
        "empty-signature": h + "." + p + ".",
        "no-header": "." + p + "." + s,
        "20kb": big,
        "dots": "..",
        "padded-signature": good + "." + s + "=x",
    }


MALFORMED = ["bad-base64", "bad-base64-header", "non-json-header",
             "header-array", "alg-not-a-string", "non-json-payload",
             "payload-array", "garbage-header", "2-segments", "4-segments",
             "5-segments", "empty-signature", "no-header", "20kb", "dots",
             "padded-signature"]


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_token_is_401_never_400_or_500(rsa_gw, keys, case):
    tok = _malformed(keys)[case]
    if case == "20kb":
        assert len(tok) > 20000         # validly signed, but over 8 KB
    assert_invalid(get(rsa_gw, tok))


def test_a_token_just_under_8kb_is_accepted(rsa_gw, keys):
    tok = keys.token("RS256", kid="k-RS256", pad="")
    tok = keys.token("RS256", kid="k-RS256",
                     pad="x" * ((8000 - len(tok)) * 3 // 4))
    assert 7000 < len(tok) <= 8192
    assert_ok(get(rsa_gw, tok))


def test_raw_garbage_bytes_in_the_authorization_header(rsa_gw):
    for value in (b"Bearer \x80\xff\xfe\xc3\x28.\xa0\xa1.\xe2\x82",
                  b"Bearer " + bytes(range(0x80, 0x100)),
                  b"Bearer sk-\xff\xfe"):
        req = (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
               b"Authorization: " + value + b"\r\n\r\n")
        with socket.create_connection(("127.0.0.1", rsa_gw.port),
                                      timeout=5) as s:
            s.sendall(req)
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        assert data.startswith(b"HTTP/1.1 401 "), data[:300]
        assert b'"code":' in data and b"error=\"invalid_token\"" in data


def test_mixed_requests_on_shared_connections(nginx_factory, keys, keyfile):
    """Good and bad credentials of every kind interleaved on keep-alive
    connections, 16 at a time: each request gets its own decision, nothing
    carries over from the request before it on the same connection."""
    key = create_key(keyfile, tenant="initech", kid="initech-1", plan="pro")
    gw = start(nginx_factory, f"infer_auth_api_keys {keyfile};\n"
               + pem_directives(keys, ["RS256", "ES256"]))
    cases = [
        ({"Authorization": "Bearer " + keys.token("RS256", kid="k-RS256")},
         200, "acme"),
        ({"Authorization": "Bearer " + keys.token("ES256", kid="k-ES256",
                                                  tenant="globex")},
         200, "globex"),
        ({"x-api-key": key}, 200, "initech"),
        ({"Authorization": "Bearer " + key}, 200, "initech"),
        ({"Authorization": "Bearer " + keys.token("RS256", kid="k-RS256",
                                                  other=True)}, 401, None),
        ({"x-api-key": key[:-2] + "zz"}, 401, None),
        ({}, 401, None),
    ]

    def client(seed):
        problems = []
        with requests.Session() as s:
            for i in range(21):
                h, status, tenant = cases[(seed * 5 + i * 3) % len(cases)]
                r = s.get(gw.url + "/", headers=h, timeout=10)
                if (r.status_code != status
                        or r.headers.get("x-tenant") != tenant):
                    problems.append((h, status, tenant, r.status_code,
                                     r.headers.get("x-tenant")))
        return problems

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        problems = [p for ps in pool.map(client, range(16)) for p in ps]
    assert problems == []


# ======================================================== nginx -t checks

@pytest.mark.parametrize("alg,content,ok", [
    ("HS256", b"a" * 32, True),
    ("HS256", b"a" * 32 + b"\n", True),
    ("HS256", b"a" * 31, False),
    ("HS256", b"a" * 31 + b"\n", False),
    ("HS384", b"a" * 47, False),
    ("HS384", b"a" * 48, True),
    ("HS512", b"a" * 63, False),
    ("HS512", b"a" * 64, True),
    ("HS256", b"", False),
    ("HS256", b"\n", False),
], ids=["hs256-32", "hs256-32-newline", "hs256-31", "hs256-31-newline",
        "hs384-47", "hs384-48", "hs512-63", "hs512-64", "empty",
        "only-newline"])
def test_nginx_t_checks_hmac_secret_lengths(nginx_factory, tmp_path, alg,
                                            content, ok):
    f = tmp_path / "hmac.secret"
    f.write_bytes(content)
    n = nginx_factory(server(f"infer_auth_jwt_key {f} alg={alg};"),
                      modules=["auth"], start=False)
    got, out = n.check_config()
    assert got == ok, out


def test_on_without_a_key_source_fails_nginx_t(nginx_factory):
    n = nginx_factory(server(), modules=["auth"], start=False)
    ok, out = n.check_config()
    assert not ok
    assert '"infer_auth on" needs infer_auth_api_keys' in out


def test_required_without_a_key_source_answers_500_and_logs_once(
        nginx_factory):
    """infer_auth required, the form the annotation fragments write: with
    no key source nginx -t warns and passes, and every request is refused
    (500 gateway_misconfigured, type server_error), never let in."""
    conf = server().replace("infer_auth on;", "infer_auth required;")
    n = nginx_factory(conf, modules=["auth"], start=False)
    ok, out = n.check_config()
    assert ok, out
    assert '[warn]' in out and '"infer_auth required" without' in out
    n.start()
    for token in (None, "not-a-token"):
        r = get(n, token=token)
        assert r.status_code == 500, (r.status_code, r.text)
        err = error_of(r)
        assert (err["type"], err["code"]) == ("server_error",
                                              "gateway_misconfigured")
        assert "www-authenticate" not in r.headers
        assert r.headers.get("content-length") == str(len(r.content))
    lines = [l for l in n.log_text().splitlines()
             if "no key source for this location" in l]
    # one line per worker at most within the interval
    assert 1 <= len(lines) <= 2, lines
    n.forget_log()


def test_required_with_keys_is_on(nginx_factory, keys):
    conf = server(pem_directives(keys, algs=["RS256"])).replace(
        "infer_auth on;", "infer_auth required;")
    n = nginx_factory(conf, modules=["auth"], start=False)
    ok, out = n.check_config()
    assert ok and "[warn]" not in out, out
    n.start()
    assert_ok(get(n, keys.token("RS256", kid="k-RS256")))
    assert_missing(get(n))


def test_nginx_t_refuses_a_public_key_as_an_hmac_secret(nginx_factory,
                                                        keys):
    """An RSA public key's PEM given as an HS256 secret would let anyone
    holding that public key sign tokens: nginx -t refuses it."""
    n = nginx_factory(server(f"infer_auth_jwt_key {keys.files['RS256']} "
                             "alg=HS256;"), modules=["auth"], start=False)
    ok, out = n.check_config()
    assert not ok
    assert "a public key (PEM, DER or JWK) cannot be an HS256 secret" in out


@pytest.mark.parametrize("form", ["der", "jwk"])
def test_nginx_t_refuses_a_der_or_jwk_public_key_as_an_hmac_secret(
        nginx_factory, keys, tmp_path, form):
    pub = serialization.load_pem_public_key(
        Path(keys.files["RS256"]).read_bytes())
    f = tmp_path / f"key.{form}"
    if form == "der":
        f.write_bytes(pub.public_bytes(
            serialization.Encoding.DER,
            serialization.PublicFormat.SubjectPublicKeyInfo))
    else:
        f.write_text(jwk.JWK.from_pyca(pub).export_public())
    n = nginx_factory(server(f"infer_auth_jwt_key {f} alg=HS256;"),
                      modules=["auth"], start=False)
    ok, out = n.check_config()
    assert not ok
    assert "cannot be an HS256 secret" in out


@pytest.mark.parametrize("what", ["missing", "not-a-key", "bad-pem"])
def test_nginx_t_refuses_a_key_file_that_is_no_key(nginx_factory, tmp_path,
                                                  keys, what):
    f = tmp_path / "key.pem"
    good = nginx_factory(server(f"infer_auth_jwt_key {keys.files['RS256']};"),
                         modules=["auth"], start=False)
    assert good.check_config()[0]
    if what == "not-a-key":
        f.write_text("hello\n")
    elif what == "bad-pem":
        f.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    n = nginx_factory(server(f"infer_auth_jwt_key {f};"), modules=["auth"],
                      start=False)
    ok, out = n.check_config()
    assert not ok, out


@pytest.mark.parametrize("content", [
    None,
    "{broken",
    '{"keys": {}}',
    '[]',
    '{"keys": [{"id": "a", "tenant": "t"}]}',
    '{"keys": [{"hash": "sha256:%s", "tenant": "t"}]}' % ("0" * 64),
    '{"keys": [{"id": "a", "hash": "sha256:%s"}]}' % ("0" * 64),
    '{"keys": [{"id": "a", "hash": "md5:00", "tenant": "t"}]}',
    '{"keys": [{"id": "a", "hash": "sha256:xyz", "tenant": "t"}]}',
], ids=["missing", "not-json", "keys-not-array", "array", "no-hash", "no-id",
        "no-tenant", "not-sha256", "bad-hex"])
def test_nginx_t_refuses_a_broken_key_file(nginx_factory, tmp_path, content):
    f = tmp_path / "keys.json"
    create_key(f)
    good = nginx_factory(server(f"infer_auth_api_keys {f};"),
                         modules=["auth"], start=False)
    assert good.check_config()[0]
    if content is None:
        f.unlink()
    else:
        f.write_text(content)
    ok, out = good.check_config()
    assert not ok, out


# ================================================================ API keys

@pytest.fixture
def keyfile(tmp_path):
    return tmp_path / "keys.json"


def test_an_api_key_as_bearer_and_as_x_api_key(nginx_factory, keyfile):
    key = create_key(keyfile, tenant="acme", kid="acme-1", plan="pro",
                     models="llama-*,mistral-7b")
    gw = start(nginx_factory, f"infer_auth_api_keys {keyfile};")
    for r in (get(gw, key), get(gw, api_key=key)):
        assert_ok(r)
        assert r.text == "ok"
        assert r.headers["x-auth-method"] == "api_key"
        assert r.headers["x-key-id"] == "acme-1"
        assert r.headers["x-subject"] == "acme-1"
        assert r.headers["x-plan"] == "pro"
        assert r.headers["x-allowed"] == "llama-* mistral-7b"


def test_x_api_key_is_tried_first(nginx_factory, keyfile):
    key = create_key(keyfile)
    gw = start(nginx_factory, f"infer_auth_api_keys {keyfile};")
    assert_ok(get(gw, "not-even-a-jwt", api_key=key))


def test_an_unknown_api_key(nginx_factory, keyfile):
    key = create_key(keyfile)
    gw = start(nginx_factory, f"infer_auth_api_keys {keyfile};")
    wrong = key[:-1] + ("A" if key[-1] != "A" else "B")
    for r in (get(gw, wrong), get(gw, api_key=wrong),
              get(gw, "sk-short"), get(gw, api_key="sk-"),
              get(gw, api_key="not-a-key-at-all")):
        assert_invalid(r, code="invalid_api_key")
        assert wrong not in r.text


def test_a_disabled_key_is_refused_without_a_reload(nginx_factory, keyfile):
    key = create_key(keyfile)
    other = create_key(keyfile, tenant="globex", kid="globex-1")
    gw = start(nginx_factory, f"infer_auth_api_keys {keyfile} interval=1s;")
    assert_ok(get(gw, key))
    workers = gw.worker_pids()
    infer_key("disable", "--file", keyfile, "--id", "acme-1")
    r = wait_status(lambda: get(gw, key), 401, timeout=6,
                    what="disabled key")
    assert_invalid(r, code="invalid_api_key", status="disabled")
    # every worker has the new file (several requests, new connections)
    for _ in range(6):
        assert get(gw, key).status_code == 401
        assert_ok(get(gw, other), tenant="globex")
    assert gw.worker_pids() == workers


def test_a_key_removed_from_the_file_is_revoked(nginx_factory, keyfile):
    key = create_key(keyfile)
    other = create_key(keyfile, tenant="globex", kid="globex-1")
    gw = start(nginx_factory, f"infer_auth_api_keys {keyfile} interval=1s;")
    assert_ok(get(gw, key))
    workers = gw.worker_pids()
    doc = json.loads(keyfile.read_text())
    doc["keys"] = [k for k in doc["keys"] if k["id"] != "acme-1"]
    write_json(keyfile, doc)
    r = wait_status(lambda: get(gw, key), 401, timeout=6, what="removed key")
    assert_invalid(r, code="invalid_api_key")
    for _ in range(6):
        assert get(gw, key).status_code == 401
    assert_ok(get(gw, other), tenant="globex")
    assert gw.worker_pids() == workers


def test_a_new_key_works_without_a_reload(nginx_factory, keyfile):
    create_key(keyfile)
    gw = start(nginx_factory, f"infer_auth_api_keys {keyfile} interval=1s;")
    key = create_key(keyfile, tenant="globex", kid="globex-1")
    r = wait_status(lambda: get(gw, key), 200, timeout=6, what="new key")
    assert_ok(r, tenant="globex")


def test_a_broken_key_file_keeps_the_last_good_keys(nginx_factory, keyfile):
    key = create_key(keyfile)
    gw = start(nginx_factory, f"infer_auth_api_keys {keyfile} interval=1s;")
    assert_ok(get(gw, key))
    tmp = keyfile.with_name("broken.tmp")
    tmp.write_text('{"keys": [')
    os.replace(tmp, keyfile)
    wait_for(lambda: re.search(r"\[(error|crit)\]", gw.log_text()),
             timeout=6, what="an error logged for the broken key file")
    for _ in range(4):
        assert_ok(get(gw, key))
    # repaired, with the key disabled: the new file is taken
    doc = {"keys": [{"id": "acme-1", "tenant": "acme", "disabled": True,
                     "hash": "sha256:" + hashlib.sha256(key.encode())
                     .hexdigest()}]}
    write_json(keyfile, doc)
    wait_status(lambda: get(gw, key), 401, timeout=6, what="repaired file")


def ours_at_debug(gw):
    """What our modules logged, after checking that it holds the auth
    handler's debug lines: a debug line printing a credential would be
    among them.  (nginx's own debug lines echo the request's headers.)"""
    ours = gw.our_log_lines()
    assert any("[debug]" in l and "infer auth access handler" in l
               for l in ours), ours
    return "\n".join(ours)


@pytest.mark.debug_log
def test_keys_and_tokens_never_reach_the_logs(nginx_factory, keyfile, keys):
    """Neither the access log (its variables) nor the error log at debug
    level shows a key or a token, not even in part."""
    key = create_key(keyfile)
    log_format = ("log_format authlog 'A=\"$http_authorization\" "
                  "K=\"$http_x_api_key\" id=$infer_key_id "
                  "st=$infer_auth_status $status';")
    gw = nginx_factory(server(
        f"infer_auth_api_keys {keyfile};\n" + pem_directives(keys, ["ES256"]),
        http=log_format, server_extra="access_log auth.log authlog;"),
        modules=["auth"], error_level="debug")
    tok = keys.token("ES256", kid="k-ES256")
    assert_ok(get(gw, key))
    assert_ok(get(gw, api_key=key))
    assert_ok(get(gw, tok))
    log = gw.workdir / "auth.log"
    lines = wait_for(lambda: log.exists() and
                     len(log.read_text().splitlines()) >= 3 and
                     log.read_text().splitlines(), what="3 access log lines")
    assert lines[0] == 'A="-" K="-" id=acme-1 st=ok 200'
    assert lines[1] == 'A="-" K="-" id=acme-1 st=ok 200'
    assert lines[2] == 'A="-" K="-" id=k-ES256 st=ok 200'
    for text in (log.read_text(), ours_at_debug(gw)):
        assert key not in text and key[3:] not in text
        assert tok not in text and tok.split(".")[2] not in text


@pytest.mark.debug_log
def test_refused_keys_and_tokens_never_reach_the_logs(nginx_factory,
                                                      keyfile, keys):
    """A rejected key is often a real key with a typo, or a real key that
    was disabled: it is not logged either."""
    key = create_key(keyfile)
    infer_key("disable", "--file", keyfile, "--id", "acme-1")
    log_format = ("log_format authlog 'A=\"$http_authorization\" "
                  "K=\"$http_x_api_key\" st=$infer_auth_status $status';")
    gw = nginx_factory(server(
        f"infer_auth_api_keys {keyfile};\n" + pem_directives(keys, ["ES256"]),
        http=log_format, server_extra="access_log auth.log authlog;"),
        modules=["auth"], error_level="debug")
    typo = key[:-2] + "zz"
    bad = keys.token("ES256", kid="k-ES256", other=True)
    assert get(gw, key).status_code == 401
    assert get(gw, api_key=typo).status_code == 401
    assert get(gw, bad).status_code == 401
    log = gw.workdir / "auth.log"
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 3,
             what="3 access log lines")
    for text in (log.read_text(), ours_at_debug(gw)):
        for secret in (key, key[3:], typo, typo[3:], bad, bad.split(".")[2]):
            assert secret not in text


# ================================================ credentials and backends

def sim_recorded(*sims):
    return [q for s in sims for q in s.requests()
            if q["path"].startswith(("/v1/", "/v2/", "/api/"))]


def header_names(q):
    return {name.lower() for name, _ in q["headers"]}


PROXY_TO = """proxy_pass http://{addr};
            proxy_http_version 1.1;
            proxy_set_header Connection "";"""


@pytest.mark.parametrize("strip", ["on", "off"])
def test_credentials_never_reach_the_backend(nginx_factory, sim_factory,
                                             keyfile, keys, strip):
    sim = sim_factory("llama-3-8b", "llama-a", ttft_ms=1, tpot_ms=1)
    key = create_key(keyfile)
    gw = start(nginx_factory, f"infer_auth_api_keys {keyfile};\n"
               + pem_directives(keys, ["RS256"])
               + (" infer_auth_strip_credentials off;" if strip == "off"
                  else ""),
               body=PROXY_TO.format(addr=sim.addr))
    tok = keys.token("RS256", kid="k-RS256")
    sent = [{"Authorization": "Bearer " + key},
            {"x-api-key": key},
            {"Authorization": "Bearer " + tok},
            {"x-api-key": key, "Authorization": "Basic Zm9vOmJhcg=="}]
    for h in sent:
        r = requests.post(gw.url + "/v1/chat/completions", timeout=10,
                          json=dict(CHAT, model="llama-3-8b"),
                          headers=dict(h, **{"X-Trace": "t-1"}))
        assert_ok(r)
    got = sim_recorded(sim)
    assert len(got) == len(sent)
    for q, h in zip(got, sent):
        names = header_names(q)
        assert "x-trace" in names
        values = " ".join(v for _, v in q["headers"])
        if strip == "on":
            assert "authorization" not in names and "x-api-key" not in names
            assert key not in values and tok not in values
        else:
            assert {n.lower() for n in h} <= names
            assert all(v in values for v in h.values())


def test_custom_credential_headers(nginx_factory, sim_factory, keyfile, keys):
    sim = sim_factory("llama-3-8b", "llama-a", ttft_ms=1, tpot_ms=1)
    key = create_key(keyfile)
    gw = start(nginx_factory, f"""infer_auth_api_keys {keyfile};
        {pem_directives(keys, ['RS256'])}
        infer_auth_header X-Gateway-Auth;
        infer_auth_api_key_header X-Gateway-Key;""",
               body=PROXY_TO.format(addr=sim.addr))
    tok = keys.token("RS256", kid="k-RS256")

    def post(h):
        return requests.post(gw.url + "/v1/chat/completions", timeout=10,
                             json=dict(CHAT, model="llama-3-8b"), headers=h)

    assert_ok(post({"X-Gateway-Auth": "Bearer " + tok}))
    assert_ok(post({"X-Gateway-Auth": "Bearer " + key}))
    assert_ok(post({"X-Gateway-Key": key}))
    assert_missing(post({"Authorization": "Bearer " + tok}))
    got = sim_recorded(sim)
    assert len(got) == 3
    for q in got:
        assert not header_names(q) & {"x-gateway-auth", "x-gateway-key"}


def test_the_auth_module_alone_proxying_and_serving(nginx_factory,
                                                    sim_factory, keyfile):
    sim = sim_factory("llama-3-8b", "llama-a", ttft_ms=1, tpot_ms=1)
    key = create_key(keyfile)
    gw = nginx_factory(f"""
    server {{
        listen 127.0.0.1:{{port}};
        infer_auth on;
        infer_auth_api_keys {keyfile};
        location /v1/ {{ {PROXY_TO.format(addr=sim.addr)} {SHOW} }}
        location /static/ {{ {SHOW} {STATIC} }}
        location /public/ {{ infer_auth off; {SHOW} {STATIC} }}
    }}""", modules=["auth"])
    r = requests.post(gw.url + "/v1/chat/completions", timeout=10,
                      json=dict(CHAT, model="anything"),
                      headers={"Authorization": "Bearer " + key})
    assert_ok(r)
    assert r.headers["x-sim-replica"] == "llama-a"
    assert r.json()["object"] == "chat.completion"
    r = requests.post(gw.url + "/v1/chat/completions", timeout=10,
                      json=dict(CHAT, model="anything"))
    assert_missing(r)
    assert len(sim_recorded(sim)) == 1
    assert_ok(get(gw, key, path="/static/"))
    assert_missing(get(gw, path="/static/"))
    r = get(gw, path="/public/")
    assert r.status_code == 200 and r.text == "ok"
    assert "x-auth-status" not in r.headers     # empty where auth is off


# ============================================ allow / deny / satisfy

@pytest.mark.parametrize("satisfy,allow,anonymous_ok", [
    ("any", "127.0.0.1", True),
    ("all", "127.0.0.1", False),
    ("any", "10.255.255.1", False),
], ids=["any-allowed", "all-allowed", "any-not-allowed"])
def test_satisfy(nginx_factory, keyfile, satisfy, allow, anonymous_ok):
    """The handler is an access module like allow/deny: "satisfy any" lets
    an allowed address in without credentials, "satisfy all" (the default)
    needs both."""
    key = create_key(keyfile)
    gw = start(nginx_factory, f"infer_auth_api_keys {keyfile};",
               location=f"satisfy {satisfy}; allow {allow}; deny all;")
    r = get(gw)
    if anonymous_ok:
        assert r.status_code == 200 and r.text == "ok"
    else:
        assert_missing(r)
    r = get(gw, key)
    assert r.status_code == 200 and r.text == "ok"
    if not anonymous_ok:            # the key is what let it in
        assert_ok(r)
    r = get(gw, key[:-2] + "zz")
    if anonymous_ok:
        assert r.status_code == 200
    else:
        assert_invalid(r, code="invalid_api_key")


# ====================================== tenants and models (route module)

ROUTE_PROXY = """proxy_pass http://$infer_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            add_header X-Model $infer_model always;
            add_header X-Model-Target $infer_model_target always;"""

REGISTRY = """
    infer_model llama-3-8b upstream=llama alias=llama3;
    infer_model llama-3-70b upstream=llama;
    infer_model mistral-7b upstream=mistral;"""


@pytest.fixture
def pools(sim_factory):
    return (sim_factory("llama-3-8b", "llama-a", ttft_ms=1, tpot_ms=1),
            sim_factory("mistral-7b", "mistral-a", ttft_ms=1, tpot_ms=1))


def model_gw(nginx_factory, pools, auth, registry=REGISTRY, extra=""):
    llama, mistral = pools
    return nginx_factory(f"""
    upstream llama {{ server {llama.addr}; keepalive 8; }}
    upstream mistral {{ server {mistral.addr}; keepalive 8; }}
    {registry}
    server {{
        listen 127.0.0.1:{{port}};
        infer_route on;
        infer_auth on;
        {auth}
        {extra}
        location / {{ {ROUTE_PROXY} {SHOW} }}
        location /v1/models {{ infer_model_list $infer_allowed_models; {SHOW} }}
    }}""", modules=["route", "auth"])


def assert_denied(r, status=404):
    assert r.status_code == status, (r.status_code, r.text[:300])
    e = error_of(r)
    assert e["code"] == ("model_not_found" if status == 404
                         else "model_not_allowed")
    assert r.headers.get("x-auth-status") == "forbidden"


def test_a_tenant_uses_only_its_models(nginx_factory, pools, keyfile):
    llama, mistral = pools
    key = create_key(keyfile, models="mistral-7b")
    gw = model_gw(nginx_factory, pools, f"infer_auth_api_keys {keyfile};")
    r = chat(gw, "mistral-7b", key=key)
    assert_ok(r)
    assert r.headers["x-sim-replica"] == "mistral-a"
    r = chat(gw, "llama-3-8b", key=key)
    assert_denied(r)
    assert "llama-3-8b" in error_of(r)["message"]
    assert len(sim_recorded(llama)) == 0 and len(sim_recorded(mistral)) == 1


def test_model_denied_403(nginx_factory, pools, keyfile):
    key = create_key(keyfile, models="mistral-7b")
    gw = model_gw(nginx_factory, pools, f"infer_auth_api_keys {keyfile};"
                  " infer_auth_model_denied 403;")
    assert_denied(chat(gw, "llama-3-8b", key=key), 403)
    assert_ok(chat(gw, "mistral-7b", key=key))
    assert sim_recorded(pools[0]) == []


def test_model_patterns(nginx_factory, pools, keyfile):
    key = create_key(keyfile, models="llama-*")
    gw = model_gw(nginx_factory, pools, f"infer_auth_api_keys {keyfile};")
    for m in ("llama-3-8b", "llama-3-70b"):
        r = chat(gw, m, key=key)
        assert_ok(r)
        assert r.headers["x-sim-replica"] == "llama-a"
    assert_denied(chat(gw, "mistral-7b", key=key))
    assert sim_recorded(pools[1]) == []


def test_an_alias_of_an_allowed_model_is_allowed(nginx_factory, pools,
                                                 keyfile):
    key = create_key(keyfile, models="llama-3-8b")
    gw = model_gw(nginx_factory, pools, f"infer_auth_api_keys {keyfile};")
    r = chat(gw, "llama3", key=key)
    assert_ok(r)
    assert r.headers["x-model-target"] == "llama-3-8b"
    assert_denied(chat(gw, "llama-3-70b", key=key))


@pytest.mark.parametrize("claim", [["mistral-7b", "llama-3-70b"],
                                   "mistral-7b llama-3-70b",
                                   "mistral-7b,llama-3-70b"],
                         ids=["array", "spaces", "commas"])
def test_models_from_a_jwt_claim(nginx_factory, pools, keys, claim):
    gw = model_gw(nginx_factory, pools, pem_directives(keys, ["ES256"]))
    tok = keys.token("ES256", kid="k-ES256", models=claim)
    assert_ok(chat(gw, "mistral-7b", token=tok))
    assert_ok(chat(gw, "llama-3-70b", token=tok))
    assert_denied(chat(gw, "llama-3-8b", token=tok))
    r = chat(gw, "mistral-7b", token=tok)
    assert set(r.headers["x-allowed"].split()) == {"mistral-7b",
                                                   "llama-3-70b"}


def test_a_models_claim_of_another_name(nginx_factory, pools, keys):
    gw = model_gw(nginx_factory, pools, pem_directives(keys, ["ES256"]) +
                  " infer_auth_models_claim scope_models;")
    tok = keys.token("ES256", kid="k-ES256", scope_models=["mistral-7b"],
                     models=["llama-3-8b"])
    assert_ok(chat(gw, "mistral-7b", token=tok))
    assert_denied(chat(gw, "llama-3-8b", token=tok))


def test_without_credentials_the_registry_stays_hidden(nginx_factory,
                                                       pools, keyfile):
    """The route module finds the model before authentication, but sends
    its errors after it: a client without credentials gets 401 whether the
    model exists, does not, or the body is broken; with a key, the route
    module's own 404 and 400."""
    key = create_key(keyfile)
    gw = model_gw(nginx_factory, pools, f"infer_auth_api_keys {keyfile};")
    for model in ("llama-3-8b", "no-such-model"):
        assert_missing(chat(gw, model))
    r = requests.post(gw.url + "/v1/chat/completions", timeout=10,
                      data=b'{"model": ', headers={"x-api-key": "sk-nope"})
    assert_invalid(r, code="invalid_api_key")

    r = chat(gw, "no-such-model", key=key)
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
    assert r.headers["x-auth-status"] == "ok"
    r = requests.post(gw.url + "/v1/chat/completions", timeout=10,
                      data=b'{"model": ', headers={"x-api-key": key})
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"
    assert all(sim_recorded(p) == [] for p in pools)


def test_tenant_models(nginx_factory, pools, keyfile):
    globex = create_key(keyfile, tenant="globex", kid="globex-1")
    acme = create_key(keyfile, tenant="acme", kid="acme-1")
    own = create_key(keyfile, tenant="globex", kid="globex-2",
                     models="llama-3-70b")
    other = create_key(keyfile, tenant="initech", kid="initech-1")
    gw = model_gw(nginx_factory, pools, f"""infer_auth_api_keys {keyfile};
        infer_auth_tenant_models globex mistral-7b;
        infer_auth_tenant_models acme '*';""")
    assert_ok(chat(gw, "mistral-7b", key=globex), tenant="globex")
    assert_denied(chat(gw, "llama-3-8b", key=globex))
    for m in ("mistral-7b", "llama-3-8b", "llama-3-70b"):
        assert_ok(chat(gw, m, key=acme))
        # nothing said: all
        assert_ok(chat(gw, m, key=other), tenant="initech")
    # the key record's models come first
    assert_ok(chat(gw, "llama-3-70b", key=own), tenant="globex")
    assert_denied(chat(gw, "mistral-7b", key=own))


def test_tenant_models_for_jwt_tenants(nginx_factory, pools, keys):
    gw = model_gw(nginx_factory, pools, pem_directives(keys, ["RS256"]) +
                  " infer_auth_tenant_models globex mistral-7b;")
    tok = keys.token("RS256", kid="k-RS256", tenant="globex")
    assert_ok(chat(gw, "mistral-7b", token=tok), tenant="globex")
    assert_denied(chat(gw, "llama-3-8b", token=tok))


def test_v1_models_shows_only_the_tenants_models(nginx_factory, pools,
                                                 keyfile):
    some = create_key(keyfile, kid="a", models="mistral-7b,llama-3-70b")
    every = create_key(keyfile, kid="b")
    gw = model_gw(nginx_factory, pools, f"infer_auth_api_keys {keyfile};")

    def ids(key):
        r = requests.get(gw.url + "/v1/models", timeout=10,
                         headers={"Authorization": "Bearer " + key})
        assert r.status_code == 200, r.text
        assert r.json()["object"] == "list"
        return [m["id"] for m in r.json()["data"]]

    assert ids(some) == ["llama-3-70b", "mistral-7b"]   # registry order
    assert ids(every) == ["llama-3-8b", "llama-3-70b", "mistral-7b"]
    assert_missing(requests.get(gw.url + "/v1/models", timeout=10))
    assert sim_recorded(*pools) == []


def test_v1_models_with_a_pattern(nginx_factory, pools, keyfile):
    """docs/auth.md: with infer_model_list $infer_allowed_models "each
    tenant sees only its models", patterns included."""
    key = create_key(keyfile, models="llama-*")
    gw = model_gw(nginx_factory, pools, f"infer_auth_api_keys {keyfile};")
    r = requests.get(gw.url + "/v1/models", timeout=10,
                     headers={"Authorization": "Bearer " + key})
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["llama-3-8b",
                                                   "llama-3-70b"]


def test_failover_keeps_the_first_decision(nginx_factory, pools, keyfile,
                                           keys):
    """The pool fails, the request goes to @fallback (an internal
    redirect): ACCESS runs again and finds the first decision, although
    the credentials were stripped from the request by then."""
    llama, mistral = pools
    key = create_key(keyfile, plan="pro")
    proxy = ROUTE_PROXY + """
            proxy_intercept_errors on;
            error_page 429 500 502 503 504 = @fallback;"""
    gw = nginx_factory(f"""
    upstream llama {{ server {llama.addr}; }}
    upstream mistral {{ server {mistral.addr}; }}
    infer_model llama-3-8b upstream=llama alias=llama3 fallback=mistral-7b;
    infer_model mistral-7b upstream=mistral;
    server {{
        listen 127.0.0.1:{{port}};
        infer_route on;
        infer_auth on;
        infer_auth_api_keys {keyfile};
        {pem_directives(keys, ['RS256'])}
        recursive_error_pages on;
        location / {{ {proxy} {SHOW} }}
        location @fallback {{ {proxy} {SHOW} }}
    }}""", modules=["route", "auth"])
    llama.configure(fail_status=503, fail_ratio=1.0)
    tok = keys.token("RS256", kid="k-RS256", tenant="globex")
    for kw, tenant in (({"key": key}, "acme"),
                       ({"token": tok}, "globex"),
                       ({"token": key}, "acme")):
        r = chat(gw, "llama3", **kw)
        assert_ok(r, tenant=tenant)
        assert r.headers["x-sim-replica"] == "mistral-a"
        assert r.headers["x-model-target"] == "mistral-7b"
    assert r.headers["x-plan"] == "pro"
    assert len(sim_recorded(llama)) == 3 and len(sim_recorded(mistral)) == 3
    for q in sim_recorded(llama, mistral):
        assert not header_names(q) & {"authorization", "x-api-key"}
    # no credentials: refused before any pool is asked
    assert_missing(chat(gw, "llama3"))
    assert len(sim_recorded(llama)) == 3


def test_an_error_page_redirect_keeps_the_decision(nginx_factory, keyfile,
                                                   keys):
    key = create_key(keyfile, plan="pro")
    gw = nginx_factory(f"""
    server {{
        listen 127.0.0.1:{{port}};
        infer_auth on;
        infer_auth_api_keys {keyfile};
        {pem_directives(keys, ['ES256'])}
        location / {{
            try_files /no-such-file =404;
            error_page 404 = /found/;
        }}
        location /found/ {{ {SHOW} {STATIC} }}
    }}""", modules=["auth"])
    tok = keys.token("ES256", kid="k-ES256", tenant="globex")
    for r, tenant in ((get(gw, key), "acme"), (get(gw, api_key=key), "acme"),
                      (get(gw, tok), "globex")):
        assert_ok(r, tenant=tenant)
        assert r.text == "ok"
    assert get(gw).status_code == 401
    assert get(gw, key[:-2] + "zz").status_code == 401


def test_the_openai_sdk(nginx_factory, pools, keyfile, keys, openai_sdk):
    key = create_key(keyfile, models="llama-*")
    gw = model_gw(nginx_factory, pools, f"infer_auth_api_keys {keyfile};\n"
                  + pem_directives(keys, ["ES256"]))
    base = gw.url + "/v1"
    params = dict(CHAT, model="llama3")
    out = openai_sdk(base, "chat", params, api_key=key)
    assert out["ok"], out
    assert out["result"]["model"] == "llama-3-8b"
    out = openai_sdk(base, "chat", params, api_key=keys.token("ES256",
                                                              kid="k-ES256"))
    assert out["ok"], out

    wrong = key[:-1] + ("A" if key[-1] != "A" else "B")
    out = openai_sdk(base, "chat", params, api_key=wrong)
    assert not out["ok"]
    assert out["error_class"] == "AuthenticationError" and out["status"] == 401
    assert out["error"]["code"] == "invalid_api_key"
    out = openai_sdk(base, "chat", params,
                     api_key=keys.token("ES256", kid="k-ES256", other=True))
    assert out["error_class"] == "AuthenticationError" and out["status"] == 401

    out = openai_sdk(base, "chat", dict(params, model="mistral-7b"),
                     api_key=key)
    assert out["error_class"] == "NotFoundError" and out["status"] == 404


def test_the_openai_sdk_permission_denied(nginx_factory, pools, keyfile,
                                          openai_sdk):
    key = create_key(keyfile, models="llama-*")
    gw = model_gw(nginx_factory, pools, f"infer_auth_api_keys {keyfile};"
                  " infer_auth_model_denied 403;")
    out = openai_sdk(gw.url + "/v1", "chat", dict(CHAT, model="mistral-7b"),
                     api_key=key)
    assert out["error_class"] == "PermissionDeniedError"
    assert out["status"] == 403


# ================================================================ JWKS file

def test_jwks_file_rotation_without_a_reload(nginx_factory, keys, tmp_path):
    f = tmp_path / "jwks.json"
    write_json(f, {"keys": [keys.jwk("RS256", "2026-10")]})
    gw = start(nginx_factory, f"infer_auth_jwks {f} interval=1s;")
    old = keys.token("RS256", kid="2026-10")
    new = keys.token("RS256", kid="2026-11", other=True)
    assert_ok(get(gw, old))
    assert_invalid(get(gw, new))
    workers = gw.worker_pids()
    write_json(f, {"keys": [keys.jwk("RS256", "2026-10"),
                            keys.jwk("RS256", "2026-11", other=True)]})
    # each worker follows the file on its own timer: one of them may see
    # the change up to an interval before the other
    wait_for(lambda: all(get(gw, new).status_code == 200 for _ in range(6)),
             5, what="new kid in every worker")
    for _ in range(6):                          # in every worker
        assert_ok(get(gw, new))
        assert_ok(get(gw, old))
    write_json(f, {"keys": [keys.jwk("RS256", "2026-11", other=True)]})
    wait_for(lambda: all(get(gw, old).status_code == 401 for _ in range(6)),
             5, what="old kid retired in every worker")
    for _ in range(6):
        assert get(gw, old).status_code == 401
        assert_ok(get(gw, new))
    assert gw.worker_pids() == workers


def test_jwks_keys_are_pinned_too(nginx_factory, keys, tmp_path):
    """The HS/RS confusion through a JWKS: an HS256 token naming the RSA
    JWK, its HMAC made with the key's PEM or its modulus; an RS256 token
    naming the oct JWK."""
    f = tmp_path / "jwks.json"
    rsa_jwk = keys.jwk("RS256", "r")
    write_json(f, {"keys": [rsa_jwk, keys.jwk("HS256", "h")]})
    gw = start(nginx_factory, f"infer_auth_jwks {f};")
    assert_ok(get(gw, keys.token("RS256", kid="r")))
    assert_ok(get(gw, hmac_token("HS256", keys.private("HS256"),
                                 {"kid": "h"})))
    for secret in (keys.public_pem("RS256"), rsa_jwk["n"].encode(),
                   json.dumps(rsa_jwk).encode()):
        for header in ({"kid": "r"}, {}):
            assert_invalid(get(gw, hmac_token("HS256", secret, header)))
    assert_invalid(get(gw, keys.token("RS256", kid="h")))


@pytest.mark.parametrize("bad,secret,alg", [
    ({"kty": "oct", "k": ""}, b"", "HS256"),
    ({"kty": "oct"}, b"", "HS256"),
    ({"kty": "oct", "k": b64u(b"s" * 16)}, b"s" * 16, "HS256"),
    ({"kty": "oct", "k": b64u(b"s" * 31)}, b"s" * 31, "HS256"),
    ({"kty": "oct", "k": b64u(b"x" * 40), "alg": "HS384"}, b"x" * 40,
     "HS384"),
    ({"kty": "oct", "k": b64u(b"x" * 40), "alg": "none"}, b"x" * 40,
     "HS256"),
], ids=["empty", "no-k", "16-bytes", "31-bytes", "hs384-40-bytes",
        "alg-none"])
def test_a_jwks_never_has_an_empty_or_short_hmac_key(nginx_factory, keys,
                                                     tmp_path, bad, secret,
                                                     alg):
    """A JWKS file holding such a key is refused by nginx -t, or the key
    is never used: either way no token signed with it passes."""
    f = tmp_path / "jwks.json"
    write_json(f, {"keys": [dict(bad, kid="bad"), keys.jwk("HS256", "good")]})
    n = nginx_factory(server(f"infer_auth_jwks {f};"), modules=["auth"],
                      start=False)
    ok, out = n.check_config()
    if not ok:
        return
    n.start()
    assert_ok(get(n, hmac_token("HS256", keys.private("HS256"),
                                {"kid": "good"})))
    assert_invalid(get(n, hmac_token(alg, secret, {"kid": "bad"})))
    assert_invalid(get(n, hmac_token(alg, secret)))
    if alg == "HS256":
        assert_invalid(get(n, raw_token({"alg": "none", "kid": "bad"},
                                        payload())))


# ================================================================ JWKS URL

class JwksServer:
    """A tiny identity provider on 127.0.0.1: serves self.doc at
    /.well-known/jwks.json (or self.status and self.raw, when set), counts
    the fetches and records each request's method and headers."""

    def __init__(self, doc, delay=0.0):
        self.doc = doc
        self.delay = delay
        self.status = 200
        self.raw = None
        self.fetches = 0
        self.seen = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def answer(self):
                with outer.lock:
                    outer.fetches += 1
                    outer.seen.append((self.command, self.path,
                                       {k.lower(): v for k, v
                                        in self.headers.items()}))
                    body = outer.raw if outer.raw is not None else \
                        json.dumps(outer.doc).encode()
                    status = outer.status
                if outer.delay:
                    time.sleep(outer.delay)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            do_GET = do_POST = do_HEAD = answer

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass    # nginx hung up on a slow answer: expected

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       args=(0.05,), daemon=True)
        self.thread.start()
        self.running = True

    def set(self, doc):
        with self.lock:
            self.doc = doc

    def count(self):
        with self.lock:
            return self.fetches

    def stop(self):
        if self.running:
            self.running = False
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(5)


@pytest.fixture
def idp(keys):
    servers = []

    def make(doc=None, delay=0.0):
        s = JwksServer(doc or {"keys": [keys.jwk("RS256", "k1")]}, delay)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


def jwks_uri_gw(nginx_factory, port, params="ttl=5m", listen_extra="",
                http="", server_extra=""):
    return nginx_factory(f"""
    {http}
    server {{
        listen 127.0.0.1:{{port}} {listen_extra};
        {server_extra}
        infer_auth_jwks_uri /_jwks {params};
        location = /_jwks {{
            internal;
            proxy_pass http://127.0.0.1:{port}/.well-known/jwks.json;
            proxy_pass_request_headers off;
            proxy_pass_request_body off;
            proxy_connect_timeout 1s;
            proxy_read_timeout 1s;
            proxy_buffering off;
        }}
        location / {{
            infer_auth on;
            {SHOW}
            {STATIC}
        }}
    }}""", modules=["auth"])


def test_jwks_uri_one_fetch_for_both_workers(nginx_factory, keys, idp):
    """20 requests at once on a cold cache, on both workers: one fetch
    (two at most, for a race), the others wait for it; then 20 more use
    the shared cache."""
    s = idp(delay=0.3)
    gw = jwks_uri_gw(nginx_factory, s.port, listen_extra="reuseport",
                     http="log_format pids '$pid $status';",
                     server_extra="access_log pids.log pids;")
    gw_log = gw.workdir / "pids.log"
    tok = keys.token("RS256", kid="k1")

    def one(_):
        # a connection of its own each: reuseport spreads them over workers
        return requests.get(gw.url + "/", timeout=10,
                            headers={"Authorization": "Bearer " + tok,
                                     "Connection": "close"})

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        rs = list(pool.map(one, range(20)))
    for r in rs:
        assert_ok(r)
    assert 1 <= s.count() <= 2, s.count()
    first = s.count()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        rs = list(pool.map(one, range(20)))
    for r in rs:
        assert_ok(r)
    assert s.count() == first
    pids = wait_for(lambda: gw_log.exists() and
                    len(gw_log.read_text().splitlines()) >= 40 and
                    {l.split()[0] for l in gw_log.read_text().splitlines()},
                    what="40 access log lines")
    assert len(pids) == 2, pids         # both workers served tokens


def test_jwks_uri_an_unknown_kid_fetches_the_new_keys(nginx_factory, keys,
                                                      idp):
    s = idp()
    gw = jwks_uri_gw(nginx_factory, s.port, "ttl=10m refresh=1s")
    assert_ok(get(gw, keys.token("RS256", kid="k1")))
    assert s.count() == 1
    # the provider rotates: k2 is published
    s.set({"keys": [keys.jwk("RS256", "k1"),
                    keys.jwk("ES256", "k2")]})
    new = keys.token("ES256", kid="k2")
    wait_status(lambda: get(gw, new), 200, timeout=5, what="k2 fetched")
    assert 2 <= s.count() <= 6
    for _ in range(6):
        assert_ok(get(gw, new))
        assert_ok(get(gw, keys.token("RS256", kid="k1")))


def test_jwks_uri_unknown_kids_do_not_hammer_the_provider(nginx_factory,
                                                          keys, idp):
    s = idp()
    gw = jwks_uri_gw(nginx_factory, s.port, "ttl=10m")   # refresh=30s
    assert_ok(get(gw, keys.token("RS256", kid="k1")))
    for i in range(15):
        assert_invalid(get(gw, keys.token("RS256", kid=f"nope-{i}")))
    assert s.count() <= 2, s.count()


def test_jwks_uri_warm_cache_outlives_the_provider(nginx_factory, keys, idp):
    s = idp()
    gw = jwks_uri_gw(nginx_factory, s.port, "ttl=10m refresh=1s")
    tok = keys.token("RS256", kid="k1")
    assert_ok(get(gw, tok))
    s.stop()
    time.sleep(1.2)                     # past refresh: a fetch would be due
    for _ in range(10):
        r = requests.get(gw.url + "/", timeout=10,
                         headers={"Authorization": "Bearer " + tok,
                                  "Connection": "close"})
        assert_ok(r)
    # an unknown kid with the provider down: the cached keys decide
    assert_invalid(get(gw, keys.token("RS256", kid="k9")))


def test_jwks_uri_cold_cache_and_provider_down_is_503(nginx_factory, keys):
    gw = jwks_uri_gw(nginx_factory, free_port(), "ttl=10m timeout=2s")
    t0 = time.monotonic()
    r = get(gw, keys.token("RS256", kid="k1"))
    assert time.monotonic() - t0 < 5
    assert r.status_code == 503, (r.status_code, r.text[:300])
    assert error_of(r)["code"] == "auth_unavailable"
    assert r.headers.get("x-auth-status") == "unavailable"
    # missing credentials need no keys: still 401
    assert_missing(get(gw))


def test_jwks_uri_fetch_is_a_get_without_the_clients_body(nginx_factory,
                                                          keys, idp):
    s = idp()
    gw = jwks_uri_gw(nginx_factory, s.port)
    tok = keys.token("RS256", kid="k1")
    r = requests.post(gw.url + "/", data=b'{"model": "m", "x": 1}',
                      headers={"Authorization": "Bearer " + tok,
                               "Content-Type": "application/json",
                               "Cookie": "session=secret",
                               "Range": "bytes=0-1"}, timeout=10)
    # a POST to a static file: 405 from nginx, after auth let it through
    assert r.status_code == 405 and r.headers["x-auth-status"] == "ok"
    assert len(s.seen) == 1
    method, path, headers = s.seen[0]
    assert (method, path) == ("GET", "/.well-known/jwks.json")
    # no body, and none announced: the client's Content-Length (22) must
    # not reach the provider with a GET that has no body
    assert headers.get("content-length", "0") == "0", headers
    assert not {"authorization", "cookie", "content-type", "range"} \
        & set(headers)


@pytest.mark.parametrize("answer", ["500", "not-json", "no-keys-member",
                                    "slow"])
def test_jwks_uri_cold_cache_and_provider_failing_is_503(nginx_factory,
                                                        keys, idp, answer):
    """Never fetched, and the provider answers 500, or junk, or too late
    (it answers after 3 s; proxy_read_timeout 1s, timeout=2s): 503
    auth_unavailable, in time."""
    s = idp(delay=3.0 if answer == "slow" else 0.0)
    if answer == "500":
        s.status = 500
    elif answer == "not-json":
        s.raw = b"<html>oops</html>"
    elif answer == "no-keys-member":
        s.raw = b'{"issuer": "x"}'
    gw = jwks_uri_gw(nginx_factory, s.port, "ttl=10m timeout=2s")
    t0 = time.monotonic()
    r = get(gw, keys.token("RS256", kid="k1"))
    assert time.monotonic() - t0 < 2.8
    assert r.status_code == 503, (r.status_code, r.text[:300])
    assert error_of(r)["code"] == "auth_unavailable"
    assert r.headers.get("x-auth-status") == "unavailable"


@pytest.mark.parametrize("failure", ["500", "not-json", "no-usable-key",
                                     "too-big", "slow", "down"])
def test_jwks_uri_a_failed_fetch_keeps_the_cached_keys(nginx_factory, keys,
                                                       idp, failure):
    """The ttl is over and the provider fails (500, junk, a set with no
    usable key, an answer slower than proxy_read_timeout, or down): the
    cached keys go on being used, in every worker, and the failure is
    logged at error."""
    s = idp()
    gw = jwks_uri_gw(nginx_factory, s.port, "ttl=1s refresh=1s timeout=2s",
                     listen_extra="reuseport")
    tok = keys.token("RS256", kid="k1")
    assert_ok(get(gw, tok))
    if failure == "500":
        s.status = 500
    elif failure == "not-json":
        s.raw = b'{"keys": [{"kty": "RSA", '
    elif failure == "no-usable-key":
        s.set({"keys": [{"kty": "RSA", "kid": "b", "n": "!!!", "e": "AQAB"},
                        {"kty": "EC", "kid": "c", "crv": "secp256k1",
                         "x": "AA", "y": "AA"}]})
    elif failure == "too-big":
        # over the 1 MB a JWKS may have: refused, the client still served
        s.raw = json.dumps({"keys": [keys.jwk("RS256", "k1")],
                            "pad": "x" * (1200 * 1024)}).encode()
    elif failure == "slow":
        s.delay = 3.0
    else:
        s.stop()
    time.sleep(1.2)                     # the ttl is over: fetched again
    for _ in range(3 if failure == "slow" else 8):
        r = requests.get(gw.url + "/", timeout=10,
                         headers={"Authorization": "Bearer " + tok,
                                  "Connection": "close"})
        assert_ok(r)
    if failure != "down":
        wait_for(lambda: s.count() >= 2, timeout=3,
                 what="a fetch after the ttl")
    wait_for(lambda: re.search(r"\[error\].*", gw.log_text()), timeout=4,
             what="the failed fetch logged at error")
    for _ in range(3 if failure == "slow" else 4):
        assert_ok(get(gw, tok))


def test_jwks_uri_keys_it_cannot_use_are_skipped(nginx_factory, keys, idp):
    """Providers publish keys beside the signing ones that this module
    cannot use (another curve, a malformed or weak key): those are
    skipped, with a warning, and the others work."""
    s = idp()
    s.set({"keys": [keys.jwk("RS256", "k1"), keys.jwk("ES256", "k2"),
                    {"kty": "RSA", "kid": "b", "n": "!!!", "e": "AQAB"},
                    {"kty": "EC", "kid": "c", "crv": "secp256k1",
                     "x": "AA", "y": "AA"}]})
    gw = jwks_uri_gw(nginx_factory, s.port, "ttl=10m")
    assert_ok(get(gw, keys.token("RS256", kid="k1")))
    assert_ok(get(gw, keys.token("ES256", kid="k2")))
    assert_invalid(get(gw, keys.token("RS256", kid="b")))
    wait_for(lambda: re.search(r"\[warn\].*2 keys skipped, the first: key 2",
                               gw.log_text()), timeout=4,
             what="the skipped keys logged at warn")


@pytest.mark.parametrize("failure", ["500", "not-json"])
def test_jwks_uri_a_failing_provider_is_not_asked_for_every_request(
        nginx_factory, keys, idp, failure):
    """After the ttl, with the provider failing, the cached keys serve;
    the provider is asked again now and then (once per refresh is what
    the unknown-kid path allows), not once per request."""
    s = idp()
    gw = jwks_uri_gw(nginx_factory, s.port, "ttl=1s refresh=1s timeout=2s")
    tok = keys.token("RS256", kid="k1")
    assert_ok(get(gw, tok))
    if failure == "500":
        s.status = 500
    else:
        s.raw = b"<html>"
    time.sleep(1.2)
    before = s.count()
    t0 = time.monotonic()
    with requests.Session() as c:
        for _ in range(60):
            r = c.get(gw.url + "/", timeout=10,
                      headers={"Authorization": "Bearer " + tok})
            assert_ok(r)
    elapsed = time.monotonic() - t0
    fetches = s.count() - before
    assert fetches <= 2 + int(elapsed), (fetches, elapsed)


def test_jwks_uri_a_reload_keeps_the_cache(nginx_factory, keys, idp):
    s = idp()
    gw = jwks_uri_gw(nginx_factory, s.port, "ttl=10m")
    tok = keys.token("RS256", kid="k1")
    assert_ok(get(gw, tok))
    s.stop()
    gw.reload()                         # new workers, the same shared zone
    for _ in range(6):
        r = requests.get(gw.url + "/", timeout=10,
                         headers={"Authorization": "Bearer " + tok,
                                  "Connection": "close"})
        assert_ok(r)
    assert s.count() == 1


def test_jwks_uri_a_large_key_set(nginx_factory, keys, idp):
    """45 RSA keys (about 18 KB of JSON): the last one verifies."""
    doc = {"keys": [keys.jwk("RS256", f"old-{i}", other=True)
                    for i in range(44)] + [keys.jwk("RS256", "k1")]}
    assert len(json.dumps(doc)) > 16000
    s = idp(doc)
    gw = jwks_uri_gw(nginx_factory, s.port)
    assert_ok(get(gw, keys.token("RS256", kid="k1")))
    assert_ok(get(gw, keys.token("RS256", kid="old-7", other=True)))
    assert_invalid(get(gw, keys.token("RS256", kid="old-7")))


def test_jwks_uri_is_fetched_again_after_its_ttl(nginx_factory, keys, idp):
    s = idp()
    gw = jwks_uri_gw(nginx_factory, s.port, "ttl=2s refresh=1s")
    tok = keys.token("RS256", kid="k1")
    assert_ok(get(gw, tok))
    assert s.count() == 1
    # k1 is withdrawn; once the ttl is over the new set is used
    s.set({"keys": [keys.jwk("ES256", "k2")]})
    wait_status(lambda: get(gw, tok), 401, timeout=6, what="k1 withdrawn")
    assert s.count() >= 2
    assert_ok(get(gw, keys.token("ES256", kid="k2")))


# ============================ nothing from a client splits a header or a log

def test_a_claim_never_splits_a_header_at_the_backend(nginx_factory,
                                                      sim_factory, keys):
    """A claim that carries CR LF goes up in one header, escaped as nginx
    escapes its logs (\\xHH), never as a header of its own."""
    sim = sim_factory("llama-3-8b", "llama-a", ttft_ms=1, tpot_ms=1)
    gw = start(nginx_factory, pem_directives(keys, ["RS256"]),
               body=PROXY_TO.format(addr=sim.addr)
               + "\n            proxy_set_header X-User-Name "
                 "$infer_claim_name;")
    tok = keys.token("RS256", kid="k-RS256", name="Alice\r\nX-Admin: true")
    r = requests.post(gw.url + "/v1/chat/completions", timeout=10,
                      json=dict(CHAT, model="llama-3-8b"),
                      headers={"Authorization": "Bearer " + tok})
    assert_ok(r)
    q = sim_recorded(sim)[-1]
    assert "x-admin" not in header_names(q)
    sent = dict((n.lower(), v) for n, v in q["headers"])
    assert sent.get("x-user-name") == "Alice\\x0D\\x0AX-Admin: true", q["headers"]


@pytest.mark.parametrize("claim", ["tenant", "sub", "plan", "models"])
def test_an_identity_claim_with_a_control_character_is_refused(
        nginx_factory, keys, claim):
    """$infer_tenant, $infer_subject, $infer_plan and the models name who
    the client is, in headers and log lines: a token whose claim could
    split one is refused with 401 invalid_token, not passed on."""
    gw = start(nginx_factory, pem_directives(keys, ["RS256"]))
    value = "acme\r\nX-Admin: true" if claim != "models" else ["a\nb"]
    r = get(gw, keys.token("RS256", kid="k-RS256", **{claim: value}))
    assert r.status_code == 401
    assert error_of(r)["code"] == "invalid_token"
    assert "control character" in error_of(r)["message"]
    assert "\n" not in r.headers["www-authenticate"]
    assert not [l for l in gw.log_text().splitlines()
                if l.startswith("X-Admin")]


@pytest.mark.parametrize("field", ["id", "tenant", "plan"])
def test_a_key_file_with_a_control_character_is_refused(nginx_factory,
                                                        keyfile, field):
    create_key(keyfile, tenant="acme", kid="acme-1", plan="pro")
    doc = json.loads(keyfile.read_text())
    doc["keys"][0][field] = "x\ny"
    keyfile.write_text(json.dumps(doc))
    n = nginx_factory(server(f"infer_auth_api_keys {keyfile};"),
                      modules=["auth"], start=False)
    ok, out = n.check_config()
    assert not ok
    assert "control character" in out, out
    assert "x\ny" not in out


def test_error_envelopes_are_utf8_json_whatever_the_model_name(
        nginx_factory, pools, keys):
    """A model name that is no UTF-8 (raw bytes in a header, an unpaired
    surrogate in the body) still gets an envelope that a strict JSON
    parser reads: each bad byte becomes U+FFFD."""
    gw = model_gw(nginx_factory, pools, pem_directives(keys, ["RS256"]),
                  extra="infer_model_source header=X-Model body;")
    tok = keys.token("RS256", kid="k-RS256")
    auth = {"Authorization": "Bearer " + tok}
    answers = [
        requests.post(gw.url + "/v1/chat/completions", timeout=10,
                      data=b'{"model": "caf\xe9\xff", "messages": []}',
                      headers=dict(auth, **{"content-type":
                                            "application/json"})),
        requests.post(gw.url + "/v1/chat/completions", timeout=10,
                      data=b'{"model": "a\\ud800b", "messages": []}',
                      headers=dict(auth, **{"content-type":
                                            "application/json"})),
        requests.post(gw.url + "/v1/chat/completions", timeout=10,
                      json={"messages": []},
                      headers=dict(auth, **{"x-model": b"m\xc3\x28"})),
    ]
    for r in answers:
        assert 400 <= r.status_code < 500, r.text
        text = r.content.decode("utf-8")          # strict: raises if not
        assert json.loads(text)["error"]["code"]


def test_a_kid_with_a_control_character_is_refused(nginx_factory, keys):
    """The kid of an accepted token is $infer_key_id: one that could split
    a header never makes it there."""
    gw = start(nginx_factory, pem_directives(keys, ["RS256"], kid=False))
    r = get(gw, keys.token("RS256", kid="k\r\nX-Admin: true"))
    assert r.status_code == 401
    assert error_of(r)["code"] == "invalid_token"
