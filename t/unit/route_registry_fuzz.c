/*
 * Copyright (C) ngx_infer authors
 *
 * libFuzzer harness for the model registry file parser and the registry
 * it builds, ngx_http_infer_route_file_registry(), then
 * ngx_http_infer_route_registry_find() and _pick() on what it built:
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -fuse-ld=lld \
 *       -ffunction-sections -Wl,--gc-sections -I ... \
 *       t/unit/route_registry_fuzz.c t/unit/ngx_shim.c \
 *       ngx_infer_route/ngx_http_infer_route_file.c \
 *       ngx_infer_route/ngx_http_infer_route_registry.c \
 *       -ljansson -lpcre2-8
 *
 * An input is a registry file, in a buffer of exactly its size, read with
 * two models of infer_model ("Conf-Model", alias "conf-alias") and the
 * upstream{} blocks pool_a, pool_b and Pool-C.  Of a registry built:
 *
 *   - every name and alias, in any case nginx was given it (upper, lower,
 *     mixed), finds its model by name;
 *   - no two names or aliases differ in case only, and a name with its
 *     case changed finds no model by name;
 *   - every fallback is a declared model's name, and no chain loops;
 *   - every target is an upstream{} block, the total weight their sum,
 *     and over one round of it smooth weighted round robin picks each
 *     target exactly its weight's times.
 *
 * With FUZZ_VERBOSE set, each input says what became of it.
 */


#include <ngx_config.h>
#include <ngx_core.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ngx_http.h>

#include <jansson.h>

#include "ngx_http_infer_route.h"
#include "unit.h"


int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_names(ngx_http_infer_route_registry_t *reg);
static void check_name(ngx_http_infer_route_registry_t *reg,
    ngx_http_infer_route_model_t *m, ngx_str_t *name);
static void check_model(ngx_http_infer_route_registry_t *reg,
    ngx_http_infer_route_model_t *m);
static ngx_uint_t declared(ngx_http_infer_route_registry_t *reg,
    u_char *p, size_t len);


static ngx_log_t                          log_;
static ngx_pool_t                        *conf_pool;
static ngx_http_upstream_main_conf_t      umcf;
static ngx_http_infer_route_main_conf_t   rmcf;


