"""infer_auth_token_cache (docs/auth.md): a worker remembers the tokens
whose signature it checked, so that the same token again skips the RSA or
EC verification; but never past a key rotation, never for a location with
other keys, and never instead of the claims, which are checked each time.

Cache hits are seen in the debug log ("token known from the token
cache"): every test that counts on a hit, or on a miss, asserts it, so that
none of them passes with the cache off.  Tokens are minted with PyJWT."""

import json
import time

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwcrypto import jwk

HIT = "token known from the token cache"
STATIC = "try_files /ok.txt =404;"


def pem(key):
    return key.public_key().public_bytes(
        serialization.Encoding.PEM,
        serialization.PublicFormat.SubjectPublicKeyInfo)


def jwks(*pairs):
    """A JWKS document of (kid, private key) pairs' public keys."""
    keys = []
    for kid, k in pairs:
        j = json.loads(jwk.JWK.from_pem(pem(k)).export_public())
        j["kid"] = kid
        keys.append(j)
    return json.dumps({"keys": keys})


def token(key, kid, alg="RS256", ttl=600, **claims):
    now = int(time.time())
    body = {"sub": "u", "tenant": "acme", "iat": now, "exp": now + ttl}
    body.update(claims)
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})


def get(gw, tok, path="/"):
    return requests.get(gw.url + path, timeout=10,
                        headers={"Authorization": "Bearer " + tok})


def hits(gw):
    return gw.log_text().count(HIT)


def handled(gw):
    """How many requests the auth handler saw (its own debug line): a count
    of hits is worth something only where these are logged."""
    return gw.log_text().count("infer auth access handler")


@pytest.fixture(scope="module")
def rsa_keys():
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048)
            for _ in range(2)]


SHOW = """add_header X-Tenant $infer_tenant always;
           add_header X-Key-Id $infer_key_id always;
           add_header X-Sub $infer_claim_sub always;"""


def gateway(nginx_factory, auth, http="", locations=""):
    return nginx_factory(f"""
    {http}
    server {{
        listen 127.0.0.1:{{port}};
        location / {{ infer_auth on; {auth} {SHOW} {STATIC} }}
        {locations}
    }}""", modules=["auth"], error_level="debug", workers=1)


@pytest.mark.debug_log
def test_the_same_token_again_skips_the_signature(nginx_factory, tmp_path,
                                                  rsa_keys):
    (tmp_path / "k.pem").write_bytes(pem(rsa_keys[0]))
    gw = gateway(nginx_factory, f"infer_auth_jwt_key {tmp_path}/k.pem kid=a;")
    tok = token(rsa_keys[0], "a", sub="alice", tenant="acme")
    for i in range(3):
        r = get(gw, tok)
        assert r.status_code == 200
        # verified once, then hits: they show the same tenant, kid and
        # claims as the verification
        assert hits(gw) == i
        assert (r.headers["x-tenant"], r.headers["x-key-id"],
                r.headers["x-sub"]) == ("acme", "a", "alice")

    # one byte else: another token, not a hit; a forged one still fails
    other = token(rsa_keys[0], "a", sub="v")
    assert get(gw, other).status_code == 200
    head, body, sig = tok.split(".")
    forged = ".".join([head, body, sig[:-2] + ("AA" if sig[-2:] != "AA"
                                                 else "BB")])
    assert get(gw, forged).status_code == 401
    assert hits(gw) == 2


@pytest.mark.debug_log
def test_off_turns_it_off(nginx_factory, tmp_path, rsa_keys):
    (tmp_path / "k.pem").write_bytes(pem(rsa_keys[0]))
    gw = gateway(nginx_factory, f"infer_auth_jwt_key {tmp_path}/k.pem kid=a;",
                 http="infer_auth_token_cache off;")
    tok = token(rsa_keys[0], "a")
    for _ in range(3):
        assert get(gw, tok).status_code == 200
    # three requests seen at debug level, none of them a hit
    assert handled(gw) == 3
    assert hits(gw) == 0


@pytest.mark.debug_log
def test_claims_are_checked_on_every_hit(nginx_factory, tmp_path,
                                         rsa_keys):
    """The key is the server's, so / and /strict share its key set: a token
    cached in / is a hit in /strict too, and there still meets the issuer
    that /strict asks for, or is refused."""
    (tmp_path / "k.pem").write_bytes(pem(rsa_keys[0]))
    gw = nginx_factory(f"""
    server {{
        listen 127.0.0.1:{{port}};
        infer_auth on;
        infer_auth_jwt_key {tmp_path}/k.pem kid=a;
        location / {{ {STATIC} }}
        location /strict {{
            infer_auth_issuer https://idp.example.com;
            {STATIC}
        }}
    }}""", modules=["auth"], error_level="debug", workers=1)
    tok = token(rsa_keys[0], "a", iss="https://other.example.com")
    good = token(rsa_keys[0], "a", iss="https://idp.example.com")
    assert get(gw, tok).status_code == 200
    assert get(gw, good).status_code == 200
    assert hits(gw) == 0

    r = get(gw, tok, "/strict")
    assert hits(gw) == 1                        # a hit, and refused
    assert r.status_code == 401
    assert r.headers["www-authenticate"].endswith(
        'error_description="the token\'s issuer is not accepted"')
    assert get(gw, good, "/strict").status_code == 200
    assert hits(gw) == 2


