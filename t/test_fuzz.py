"""Every parser is fuzzed: bounded libFuzzer runs, under ASan and UBSan, of
the parsers that call nginx core functions, linked with the test-only shim
t/unit/ngx_shim.c (Debian's nginx-dev tree has nginx's headers, none of
its .c files) and lld's --gc-sections, which leaves out the module code
that needs the rest of nginx.  The token decoder and its signature checks,
the JWKS parser, the API key file, the model registry file, and Redis's
replies; each run starts from its seeds in t/unit and the inputs that
found a bug, so they are replayed each time.  The long runs are in
t/unit/fuzz_runs.md."""

import base64
import hashlib
import hmac
import json
import shutil
import subprocess

import jwt
import pytest

from harness.cunit import REPO, TREE, UNIT, fuzz

SECONDS = 5

# what lets a target leave out the module code it does not call
LINK = ["-ffunction-sections", "-fdata-sections", "-fuse-ld=lld",
        "-Wl,--gc-sections"]

# t/unit/auth_jwt_fuzz.c's HMAC secret
SECRET = (b"ngx_infer fuzz secret: 64 bytes or more, as HS512 wants, "
          b"for HS256, HS384 and HS512")


def pcre_lib():
    """The PCRE the tree is configured with: PCRE2, or PCRE1 for a tree
    configured --without-pcre2 (ingress-nginx's)."""
    config = (TREE / "objs" / "ngx_auto_config.h").read_text()
    return "-lpcre2-8" if "#define NGX_PCRE2" in config else "-lpcre"


def run_fuzz(tmp_path, target, sources, corpus, libs, args=()):
    if shutil.which("ld.lld") is None:
        pytest.skip("lld is not installed")
    return fuzz(tmp_path, [UNIT / target, UNIT / "ngx_shim.c",
                           *(REPO / s for s in sources)],
                UNIT / corpus,
                (UNIT / target.replace("_fuzz.c", ".dict")).read_text(),
                seconds=SECONDS, args=args, flags=LINK, libs=libs)


