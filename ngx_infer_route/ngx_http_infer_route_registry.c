/*
 * Copyright (C) ngx_infer authors
 *
 * The model registry of ngx_http_infer_route_module: models declared with
 * infer_model / infer_model_target (and read from infer_model_registry's
 * file, see ngx_http_infer_route_file.c), looked up by name, alias or
 * pattern, and the pick of a target for weighted (canary, A/B) splits.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_infer_route.h"
#include "ngx_http_infer_route_json.h"


static ngx_int_t ngx_http_infer_route_registry_add_name(ngx_conf_t *cf,
    ngx_http_infer_route_main_conf_t *rmcf, ngx_str_t *name,
    ngx_http_infer_route_model_t *m);
static ngx_int_t ngx_http_infer_route_registry_fallbacks(
    ngx_http_infer_route_registry_t *reg, u_char *err);
static void ngx_http_infer_route_registry_release(void *data);
static ngx_int_t ngx_http_infer_route_registry_split(ngx_str_t *param,
    ngx_str_t *name, ngx_str_t *v);
static ngx_int_t ngx_http_infer_route_registry_key(
    ngx_hash_keys_arrays_t *keys, ngx_pool_t *pool, ngx_str_t *name,
    ngx_http_infer_route_model_t *m);
static ngx_uint_t ngx_http_infer_route_registry_named(
    ngx_http_infer_route_model_t *m, ngx_str_t *name);


/*
 * infer_model NAME [upstream=POOL] [model=ID] [alias=NAME[,NAME...]]
 *     [pattern=REGEX] [sticky=VALUE] [state=active|deprecated|disabled]
 *     [max_body_size=SIZE] [fallback=NAME] [input_price=USD]
 *     [output_price=USD] [cached_input_price=USD];
 *
 * Each parameter but sticky= (compiled with nginx variables) is checked
 * by ngx_http_infer_route_model_param(), as a registry file's keys are.
 */

char *
ngx_http_infer_route_registry_model(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_infer_route_main_conf_t *rmcf = conf;

    u_char                             *p, *last;
    u_char                              err[NGX_HTTP_INFER_ROUTE_ERRSTR];
    ngx_int_t                           rc;
    ngx_str_t                          *value, *alias, name, v, a;
    ngx_uint_t                          i, j;
    ngx_http_infer_route_model_t       *m, **mp;
    ngx_http_compile_complex_value_t    ccv;

    value = cf->args->elts;

    if (ngx_http_infer_route_registry_name_ok(&value[1]) != NGX_OK) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid model name \"%V\": it must have 1 to %d "
                           "bytes and no control characters",
                           &value[1], NGX_HTTP_INFER_MODEL_MAX);
        return NGX_CONF_ERROR;
    }

    m = ngx_http_infer_route_model_create(cf->pool, 0);
    if (m == NULL) {
        return NGX_CONF_ERROR;
    }

    m->name = value[1];

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_http_infer_route_registry_split(&value[i], &name, &v)
            != NGX_OK
            || v.len == 0)
        {
            goto invalid;
        }

        if (name.len == 6 && ngx_strncmp(name.data, "sticky", 6) == 0) {
            if (m->sticky) {
                ngx_http_infer_route_registry_error(err, m,
                    "\"sticky\" is given twice");
                goto failed;
            }

            m->sticky = ngx_palloc(cf->pool,
                                   sizeof(ngx_http_complex_value_t));
            if (m->sticky == NULL) {
                return NGX_CONF_ERROR;
            }

            ngx_memzero(&ccv, sizeof(ngx_http_compile_complex_value_t));

            ccv.cf = cf;
            ccv.value = &v;
            ccv.complex_value = m->sticky;

            if (ngx_http_compile_complex_value(&ccv) != NGX_OK) {
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (name.len == 7 && ngx_strncmp(name.data, "aliases", 7) == 0) {
            /* a registry file's key, not a parameter */
            goto invalid;
        }

        if ((name.len == 5 && ngx_strncmp(name.data, "alias", 5) == 0)
            || (name.len == 10
                && ngx_strncmp(name.data, "namespaces", 10) == 0))
        {
            /*
             * alias=a,b: each name as a file's "aliases" gives it, and
             * namespaces=a,b so
             */

            p = v.data;
            last = v.data + v.len;

            do {
                a.data = p;

                while (p < last && *p != ',') {
                    p++;
                }

                a.len = p++ - a.data;

                rc = ngx_http_infer_route_model_param(m, &name, &a,
                                                      cf->pool, err);
                if (rc != NGX_OK) {
                    break;
                }

            } while (p < last);

        } else {
            rc = ngx_http_infer_route_model_param(m, &name, &v, cf->pool,
                                                  err);
        }

        if (rc == NGX_DECLINED) {
            goto invalid;
        }

        if (rc != NGX_OK) {
            goto failed;
        }
    }

    if (rmcf->keys == NULL) {
        rmcf->keys = ngx_pcalloc(cf->temp_pool,
                                 sizeof(ngx_hash_keys_arrays_t));
        if (rmcf->keys == NULL) {
            return NGX_CONF_ERROR;
        }

        rmcf->keys->pool = cf->pool;
        rmcf->keys->temp_pool = cf->temp_pool;

        if (ngx_hash_keys_array_init(rmcf->keys, NGX_HASH_SMALL) != NGX_OK) {
            return NGX_CONF_ERROR;
        }
    }

    if (ngx_http_infer_route_registry_add_name(cf, rmcf, &m->name, m)
        != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    alias = m->aliases.elts;

    for (j = 0; j < m->aliases.nelts; j++) {
        if (ngx_http_infer_route_registry_add_name(cf, rmcf, &alias[j], m)
            != NGX_OK)
        {
            return NGX_CONF_ERROR;
        }
    }

    mp = ngx_array_push(&rmcf->models);
    if (mp == NULL) {
        return NGX_CONF_ERROR;
    }

    *mp = m;

    return NGX_CONF_OK;

failed:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "%s", err);
    return NGX_CONF_ERROR;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\" for model \"%V\"",
                       &value[i], &m->name);
    return NGX_CONF_ERROR;
}


