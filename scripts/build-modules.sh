#!/usr/bin/env bash
# Builds the four ngx_infer modules against an nginx source tree, for one
# nginx binary: the one `make` runs it for (Debian's), or a controller's.
#
#   scripts/build-modules.sh --nginx-src DIR [--nginx-v FILE] \
#                            [--build DIR] [--out DIR]
#
#   --nginx-src  the nginx source tree of the target's exact version, with
#                the target's own patches if it has any (ingress-nginx)
#   --nginx-v    the target binary's `nginx -V 2>&1` output ('-': stdin);
#                the tree is configured with the binary's own arguments.
#                Without it: Debian's conf_flags if the tree has them
#                (package nginx-dev), else --with-compat
#   --build      the work directory (default: build/ in the project)
#   --out        where the .so files go (default: BUILD/modules)
#   --print-args print the configure arguments it would use, and stop
#
# $NGINX_CONFIGURE_FLAGS adds configure arguments (one word each).
#
# It refuses to build, so that a module cannot be loaded into an nginx
# whose structures differ from the ones it was compiled against, when
#   - the tree's version is not the binary's;
#   - the binary was not built --with-compat (a dynamic module built
#     elsewhere loads only into a --with-compat nginx, or one built with
#     the very same flags: Debian's, given by --nginx-v or conf_flags);
#   - the binary is ingress-nginx's (its arguments name lua-nginx-module)
#     and the tree lacks ingress-nginx's patches, which move fields of
#     ngx_http_upstream_s and ngx_event_s without changing the module
#     signature.
# Warnings are errors in our files on every tree (ingress-nginx's patch
# 18 drops -Werror from nginx's own flags).
#
# The configured copy is kept in BUILD/nginx-src and reconfigured only
# when the tree or the arguments change; `make modules` there is
# incremental.  The tree itself is never written to.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
src="" nginx_v="" build="$top/build" out="" print_args=""

die() { echo "build-modules: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case $1 in
        --nginx-src) src=${2:?}; shift 2 ;;
        --nginx-v)   nginx_v=${2:?}; shift 2 ;;
        --build)     build=${2:?}; shift 2 ;;
        --out)       out=${2:?}; shift 2 ;;
        --print-args) print_args=1; shift ;;
        -h|--help)   sed -n '2,/^set -e/{/^set -e/d;s/^# \{0,1\}//;p}' "$0"
                     exit 0 ;;
        *)           die "unknown argument $1 (see --help)" ;;
    esac
done

[ -n "$src" ] || die "--nginx-src is required (see --help)"
[ -x "$src/configure" ] && [ -f "$src/src/core/nginx.h" ] \
    || die "no nginx source tree at $src: run 'make deps' (Debian's" \
           "nginx-dev) or give the target's sources"
src=$(cd "$src" && pwd)
mkdir -p "$build"
build=$(cd "$build" && pwd)
out=${out:-$build/modules}
tree=$build/nginx-src

tree_version=$(sed -n 's/^#define NGINX_VERSION *"\(.*\)"/\1/p' \
               "$src/src/core/nginx.h")
[ -n "$tree_version" ] || die "no NGINX_VERSION in $src/src/core/nginx.h"

