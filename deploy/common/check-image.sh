#!/bin/sh
# The last build step of every image under deploy/: the nginx of the image
# must be the nginx the modules were built for, and must load them.
#
#   check-image.sh NGINX NGINX_V_FILE MODULES_DIR
#
# NGINX         the image's nginx binary
# NGINX_V_FILE  the `nginx -V 2>&1` output the modules were built against
#               (what scripts/build-modules.sh was given)
# MODULES_DIR   where the image keeps ngx_http_infer_*_module.so
#
# Then nginx -t on infer-test.conf (next to this script): the four
# load_module lines and a directive of each module.  POSIX sh only: the
# images have busybox sh, dash or bash.
set -eu

if [ $# -ne 3 ]; then
    echo "usage: $0 NGINX NGINX_V_FILE MODULES_DIR" >&2
    exit 2
fi

nginx=$1
expected=$2
moddir=$3
here=$(cd "$(dirname "$0")" && pwd)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$nginx" -V > "$tmp/nginx-V.txt" 2>&1
if ! cmp -s "$expected" "$tmp/nginx-V.txt"; then
    echo "check-image: $nginx is not the nginx the modules were built for" \
         "($expected):" >&2
    diff "$expected" "$tmp/nginx-V.txt" >&2 || true
    exit 1
fi

for m in route auth ratelimit metrics; do
    so=$moddir/ngx_http_infer_${m}_module.so
    if [ ! -r "$so" ]; then
        echo "check-image: $so is missing" >&2
        exit 1
    fi
done

# One API key (its hash only), for the auth module's file.
printf '%s\n' '{"keys": [{"id": "check-1", "tenant": "check",' \
    ' "hash": "sha256:0000000000000000000000000000000000000000000000000000000000000000"}]}' \
    > "$tmp/api-keys.json"

# nginx -t creates every temporary directory: those of the modules this
# binary has (ingress-nginx's lacks uwsgi and scgi) go to $tmp too.
temp_paths=""
for m in fastcgi uwsgi scgi; do
    if ! grep -q -- "--without-http_${m}_module" "$tmp/nginx-V.txt"; then
        temp_paths="$temp_paths ${m}_temp_path $tmp/$m;"
    fi
done

sed -e "s|@MODULES@|$moddir|g" -e "s|@TMP@|$tmp|g" \
    -e "s|@TEMP_PATHS@|$temp_paths|" \
    "$here/infer-test.conf" > "$tmp/nginx.conf"

"$nginx" -t -q -p "$tmp/" -e stderr -c "$tmp/nginx.conf"
echo "check-image: $nginx loads ngx_infer from $moddir"
