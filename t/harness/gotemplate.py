"""What the tests of the controllers' annotation fragments share
(t/test_annotations.py for ingress-nginx, t/test_annotations_nic.py for the
F5 NGINX Ingress Controller): Go's text/template as the controllers run it
(t/go/render.go, built with Debian's golang-go), the table of hostile
annotation values, and how a rendered quoted string reads back, to Go and
to nginx."""

import ast
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

RENDER_GO = Path(__file__).resolve().parents[1] / "go" / "render.go"


@pytest.fixture(scope="module")
def render_bin(tmp_path_factory):
    go = shutil.which("go")
    if go is None:
        pytest.skip("go is not installed (Debian's golang-go; make deps "
                    "installs it)")
    d = tmp_path_factory.mktemp("render")
    env = dict(os.environ, GOCACHE=str(d / "cache"), GOPATH=str(d / "gopath"),
               GO111MODULE="off", GOFLAGS="")
    r = subprocess.run([go, "build", "-o", str(d / "render"), str(RENDER_GO)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return d / "render"


HOSTILE = [
    "", "a", 'a"b', '"', '\\', 'a\\', '\\"', "$", "$host", "${host}",
    "${literal_dollar}", "${infer_literal_dollar}", "a$", "${", "}", "a;b",
    "; return 200 hacked;", "{", "} server { listen 9999; }", "a\nb",
    "\n}\n", "a\rb", "a\tb", "a\x00b", "\x00", "'single'", "#comment",
    "a b", "llama-3-8b,$x", "\u2028", "\u00e9t\u00e9", "\U0001f600", "\x7f",
    "\\x41", "x" * 65536, "$" * 4096, '"' * 3000, "llama-3-8b;" * 400,
    '"; } } http { #',
]

HOSTILE_IDS = [repr(v[:12]) + (f"..{len(v)}" if len(v) > 12 else "")
               for v in HOSTILE]


def go_unquote(token):
    """What Go's %q wrote, read back: Go's escapes (\\" \\\\ \\n \\t \\xNN
    \\uNNNN \\UNNNNNNNN \\a...) are Python's too."""
    assert token[0] == '"' and token[-1] == '"'
    inner = token[1:-1]
    assert not re.search(r"[\x00-\x1f\x7f]", inner), token
    return ast.literal_eval(token)


def nginx_reads(token, dollar="${literal_dollar}"):
    """The value nginx gives the quoted token once parsed (\\" \\' \\\\ \\t
    \\r \\n unescaped, any other backslash kept) and its dollar variable
    (the controller's "$") evaluated."""
    inner, out, i = token[1:-1], [], 0
    while i < len(inner):
        c = inner[i]
        if c == "\\" and i + 1 < len(inner):
            n = inner[i + 1]
            if n in "\"'\\":
                out.append(n)
                i += 2
                continue
            if n in "trn":
                out.append({"t": "\t", "r": "\r", "n": "\n"}[n])
                i += 2
                continue
        out.append(c)
        i += 1
    return "".join(out).replace(dollar, "$")


# the lines an annotation fragment writes: fixed ones, and those that carry
# one value as one quoted string
QUOTED = r'"(?:[^"\\]|\\.)*"'
VALUED = re.compile(r"(infer_route_namespace|infer_route_models"
                    r"|set \$infer_ingress_plan|set \$infer_ingress_label) "
                    rf"({QUOTED});")

# what both controllers' fragments write as they are
FIXED = {"infer_route on;", "infer_auth required;", "infer_auth off;",
         "infer_ratelimit on;", "infer_metrics on;", "infer_metrics off;"}


def check_lines(lines, fixed=FIXED, dollar="${literal_dollar}"):
    """Every line is a fixed one or a valued one whose value is one quoted
    string in which "$" appears only as the controller's dollar variable;
    returns {directive: token}."""
    valued = {}
    for ln in lines:
        if ln in fixed:
            continue
        m = VALUED.fullmatch(ln)
        assert m, f"a line that is not the fragment's: {ln[:200]!r}"
        assert "$" not in m.group(2).replace(dollar, ""), ln
        valued[m.group(1)] = m.group(2)
    return valued