# The arguments, one per line, into $build/configure.args.new.
args=$build/configure.args.new
{
    echo "# $src ($tree_version)"

    if [ -n "$nginx_v" ]; then
        if [ "$nginx_v" = - ]; then
            v=$(cat)
        else
            [ -r "$nginx_v" ] || die "cannot read $nginx_v"
            v=$(cat "$nginx_v")
        fi

        bin_version=$(printf '%s\n' "$v" \
            | sed -n 's|^nginx version: [A-Za-z]*/\([0-9.]*\).*|\1|p')
        [ -n "$bin_version" ] \
            || die "no 'nginx version:' line in the nginx -V output"
        [ "$bin_version" = "$tree_version" ] \
            || die "the binary is nginx $bin_version, the tree at $src is" \
                   "$tree_version: build against the binary's own version"

        line=$(printf '%s\n' "$v" | sed -n 's/^configure arguments: //p')

        # the arguments as nginx -V quotes them; xargs splits on the
        # shell's quoting rules without evaluating anything
        words=$(printf '%s\n' "$line" | xargs -n 1 printf '%s\n')

        grep -qx -- '--with-compat' <<< "$words" \
            || die "the binary was built without --with-compat: a module" \
                   "built apart from it may not match its structures"

        if grep -q -- '^--add-module=.*lua-nginx-module' <<< "$words"; then
            # patch 29 (upstream_timeout_fields) puts a second
            # connect_timeout, ngx_http_upstream_s's, in the header
            n=$(grep -c 'connect_timeout;' \
                "$src/src/http/ngx_http_upstream.h" || true)
            [ "$n" -ge 2 ] \
                || die "this nginx is ingress-nginx's (lua-nginx-module in" \
                       "its arguments) but $src lacks its patches, which" \
                       "move fields of ngx_http_upstream_s and ngx_event_s:" \
                       "apply images/nginx/rootfs/patches of the" \
                       "controller's release first (deploy/ingress-nginx)"
        fi

        printf '%s\n' "$words" | while IFS= read -r w; do
            case $w in
                # other modules' sources are not here, and do not change
                # the structures a module sees
                --add-module=*|--add-dynamic-module=*) ;;
                # nginx's own dynamic modules are .so files of their own
                # (and Debian's nginx-dev tree lacks their sources)
                --with-*=dynamic) ;;
                # a library's sources the binary was built with: use the
                # system's instead (the module links only what it needs)
                --with-pcre=*|--with-zlib=*|--with-openssl=*|--with-libatomic=*)
                    d=${w#*=}
                    if [ -d "$d" ]; then echo "$w"
                    else echo "build-modules: $w: no such directory, left out" >&2
                    fi ;;
                *) echo "$w" ;;
            esac
        done
    else
        "$top/scripts/configure-args.sh" "$src"
    fi

    for f in ${NGINX_CONFIGURE_FLAGS:-}; do
        echo "$f"
    done

    # the addon's own config (its list of sources): a change reconfigures
    echo "# config: $(cksum < "$top/config")"
} > "$args"

if [ -n "$print_args" ]; then
    grep -v '^#' "$args"
    rm "$args"
    exit 0
fi

if [ -f "$tree/objs/Makefile" ] && cmp -s "$args" "$build/configure.args"
then
    rm "$args"
else
    echo "configuring against $src (log: $build/configure.log)"
    rm -rf "$tree" "$build/configure.args"
    mkdir -p "$tree"
    cp -a "$src/." "$tree/"
    (cd "$tree" && grep -v '^#' "$args" \
        | env -u CFLAGS xargs -d '\n' ./configure \
            --add-dynamic-module="$top" > "$build/configure.log" 2>&1) \
        || { tail -n 20 "$build/configure.log" >&2; rm -f "$args"; exit 1; }

    # a standalone -Werror, not -Werror=format-security
    if ! grep -Eq -- '^CFLAGS *=.*-Werror( |$)' "$tree/objs/Makefile"; then
        echo "build-modules: this tree drops -Werror; putting it back"
        sed -i -E 's/^(CFLAGS *=.*)$/\1 -Werror/' "$tree/objs/Makefile"
    fi
    mv "$args" "$build/configure.args"
fi

make -C "$tree" -f objs/Makefile modules

mkdir -p "$out"
for name in route auth ratelimit metrics; do
    so=$tree/objs/ngx_http_infer_${name}_module.so
    [ -f "$so" ] || die "$so was not built"
    # a new file, then a rename: a running nginx keeps the old one mapped
    cp "$so" "$out/.tmp.${so##*/}"
    mv -f "$out/.tmp.${so##*/}" "$out/${so##*/}"
done
echo "built for nginx $tree_version: $(cd "$out" && ls ngx_http_infer_*.so | tr '\n' ' ')"