def verbose(binary, *inputs):
    """What the harness says of each input, with FUZZ_VERBOSE set."""
    r = subprocess.run([str(binary), *map(str, inputs)],
                       env={"FUZZ_VERBOSE": "1"}, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stderr


def test_token_decoder(tmp_path):
    """The decoder and the checks after it: only the key of a token's
    algorithm may verify it, and only with the right signature.  A token
    PyJWT signs with the harness's secret verifies, the same one with its
    signature changed does not."""
    binary = run_fuzz(tmp_path, "auth_jwt_fuzz.c",
                      ["ngx_infer_auth/ngx_http_infer_auth_jwt.c"],
                      "jwt_corpus", ["-ljansson", "-lcrypto"])

    good = tmp_path / "good"
    token = jwt.encode({"sub": "u", "tenant": "acme"}, SECRET,
                       algorithm="HS384", headers={"kid": "HS384"})
    good.write_text(token)
    bad = tmp_path / "bad"
    head, body, sig = token.split(".")
    sig = base64.urlsafe_b64encode(
        bytes([base64.urlsafe_b64decode(sig + "==")[0] ^ 1])
        + base64.urlsafe_b64decode(sig + "==")[1:]).rstrip(b"=").decode()
    bad.write_text(f"{head}.{body}.{sig}")

    assert 'verified by "HS384"' in verbose(binary, good)
    assert "verified" not in verbose(binary, bad)
    for seed, kid in (("hs256", "HS256"), ("hs512", "HS512")):
        assert f'verified by "{kid}"' in verbose(binary,
                                                 UNIT / "jwt_corpus" / seed)
    assert "verified" not in verbose(binary, UNIT / "jwt_corpus" / "rs256")


def test_jwks_parser(tmp_path):
    """The JWKS parser, and the body filter that collects a JWKS answer in
    buffers of any size, empty ones included (an empty first buffer was
    copied from a NULL pointer: jwks_corpus/empty_buffer)."""
    binary = run_fuzz(tmp_path, "auth_jwks_fuzz.c",
                      ["ngx_infer_auth/ngx_http_infer_auth_jwt.c",
                       "ngx_infer_auth/ngx_http_infer_auth_jwks.c"],
                      "jwks_corpus", ["-ljansson", "-lcrypto"])
    verbose(binary, UNIT / "jwks_corpus" / "empty_buffer")


def test_api_key_file(tmp_path):
    """The API key file, checked against jansson's reading of it (a key
    with "plan": null had a NULL pointer moved: keys_corpus/one)."""
    binary = run_fuzz(tmp_path, "auth_keys_fuzz.c",
                      ["ngx_infer_auth/ngx_http_infer_auth_keys.c"],
                      "keys_corpus", ["-ljansson", "-lcrypto"])
    verbose(binary, UNIT / "keys_corpus" / "one")


def test_model_registry_file(tmp_path):
    """The registry file with infer_model's models: names in upper and
    mixed case are found in their case only, fallbacks to them are found
    (they were refused: registry_corpus/array), names that differ in case
    only are refused."""
    binary = run_fuzz(tmp_path, "route_registry_fuzz.c",
                      ["ngx_infer_route/ngx_http_infer_route_file.c",
                       "ngx_infer_route/ngx_http_infer_route_registry.c"],
                      "registry_corpus", ["-ljansson", pcre_lib()],
                      args=["-max_len=8192"])
    seeds = UNIT / "registry_corpus"
    assert "registry of 5 models" in verbose(binary, seeds / "models")
    assert "registry of 3 models" in verbose(binary, seeds / "array")
    out = verbose(binary, seeds / "case_twice")
    assert 'name or alias "same" is declared twice' in out, out
    out = verbose(binary, seeds / "conf_clash")
    assert 'name or alias "conf-model" is declared twice' in out, out

    # a file written here, in the case a user would write it
    mixed = tmp_path / "mixed"
    mixed.write_text(json.dumps({"models": [
        {"name": "Qwen2.5-72B-Instruct", "upstream": "Pool-C",
         "aliases": ["QWEN", "qwen-Big"], "fallback": "Conf-Model"}]}))
    assert "registry of 2 models" in verbose(binary, mixed)


def test_redis_replies(tmp_path):
    """Redis's bytes through hiredis's reader, bounded as the module bounds
    it (redis_corpus/huge: "*2147483647\\r\\n"), into an admission's
    answer."""
    binary = run_fuzz(tmp_path, "ratelimit_redis_fuzz.c",
                      ["ngx_infer_ratelimit/"
                       "ngx_http_infer_ratelimit_redis.c",
                       "ngx_infer_ratelimit/"
                       "ngx_http_infer_ratelimit_redis_call.c"],
                      "redis_corpus", ["-lhiredis"], args=["-max_len=4096"])
    verbose(binary, UNIT / "redis_corpus" / "huge",
            UNIT / "redis_corpus" / "nested")


def test_the_seeds_are_what_they_say(tmp_path):
    """The HS* seeds are signed with the harness's secret, as an
    independent HMAC computes it."""
    for seed, md in (("hs256", hashlib.sha256), ("hs384", hashlib.sha384),
                     ("hs512", hashlib.sha512)):
        head, body, sig = (UNIT / "jwt_corpus" / seed).read_bytes().split(
            b".")
        want = base64.urlsafe_b64encode(
            hmac.new(SECRET, head + b"." + body, md).digest()).rstrip(b"=")
        assert sig == want, seed


def test_decimal_amounts(tmp_path):
    """Prices, costs and budgets (ngx_infer_common/ngx_http_infer_decimal.h):
    the parser against an oracle written another way, every amount read
    written back and read again to itself, the cost against 128-bit
    arithmetic (t/unit/common_decimal_fuzz.c)."""
    binary = run_fuzz(tmp_path, "common_decimal_fuzz.c", [],
                      "decimal_corpus", [pcre_lib()])
    out = verbose(binary, UNIT / "decimal_corpus" / "max",
                  UNIT / "decimal_corpus" / "toolong")
    assert "scale=6 v=9007199254740992 " in out
    assert "scale=9 v=-1 " in out


def test_cluster_slots_and_nodes(tmp_path):
    """A key's slot, a MOVED or ASK, and CLUSTER NODES's answer
    (ngx_infer_ratelimit/ngx_http_infer_ratelimit_nodes.c): the slot
    against an oracle written bit by bit and, here, against redis-py's
    own key_slot; the map against the lines read again another way."""
    from redis.crc import key_slot
    binary = run_fuzz(tmp_path, "ratelimit_nodes_fuzz.c",
                      ["ngx_infer_ratelimit/"
                       "ngx_http_infer_ratelimit_nodes.c"],
                      "nodes_corpus", [])
    for k in [b"foo", b"{user1000}.following", b"{}{bar}", b"{{a}}",
              b"a{b}c", b"{a", b"}a{", b"", b"infer:rl:{acme}:req:20261206",
              "{t\u00e9nant}:x".encode()]:
        f = tmp_path / "key"
        f.write_bytes(b"k" + k)
        assert f"slot={key_slot(k)}\n" in verbose(binary, f), k
    out = verbose(binary, UNIT / "nodes_corpus" / "nodes_doc")
    assert "rc=0 masters=3 slots=16384" in out, out
    out = verbose(binary, UNIT / "nodes_corpus" / "nodes_self")
    assert "rc=0 masters=1 slots=102" in out, out
    assert "rc=-5" in verbose(binary, UNIT / "nodes_corpus" / "nodes_none")
    assert "rc=1 slot=3999 port=6381" in verbose(
        binary, UNIT / "nodes_corpus" / "moved")
    assert "rc=2 slot=3999 port=6381" in verbose(
        binary, UNIT / "nodes_corpus" / "ask")
    assert "rc=-5" in verbose(binary, UNIT / "nodes_corpus" / "moved_bad")
