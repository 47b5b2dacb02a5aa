"""deploy/: the controller images, checked without Docker.

Every Dockerfile is parsed (instructions, stages, --from references, the
shell of each RUN), its ARG versions are compared with deploy/versions.env
and its README, its build calls scripts/build-modules.sh with that
script's interface and ends with the image check; every load_module line
names the .so files `config` builds, every directive in the snippets is
in a module's command table, every YAML file parses.  When a built nginx
and modules are at hand (INFER_NGINX, INFER_MODULES_DIR, as the rest of
the suite), the image check and the snippets also run through nginx -t.
"""

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"

INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD",
    "COPY", "ENTRYPOINT", "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD",
    "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}

# Each Dockerfile: its ARGs that carry a version, the versions.env key
# each must equal, the nginx binary of the target image, and the README
# that must state the versions.
TARGETS = {
    "ingress-nginx/Dockerfile": {
        "readme": "ingress-nginx/README.md",
        "nginx": "/usr/local/nginx/sbin/nginx",
        "args": {
            "CONTROLLER_IMAGE": "INGRESS_NGINX_IMAGE",
            "ALPINE_IMAGE": "INGRESS_NGINX_ALPINE",
            "NGINX_VERSION": "INGRESS_NGINX_NGINX_VERSION",
            "NGINX_COMMIT": "INGRESS_NGINX_NGINX_COMMIT",
            "INGRESS_NGINX_TAG": "INGRESS_NGINX_TAG",
            "INGRESS_NGINX_COMMIT": "INGRESS_NGINX_COMMIT",
        },
    },
    "nginx-ingress/Dockerfile": {
        "readme": "nginx-ingress/README.md",
        "nginx": "/usr/sbin/nginx",
        "args": {
            "CONTROLLER_IMAGE": "NIC_IMAGE",
            "DEBIAN_IMAGE": "NIC_DEBIAN",
            "NGINX_VERSION": "NIC_NGINX_VERSION",
            "NGINX_COMMIT": "NIC_NGINX_COMMIT",
        },
    },
    "nginx-ingress/Dockerfile.alpine": {
        "readme": "nginx-ingress/README.md",
        "nginx": "/usr/sbin/nginx",
        "args": {
            "CONTROLLER_IMAGE": "NIC_IMAGE_ALPINE",
            "ALPINE_IMAGE": "NIC_ALPINE",
            "NGINX_VERSION": "NIC_NGINX_VERSION",
            "NGINX_COMMIT": "NIC_NGINX_COMMIT",
        },
    },
    "nginx-gateway-fabric/Dockerfile": {
        "readme": "nginx-gateway-fabric/README.md",
        "nginx": "/usr/sbin/nginx",
        "args": {
            "NGINX_IMAGE": "NGF_NGINX_IMAGE",
            "ALPINE_IMAGE": "NGF_ALPINE",
            "NGINX_VERSION": "NGF_NGINX_VERSION",
            "NGINX_COMMIT": "NGF_NGINX_COMMIT",
        },
    },
}

BUILD_SCRIPT = "/src/ngx_infer/scripts/build-modules.sh"
CHECK_SCRIPT = "/usr/local/share/ngx_infer/check-image.sh"


# --- parsing --------------------------------------------------------------

def parse_dockerfile(path):
    """[(instruction, arguments, line)], continuations joined, comments and
    parser directives dropped."""
    out = []
    buf, start = "", None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue                      # a comment inside a continuation
        if start is None:
            start = n
        if line.endswith("\\"):
            buf += line[:-1]
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip(), start))
        buf, start = "", None
    assert not buf, f"{path}: ends inside a continuation"
    return out


def stages(instrs):
    """Global ARGs and the stages: [{name, base, instrs}]."""
    global_args, result = {}, []
    for word, rest, line in instrs:
        if word == "FROM":
            toks = rest.split()
            toks = [t for t in toks if not t.startswith("--platform=")]
            name = toks[2] if len(toks) == 3 and toks[1].upper() == "AS" \
                else None
            assert len(toks) in (1, 3), f"line {line}: FROM {rest}"
            result.append({"name": name, "base": toks[0], "instrs": [],
                           "line": line})
        elif not result:
            assert word == "ARG", f"line {line}: {word} before FROM"
            k, _, v = rest.partition("=")
            global_args[k] = v
        else:
            result[-1]["instrs"].append((word, rest, line))
    return global_args, result


