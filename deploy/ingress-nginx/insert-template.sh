#!/bin/sh
# Puts ngx_infer's annotation fragment into ingress-nginx's own template,
# at image build time, so that nobody maintains a fork of that template:
#
#   insert-template.sh /etc/nginx/template/nginx.tmpl ngx-infer.tmpl
#
# It appends ngx-infer.tmpl (its templates are `define`d, so they render
# only where they are called) and calls them at two anchor lines of the
# controller's template, each of which must be there exactly once:
#
#   http:     {{ if not (empty $cfg.HTTPSnippet) }}
#             -> the http part, just before the ConfigMap's http-snippet
#   location: set $proxy_alternative_upstream_name "";
#             -> the location part, after the template's own
#                set $proxy_upstream_name of that location
#
# and checks that the location anchor comes after the location's
# `$ing := (getIngressInformation ...)`, whose annotations the fragment
# reads.  Anything else makes it stop with an error and leave the template
# as it was.  Lines are compared without their leading and trailing blanks.
# The anchors were checked at the controller tags docs/kubernetes.md lists.
#
# POSIX sh and awk (BusyBox's in the controller's Alpine image).
set -eu

if [ $# -ne 2 ]; then
    echo "usage: $0 nginx.tmpl ngx-infer.tmpl" >&2
    exit 2
fi

tmpl=$1
frag=$2

die() {
    echo "insert-template.sh: $tmpl: $*" >&2
    exit 1
}

[ -r "$tmpl" ] || die "cannot read it"
[ -r "$frag" ] || die "cannot read $frag"

if grep -q 'template "ngx_infer_' "$tmpl"; then
    die "ngx_infer's fragment is in it already"
fi

out=$(mktemp "${TMPDIR:-/tmp}/nginx.tmpl.XXXXXX")
trap 'rm -f "$out"' EXIT

awk -v frag="$frag" '
function trim(s) {
    sub(/^[ \t]+/, "", s)
    sub(/[ \t\r]+$/, "", s)
    return s
}

BEGIN {
    http_anchor = "{{ if not (empty $cfg.HTTPSnippet) }}"
    loc_anchor = "set $proxy_alternative_upstream_name \"\";"
    ing_line = "{{ $ing := (getIngressInformation "
    infer = "$all.Cfg.MainSnippet"
}

{
    line = trim($0)

    if (index(line, ing_line) == 1) {
        ing++
        ing_at = NR
    }

    if (line == http_anchor) {
        http++
        print "    {{ template \"ngx_infer_http\" }}"
        print "    {{ if contains $cfg.MainSnippet \"ngx_http_infer_route_module.so\" }}{{ template \"ngx_infer_http_route\" }}{{ end }}"
        print
        next
    }

    print

    if (line == loc_anchor) {
        loc++
        loc_at = NR
        split("route auth ratelimit metrics", m, " ")
        for (i = 1; i <= 4; i++) {
            printf "            {{ if contains %s \"ngx_http_infer_%s_module.so\" }}{{ template \"ngx_infer_%s\" $ing }}{{ end }}\n", infer, m[i], m[i]
        }
    }
}

END {
    if (http != 1) {
        printf "the http anchor \"%s\" is there %d times, not once\n", http_anchor, http > "/dev/stderr"
        exit 1
    }
    if (loc != 1) {
        printf "the location anchor \"%s\" is there %d times, not once\n", loc_anchor, loc > "/dev/stderr"
        exit 1
    }
    if (ing != 1 || ing_at > loc_at) {
        printf "\"%s...\" is not once before the location anchor\n", ing_line > "/dev/stderr"
        exit 1
    }

    print ""
    print "{{/* ngx_infer: deploy/ingress-nginx/ngx-infer.tmpl, appended by insert-template.sh */}}"
    while ((getline l < frag) > 0) {
        print l
    }
}
' "$tmpl" > "$out" || die "not changed"

# in place, keeping the file's owner and mode
cat "$out" > "$tmpl"
echo "insert-template.sh: $tmpl: ngx_infer's fragment inserted"
