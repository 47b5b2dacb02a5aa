#!/bin/sh
# The init container of the ingress-nginx chart's controller.extraModules
# (it runs `sh -c /usr/local/bin/init_module.sh` with the pod's emptyDir at
# /modules_mount): copies the ngx_infer modules to
# /modules_mount/etc/nginx/modules/ngx_infer/ and their libraries to
# /modules_mount/etc/nginx/modules/otel/, the directory the controller's
# musl loader searches (/etc/ld-musl-x86_64.path).
set -eu

src=/ngx_infer/modules_mount
dst=/modules_mount

if [ ! -d "$dst" ]; then
    echo "init_module.sh: $dst is not mounted" >&2
    exit 1
fi

mkdir -p "$dst/etc/nginx/modules/ngx_infer" "$dst/etc/nginx/modules/otel"
cp "$src"/etc/nginx/modules/ngx_infer/*.so "$dst/etc/nginx/modules/ngx_infer/"
cp "$src"/etc/nginx/modules/otel/* "$dst/etc/nginx/modules/otel/"
chmod 0644 "$dst"/etc/nginx/modules/ngx_infer/*.so "$dst"/etc/nginx/modules/otel/*

echo "init_module.sh: ngx_infer copied to $dst:"
ls -l "$dst/etc/nginx/modules/ngx_infer" "$dst/etc/nginx/modules/otel"