/* a model with no parameter yet; number: its place in a file, 0 */

ngx_http_infer_route_model_t *
ngx_http_infer_route_model_create(ngx_pool_t *pool, ngx_uint_t number)
{
    ngx_http_infer_route_model_t  *m;

    m = ngx_pcalloc(pool, sizeof(ngx_http_infer_route_model_t));
    if (m == NULL) {
        return NULL;
    }

    m->number = number;
    m->max_body_size = -1;
    m->price[0] = -1;
    m->price[1] = -1;
    m->price[2] = -1;

    if (ngx_array_init(&m->aliases, pool, 2, sizeof(ngx_str_t)) != NGX_OK
        || ngx_array_init(&m->namespaces, pool, 1, sizeof(ngx_str_t))
           != NGX_OK
        || ngx_array_init(&m->targets, pool, 2,
                          sizeof(ngx_http_infer_route_target_t))
           != NGX_OK)
    {
        return NULL;
    }

    return m;
}


/*
 * One parameter of a model, the same from infer_model (name=value, an
 * alias at a time) and from a registry file (a key and its string):
 * NGX_DECLINED when name is none, NGX_ERROR with err saying what is
 * wrong.  The value is kept, not copied: it lives in the caller's pool.
 */

ngx_int_t
ngx_http_infer_route_model_param(ngx_http_infer_route_model_t *m,
    ngx_str_t *name, ngx_str_t *v, ngx_pool_t *pool, u_char *err)
{
    int64_t               price;
    ngx_str_t            *s;
    ngx_uint_t            k;
#if (NGX_PCRE)
    u_char                errstr[NGX_MAX_CONF_ERRSTR];
    ngx_regex_compile_t   rc;
#endif

#define ngx_infer_param(p)                                                    \
    (name->len == sizeof(p) - 1 && ngx_strncmp(name->data, p, name->len) == 0)

    if (ngx_infer_param("upstream")) {
        if (v->len == 0) {
            goto empty;
        }

        if (m->upstream.len) {
            goto twice;
        }

        m->upstream = *v;
        return NGX_OK;
    }

    if (ngx_infer_param("model") || ngx_infer_param("fallback")) {
        s = ngx_infer_param("model") ? &m->model : &m->fallback_name;

        if (s->len) {
            goto twice;
        }

        if (ngx_http_infer_route_registry_name_ok(v) != NGX_OK) {
            goto bad_name;
        }

        *s = *v;
        return NGX_OK;
    }

    if (ngx_infer_param("alias") || ngx_infer_param("aliases")) {
        if (ngx_http_infer_route_registry_name_ok(v) != NGX_OK) {
            goto bad_name;
        }

        s = ngx_array_push(&m->aliases);
        if (s == NULL) {
            goto nomem;
        }

        *s = *v;
        return NGX_OK;
    }

    if (ngx_infer_param("pattern")) {
        if (v->len == 0) {
            goto empty;
        }

        if (m->pattern.len) {
            goto twice;
        }

#if (NGX_PCRE)
        ngx_memzero(&rc, sizeof(ngx_regex_compile_t));

        rc.pattern = *v;
        rc.pool = pool;
        rc.err.len = NGX_MAX_CONF_ERRSTR;
        rc.err.data = errstr;

        if (ngx_regex_compile(&rc) != NGX_OK) {
            ngx_http_infer_route_registry_error(err, m,
                                                "invalid pattern: %V",
                                                &rc.err);
            return NGX_ERROR;
        }

        m->regex = rc.regex;
        m->pattern = *v;
        return NGX_OK;
#else
        ngx_http_infer_route_registry_error(err, m,
            "\"pattern\" needs nginx built with PCRE");
        return NGX_ERROR;
#endif
    }

    if (ngx_infer_param("namespaces")) {
        if (!(v->len == 1 && v->data[0] == '*')
            && ngx_http_infer_route_namespace_ok(v->data, v->len) != NGX_OK)
        {
            ngx_http_infer_route_registry_error(err, m,
                "\"namespaces\": \"%V\" is not a Kubernetes namespace "
                "name (1 to 63 lowercase letters, digits and \"-\", "
                "starting and ending with a letter or digit) nor \"*\"",
                v);
            return NGX_ERROR;
        }

        s = ngx_array_push(&m->namespaces);
        if (s == NULL) {
            goto nomem;
        }

        *s = *v;
        return NGX_OK;
    }

    if (ngx_infer_param("state")) {
        if (v->len == 6 && ngx_strncmp(v->data, "active", 6) == 0) {
            m->state = NGX_HTTP_INFER_MODEL_ACTIVE;

        } else if (v->len == 10
                   && ngx_strncmp(v->data, "deprecated", 10) == 0)
        {
            m->state = NGX_HTTP_INFER_MODEL_DEPRECATED;

        } else if (v->len == 8 && ngx_strncmp(v->data, "disabled", 8) == 0)
        {
            m->state = NGX_HTTP_INFER_MODEL_DISABLED;

        } else {
            ngx_http_infer_route_registry_error(err, m,
                "\"state\" must be \"active\", \"deprecated\" or "
                "\"disabled\"");
            return NGX_ERROR;
        }

        return NGX_OK;
    }

    if (ngx_infer_param("max_body_size")) {
        m->max_body_size = (v->len == 0) ? NGX_ERROR : ngx_parse_offset(v);

        if (m->max_body_size == NGX_ERROR) {
            ngx_http_infer_route_registry_error(err, m,
                "\"max_body_size\" must be a number of bytes, or a size "
                "such as \"64k\" or \"1m\"");
            return NGX_ERROR;
        }

        return NGX_OK;
    }

    if (ngx_infer_param("input_price") || ngx_infer_param("output_price")
        || ngx_infer_param("cached_input_price"))
    {
        price = ngx_http_infer_decimal_parse(v->data, v->len, 6);

        if (price < 0 || price > NGX_HTTP_INFER_PRICE_MAX) {
            ngx_http_infer_route_registry_error(err, m,
                "\"%V\" must be US dollars per million tokens, 0 to "
                "1000000 with at most 6 decimals (\"0.15\")", name);
            return NGX_ERROR;
        }

        k = (name->data[0] == 'i') ? NGX_HTTP_INFER_PRICE_INPUT
            : (name->data[0] == 'o') ? NGX_HTTP_INFER_PRICE_OUTPUT
            : NGX_HTTP_INFER_PRICE_CACHED;

        if (m->price[k] >= 0) {
            goto twice;
        }

        m->price[k] = price;
        return NGX_OK;
    }

#undef ngx_infer_param

    return NGX_DECLINED;

empty:

    ngx_http_infer_route_registry_error(err, m,
                                        "\"%V\" must be a non-empty string",
                                        name);
    return NGX_ERROR;

twice:

    ngx_http_infer_route_registry_error(err, m, "\"%V\" is given twice",
                                        name);
    return NGX_ERROR;

bad_name:

    ngx_http_infer_route_registry_error(err, m,
        "\"%V\": a name must have 1 to %d bytes and no control characters",
        name, NGX_HTTP_INFER_MODEL_MAX);
    return NGX_ERROR;

nomem:

    ngx_http_infer_route_registry_error(err, m, "not enough memory");
    return NGX_ERROR;
}


