"""The Debian packages (make deb: scripts/build-deb.sh, debian/): built
with Debian's own tools, checked by lintian, installed with dpkg next to
Debian's nginx, enabled the way Debian enables its own modules, loaded
by that nginx, used by a request through the four modules, and purged
without a trace.  The packages are installed on this machine for the
length of the test module: it needs root and Debian's nginx."""

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from harness.nginx import NGINX_BIN, REPO

MODULES = ["route", "auth", "ratelimit", "metrics"]
PACKAGES = [f"libnginx-mod-http-infer-{m}" for m in MODULES]
META = "libnginx-mod-http-infer"
ENABLED = Path("/etc/nginx/modules-enabled")
KEY = "sk-debian-package-test-0123456789abcdefghijklmnop"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or NGINX_BIN != "/usr/sbin/nginx"
    or not shutil.which("dh_nginx"),
    reason="needs root, Debian's nginx and nginx-dev (make deps)")


def run(*cmd, check=True, timeout=600):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{cmd}: {r.stdout}{r.stderr}"
    return r


def installed(pkg):
    r = run("dpkg-query", "-W", "-f=${Status}", pkg, check=False)
    return "ok installed" in r.stdout


def field(deb, name):
    return run("dpkg-deb", "-f", str(deb), name).stdout.strip()


@pytest.fixture(scope="module")
def debs(tmp_path_factory):
    """{package: its .deb}, built by the make target's script."""
    if any(installed(p) for p in PACKAGES + [META]):
        pytest.skip("ngx_infer's packages are installed on this machine "
                    "already; this test installs and purges them")
    out = tmp_path_factory.mktemp("deb")
    run(str(REPO / "scripts/build-deb.sh"), "--out", str(out))
    found = {p.name.split("_")[0]: p for p in out.glob("*.deb")}
    for p in PACKAGES + [META]:
        assert p in found, sorted(found)
    return found


@pytest.fixture(scope="module")
def purge_at_end(debs):
    yield
    run("dpkg", "--purge", *PACKAGES, META, check=False)


def abi():
    """The nginx ABI (nginx-abi-X-N) that the package of Debian's nginx
    binary provides (in bookworm the package nginx, not nginx-core)."""
    owner = run("dpkg", "-S", NGINX_BIN).stdout.split(":")[0]
    provides = run("dpkg-query", "-W", "-f=${Provides}", owner).stdout
    names = [p.strip() for p in provides.split(",")
             if p.strip().startswith("nginx-abi-")]
    assert len(names) == 1, provides
    return names[0]


def test_each_module_is_one_package_as_debian_ships_its_own(debs):
    for m, pkg in zip(MODULES, PACKAGES):
        deb = debs[pkg]
        files = run("dpkg-deb", "-c", str(deb)).stdout
        assert f"./usr/lib/nginx/modules/ngx_http_infer_{m}_module.so" in files
        conf = f"./usr/share/nginx/modules-available/mod-http-infer-{m}.conf"
        assert conf in files
        depends = [d.strip() for d in field(deb, "Depends").split(",")]
        # the exact nginx it was built for, and the libraries it links
        assert abi() in depends, depends
        assert any(d.startswith("libc6") for d in depends), depends
        assert field(deb, "Section") == "httpd"
    libs = {m: field(debs[p], "Depends") for m, p in zip(MODULES, PACKAGES)}
    assert "libjansson4" in libs["route"] and "libssl3" in libs["auth"]
    assert "libhiredis" in libs["ratelimit"]
    assert "libhiredis" not in libs["auth"]
    meta = field(debs[META], "Depends")
    for pkg in PACKAGES:
        assert f"{pkg} (= " in meta, meta


def test_lintian_finds_nothing_to_say(debs):
    changes = list(next(iter(debs.values())).parent.glob("*.changes"))
    assert len(changes) == 1
    r = run("lintian", "--fail-on", "error,warning", "--pedantic",
            str(changes[0]), check=False, timeout=300)
    tags = [line for line in r.stdout.splitlines() if line[:2] in
            ("E:", "W:", "I:", "P:")]
    assert r.returncode == 0 and tags == [], r.stdout + r.stderr