@pytest.mark.debug_log
def test_a_cached_token_is_refused_once_it_expires(nginx_factory, tmp_path,
                                                   rsa_keys):
    """A hit until exp; then the entry is gone with the token's validity,
    and the token is refused as expired."""
    (tmp_path / "k.pem").write_bytes(pem(rsa_keys[0]))
    gw = gateway(nginx_factory, f"infer_auth_jwt_key {tmp_path}/k.pem kid=a;")
    tok = token(rsa_keys[0], "a", ttl=2)
    assert get(gw, tok).status_code == 200
    assert get(gw, tok).status_code == 200
    assert hits(gw) == 1
    deadline = time.monotonic() + 5
    r = get(gw, tok)
    while r.status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
        r = get(gw, tok)
    assert r.status_code == 401
    assert r.headers["www-authenticate"].endswith(
        'error_description="the token has expired"')


@pytest.mark.debug_log
def test_a_rotated_key_is_not_trusted_from_the_cache(nginx_factory,
                                                      tmp_path, rsa_keys):
    """The JWKS file drops kid a for kid b: a token of a, accepted (and
    cached) before, is refused after the file is read again."""
    f = tmp_path / "jwks.json"
    f.write_text(jwks(("a", rsa_keys[0])))
    gw = gateway(nginx_factory, f"infer_auth_jwks {f} interval=100ms;")
    old = token(rsa_keys[0], "a")
    assert get(gw, old).status_code == 200
    assert get(gw, old).status_code == 200
    assert hits(gw) == 1

    f.write_text(jwks(("b", rsa_keys[1])))
    new = token(rsa_keys[1], "b")
    deadline = time.monotonic() + 5
    while get(gw, new).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert get(gw, new).status_code == 200
    before = hits(gw)
    r = get(gw, old)
    assert hits(gw) == before                   # not a hit: checked again
    assert r.status_code == 401
    assert "no key for the token" in r.headers["www-authenticate"]


@pytest.mark.debug_log
def test_a_location_with_other_keys_does_not_trust_it(nginx_factory,
                                                      tmp_path, rsa_keys):
    """Verified in / against key a; /other knows key b only (same kid): the
    cache entry of / counts for nothing there."""
    (tmp_path / "a.pem").write_bytes(pem(rsa_keys[0]))
    (tmp_path / "b.pem").write_bytes(pem(rsa_keys[1]))
    gw = gateway(nginx_factory, f"infer_auth_jwt_key {tmp_path}/a.pem kid=k;",
                 locations=f"""
        location /other {{
            infer_auth on; infer_auth_jwt_key {tmp_path}/b.pem kid=k;
            {STATIC}
        }}""")
    tok = token(rsa_keys[0], "k")
    assert get(gw, tok).status_code == 200
    assert get(gw, tok).status_code == 200
    assert hits(gw) == 1                        # cached for /
    assert get(gw, tok, "/other").status_code == 401
    assert hits(gw) == 1                        # not a hit in /other


@pytest.mark.debug_log
def test_the_cache_is_bounded(nginx_factory, tmp_path):
    """With room for 2 tokens, a third pushes out the least recent."""
    k = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "k.pem").write_bytes(pem(k))
    gw = gateway(nginx_factory, f"infer_auth_jwt_key {tmp_path}/k.pem kid=e;",
                 http="infer_auth_token_cache 2;")
    t1, t2, t3 = (token(k, "e", alg="ES256", sub=s) for s in "123")
    for t in (t1, t2, t3):
        assert get(gw, t).status_code == 200
    assert hits(gw) == 0
    assert get(gw, t3).status_code == 200      # kept: a hit
    assert hits(gw) == 1
    assert get(gw, t1).status_code == 200      # pushed out: verified again
    assert hits(gw) == 1


@pytest.mark.parametrize("value", ["0", "-1", "lots"],
                         ids=["zero", "negative", "not-a-number"])
def test_nginx_t_refuses_a_bad_size(nginx_factory, tmp_path, rsa_keys,
                                    value):
    (tmp_path / "k.pem").write_bytes(pem(rsa_keys[0]))
    n = nginx_factory(f"""
    infer_auth_token_cache {value};
    server {{
        listen 127.0.0.1:{{port}};
        location / {{ infer_auth on;
                     infer_auth_jwt_key {tmp_path}/k.pem; {STATIC} }}
    }}""", modules=["auth"], start=False)
    ok, out = n.check_config()
    assert not ok
    assert f'invalid number of tokens "{value}"' in out