/*
 * A model once all its parameters and targets are in, from either
 * source: upstream= becomes its one target; every target's pool must be
 * an upstream{} of umcf, and a target without model= takes the model's.
 */

ngx_int_t
ngx_http_infer_route_model_check(ngx_http_infer_route_model_t *m,
    ngx_http_upstream_main_conf_t *umcf, u_char *err)
{
    ngx_uint_t                       i, j;
    ngx_http_upstream_srv_conf_t   **uscf;
    ngx_http_infer_route_target_t   *t;

    if (m->upstream.len) {
        if (m->targets.nelts) {
            ngx_http_infer_route_registry_error(err, m,
                "has both \"upstream\" and \"targets\": use either");
            return NGX_ERROR;
        }

        t = ngx_http_infer_route_target_add(m);
        if (t == NULL) {
            ngx_http_infer_route_registry_error(err, m, "not enough memory");
            return NGX_ERROR;
        }

        t->upstream = m->upstream;
    }

    if (m->targets.nelts == 0) {
        ngx_http_infer_route_registry_error(err, m,
            "has no upstream: give it %s",
            m->number ? "\"upstream\" or \"targets\""
                      : "upstream= or an infer_model_target");
        return NGX_ERROR;
    }

    t = m->targets.elts;
    m->total_weight = 0;

    for (i = 0; i < m->targets.nelts; i++) {

        if (t[i].model.len == 0) {
            t[i].model = m->model;
        }

        m->total_weight += t[i].weight;

        if (umcf == NULL) {
            /* infer_model_upstream_check off: a name, not a block */
            continue;
        }

        uscf = umcf->upstreams.elts;

        for (j = 0; j < umcf->upstreams.nelts; j++) {
            if ((uscf[j]->flags & NGX_HTTP_UPSTREAM_CREATE)
                && uscf[j]->host.len == t[i].upstream.len
                && ngx_strncmp(uscf[j]->host.data, t[i].upstream.data,
                               t[i].upstream.len)
                   == 0)
            {
                break;
            }
        }

        if (j == umcf->upstreams.nelts) {
            ngx_http_infer_route_registry_error(err, m,
                "no upstream \"%V\" is defined", &t[i].upstream);
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/*
 * infer_model_target NAME POOL [weight=N] [model=ID];
 */

char *
ngx_http_infer_route_registry_target(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_infer_route_main_conf_t *rmcf = conf;

    u_char                           err[NGX_HTTP_INFER_ROUTE_ERRSTR];
    ngx_int_t                        rc;
    ngx_str_t                       *value, name, v;
    ngx_uint_t                       i;
    ngx_http_infer_route_model_t   **mp, *m;
    ngx_http_infer_route_target_t   *t;

    value = cf->args->elts;

    mp = rmcf->models.elts;
    m = NULL;

    for (i = 0; i < rmcf->models.nelts; i++) {
        if (mp[i]->name.len == value[1].len
            && ngx_strncmp(mp[i]->name.data, value[1].data, value[1].len)
               == 0)
        {
            m = mp[i];
            break;
        }
    }

    if (m == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "unknown model \"%V\": declare it with "
                           "infer_model first", &value[1]);
        return NGX_CONF_ERROR;
    }

    if (m->upstream.len) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "model \"%V\" has upstream= already: use either "
                           "upstream= or infer_model_target", &m->name);
        return NGX_CONF_ERROR;
    }

    t = ngx_http_infer_route_target_add(m);
    if (t == NULL) {
        return NGX_CONF_ERROR;
    }

    t->upstream = value[2];

    for (i = 3; i < cf->args->nelts; i++) {

        if (ngx_http_infer_route_registry_split(&value[i], &name, &v)
            != NGX_OK)
        {
            goto invalid;
        }

        if (name.len == 8 && ngx_strncmp(name.data, "upstream", 8) == 0) {
            /* the second argument */
            goto invalid;
        }

        rc = ngx_http_infer_route_target_param(m, t, &name, &v, err);

        if (rc == NGX_DECLINED) {
            goto invalid;
        }

        if (rc != NGX_OK) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "%s", err);
            return NGX_CONF_ERROR;
        }
    }

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\" for a target of model "
                       "\"%V\"", &value[i], &m->name);
    return NGX_CONF_ERROR;
}


