"""The build: `make NGINX_SRC=<another tree>` builds the four modules from
a tree without Debian's conf_flags (configured --with-compat), without
touching that tree, and Debian's nginx loads them; a static build is
refused with a message."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEBIAN_SRC = Path("/usr/share/nginx/src")
MODULES = ["route", "auth", "ratelimit", "metrics"]

pytestmark = pytest.mark.skipif(not (DEBIAN_SRC / "configure").exists(),
                                reason="nginx-dev is not installed")


@pytest.fixture
def plain_tree(tmp_path):
    """An nginx source tree like a release tarball: no conf_flags."""
    tree = tmp_path / "nginx-plain"
    shutil.copytree(DEBIAN_SRC, tree, symlinks=True)
    (tree / "conf_flags").unlink(missing_ok=True)
    return tree


def snapshot(tree):
    return sorted((str(p.relative_to(tree)), p.stat().st_mtime_ns)
                  for p in tree.rglob("*"))


def test_make_builds_against_another_tree_and_nginx_loads_it(tmp_path,
                                                             plain_tree):
    build = tmp_path / "build"
    before = snapshot(plain_tree)
    r = subprocess.run(["make", "-C", str(REPO), f"NGINX_SRC={plain_tree}",
                        f"BUILD={build}"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert snapshot(plain_tree) == before, "the source tree was written to"
    assert "--with-compat" in (build / "configure.args").read_text()

    conf = tmp_path / "nginx.conf"
    conf.write_text("".join(
        f"load_module {build}/modules/ngx_http_infer_{m}_module.so;\n"
        for m in MODULES) + "events {}\nhttp { infer_route on; }\n")
    t = subprocess.run(["/usr/sbin/nginx", "-t", "-p", str(tmp_path), "-c",
                        str(conf), "-e", str(tmp_path / "error.log")],
                       capture_output=True, text=True, timeout=30)
    assert t.returncode == 0, t.stderr

    # a second make with nothing changed does nothing
    r = subprocess.run(["make", "-C", str(REPO), f"NGINX_SRC={plain_tree}",
                        f"BUILD={build}"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "configuring" not in r.stdout
    assert "objs/Makefile modules" not in r.stdout


def test_a_static_build_is_refused(plain_tree):
    r = subprocess.run(["./configure", f"--add-module={REPO}"],
                       cwd=plain_tree, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0
    assert "ngx_infer builds dynamic modules only" in r.stdout + r.stderr