int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    u_char                          err[NGX_HTTP_INFER_ROUTE_ERRSTR];
    ngx_str_t                       name, v;
    ngx_uint_t                      i;
    ngx_http_infer_route_model_t   *m, **mp;
    ngx_http_upstream_srv_conf_t   *us, **usp;

    static char  *pools[] = { "pool_a", "pool_b", "Pool-C", "127.0.0.1:1" };

    (void) argc;
    (void) argv;

    log_.log_level = NGX_LOG_DEBUG_ALL;

    conf_pool = ngx_create_pool(NGX_DEFAULT_POOL_SIZE, &log_);
    check(conf_pool != NULL);

    /* the last is proxy_pass's implicit upstream: no upstream{} block */

    check(ngx_array_init(&umcf.upstreams, conf_pool, 4,
                         sizeof(ngx_http_upstream_srv_conf_t *))
          == NGX_OK);

    for (i = 0; i < 4; i++) {
        us = ngx_pcalloc(conf_pool, sizeof(ngx_http_upstream_srv_conf_t));
        check(us != NULL);

        us->host.data = (u_char *) pools[i];
        us->host.len = strlen(pools[i]);
        us->flags = (i < 3) ? NGX_HTTP_UPSTREAM_CREATE : 0;

        usp = ngx_array_push(&umcf.upstreams);
        check(usp != NULL);
        *usp = us;
    }

    /* infer_model Conf-Model upstream=pool_a alias=conf-alias; */

    check(ngx_array_init(&rmcf.models, conf_pool, 2,
                         sizeof(ngx_http_infer_route_model_t *))
          == NGX_OK);

    m = ngx_http_infer_route_model_create(conf_pool, 0);
    check(m != NULL);
    ngx_str_set(&m->name, "Conf-Model");

    ngx_str_set(&name, "upstream");
    ngx_str_set(&v, "pool_a");
    check(ngx_http_infer_route_model_param(m, &name, &v, conf_pool, err)
          == NGX_OK);

    ngx_str_set(&name, "alias");
    ngx_str_set(&v, "conf-alias");
    check(ngx_http_infer_route_model_param(m, &name, &v, conf_pool, err)
          == NGX_OK);

    check(ngx_http_infer_route_model_check(m, &umcf, err) == NGX_OK);

    mp = ngx_array_push(&rmcf.models);
    check(mp != NULL);
    *mp = m;

    return 0;
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    u_char                           *p;
    u_char                            err[NGX_HTTP_INFER_ROUTE_ERRSTR];
    json_t                           *root, *list;
    ngx_uint_t                        i;
    ngx_pool_t                       *pool;
    ngx_http_infer_route_model_t    **m;
    ngx_http_infer_route_registry_t  *reg;

    p = malloc(size ? size : 1);
    if (p == NULL) {
        return 0;
    }

    memcpy(p, data, size);

    pool = ngx_create_pool(NGX_DEFAULT_POOL_SIZE, &log_);
    check(pool != NULL);

    memset(err, 0xa5, sizeof(err));

    reg = ngx_http_infer_route_file_registry(&rmcf, &umcf, p, size, pool,
                                             &log_, err);

    /* the registry keeps nothing of the file's bytes */
    memset(p, 0xa5, size);
    free(p);

    check(memchr(err, '\0', sizeof(err)) != NULL);

    if (reg == NULL) {
        check(err[0] != '\0');

        if (getenv("FUZZ_VERBOSE")) {
            fprintf(stderr, "refused: %s\n", err);
        }

        ngx_destroy_pool(pool);
        return 0;
    }

    if (getenv("FUZZ_VERBOSE")) {
        fprintf(stderr, "registry of %u models\n",
                (unsigned) reg->models.nelts);
    }

    check(err[0] == '\0');
    check(reg->pool == pool);

    root = json_loadb((char *) data, size, JSON_REJECT_DUPLICATES, NULL);
    check(root != NULL);

    list = json_is_object(root) ? json_object_get(root, "models") : root;
    check(json_is_array(list));
    check(reg->models.nelts == rmcf.models.nelts + json_array_size(list));

    json_decref(root);

    m = reg->models.elts;

    for (i = 0; i < reg->models.nelts; i++) {
        check(m[i]->number == (i < rmcf.models.nelts
                               ? 0 : i - rmcf.models.nelts + 1));
        check_model(reg, m[i]);
    }

    check_names(reg);

    ngx_destroy_pool(pool);

    return 0;
}


static void
check_model(ngx_http_infer_route_registry_t *reg,
    ngx_http_infer_route_model_t *m)
{
    ngx_int_t                        total;
    ngx_uint_t                       i, j, n, *picked;
    ngx_http_infer_route_target_t   *t, *got;
    ngx_http_infer_route_model_t    *step;
    ngx_http_upstream_srv_conf_t   **us;

    check(ngx_http_infer_route_registry_name_ok(&m->name) == NGX_OK);
    check(m->state <= NGX_HTTP_INFER_MODEL_DISABLED);
    check(m->sticky == NULL || m->number == 0);
    check((m->pattern.len == 0) == (m->regex == NULL));

    if (m->fallback_name.len) {
        step = m->fallback;
        check(step != NULL);
        check(step->name.len == m->fallback_name.len
              && memcmp(step->name.data, m->fallback_name.data,
                        step->name.len) == 0);

        for (n = 0; step; n++, step = step->fallback) {
            check(step != m && n <= reg->models.nelts);
        }

    } else {
        check(m->fallback == NULL);
    }

    /* targets: upstream{} blocks, weights from 1 to the maximum */

    check(m->targets.nelts > 0);

    t = m->targets.elts;
    us = umcf.upstreams.elts;
    total = 0;

    for (i = 0; i < m->targets.nelts; i++) {
        check(t[i].weight >= 1
              && t[i].weight <= NGX_HTTP_INFER_ROUTE_WEIGHT_MAX);
        check(t[i].model.len == 0
              || ngx_http_infer_route_registry_name_ok(&t[i].model)
                 == NGX_OK);
        check(t[i].model.len || m->model.len == 0);

        for (j = 0; j < umcf.upstreams.nelts; j++) {
            if ((us[j]->flags & NGX_HTTP_UPSTREAM_CREATE)
                && us[j]->host.len == t[i].upstream.len
                && memcmp(us[j]->host.data, t[i].upstream.data,
                          t[i].upstream.len) == 0)
            {
                break;
            }
        }

        check(j < umcf.upstreams.nelts);

        total += t[i].weight;
    }

    check(m->total_weight == total);

    if (m->number == 0 || total > 2000) {
        /* infer_model's own are shared by every input: left as they are */
        return;
    }

    /* one round of smooth weighted round robin: each its weight's times */

    picked = calloc(m->targets.nelts, sizeof(ngx_uint_t));
    check(picked != NULL);

    for (n = 0; n < (ngx_uint_t) total; n++) {
        got = ngx_http_infer_route_registry_pick(NULL, m);
        check(got >= t && got < t + m->targets.nelts);
        picked[got - t]++;
    }

    for (i = 0; i < m->targets.nelts; i++) {
        check(picked[i] == (ngx_uint_t) t[i].weight);
        check(t[i].current == 0);
    }

    free(picked);
}