/* a new target of m, of weight 1 */

ngx_http_infer_route_target_t *
ngx_http_infer_route_target_add(ngx_http_infer_route_model_t *m)
{
    ngx_http_infer_route_target_t  *t;

    t = ngx_array_push(&m->targets);
    if (t == NULL) {
        return NULL;
    }

    ngx_memzero(t, sizeof(ngx_http_infer_route_target_t));
    t->weight = 1;

    return t;
}


/*
 * One parameter of a target, the last of m's, as infer_model_target and
 * a registry file's "targets" give it: NGX_DECLINED when name is none,
 * NGX_ERROR with err saying what is wrong.
 */

ngx_int_t
ngx_http_infer_route_target_param(ngx_http_infer_route_model_t *m,
    ngx_http_infer_route_target_t *t, ngx_str_t *name, ngx_str_t *v,
    u_char *err)
{
    ngx_int_t  weight;

    if (name->len == 8 && ngx_strncmp(name->data, "upstream", 8) == 0) {
        if (v->len == 0) {
            ngx_http_infer_route_registry_error(err, m,
                "target #%ui: \"upstream\" must be a non-empty string",
                m->targets.nelts);
            return NGX_ERROR;
        }

        t->upstream = *v;
        return NGX_OK;
    }

    if (name->len == 6 && ngx_strncmp(name->data, "weight", 6) == 0) {
        weight = ngx_atoi(v->data, v->len);

        if (weight == NGX_ERROR || weight == 0
            || weight > NGX_HTTP_INFER_ROUTE_WEIGHT_MAX)
        {
            ngx_http_infer_route_registry_error(err, m,
                "target #%ui: \"weight\" must be a whole number from 1 to "
                "%d", m->targets.nelts, NGX_HTTP_INFER_ROUTE_WEIGHT_MAX);
            return NGX_ERROR;
        }

        t->weight = weight;
        return NGX_OK;
    }

    if (name->len == 5 && ngx_strncmp(name->data, "model", 5) == 0) {
        if (ngx_http_infer_route_registry_name_ok(v) != NGX_OK) {
            ngx_http_infer_route_registry_error(err, m,
                "target #%ui: \"model\" must be a string of 1 to %d bytes "
                "and no control characters", m->targets.nelts,
                NGX_HTTP_INFER_MODEL_MAX);
            return NGX_ERROR;
        }

        t->model = *v;
        return NGX_OK;
    }

    return NGX_DECLINED;
}