def backend_conf(sim, keys):
    return f"""
    upstream pool {{ server {sim.addr}; keepalive 8; }}
    infer_model llama-3-8b upstream=pool;
    infer_auth_api_keys {keys};
    infer_ratelimit_zone rl:1m;
    infer_metrics_zone m 1m;
    server {{
        listen 127.0.0.1:{{port}};
        location /v1/ {{
            infer_route on; infer_auth on; infer_ratelimit on;
            infer_metrics on;
            infer_ratelimit_limit rpm $infer_tenant requests=100/m;
            proxy_pass http://$infer_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
        location = /metrics {{ infer_metrics_export; }}
    }}"""


def test_installed_enabled_loaded_used_and_purged(debs, purge_at_end,
                                                  nginx_factory, sim_factory,
                                                  tmp_path):
    run("dpkg", "-i", *(str(debs[p]) for p in PACKAGES + [META]))
    for m in MODULES:
        link = ENABLED / f"50-mod-http-infer-{m}.conf"
        assert link.is_symlink(), sorted(os.listdir(ENABLED))
        assert link.read_text().strip() == \
            f"load_module modules/ngx_http_infer_{m}_module.so;"

    # Debian's own nginx.conf, which includes modules-enabled/*.conf
    r = run(NGINX_BIN, "-t", check=False)
    assert r.returncode == 0, r.stderr

    # a gateway loading the modules exactly as Debian's nginx.conf does;
    # "modules/" is relative to the prefix, which for Debian's nginx is
    # /usr/share/nginx with its modules -> /usr/lib/nginx/modules link
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{
        "id": "deb-1", "tenant": "debian", "plan": "free",
        "hash": "sha256:" + hashlib.sha256(KEY.encode()).hexdigest()}]}))
    sim = sim_factory("llama-3-8b", "deb-a", ttft_ms=1, tpot_ms=1)
    gw = nginx_factory(backend_conf(sim, keys), start=False, modules=[],
                       main=f"include {ENABLED}/*.conf;")
    (gw.workdir / "modules").symlink_to("/usr/lib/nginx/modules")
    gw.start()

    chat = {"model": "llama-3-8b",
            "messages": [{"role": "user", "content": "hello"}]}
    ok = requests.post(gw.url + "/v1/chat/completions", json=chat,
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert ok.status_code == 200, ok.text
    assert ok.json()["model"] == "llama-3-8b"
    assert ok.headers.get("x-ratelimit-limit-requests") == "100"
    denied = requests.post(gw.url + "/v1/chat/completions", json=chat,
                           timeout=10)
    assert denied.status_code == 401
    assert denied.json()["error"]["code"] == "missing_credentials"
    page = requests.get(gw.url + "/metrics", timeout=10).text
    assert any(line.startswith("infer_requests_total{")
               and 'tenant="debian"' in line and 'model="llama-3-8b"' in line
               for line in page.splitlines()), page
    gw.stop()

    # removed, the modules stay on disk but are disabled (Debian's
    # .removed links); purged, nothing of them is left
    run("dpkg", "-r", META, *PACKAGES)
    for m in MODULES:
        assert not (ENABLED / f"50-mod-http-infer-{m}.conf").exists()
    assert run(NGINX_BIN, "-t", check=False).returncode == 0
    run("dpkg", "--purge", META, *PACKAGES)
    left = [p for p in ENABLED.iterdir() if "infer" in p.name]
    left += list(Path("/usr/lib/nginx/modules").glob("ngx_http_infer_*"))
    left += list(Path("/usr/share/nginx/modules-available").glob("*infer*"))
    assert left == [] and not any(installed(p) for p in PACKAGES + [META])
    assert run(NGINX_BIN, "-t", check=False).returncode == 0
