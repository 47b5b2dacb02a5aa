"""The build: `make NGINX_SRC=<another tree>` builds the four modules from
a tree without Debian's conf_flags (configured --with-compat), without
touching that tree, with warnings as errors even when the tree drops
-Werror, and Debian's nginx loads them; scripts/build-modules.sh refuses
a binary of another version, one without --with-compat, and ingress-nginx's
against an unpatched tree; a static build is refused with a message."""

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
    """An nginx source tree like a release tarball: no conf_flags; and,
    as ingress-nginx's patch 18 does, no -Werror in nginx's own flags."""
    tree = tmp_path / "nginx-plain"
    shutil.copytree(DEBIAN_SRC, tree, symlinks=True)
    (tree / "conf_flags").unlink(missing_ok=True)
    gcc = tree / "auto" / "cc" / "gcc"
    text = gcc.read_text()
    assert 'CFLAGS="$CFLAGS -Werror"' in text
    gcc.write_text(text.replace('CFLAGS="$CFLAGS -Werror"', ""))
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
    assert "drops -Werror; putting it back" in r.stdout
    cflags = [ln for ln in (build / "nginx-src" / "objs" / "Makefile")
              .read_text().splitlines() if ln.startswith("CFLAGS")]
    assert cflags and " -Werror" in cflags[0] + " ", cflags

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


def nginx_v(tmp_path, version="1.22.1", args="--with-compat"):
    f = tmp_path / "nginx-V.txt"
    f.write_text(f"nginx version: nginx/{version}\n"
                 "built by gcc 12.2.0 (Debian 12.2.0-14)\n"
                 f"configure arguments: {args}\n")
    return f


def build_modules(tmp_path, v, *extra):
    return subprocess.run(
        [str(REPO / "scripts" / "build-modules.sh"), "--nginx-src",
         str(DEBIAN_SRC), "--nginx-v", str(v), "--build",
         str(tmp_path / "build"), *extra],
        capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("version,args,says", [
    ("1.27.1", "--with-compat", "the binary is nginx 1.27.1, the tree"),
    ("1.22.1", "--with-http_ssl_module", "without --with-compat"),
    ("1.22.1", "--with-compat --add-module=/tmp/build/lua-nginx-module "
     "--with-cc-opt='-g -O2'", "this nginx is ingress-nginx's"),
])
def test_build_modules_refuses_a_binary_it_cannot_match(tmp_path, version,
                                                       args, says):
    r = build_modules(tmp_path, nginx_v(tmp_path, version, args))
    assert r.returncode == 1, r.stdout + r.stderr
    assert says in r.stderr, r.stderr
    assert not (tmp_path / "build" / "nginx-src").exists()


def test_build_modules_takes_the_binarys_arguments(tmp_path):
    """Quoted as nginx -V prints them; other modules' sources left out."""
    r = build_modules(tmp_path, nginx_v(tmp_path, args=(
        "--with-compat --with-cc-opt='-g -O2 -DX=\"a b\"' "
        "--add-dynamic-module=/nowhere/njs --with-http_xslt_module=dynamic "
        "--with-pcre=/nowhere/pcre-8.45 --with-http_v2_module")),
        "--print-args")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines == ["--with-compat", '--with-cc-opt=-g -O2 -DX="a b"',
                     "--with-http_v2_module"], (lines, r.stderr[-2000:])