/*
 * Once the whole http{} block is read, every upstream{} block is known: a
 * model naming a pool that does not exist is a config error, not a 502
 * at request time.
 */

char *
ngx_http_infer_route_registry_init(ngx_conf_t *cf,
    ngx_http_infer_route_main_conf_t *rmcf)
{
    u_char                            err[NGX_HTTP_INFER_ROUTE_ERRSTR];
    ngx_uint_t                        i;
    ngx_http_infer_route_model_t    **m;
    ngx_http_infer_route_registry_t  *reg;
    ngx_http_upstream_main_conf_t    *umcf;

    umcf = rmcf->upstream_check
           ? ngx_http_conf_get_module_main_conf(cf, ngx_http_upstream_module)
           : NULL;

    m = rmcf->models.elts;

    for (i = 0; i < rmcf->models.nelts; i++) {
        if (ngx_http_infer_route_model_check(m[i], umcf, err) != NGX_OK) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0, "%s", err);
            return NGX_CONF_ERROR;
        }
    }

    rmcf->keys = NULL;

    if (rmcf->file) {
        return ngx_http_infer_route_file_init_conf(cf, rmcf);
    }

    if (rmcf->models.nelts == 0) {
        return NGX_CONF_OK;
    }

    err[0] = '\0';

    reg = ngx_http_infer_route_registry_build(rmcf, NULL, cf->pool, cf->log,
                                              err);
    if (reg == NULL) {
        if (err[0]) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0, "%s", err);
        }

        return NGX_CONF_ERROR;
    }

    /* the cycle's pool: it lasts as long as the configuration */
    reg->pool = NULL;

    ngx_http_infer_route_registry_replace(rmcf, reg);

    return NGX_CONF_OK;
}


/*
 * A registry of its own for the models of infer_model and those in
 * "more" (from the registry file, already in the pool).  Each model of
 * infer_model is copied: its targets (with their round robin state) and
 * its fallback, which may name a model of the file, belong to one
 * registry.  What the copies share with the configuration (names,
 * aliases, regexes, sticky keys) lasts as long as the cycle does.
 *
 * On an error, NULL and err says why.
 */

