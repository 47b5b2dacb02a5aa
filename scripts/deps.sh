#!/usr/bin/env bash
# Installs what building, testing, benchmarking and the demo need, from
# Debian's archive and the npm registry only.  Idempotent and quiet when
# everything is already there.  Run as root (or with sudo available).
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)

pkgs=(
    # build: Debian's nginx, its module source tree, and our libraries
    build-essential nginx-core nginx-dev
    libjansson-dev libssl-dev libhiredis-dev libpcre2-dev zlib1g-dev
    # the Debian packages (make deb): dpkg-buildpackage, dh, lintian
    dpkg-dev debhelper lintian
    # tests and demo
    redis-server python3 python3-pytest python3-requests python3-jwt
    python3-jwcrypto python3-prometheus-client python3-redis
    python3-pytest-timeout
    postgresql python3-psycopg2      # examples/analytics and its test
    # memory checks (make valgrind) and the parsers' fuzzers (libFuzzer); lld links them with --gc-sections
    valgrind clang lld
    # metrics oracles: promtool and a real Prometheus server
    prometheus
    # benchmarks
    wrk util-linux
    # the ingress-nginx annotation tests (t/test_annotations.py): Go's
    # text/template renders the fragment, Debian's lua module and
    # lua-resty-core stand in for the controller's balancer_by_lua, kubectl
    # checks the example manifests with --dry-run=client (kubernetes-client
    # below, unless a kubectl is there already)
    golang-go libnginx-mod-http-lua lua-resty-core
)
# Debian's kubernetes-client ships /usr/bin/kubectl, which another package
# (Google Cloud SDK's kubectl) may own already: dpkg would refuse the file.
command -v kubectl >/dev/null 2>&1 || pkgs+=(kubernetes-client)

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' \
        || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    echo "deps: installing ${missing[*]}"

    # Debian's nginx and redis-server packages start system services on
    # install; we start our own on loopback, so keep theirs from starting.
    prc=/usr/sbin/policy-rc.d
    own_prc=""
    if [ ! -e "$prc" ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$prc" >/dev/null
        $sudo chmod 755 "$prc"
        own_prc=1
    fi
    trap '[ -n "$own_prc" ] && $sudo rm -f "$prc"' EXIT

    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        >/dev/null
fi

# The official OpenAI SDK, used by the tests as an independent client.
if command -v npm >/dev/null 2>&1; then
    if [ ! -d "$top/t/node/node_modules/openai" ]; then
        echo "deps: installing node packages in t/node"
        (cd "$top/t/node" && npm ci --no-audit --no-fund --loglevel=error)
    fi
else
    echo "deps: npm not found; tests that use the OpenAI SDK will be skipped" >&2
fi
