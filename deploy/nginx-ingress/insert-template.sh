#!/bin/sh
# Puts ngx_infer's annotation support into the F5 NGINX Ingress
# Controller's own templates, at image build time, so that nobody
# maintains a fork of them:
#
#   insert-template.sh /nginx.tmpl /nginx.ingress.tmpl ngx-infer-location.tmpl
#
# nginx.tmpl (the main configuration), at two anchor lines:
#
#   load_module modules/ngx_http_js_module.so;
#       -> after it, the load_module lines of the four modules: the
#          directives the annotations write are always known
#   default_type  application/octet-stream;   (the first line of http {}
#                                              after include mime.types)
#       -> after it, $infer_literal_dollar ("$") and empty defaults of
#          $infer_ingress_plan and $infer_ingress_label
#
# nginx.ingress.tmpl (one file per Ingress), at three:
#
#   location {{ makeLocationPath ... }} {
#       -> after it, ngx-infer-location.tmpl, as it is
#   proxy_pass {{ $location.ProxyPass }}{{ $location.Rewrite }};  (5.5)
#   proxy_pass http://{{$location.Upstream.Name}}{{$location.Rewrite}};
#   proxy_pass https://{{$location.Upstream.Name}}{{$location.Rewrite}};
#       -> each wrapped: proxy_pass http(s)://$infer_upstream; when the
#          fragment's $inferRoute is true, the line as it was otherwise
#   {{- if $upstream.LBMethod}}
#       -> infer_balance; for the upstreams of an Ingress whose
#          ngx-infer.io/route is "true", the method as it was otherwise
#
# Each anchor must be there exactly once (the proxy_pass lines: one, or
# two, all after the location line); anything else makes it stop with an
# error and leave both templates as they were.  Lines are compared without
# their leading and trailing blanks.  The anchors were checked at the
# controller tags docs/kubernetes.md lists.
#
# POSIX sh and awk (BusyBox's in the controller's Alpine image).
set -eu

if [ $# -ne 3 ]; then
    echo "usage: $0 nginx.tmpl nginx.ingress.tmpl ngx-infer-location.tmpl" >&2
    exit 2
fi

main=$1
ingress=$2
frag=$3

die() {
    echo "insert-template.sh: $*" >&2
    exit 1
}

for f in "$main" "$ingress" "$frag"; do
    [ -r "$f" ] || die "$f: cannot read it"
done

for f in "$main" "$ingress"; do
    if grep -q 'ngx_infer' "$f"; then
        die "$f: ngx_infer is in it already"
    fi
done

main_out=$(mktemp "${TMPDIR:-/tmp}/nginx.tmpl.XXXXXX")
ingress_out=$(mktemp "${TMPDIR:-/tmp}/nginx.ingress.tmpl.XXXXXX")
trap 'rm -f "$main_out" "$ingress_out"' EXIT

# both files' lines are compared without their leading and trailing blanks
trim='
function trim(s) {
    sub(/^[ \t]+/, "", s)
    sub(/[ \t\r]+$/, "", s)
    return s
}
'

awk "$trim"'
{
    line = trim($0)
    print

    if (line == "load_module modules/ngx_http_js_module.so;") {
        js++
        print "# ngx_infer (deploy/nginx-ingress/insert-template.sh)"
        split("route auth ratelimit metrics", m, " ")
        for (i = 1; i <= 4; i++) {
            printf "load_module modules/ngx_http_infer_%s_module.so;\n", m[i]
        }
    }

    if (line == "default_type  application/octet-stream;") {
        http++
        print "    # ngx_infer: what the lines of the ngx-infer.io/* annotations use"
        print "    geo $infer_literal_dollar { default \"$\"; }"
        print "    map \"\" $infer_ingress_plan { default \"\"; }"
        print "    map \"\" $infer_ingress_label { default \"\"; }"
    }
}

END {
    if (js != 1) {
        printf "%s: the load_module line of njs is there %d times, not once\n", FILENAME, js > "/dev/stderr"
        exit 1
    }
    if (http != 1) {
        printf "%s: the default_type line of http {} is there %d times, not once\n", FILENAME, http > "/dev/stderr"
        exit 1
    }
}
' "$main" > "$main_out" || die "$main: not changed"

# before 5.5.0 a location has no .Internal (the fragment's test of it would
# not render): there, no location is the controller's internal one
internal=1
grep -q '\$location\.Internal' "$ingress" || internal=0

# the fragment's path through the environment: -v would read its
# backslashes as escapes
NGX_INFER_FRAG=$frag awk -v internal="$internal" "$trim"'
BEGIN {
    frag = ENVIRON["NGX_INFER_FRAG"]
}

{
    line = trim($0)
    lead = $0
    sub(/[^ \t].*$/, "", lead)

    if (line ~ /^\{\{- if \$upstream\.LBMethod ?\}\}$/) {
        lb++
        print lead "{{- if eq (index $.Ingress.Annotations \"ngx-infer.io/route\") \"true\" }}"
        print lead "# ngx_infer: ngx-infer.io/route"
        print lead "infer_balance;"
        print lead "{{- else if $upstream.LBMethod }}"
        next
    }

    if (line ~ /^proxy_pass (\{\{ \$location\.ProxyPass \}\}|https?:\/\/\{\{ ?\$location\.Upstream\.Name ?\}\})\{\{ ?\$location\.Rewrite ?\}\};$/) {
        pp++
        if (!loc) {
            pp_early++
        }
        print lead "{{- if $inferRoute }}"
        print lead "proxy_pass {{ if $location.SSL }}https{{ else }}http{{ end }}://$infer_upstream;"
        print lead "{{- else }}"
        print
        print lead "{{- end }}"
        next
    }

    print

    if (line ~ /^location \{\{ +makeLocationPath .*\}\} \{$/) {
        loc++
        while ((getline l < frag) > 0) {
            if (!internal) {
                gsub(/\(not \$location\.Internal\)/, "true", l)
            }
            print l
        }
        close(frag)
    }
}

END {
    if (lb != 1) {
        printf "%s: the line {{- if $upstream.LBMethod}} is there %d times, not once\n", FILENAME, lb > "/dev/stderr"
        exit 1
    }
    if (loc != 1) {
        printf "%s: the location line is there %d times, not once\n", FILENAME, loc > "/dev/stderr"
        exit 1
    }
    if (pp < 1 || pp > 2 || pp_early) {
        printf "%s: %d proxy_pass lines of a location (%d before the location line), not one or two after it\n", FILENAME, pp, pp_early > "/dev/stderr"
        exit 1
    }
}
' "$ingress" > "$ingress_out" || die "$ingress: not changed"

# in place, keeping the files' owners and modes
cat "$main_out" > "$main"
cat "$ingress_out" > "$ingress"
echo "insert-template.sh: $main, $ingress: ngx_infer inserted"
