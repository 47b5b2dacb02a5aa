# ngx_infer: build, test, demo and benchmark.
#
#   make            build the four modules into build/modules/
#   make run        install what is missing, build, start the demo gateway
#   make test       install what is missing, build, run the whole test suite
#   make bench      install what is missing, build, run the benchmarks
#   make valgrind   the reload and JWKS tests with nginx under valgrind
#   make deb        Debian packages of the modules, in build/deb/
#
#   make NGINX_SRC=/path/to/nginx-1.x.y    build against another nginx tree
#        [NGINX_BIN=/path/to/its/nginx]    for that binary (checked: same
#                                          version, --with-compat)

NGINX_SRC ?= /usr/share/nginx/src
BUILD     ?= $(CURDIR)/build
PYTHON    ?= /usr/bin/python3
PYTEST_ARGS ?=

MODDIR  := $(BUILD)/modules
SOURCES := config $(wildcard ngx_infer_*/*.c ngx_infer_*/*.h)

export INFER_MODULES_DIR := $(MODDIR)

.PHONY: all build deps run test bench valgrind valgrind-run token deb clean \
        FORCE

all: build

build: $(MODDIR)/.built

deps:
	@scripts/deps.sh

# The modules are built for one nginx binary, NGINX_BIN: the tree is
# configured with its own arguments (nginx -V), after checking that its
# version is the tree's and that it was built --with-compat; see
# scripts/build-modules.sh, which the controller images run too.  By
# default that is Debian's nginx, for Debian's tree; another tree without
# NGINX_BIN is configured --with-compat.  What the build is for is kept
# in a file rewritten only when it changes, so that a new NGINX_SRC,
# binary or flag reconfigures and nothing else does.
ifeq ($(NGINX_SRC),/usr/share/nginx/src)
NGINX_BIN ?= $(wildcard /usr/sbin/nginx)
endif

$(BUILD)/target: FORCE
	@mkdir -p $(BUILD)
	@{ echo "src: $(abspath $(NGINX_SRC))"; \
	   echo "flags: $(NGINX_CONFIGURE_FLAGS)"; \
	   if [ -n "$(NGINX_BIN)" ]; then "$(NGINX_BIN)" -V 2>&1; fi; \
	 } > $@.tmp
	@if cmp -s $@.tmp $@; then rm $@.tmp; else mv $@.tmp $@; fi

# the target file holds the binary's nginx -V output
$(MODDIR)/.built: $(BUILD)/target $(SOURCES) scripts/build-modules.sh
	@scripts/build-modules.sh --nginx-src "$(NGINX_SRC)" --build $(BUILD) \
	    --out $(MODDIR) $(if $(NGINX_BIN),--nginx-v $(BUILD)/target)
	@touch $@

# libnginx-mod-http-infer-* for Debian's nginx, built by dpkg-buildpackage
# from debian/ (docs/debian.md), checked by lintian
deb: deps
	@scripts/build-deb.sh --out $(BUILD)/deb --lintian

run: deps build
	$(PYTHON) examples/demo/run.py

# The suite, then the tests of what lives across reloads and requests
# (pools, key sets, timers) again with nginx under valgrind.
test: deps build
	$(PYTHON) -m pytest -p no:cacheprovider $(PYTEST_ARGS) t/
	@$(MAKE) --no-print-directory valgrind-run \
	    VALGRIND_TESTS="$(VALGRIND_QUICK)"

# Under valgrind every nginx process (master, workers, nginx -t) leaves a
# report in build/valgrind; scripts/valgrind-check fails on an invalid
# read or write, or a use of uninitialised memory, in our modules' frames.
VALGRIND_LOGS  := $(BUILD)/valgrind
VALGRIND_QUICK := t/test_reload.py \
    t/test_auth.py::test_jwks_uri_one_fetch_for_both_workers \
    t/test_auth.py::test_jwks_uri_is_fetched_again_after_its_ttl \
    t/test_auth.py::test_jwks_uri_an_unknown_kid_fetches_the_new_keys
VALGRIND_TESTS ?= t/test_reload.py t/test_auth.py -k "reload or jwks"

valgrind: deps build valgrind-run

valgrind-run:
	@rm -rf $(VALGRIND_LOGS)
	INFER_NGINX=$(CURDIR)/scripts/valgrind-nginx \
	INFER_VALGRIND_LOGS=$(VALGRIND_LOGS) INFER_RELOADS=20 \
	    $(PYTHON) -m pytest -p no:cacheprovider -q $(VALGRIND_TESTS)
	scripts/valgrind-check $(VALGRIND_LOGS)

bench: deps build
	$(PYTHON) bench/run.py
	$(PYTHON) bench/auth.py
	$(PYTHON) bench/ratelimit.py
	$(PYTHON) bench/gateways.py
	$(PYTHON) bench/events.py
	$(PYTHON) bench/metrics.py
	$(PYTHON) bench/balance.py
	$(PYTHON) bench/prefix.py
	$(PYTHON) bench/prefix.py --mix unique

# a JWT for the running demo: make token TENANT=globex
token:
	@$(PYTHON) examples/demo/mint_token.py $(TENANT)

clean:
	rm -rf $(BUILD)
