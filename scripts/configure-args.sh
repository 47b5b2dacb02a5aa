#!/usr/bin/env bash
# Prints, one per line, the ./configure arguments for building ngx_infer
# against the nginx source tree $1.  Debian's tree (package nginx-dev)
# carries conf_flags: the flags its nginx binary was built with, which the
# modules must match to load into it.  Any other tree gets --with-compat.
# Extra arguments come from $NGINX_CONFIGURE_FLAGS.
set -euo pipefail

src=$1

if [ -f "$src/conf_flags" ]; then
    # shellcheck disable=SC1091
    . "$src/conf_flags"
    printf '%s\n' "${NGX_CONF_FLAGS[@]}"
else
    echo --with-compat
fi

# Debian's hardening flags (what its nginx binary was built with).
echo "--with-cc-opt=-g -O2 -fstack-protector-strong -Wformat -Werror=format-security -fPIC -D_FORTIFY_SOURCE=2"
echo "--with-ld-opt=-Wl,-z,relro -Wl,-z,now -fPIC"

for f in ${NGINX_CONFIGURE_FLAGS:-}; do
    echo "$f"
done