def stage_args(stage):
    args = {}
    for word, rest, _ in stage["instrs"]:
        if word == "ARG":
            k, _, v = rest.partition("=")
            args[k] = v
    return args


def run_body(rest):
    """A RUN's shell command, its --mount/--network flags removed."""
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        rest = rest.lstrip()
    return rest


def copy_parts(rest):
    toks = shlex.split(rest)
    flags = [t for t in toks if t.startswith("--")]
    paths = [t for t in toks if not t.startswith("--")]
    return flags, paths[:-1], paths[-1]


def read_env(path):
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            k, _, v = line.partition("=")
            env[k] = v
    return env


def config_so_files():
    """The .so files `config` builds: one per auto/module block, named
    after the block's first module."""
    text = (REPO / "config").read_text()
    names = re.findall(r'^ngx_module_name="?([A-Za-z0-9_]+)', text, re.M)
    return {n + ".so" for n in names}


def config_dirs():
    text = (REPO / "config").read_text()
    return set(re.findall(r"\$ngx_addon_dir/(ngx_infer_[a-z]+)", text))


def module_directives():
    """Every directive of every module: the names in its ngx_command_t
    tables."""
    names = set()
    for c in REPO.glob("ngx_infer_*/*.c"):
        for table in re.findall(
                r"static\s+ngx_command_t\s+\w+\[\]\s*=\s*\{(.*?)ngx_null_command",
                c.read_text(), re.S):
            names.update(re.findall(r'ngx_string\("([a-z0-9_]+)"\)', table))
    return names


def conf_statements(text):
    """The first word of each statement of an nginx configuration text."""
    text = re.sub(r"#[^\n]*", "", text)
    words = []
    for stmt in re.split(r"[;{}]", text):
        toks = stmt.split()
        if toks:
            words.append(toks[0])
    return words


def yaml_module():
    try:
        import yaml
    except ImportError:
        return None
    return yaml