ngx_http_infer_route_registry_t *
ngx_http_infer_route_registry_build(ngx_http_infer_route_main_conf_t *rmcf,
    ngx_array_t *more, ngx_pool_t *pool, ngx_log_t *log, u_char *err)
{
    ngx_int_t                         rc;
    ngx_str_t                        *alias;
    ngx_uint_t                        i, j, n;
    ngx_pool_t                       *temp;
    ngx_hash_init_t                   hash;
    ngx_hash_keys_arrays_t            keys;
    ngx_http_infer_route_model_t    **dm, **mp, **pp, *m;
    ngx_http_infer_route_registry_t  *reg;

    n = rmcf->models.nelts + (more ? more->nelts : 0);

    reg = ngx_pcalloc(pool, sizeof(ngx_http_infer_route_registry_t));
    if (reg == NULL) {
        return NULL;
    }

    reg->pool = pool;
    reg->loaded = ngx_time();

    if (ngx_array_init(&reg->models, pool, ngx_max(n, 1),
                       sizeof(ngx_http_infer_route_model_t *))
        != NGX_OK
        || ngx_array_init(&reg->patterns, pool, 2,
                          sizeof(ngx_http_infer_route_model_t *))
           != NGX_OK)
    {
        return NULL;
    }

    dm = rmcf->models.elts;

    for (i = 0; i < rmcf->models.nelts; i++) {

        m = ngx_palloc(pool, sizeof(ngx_http_infer_route_model_t));
        if (m == NULL) {
            return NULL;
        }

        *m = *dm[i];
        m->fallback = NULL;

        if (ngx_array_init(&m->targets, pool, dm[i]->targets.nelts,
                           sizeof(ngx_http_infer_route_target_t))
            != NGX_OK)
        {
            return NULL;
        }

        ngx_memcpy(m->targets.elts, dm[i]->targets.elts,
                   dm[i]->targets.nelts
                   * sizeof(ngx_http_infer_route_target_t));
        m->targets.nelts = dm[i]->targets.nelts;

        mp = ngx_array_push(&reg->models);
        if (mp == NULL) {
            return NULL;
        }

        *mp = m;
    }

    if (more && more->nelts) {
        mp = ngx_array_push_n(&reg->models, more->nelts);
        if (mp == NULL) {
            return NULL;
        }

        ngx_memcpy(mp, more->elts,
                   more->nelts * sizeof(ngx_http_infer_route_model_t *));
    }

    temp = ngx_create_pool(NGX_DEFAULT_POOL_SIZE, log);
    if (temp == NULL) {
        return NULL;
    }

    ngx_memzero(&keys, sizeof(ngx_hash_keys_arrays_t));

    keys.pool = temp;
    keys.temp_pool = temp;

    if (ngx_hash_keys_array_init(&keys, NGX_HASH_SMALL) != NGX_OK) {
        goto failed;
    }

    mp = reg->models.elts;

    for (i = 0; i < reg->models.nelts; i++) {

        if (mp[i]->pattern.len) {
            pp = ngx_array_push(&reg->patterns);
            if (pp == NULL) {
                goto failed;
            }

            *pp = mp[i];
        }

        alias = mp[i]->aliases.elts;

        for (j = 0; j <= mp[i]->aliases.nelts; j++) {

            rc = ngx_http_infer_route_registry_key(&keys, pool,
                                  j ? &alias[j - 1] : &mp[i]->name, mp[i]);

            if (rc == NGX_BUSY) {
                /* infer_model checked its own: one side is the file */
                ngx_http_infer_route_registry_error(err, mp[i],
                    "name or alias \"%V\" is declared twice (names may "
                    "not differ in case only)",
                    j ? &alias[j - 1] : &mp[i]->name);
                goto failed;
            }

            if (rc != NGX_OK) {
                goto failed;
            }
        }
    }

    hash.hash = &reg->names;
    hash.key = ngx_hash_key;
    hash.max_size = 4096;
    hash.bucket_size = ngx_align(NGX_HTTP_INFER_MODEL_MAX + 64,
                                 ngx_cacheline_size);
    hash.name = "infer_model_names_hash";
    hash.pool = pool;
    hash.temp_pool = NULL;

    if (ngx_hash_init(&hash, keys.keys.elts, keys.keys.nelts) != NGX_OK) {
        goto failed;
    }

    ngx_destroy_pool(temp);

    if (ngx_http_infer_route_registry_fallbacks(reg, err) != NGX_OK) {
        return NULL;
    }

    return reg;

failed:

    ngx_destroy_pool(temp);
    return NULL;
}


/*
 * fallback= names a declared model (not an alias); a chain that comes
 * back to a model already in it would send a failing request round in
 * circles, so it is refused here.
 */

static ngx_int_t
ngx_http_infer_route_registry_fallbacks(ngx_http_infer_route_registry_t *reg,
    u_char *err)
{
    u_char                          low[NGX_HTTP_INFER_MODEL_MAX];
    ngx_uint_t                      i, n, key;
    ngx_http_infer_route_model_t  **m, *f, *step;

    m = reg->models.elts;

    for (i = 0; i < reg->models.nelts; i++) {

        if (m[i]->fallback_name.len == 0) {
            continue;
        }

        /* the key in lower case, as registry_find() looks a name up */

        key = ngx_hash_strlow(low, m[i]->fallback_name.data,
                              m[i]->fallback_name.len);

        f = ngx_hash_find(&reg->names, key, low, m[i]->fallback_name.len);

        if (f == NULL
            || f->name.len != m[i]->fallback_name.len
            || ngx_strncmp(f->name.data, m[i]->fallback_name.data,
                           f->name.len) != 0)
        {
            ngx_http_infer_route_registry_error(err, m[i],
                "fallback \"%V\" is not a declared model",
                &m[i]->fallback_name);
            return NGX_ERROR;
        }

        m[i]->fallback = f;
    }

    for (i = 0; i < reg->models.nelts; i++) {

        step = m[i]->fallback;

        for (n = 0; step && n <= reg->models.nelts; n++) {
            if (step == m[i]) {
                ngx_http_infer_route_registry_error(err, m[i],
                    "its fallback chain comes back to it");
                return NGX_ERROR;
            }

            step = step->fallback;
        }
    }

    return NGX_OK;
}


