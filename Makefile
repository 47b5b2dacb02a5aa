# ngx_infer: build, test, demo and benchmark.
#
#   make            build the four modules into build/modules/
#   make run        install what is missing, build, start the demo gateway
#   make test       install what is missing, build, run the whole test suite
#   make bench      install what is missing, build, run the benchmarks
#   make valgrind   the reload and JWKS tests with nginx under valgrind
#
#   make NGINX_SRC=/path/to/nginx-1.x.y    build against another nginx tree

NGINX_SRC ?= /usr/share/nginx/src
BUILD     ?= $(CURDIR)/build
PYTHON    ?= /usr/bin/python3
PYTEST_ARGS ?=

TREE    := $(BUILD)/nginx-src
MODDIR  := $(BUILD)/modules
SOURCES := config $(wildcard ngx_infer_*/*.c ngx_infer_*/*.h)

export INFER_MODULES_DIR := $(MODDIR)

.PHONY: all build deps run test bench valgrind valgrind-run token clean \
        FORCE

all: build

build: $(MODDIR)/.built

deps:
	@scripts/deps.sh

# The configure arguments are kept in a file rewritten only when they
# change, so that a new NGINX_SRC or flag reconfigures and nothing else does.
$(BUILD)/configure.args: FORCE
	@test -x "$(NGINX_SRC)/configure" || { \
	    echo "no nginx source tree at $(NGINX_SRC):" \
	         "run 'make deps' (Debian's nginx-dev) or set NGINX_SRC" >&2; \
	    exit 1; }
	@mkdir -p $(BUILD)
	@{ echo "# $(abspath $(NGINX_SRC))"; \
	   scripts/configure-args.sh "$(NGINX_SRC)"; } > $@.tmp
	@if cmp -s $@.tmp $@; then rm $@.tmp; else mv $@.tmp $@; fi

# nginx's configure writes into the tree it runs in: work on a copy, so the
# sources (Debian's or anyone's) are never touched.
$(BUILD)/configured: $(BUILD)/configure.args config
	@echo "configuring against $(NGINX_SRC) (log: $(BUILD)/configure.log)"
	@rm -rf $(TREE) && mkdir -p $(TREE) && cp -a $(NGINX_SRC)/. $(TREE)/
	@cd $(TREE) && grep -v '^#' $(BUILD)/configure.args \
	    | env -u CFLAGS xargs -d '\n' ./configure \
	        --add-dynamic-module=$(CURDIR) > $(BUILD)/configure.log 2>&1 \
	    || { tail -n 20 $(BUILD)/configure.log; exit 1; }
	@grep -q -- '-Werror' $(TREE)/objs/Makefile || { \
	    echo "objs/Makefile lacks -Werror: warnings must be errors" >&2; \
	    exit 1; }
	@touch $@

$(MODDIR)/.built: $(BUILD)/configured $(SOURCES)
	$(MAKE) -C $(TREE) -f objs/Makefile modules
	@mkdir -p $(MODDIR)
	@# a new file, then a rename: a running nginx keeps the old one mapped
	@for so in $(TREE)/objs/ngx_http_infer_*_module.so; do \
	    name=$$(basename $$so); \
	    cp $$so $(MODDIR)/.tmp.$$name \
	    && mv -f $(MODDIR)/.tmp.$$name $(MODDIR)/$$name || exit 1; \
	done
	@touch $@
	@echo "built: $$(cd $(MODDIR) && ls *.so | tr '\n' ' ')"

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
	$(PYTHON) bench/metrics.py
	$(PYTHON) bench/balance.py

# a JWT for the running demo: make token TENANT=globex
token:
	@$(PYTHON) examples/demo/mint_token.py $(TENANT)

clean:
	rm -rf $(BUILD)