def snippet_texts():
    """(where, text) of every nginx configuration under deploy/: the test
    conf, load-modules.conf, and each snippet in the YAML files."""
    out = [("deploy/common/infer-test.conf",
            (DEPLOY / "common/infer-test.conf").read_text()),
           ("deploy/nginx-gateway-fabric/load-modules.conf",
            (DEPLOY / "nginx-gateway-fabric/load-modules.conf").read_text())]
    yaml = yaml_module()
    if yaml is None:
        return out
    for f in sorted(DEPLOY.rglob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            for where, text in _yaml_snippets(doc, f.relative_to(REPO)):
                out.append((where, text))
    return out


def _yaml_snippets(doc, f):
    if not isinstance(doc, dict):
        return
    config = (doc.get("controller") or {}).get("config") or {}
    entries = config.get("entries", config)
    for key in ("main-snippet", "http-snippet", "main-snippets",
                "http-snippets"):
        if key in entries:
            yield f"{f} {key}", entries[key]
    if doc.get("kind") == "SnippetsFilter":
        for s in doc["spec"]["snippets"]:
            yield f"{f} {s['context']}", s["value"]


DOCKERFILES = sorted(TARGETS)


# --- Dockerfiles ------------------------------------------------------------

def test_every_dockerfile_is_listed():
    found = {str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("Dockerfile*")}
    assert found == set(TARGETS)


@pytest.mark.parametrize("df", DOCKERFILES)
def test_dockerfile_parses(df):
    instrs = parse_dockerfile(DEPLOY / df)
    for word, rest, line in instrs:
        assert word in INSTRUCTIONS, f"{df}:{line}: unknown instruction {word}"
    gargs, st = stages(instrs)
    assert st, f"{df}: no FROM"
    names = []
    for s in st:
        base = s["base"]
        m = re.fullmatch(r"\$\{(\w+)\}", base)
        if m:
            assert gargs.get(m.group(1)), \
                f"{df}:{s['line']}: FROM ${{{m.group(1)}}} has no global ARG default"
        elif "/" not in base and ":" not in base:
            assert base in names, f"{df}:{s['line']}: FROM {base}: no such stage"
        for word, rest, line in s["instrs"]:
            for ref in re.findall(r"--mount=[^ ]*from=([\w.-]+)", rest) + \
                    re.findall(r"--from=([\w.-]+)", rest):
                assert ref in names, \
                    f"{df}:{line}: --from={ref} names no earlier stage"
        if s["name"]:
            assert s["name"] not in names, f"{df}: stage {s['name']} twice"
            names.append(s["name"])


@pytest.mark.parametrize("df", DOCKERFILES)
def test_run_commands_are_shell(df):
    """Each RUN is what /bin/sh -c gets: it must parse (sh -n)."""
    sh = shutil.which("dash") or shutil.which("sh")
    for word, rest, line in parse_dockerfile(DEPLOY / df):
        if word != "RUN":
            continue
        body = run_body(rest)
        assert not body.startswith("["), f"{df}:{line}: exec-form RUN"
        r = subprocess.run([sh, "-n", "-c", body], capture_output=True,
                           text=True)
        assert r.returncode == 0, f"{df}:{line}: {r.stderr}"


@pytest.mark.parametrize("df", DOCKERFILES)
def test_versions_are_one(df):
    env = read_env(DEPLOY / "versions.env")
    gargs, st = stages(parse_dockerfile(DEPLOY / df))
    args = dict(gargs)
    for s in st:
        args.update(stage_args(s))
    readme = (DEPLOY / TARGETS[df]["readme"]).read_text()
    for arg, key in TARGETS[df]["args"].items():
        assert arg in args, f"{df}: no ARG {arg}"
        assert args[arg] == env[key], \
            f"{df}: ARG {arg}={args[arg]}, deploy/versions.env {key}={env[key]}"
        assert env[key] in readme, \
            f"{TARGETS[df]['readme']} does not say {key}={env[key]}"
    # one nginx release, one commit
    if env["NIC_NGINX_VERSION"] == env["NGF_NGINX_VERSION"]:
        assert env["NIC_NGINX_COMMIT"] == env["NGF_NGINX_COMMIT"]


def _build_call(st):
    calls = []
    for s in st:
        for word, rest, line in s["instrs"]:
            if word == "RUN" and "build-modules.sh" in rest:
                calls.append((s, run_body(rest), line))
    return calls


@pytest.mark.parametrize("df", DOCKERFILES)
def test_builds_with_build_modules_sh(df):
    """The modules are built by scripts/build-modules.sh with its interface:
    --nginx-src DIR --nginx-v FILE [--build DIR] [--out DIR], FILE being
    the target image's own `nginx -V 2>&1`, and the sources `config` names
    copied in."""
    gargs, st = stages(parse_dockerfile(DEPLOY / df))
    calls = _build_call(st)
    assert len(calls) == 1, f"{df}: {len(calls)} build-modules.sh calls"
    builder, body, line = calls[0]
    toks = shlex.split(body)
    assert toks[0] == BUILD_SCRIPT, f"{df}:{line}: {toks[0]}"
    opts = dict(zip(toks[1::2], toks[2::2]))
    assert len(toks) % 2 == 1 and set(opts) <= \
        {"--nginx-src", "--nginx-v", "--build", "--out"}, f"{df}:{line}: {toks}"
    assert {"--nginx-src", "--nginx-v"} <= set(opts)

    # --nginx-v comes from a stage FROM the target image running nginx -V
    nginx = TARGETS[df]["nginx"]
    copies = [copy_parts(r) for w, r, _ in builder["instrs"] if w == "COPY"]
    src_stage = src_file = None
    for flags, srcs, dst in copies:
        if dst == opts["--nginx-v"]:
            src_stage = [f.split("=", 1)[1] for f in flags
                         if f.startswith("--from=")][0]
            src_file = srcs[0]
    assert src_stage, f"{df}: {opts['--nginx-v']} is not copied from a stage"
    target = [s for s in st if s["name"] == src_stage][0]
    runs = [run_body(r) for w, r, _ in target["instrs"] if w == "RUN"]
    assert f"{nginx} -V > {src_file} 2>&1" in runs, \
        f"{df}: stage {src_stage} does not run {nginx} -V > {src_file} 2>&1"
    assert target["base"] == st[-1]["base"], \
        f"{df}: nginx -V is taken from {target['base']}, the image is {st[-1]['base']}"

    # the nginx tree: the release tag, checked against its commit
    text = "\n".join(r for w, r, _ in builder["instrs"] if w == "RUN")
    assert '--branch "release-${NGINX_VERSION}"' in text
    assert 'rev-parse HEAD)" = "${NGINX_COMMIT}"' in text
    assert f"{opts['--nginx-src']}/configure" in text

    # the sources config names, config itself, and the scripts
    dests = {dst: srcs for flags, srcs, dst in copies if not flags}
    for d in config_dirs() | {"config", "scripts"}:
        assert dests.get(f"/src/ngx_infer/{d}") == [d], \
            f"{df}: {d} is not copied to /src/ngx_infer/{d}"


def _runs_check(stage, nginx):
    """The stage's last instruction runs the image check."""
    word, rest, line = stage["instrs"][-1]
    if word != "RUN":
        return None
    for part in run_body(rest).split("&&"):
        toks = shlex.split(part.split(">")[0].split(";")[0])
        if toks[:2] == [CHECK_SCRIPT, nginx]:
            return toks
    return None


@pytest.mark.parametrize("df", DOCKERFILES)
def test_ends_with_the_image_check(df):
    """Every image the Dockerfile makes (its stages no other stage uses)
    ends with check-image.sh on the target's nginx, the nginx -V the
    modules were built for, and the directory it put them in; or with a
    COPY of a stamp from a stage that does, FROM the target image."""
    nginx = TARGETS[df]["nginx"]
    gargs, st = stages(parse_dockerfile(DEPLOY / df))
    used = set()
    for s in st:
        used.add(s["base"])
        for w, r, _ in s["instrs"]:
            used.update(re.findall(r"from=([\w.-]+)", r))
    finals = [s for s in st if s["name"] not in used]
    assert st[-1] in finals
    builder, body, _ = _build_call(st)[0]
    opts = dict(zip(shlex.split(body)[1::2], shlex.split(body)[2::2]))
    out = opts.get("--out", "/tmp/build/modules")
    for s in finals:
        checker = s
        word, rest, line = s["instrs"][-1]
        if word == "COPY":
            flags, srcs, dst = copy_parts(rest)
            ref = [f.split("=", 1)[1] for f in flags if f.startswith("--from=")]
            assert ref, f"{df}:{line}: the last step is neither the check nor its stamp"
            checker = [x for x in st if x["name"] == ref[0]][0]
            assert srcs[0] in run_body(checker["instrs"][-1][1]), \
                f"{df}:{line}: {srcs[0]} is not what stage {ref[0]} writes"
        toks = _runs_check(checker, nginx)
        assert toks, f"{df}: stage {checker['name'] or 'last'} does not end with the check"
        assert checker["base"] == st[-1]["base"] or checker is s
        assert len(toks) == 4, toks
        vfile, moddir = toks[2], toks[3]
        copies = [copy_parts(r) for w, r, _ in checker["instrs"] if w == "COPY"]
        assert any(dst == vfile and srcs == [opts["--nginx-v"]]
                   for flags, srcs, dst in copies), \
            f"{df}: {vfile} is not the builder's {opts['--nginx-v']}"
        assert any(dst.rstrip("/") == moddir
                   or dst.rstrip("/") + "/etc/nginx/modules/ngx_infer" == moddir
                   for flags, srcs, dst in copies
                   if srcs and srcs[0].startswith("/out/")), \
            f"{df}: nothing copies the built modules ({out}) to {moddir}"
        assert any(srcs == ["deploy/common/check-image.sh",
                            "deploy/common/infer-test.conf"]
                   or srcs[:2] == ["deploy/common/check-image.sh",
                                   "deploy/common/infer-test.conf"]
                   for flags, srcs, dst in copies), \
            f"{df}: check-image.sh and infer-test.conf are not copied"


def test_ingress_nginx_patches_list():
    """patches.sha256 names each patch once, in the order of `ls`."""
    names = []
    for line in (DEPLOY / "ingress-nginx/patches.sha256").read_text().splitlines():
        if line.startswith("#"):
            continue
        digest, name = line.split("  ")
        assert re.fullmatch(r"[0-9a-f]{64}", digest)
        names.append(name)
    assert len(names) == 35
    assert names == sorted(names, key=lambda n: n.encode())
    assert len(set(names)) == len(names)


# --- nginx configuration ----------------------------------------------------

def test_load_module_lines_name_the_four_so_files():
    expected = config_so_files()
    assert len(expected) == 4
    seen = 0
    for where, text in snippet_texts():
        loads = re.findall(r"^\s*load_module\s+(\S+);", text, re.M)
        if not loads:
            continue
        seen += 1
        assert {os.path.basename(p) for p in loads} == expected, where
        assert len(loads) == 4, where
    assert seen >= 2


def test_snippet_directives_exist():
    known = module_directives()
    assert {"infer_route", "infer_model", "infer_metrics_zone",
            "infer_ratelimit_zone"} <= known
    for where, text in snippet_texts():
        for word in conf_statements(text):
            if word.startswith("infer_"):
                assert word in known, f"{where}: no module has {word}"


def test_yaml_parses():
    yaml = yaml_module()
    if yaml is None:
        pytest.skip("python3-yaml is not installed")
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert files
    for f in files:
        docs = [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
        assert docs, f


def test_scripts_are_sh():
    sh = shutil.which("dash") or shutil.which("sh")
    for f in ("common/check-image.sh", "ingress-nginx/init_module.sh",
              "ingress-nginx/insert-template.sh",
              "nginx-ingress/insert-template.sh"):
        p = DEPLOY / f
        assert os.access(p, os.X_OK), f"{f} is not executable"
        assert p.read_text().startswith("#!/bin/sh\n")
        r = subprocess.run([sh, "-n", str(p)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def test_readme_links():
    assert "(deploy/README.md)" in (REPO / "README.md").read_text()
    index = (DEPLOY / "README.md").read_text()
    for d in ("ingress-nginx", "nginx-ingress", "nginx-gateway-fabric"):
        assert f"({d}/README.md)" in index or f"({d}/)" in index, d
        assert (DEPLOY / d / "README.md").is_file()


# --- with a built nginx and modules -------------------------------------------

NGINX = os.environ.get("INFER_NGINX", "/usr/sbin/nginx")
MODULES = Path(os.environ.get("INFER_MODULES_DIR", REPO / "build" / "modules"))
need_build = pytest.mark.skipif(
    not (os.access(NGINX, os.X_OK)
         and (MODULES / "ngx_http_infer_route_module.so").is_file()),
    reason=f"no nginx at {NGINX} or no modules in {MODULES} (run make)")


@need_build
def test_image_check_runs(tmp_path):
    vfile = tmp_path / "nginx-V.txt"
    vfile.write_bytes(subprocess.run([NGINX, "-V"], capture_output=True).stderr)
    check = DEPLOY / "common/check-image.sh"
    r = subprocess.run([str(check), NGINX, str(vfile), str(MODULES)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    # a different nginx -V is refused
    vfile.write_text("nginx version: nginx/0.0.0\n")
    r = subprocess.run([str(check), NGINX, str(vfile), str(MODULES)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "not the nginx" in r.stderr


@need_build
def test_snippets_pass_nginx_t(tmp_path):
    """Each target's main and http snippets, as the controller would place
    them, with the modules from MODULES and the Services' names replaced by
    an address (nginx resolves upstream servers when it loads)."""
    yaml = yaml_module()
    if yaml is None:
        pytest.skip("python3-yaml is not installed")
    so = sorted(config_so_files())
    main = "\n".join(f"load_module {MODULES}/{s};" for s in so)
    groups = {}
    for where, text in snippet_texts():
        f, _, ctx = where.partition(" ")
        if ctx.startswith("http") and ctx != "http.server.location":
            groups.setdefault(f, {})["http"] = text
        if ctx == "http.server.location":
            groups.setdefault(f, {}).setdefault("locations", []).append(text)
    assert len(groups) == 5, groups.keys()
    # a file of location snippets only goes with the NGF http snippet
    ngf_http = groups["deploy/nginx-gateway-fabric/snippetsfilter.yaml"]["http"]
    v = subprocess.run([NGINX, "-V"], capture_output=True, text=True).stderr
    temp = "".join(f"    {m}_temp_path {tmp_path}/{m};\n"
                   for m in ("fastcgi", "uwsgi", "scgi")
                   if f"--without-http_{m}_module" not in v)
    for n, (f, g) in enumerate(sorted(groups.items())):
        http = re.sub(r"server [a-z0-9.-]+\.svc\.cluster\.local:\d+;",
                      "server 127.0.0.1:9;", g.get("http", ngf_http))
        http = http.replace("listen 8000;", f"listen 127.0.0.1:{18100 + n};")
        locs = "".join(f"""
        location /v{i}/ {{
{loc}
            proxy_pass http://127.0.0.1:9;
        }}""" for i, loc in enumerate(g.get("locations", [""]), 1))
        conf = tmp_path / f"nginx{n}.conf"
        conf.write_text(f"""{main}
error_log stderr notice;
pid {tmp_path}/nginx{n}.pid;
events {{ }}
http {{
    client_body_temp_path {tmp_path}/body;
    proxy_temp_path {tmp_path}/proxy;
{temp}    access_log off;
{http}
    server {{
        listen 127.0.0.1:{18200 + n};{locs}
    }}
}}
""")
        r = subprocess.run([NGINX, "-t", "-q", "-p", f"{tmp_path}/",
                            "-e", "stderr", "-c", str(conf)],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, f"{f}: {r.stderr}"