/*
 * reg becomes the registry new requests acquire; the one it replaces is
 * freed once the last request that holds it is.
 */

void
ngx_http_infer_route_registry_replace(ngx_http_infer_route_main_conf_t *rmcf,
    ngx_http_infer_route_registry_t *reg)
{
    ngx_http_infer_route_registry_t  *old;

    old = rmcf->current;

    reg->refs = 1;
    rmcf->current = reg;

    if (old) {
        ngx_http_infer_route_registry_release(old);
    }
}


/*
 * The current registry, held until the request is freed.  Call it only
 * when rmcf->current is set; NULL means no memory.
 */

ngx_http_infer_route_registry_t *
ngx_http_infer_route_registry_acquire(ngx_http_request_t *r)
{
    ngx_pool_cleanup_t                *cln;
    ngx_http_infer_route_registry_t   *reg;
    ngx_http_infer_route_main_conf_t  *rmcf;

    rmcf = ngx_http_get_module_main_conf(r, ngx_http_infer_route_module);
    reg = rmcf->current;

    if (reg->pool == NULL) {
        /* the configuration's own: never freed, nothing to count */
        return reg;
    }

    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        return NULL;
    }

    cln->handler = ngx_http_infer_route_registry_release;
    cln->data = reg;

    reg->refs++;

    return reg;
}


static void
ngx_http_infer_route_registry_release(void *data)
{
    ngx_http_infer_route_registry_t  *reg = data;

    if (reg->pool == NULL || --reg->refs) {
        return;
    }

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, reg->pool->log, 0,
                   "infer route: registry of %ui models freed",
                   reg->models.nelts);

    ngx_destroy_pool(reg->pool);
}


/*
 * A declared name or alias first, then the patterns in the order they
 * were declared.
 */

ngx_http_infer_route_model_t *
ngx_http_infer_route_registry_find(ngx_http_infer_route_registry_t *reg,
    ngx_str_t *name, ngx_uint_t *by_pattern)
{
    u_char                         low[NGX_HTTP_INFER_MODEL_MAX];
    ngx_uint_t                     key;
    ngx_http_infer_route_model_t  *m;
#if (NGX_PCRE)
    ngx_uint_t                     i;
    ngx_http_infer_route_model_t **p;
#endif

    *by_pattern = 0;

    if (name->len <= NGX_HTTP_INFER_MODEL_MAX) {
        key = ngx_hash_strlow(low, name->data, name->len);
        m = ngx_hash_find(&reg->names, key, low, name->len);

        if (m && ngx_http_infer_route_registry_named(m, name)) {
            return m;
        }
    }

#if (NGX_PCRE)
    p = reg->patterns.elts;

    for (i = 0; i < reg->patterns.nelts; i++) {
        if (ngx_regex_exec(p[i]->regex, name, NULL, 0) >= 0) {
            *by_pattern = 1;
            return p[i];
        }
    }
#endif

    return NULL;
}


/*
 * With a sticky key, a hash of its value picks the target, so one user
 * stays on one variant; otherwise smooth weighted round robin, as nginx's
 * upstream does, which keeps each worker's split exact.
 */

ngx_http_infer_route_target_t *
ngx_http_infer_route_registry_pick(ngx_http_request_t *r,
    ngx_http_infer_route_model_t *m)
{
    uint64_t                        point;
    ngx_str_t                       key;
    ngx_uint_t                      i;
    ngx_http_infer_route_target_t  *t, *best;

    t = m->targets.elts;

    if (m->targets.nelts == 1) {
        return t;
    }

    if (m->sticky) {
        if (ngx_http_complex_value(r, m->sticky, &key) != NGX_OK) {
            return NULL;
        }

        if (key.len) {
            point = ((uint64_t) ngx_murmur_hash2(key.data, key.len)
                     * m->total_weight) >> 32;

            for (i = 0; i < m->targets.nelts; i++) {
                if (point < (uint64_t) t[i].weight) {
                    return &t[i];
                }

                point -= t[i].weight;
            }
        }
    }

    best = NULL;

    for (i = 0; i < m->targets.nelts; i++) {
        t[i].current += t[i].weight;

        if (best == NULL || t[i].current > best->current) {
            best = &t[i];
        }
    }

    best->current -= m->total_weight;

    return best;
}


