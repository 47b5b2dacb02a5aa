#!/usr/bin/env bash
# Builds the Debian packages of the four modules with Debian's own tools
# (dpkg-buildpackage, debhelper and nginx-dev's dh_nginx), for the nginx
# installed here (Debian's nginx-core), from the files in debian/:
#
#   libnginx-mod-http-infer-{route,auth,ratelimit,metrics}   one module each
#   libnginx-mod-http-infer                                  all four
#
#   scripts/build-deb.sh [--out DIR] [--lintian]
#
#   --out      where the .deb files go (default: build/deb)
#   --lintian  check them with lintian afterwards (fails on an error or a warning)
#
# The source is copied into OUT/ngx-infer-VERSION first, so that the
# build leaves nothing in the project's own tree.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
out="$top/build/deb" lintian=""

die() { echo "build-deb: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case $1 in
        --out)     out=${2:?}; shift 2 ;;
        --lintian) lintian=1; shift ;;
        -h|--help) sed -n '2,/^set -e/{/^set -e/d;s/^# \{0,1\}//;p}' "$0"
                   exit 0 ;;
        *)         die "unknown argument $1 (see --help)" ;;
    esac
done

command -v dpkg-buildpackage >/dev/null && command -v dh_nginx >/dev/null \
    || die "dpkg-buildpackage or dh_nginx missing: run 'make deps'" \
           "(dpkg-dev, debhelper, nginx-dev)"

version=$(cd "$top" && dpkg-parsechangelog -S Version)
src="$out/ngx-infer-$version"
mkdir -p "$out"
out=$(cd "$out" && pwd)
src="$out/ngx-infer-$version"

# what the package is built from: the modules, their config, the build
# script and the packaging
rm -rf "$src"
mkdir -p "$src/scripts"
cp -a "$top"/config "$top"/ngx_infer_* "$top"/debian "$src/"
cp -a "$top"/scripts/build-modules.sh "$src/scripts/"
rm -f "$out"/*.deb "$out"/*.changes "$out"/*.buildinfo

(cd "$src" && dpkg-buildpackage -b -uc -us) > "$out/build.log" 2>&1 \
    || { tail -30 "$out/build.log" >&2
         die "dpkg-buildpackage failed; the whole log: $out/build.log"; }

ls "$out"/*.deb
if [ -n "$lintian" ]; then
    lintian --fail-on error,warning "$out"/*.changes
fi
