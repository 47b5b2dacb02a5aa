"""The reference in docs/*.md covers every module.  Each directive that a
module's command table declares has a block in nginx.org's form in the
module's own page (docs/route.md for ngx_infer_route/, and so on):

    ### infer_x

        Syntax:  infer_x ...;
        Default: ...
        Context: ...

and each variable that a module's variables table declares is named as
$infer_x somewhere in docs/*.md.  The names are read from the C sources
(ngx_infer_*/*.c), so a directive or a variable added without its
documentation fails here, naming it."""

import re

from harness.nginx import REPO

COMMANDS = re.compile(r"static ngx_command_t\s+\w+_commands\[\]\s*=\s*\{"
                      r"(.*?)\n\};", re.S)
VARIABLES = re.compile(r"static ngx_http_variable_t\s+\w+\[\]\s*=\s*\{"
                       r"(.*?)\n\};", re.S)
NAME = re.compile(r'ngx_string\("(infer_\w+)"\)')

# every module directory declares directives
MODULE_DIRS = ["ngx_infer_auth", "ngx_infer_balance", "ngx_infer_metrics",
               "ngx_infer_ratelimit", "ngx_infer_route"]


def declared(table):
    """{name: module directory} of the infer_ names in the C tables that
    `table` (a regex whose group is a table's body) finds."""
    names = {}
    for path in sorted(REPO.glob("ngx_infer_*/*.c")):
        for body in table.findall(path.read_text()):
            for name in NAME.findall(body):
                names[name] = path.parent.name
    return names


def docs():
    return "\n".join(p.read_text() for p in sorted(REPO.glob("docs/*.md")))


def page_of(module):
    """The module's own page, docs/<x>.md for ngx_infer_<x>/; all of
    docs/*.md for a module without one."""
    page = REPO / "docs" / (module.replace("ngx_infer_", "") + ".md")
    return page.read_text() if page.exists() else docs()


def reference_block(name):
    """### name, then Syntax (which starts with the name), Default and
    Context, each of which may go on over lines indented further."""
    more = r"(?: {5,}\S[^\n]*\n)*"
    return re.compile(
        r"^### " + re.escape(name) + r"\n\n"
        r"    Syntax:  " + re.escape(name) + r"[ ;][^\n]*\n" + more +
        r"    Default: \S[^\n]*\n" + more +
        r"    Context: \S[^\n]*$", re.M)


def test_every_directive_has_a_syntax_default_context_block():
    """What a user reads before writing a directive: its syntax, its
    default and where it may go, on the page of the module that has it."""
    directives = declared(COMMANDS)
    # the tables were found, in every module: the check is not empty
    assert set(directives.values()) == set(MODULE_DIRS), directives
    for d in ("infer_route", "infer_model", "infer_auth",
              "infer_ratelimit_zone", "infer_metrics_zone", "infer_balance"):
        assert d in directives, d
    pages = {m: page_of(m) for m in MODULE_DIRS}
    missing = sorted(f"{d} ({m})" for d, m in directives.items()
                     if not reference_block(d).search(pages[m]))
    assert not missing, "no Syntax/Default/Context block in the module's " \
        "docs/*.md page: " + ", ".join(missing)


def test_every_variable_is_documented():
    """Every variable a module makes is named where a user looks for it:
    the docs say what $infer_x holds."""
    variables = declared(VARIABLES)
    for v in ("infer_model", "infer_tenant", "infer_ratelimit_status",
              "infer_endpoint"):
        assert v in variables, v
    text = docs()
    # a prefix variable (infer_claim_) is documented with its suffix
    missing = sorted(f"${v} ({m})" for v, m in variables.items()
                     if not re.search(re.escape("$" + v)
                                      + ("" if v.endswith("_") else r"(?!\w)"),
                                      text))
    assert not missing, "not named in docs/*.md: " + ", ".join(missing)