/*
 * A registry error, into err: "model "x": ..." for a model of infer_model,
 * "model #n ("x"): ..." for the n-th model of the registry file.
 */

void
ngx_http_infer_route_registry_error(u_char *err,
    ngx_http_infer_route_model_t *m, const char *fmt, ...)
{
    u_char   *p, *last;
    va_list   args;

    p = err;
    last = err + NGX_HTTP_INFER_ROUTE_ERRSTR - 1;

    if (m && m->number == 0) {
        p = ngx_slprintf(p, last, "model \"%V\": ", &m->name);

    } else if (m && m->name.len) {
        p = ngx_slprintf(p, last, "model #%ui (\"%V\"): ", m->number,
                         &m->name);

    } else if (m) {
        p = ngx_slprintf(p, last, "model #%ui: ", m->number);
    }

    va_start(args, fmt);
    p = ngx_vslprintf(p, last, fmt, args);
    va_end(args);

    *p = '\0';
}


static ngx_int_t
ngx_http_infer_route_registry_add_name(ngx_conf_t *cf,
    ngx_http_infer_route_main_conf_t *rmcf, ngx_str_t *name,
    ngx_http_infer_route_model_t *m)
{
    ngx_int_t  rc;

    rc = ngx_http_infer_route_registry_key(rmcf->keys, cf->pool, name, m);

    if (rc == NGX_BUSY) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "model name or alias \"%V\" is declared twice "
                           "(names may not differ in case only)", name);
    }

    return rc;
}


/*
 * Model names are case-sensitive, as OpenAI's are, but nginx's hash
 * keeps its keys in lower case (ngx_hash_init): a name is its key in
 * lower case, and a lookup checks the case after (registry_find).  Two
 * names that differ in case only are then one key, refused.
 */

static ngx_int_t
ngx_http_infer_route_registry_key(ngx_hash_keys_arrays_t *keys,
    ngx_pool_t *pool, ngx_str_t *name, ngx_http_infer_route_model_t *m)
{
    ngx_str_t  low;

    low.len = name->len;
    low.data = ngx_pnalloc(pool, name->len);
    if (low.data == NULL) {
        return NGX_ERROR;
    }

    ngx_strlow(low.data, name->data, name->len);

    return ngx_hash_add_key(keys, &low, m, NGX_HASH_READONLY_KEY);
}


/* whether m is named name, or has it as an alias, in this very case */

static ngx_uint_t
ngx_http_infer_route_registry_named(ngx_http_infer_route_model_t *m,
    ngx_str_t *name)
{
    ngx_str_t   *alias;
    ngx_uint_t   i;

    if (m->name.len == name->len
        && ngx_memcmp(m->name.data, name->data, name->len) == 0)
    {
        return 1;
    }

    alias = m->aliases.elts;

    for (i = 0; i < m->aliases.nelts; i++) {
        if (alias[i].len == name->len
            && ngx_memcmp(alias[i].data, name->data, name->len) == 0)
        {
            return 1;
        }
    }

    return 0;
}


/* a "name=value" parameter in its two parts; NGX_ERROR: no name= */

static ngx_int_t
ngx_http_infer_route_registry_split(ngx_str_t *param, ngx_str_t *name,
    ngx_str_t *v)
{
    u_char  *p;

    p = ngx_strlchr(param->data, param->data + param->len, '=');

    if (p == NULL || p == param->data) {
        return NGX_ERROR;
    }

    name->data = param->data;
    name->len = p - param->data;
    v->data = p + 1;
    v->len = param->data + param->len - v->data;

    return NGX_OK;
}


ngx_int_t
ngx_http_infer_route_registry_name_ok(ngx_str_t *name)
{
    u_char  *p, *last;

    if (name->len == 0 || name->len > NGX_HTTP_INFER_MODEL_MAX) {
        return NGX_ERROR;
    }

    last = name->data + name->len;

    for (p = name->data; p < last; p++) {
        if (*p < 0x20 || *p == 0x7f) {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/*
 * A Kubernetes namespace name (an RFC 1123 label): 1 to 63 lowercase
 * letters, digits and '-', starting and ending with a letter or digit.
 */

ngx_int_t
ngx_http_infer_route_namespace_ok(u_char *p, size_t len)
{
    size_t  i;

    if (len == 0 || len > 63 || p[0] == '-' || p[len - 1] == '-') {
        return NGX_ERROR;
    }

    for (i = 0; i < len; i++) {
        if (!((p[i] >= 'a' && p[i] <= 'z') || (p[i] >= '0' && p[i] <= '9')
              || p[i] == '-'))
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}