/* every name and alias: found as given, and not with its case changed */

static void
check_names(ngx_http_infer_route_registry_t *reg)
{
    ngx_str_t                      *alias;
    ngx_uint_t                      i, j;
    ngx_http_infer_route_model_t  **m;

    m = reg->models.elts;

    for (i = 0; i < reg->models.nelts; i++) {
        check_name(reg, m[i], &m[i]->name);

        alias = m[i]->aliases.elts;

        for (j = 0; j < m[i]->aliases.nelts; j++) {
            check_name(reg, m[i], &alias[j]);
        }
    }
}


static void
check_name(ngx_http_infer_route_registry_t *reg,
    ngx_http_infer_route_model_t *m, ngx_str_t *name)
{
    u_char                         other[NGX_HTTP_INFER_MODEL_MAX];
    ngx_str_t                      s;
    ngx_uint_t                     i, by_pattern, changed;
    ngx_http_infer_route_model_t  *found;

    check(ngx_http_infer_route_registry_name_ok(name) == NGX_OK);

    /* exactly one declaration of it, whatever its case */
    check(declared(reg, name->data, name->len) == 1);

    found = ngx_http_infer_route_registry_find(reg, name, &by_pattern);
    check(found == m && by_pattern == 0);

    /* each letter's case swapped: no model by name */

    changed = 0;

    for (i = 0; i < name->len; i++) {
        other[i] = name->data[i];

        if (ngx_tolower(other[i]) != other[i]) {
            other[i] = ngx_tolower(other[i]);
            changed = 1;

        } else if (ngx_toupper(other[i]) != other[i]) {
            other[i] = ngx_toupper(other[i]);
            changed = 1;
        }
    }

    if (!changed) {
        return;
    }

    s.data = other;
    s.len = name->len;

    found = ngx_http_infer_route_registry_find(reg, &s, &by_pattern);
    check(found == NULL || by_pattern == 1);
}


/* how many names and aliases are p, compared in any case */

static ngx_uint_t
declared(ngx_http_infer_route_registry_t *reg, u_char *p, size_t len)
{
    ngx_str_t                      *alias;
    ngx_uint_t                      i, j, n;
    ngx_http_infer_route_model_t  **m;

    m = reg->models.elts;
    n = 0;

    for (i = 0; i < reg->models.nelts; i++) {
        n += (m[i]->name.len == len
              && ngx_strncasecmp(m[i]->name.data, p, len) == 0);

        alias = m[i]->aliases.elts;

        for (j = 0; j < m[i]->aliases.nelts; j++) {
            n += (alias[j].len == len
                  && ngx_strncasecmp(alias[j].data, p, len) == 0);
        }
    }

    return n;
}
