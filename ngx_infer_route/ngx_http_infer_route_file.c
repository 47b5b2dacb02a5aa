/*
 * Copyright (C) ngx_infer authors
 *
 * infer_model_registry: models read from a JSON file, in the shape a
 * Kubernetes ConfigMap carries, and read again by each worker when the
 * file changes, without a reload of nginx.  A file that does not make a
 * valid registry fails "nginx -t"; at run time it is refused, once, and
 * the registry in use stays.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <jansson.h>

#include "ngx_http_infer_file.h"
#include "ngx_http_infer_route.h"
#include "ngx_http_infer_route_json.h"


/* a registry file is a few kilobytes: a bound against a wrong path */
#define NGX_HTTP_INFER_ROUTE_FILE_MAX  (16 * 1024 * 1024)


struct ngx_http_infer_route_file_s {
    ngx_http_infer_watch_t             watch;
    ngx_http_infer_route_main_conf_t  *rmcf;
    ngx_http_upstream_main_conf_t     *umcf;
};


static void ngx_http_infer_route_file_changed(ngx_http_infer_watch_t *w,
    ngx_int_t rc, u_char *stat_err, ngx_log_t *log);
static ngx_http_infer_route_registry_t *ngx_http_infer_route_file_load(
    ngx_http_infer_route_file_t *f, ngx_pool_t *pool, ngx_log_t *log,
    u_char *err);
static ngx_int_t ngx_http_infer_route_file_parse(
    ngx_http_upstream_main_conf_t *umcf, json_t *root, ngx_pool_t *pool,
    ngx_array_t *models, u_char *err);
static ngx_http_infer_route_model_t *ngx_http_infer_route_file_model(
    ngx_http_upstream_main_conf_t *umcf, json_t *obj, ngx_uint_t number,
    ngx_pool_t *pool, u_char *err);
static ngx_int_t ngx_http_infer_route_file_param(
    ngx_http_infer_route_model_t *m, const char *key, json_t *v,
    ngx_pool_t *pool, u_char *err);
static ngx_int_t ngx_http_infer_route_file_targets(
    ngx_http_infer_route_model_t *m, json_t *list, ngx_pool_t *pool,
    u_char *err);
static ngx_int_t ngx_http_infer_route_file_string(json_t *v,
    ngx_pool_t *pool, ngx_str_t *s);
static ngx_int_t ngx_http_infer_route_file_name(json_t *v, ngx_pool_t *pool,
    ngx_str_t *s);


/*
 * infer_model_registry FILE [interval=TIME];
 */

char *
ngx_http_infer_route_file_conf(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_infer_route_main_conf_t *rmcf = conf;

    ngx_str_t                    *value;
    ngx_uint_t                    i;
    ngx_http_infer_route_file_t  *f;

    if (rmcf->file) {
        return "is duplicate";
    }

    value = cf->args->elts;

    f = ngx_pcalloc(cf->pool, sizeof(ngx_http_infer_route_file_t));
    if (f == NULL) {
        return NGX_CONF_ERROR;
    }

    f->watch.file.name = value[1];

    if (ngx_conf_full_name(cf->cycle, &f->watch.file.name, 1) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    f->watch.interval = NGX_HTTP_INFER_WATCH_INTERVAL;
    f->watch.changed = ngx_http_infer_route_file_changed;
    f->watch.data = f;

    for (i = 2; i < cf->args->nelts; i++) {
        if (ngx_http_infer_watch_interval(&f->watch, &value[i]) != NGX_OK) {
            goto invalid;
        }
    }

    f->rmcf = rmcf;
    f->umcf = ngx_http_conf_get_module_main_conf(cf,
                                                 ngx_http_upstream_module);
    rmcf->file = f;

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\"", &value[i]);
    return NGX_CONF_ERROR;
}


/*
 * At configuration time, after the models of infer_model: the file must
 * make a valid registry with them, or nginx does not start.
 */

char *
ngx_http_infer_route_file_init_conf(ngx_conf_t *cf,
    ngx_http_infer_route_main_conf_t *rmcf)
{
    u_char                            err[NGX_HTTP_INFER_ROUTE_ERRSTR];
    ngx_http_infer_route_file_t      *f;
    ngx_http_infer_route_registry_t  *reg;

    f = rmcf->file;

    reg = ngx_http_infer_route_file_load(f, cf->pool, cf->log, err);

    if (reg == NULL) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "infer_model_registry \"%V\": %s",
                      &f->watch.file.name, err);
        return NGX_CONF_ERROR;
    }

    /* the cycle's pool: it lasts as long as the configuration */
    reg->pool = NULL;

    ngx_http_infer_route_registry_replace(rmcf, reg);

    return NGX_CONF_OK;
}


ngx_int_t
ngx_http_infer_route_file_init_process(ngx_cycle_t *cycle)
{
    ngx_http_infer_route_main_conf_t  *rmcf;

    if (ngx_process != NGX_PROCESS_WORKER
        && ngx_process != NGX_PROCESS_SINGLE)
    {
        /* the cache manager and loader route nothing */
        return NGX_OK;
    }

    rmcf = ngx_http_cycle_get_module_main_conf(cycle,
                                               ngx_http_infer_route_module);

    if (rmcf == NULL || rmcf->file == NULL) {
        return NGX_OK;
    }

    ngx_http_infer_watch_start(&rmcf->file->watch, cycle);

    return NGX_OK;
}


void
ngx_http_infer_route_file_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_infer_route_main_conf_t  *rmcf;

    rmcf = ngx_http_cycle_get_module_main_conf(cycle,
                                               ngx_http_infer_route_module);

    if (rmcf && rmcf->file) {
        ngx_http_infer_watch_stop(&rmcf->file->watch);
    }
}


/*
 * Every worker reads the file and builds its own registry; worker 0
 * speaks for them all in the error log, so that one failure is one line
 * (the others say it at the debug level).
 */

static void
ngx_http_infer_route_file_changed(ngx_http_infer_watch_t *w, ngx_int_t rc,
    u_char *stat_err, ngx_log_t *log)
{
    u_char                            err[NGX_HTTP_INFER_ROUTE_ERRSTR];
    ngx_tm_t                          tm;
    ngx_uint_t                        ok, failed;
    ngx_pool_t                       *pool;
    ngx_http_infer_route_file_t      *f;
    ngx_http_infer_route_registry_t  *reg;

    f = w->data;

    ok = (ngx_worker == 0) ? NGX_LOG_NOTICE : NGX_LOG_DEBUG;
    failed = (ngx_worker == 0) ? NGX_LOG_ERR : NGX_LOG_DEBUG;

    if (rc == NGX_ERROR) {
        ngx_cpystrn(err, stat_err, sizeof(err));
        goto fail;
    }

    ngx_log_debug1(NGX_LOG_DEBUG_HTTP, log, 0,
                   "infer route: registry file \"%V\" changed",
                   &f->watch.file.name);

    pool = ngx_create_pool(NGX_DEFAULT_POOL_SIZE, log);
    if (pool == NULL) {
        return;
    }

    reg = ngx_http_infer_route_file_load(f, pool, log, err);

    if (reg == NULL) {
        ngx_destroy_pool(pool);
        goto fail;
    }

    ngx_http_infer_route_registry_replace(f->rmcf, reg);

    ngx_log_error(ok, log, 0,
                  "infer_model_registry \"%V\": %ui models loaded",
                  &f->watch.file.name, reg->models.nelts);

    return;

fail:

    ngx_localtime(f->rmcf->current->loaded, &tm);

    ngx_log_error(failed, log, 0,
                  "infer_model_registry \"%V\": %s, keeping the registry "
                  "loaded at %4d/%02d/%02d %02d:%02d:%02d",
                  &f->watch.file.name, err, tm.ngx_tm_year, tm.ngx_tm_mon,
                  tm.ngx_tm_mday, tm.ngx_tm_hour, tm.ngx_tm_min,
                  tm.ngx_tm_sec);
}


/*
 * The file, read and checked, with the models of infer_model, as a new
 * registry in pool; NULL and err on an error.
 */

static ngx_http_infer_route_registry_t *
ngx_http_infer_route_file_load(ngx_http_infer_route_file_t *f,
    ngx_pool_t *pool, ngx_log_t *log, u_char *err)
{
    u_char                           *buf;
    size_t                            size;
    ngx_http_infer_route_registry_t  *reg;

    err[0] = '\0';

    buf = ngx_http_infer_file_read(&f->watch.file,
                                   NGX_HTTP_INFER_ROUTE_FILE_MAX,
                                   &size, log, err,
                                   NGX_HTTP_INFER_ROUTE_ERRSTR);
    if (buf == NULL) {
        return NULL;
    }

    reg = ngx_http_infer_route_file_registry(f->rmcf,
                                             f->rmcf->upstream_check
                                             ? f->umcf : NULL,
                                             buf, size, pool, log, err);

    ngx_free(buf);

    return reg;
}


/*
 * A registry file's contents, with the models of infer_model, as a new
 * registry in pool, which keeps nothing of data; NULL and err on an
 * error.  The names of umcf's upstream{} blocks are the pools a target
 * may name.
 */

ngx_http_infer_route_registry_t *
ngx_http_infer_route_file_registry(ngx_http_infer_route_main_conf_t *rmcf,
    ngx_http_upstream_main_conf_t *umcf, u_char *data, size_t len,
    ngx_pool_t *pool, ngx_log_t *log, u_char *err)
{
    json_t                           *root;
    ngx_int_t                         rc;
    ngx_array_t                       models;
    json_error_t                      jerr;
    ngx_http_infer_route_registry_t  *reg;

    err[0] = '\0';

    root = json_loadb((char *) data, len, JSON_REJECT_DUPLICATES, &jerr);

    if (root == NULL) {
        ngx_http_infer_route_registry_error(err, NULL,
            "invalid JSON at line %d, column %d: %s",
            jerr.line, jerr.column, jerr.text);
        return NULL;
    }

    rc = ngx_http_infer_route_file_parse(umcf, root, pool, &models, err);

    json_decref(root);

    if (rc != NGX_OK) {
        goto invalid;
    }

    reg = ngx_http_infer_route_registry_build(rmcf, &models, pool, log,
                                              err);
    if (reg == NULL) {
        goto invalid;
    }

    return reg;

invalid:

    if (err[0] == '\0') {
        ngx_http_infer_route_registry_error(err, NULL, "not enough memory");
    }

    return NULL;
}


/*
 * A JSON array of models, or an object {"models": [...]}.
 */

static ngx_int_t
ngx_http_infer_route_file_parse(ngx_http_upstream_main_conf_t *umcf,
    json_t *root, ngx_pool_t *pool, ngx_array_t *models, u_char *err)
{
    size_t                          i;
    json_t                         *list, *item, *v;
    const char                     *key;
    ngx_http_infer_route_model_t  **mp;

    list = root;

    if (json_is_object(root)) {
        json_object_foreach(root, key, v) {
            if (ngx_strcmp(key, "models") != 0) {
                ngx_http_infer_route_registry_error(err, NULL,
                    "unknown key \"%s\": the file holds a JSON array of "
                    "models, or an object with a \"models\" array only",
                    key);
                return NGX_ERROR;
            }
        }

        list = json_object_get(root, "models");
    }

    if (!json_is_array(list)) {
        ngx_http_infer_route_registry_error(err, NULL,
            "the file must hold a JSON array of models, or an object "
            "with a \"models\" array");
        return NGX_ERROR;
    }

    if (ngx_array_init(models, pool, ngx_max(json_array_size(list), 1),
                       sizeof(ngx_http_infer_route_model_t *))
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    json_array_foreach(list, i, item) {

        mp = ngx_array_push(models);
        if (mp == NULL) {
            return NGX_ERROR;
        }

        *mp = ngx_http_infer_route_file_model(umcf, item, i + 1, pool,
                                              err);
        if (*mp == NULL) {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/*
 * One model: what infer_model and infer_model_target say, checked as
 * they are.  An unknown key is an error, so that a typo does not pass as
 * a default.
 */

static ngx_http_infer_route_model_t *
ngx_http_infer_route_file_model(ngx_http_upstream_main_conf_t *umcf,
    json_t *obj, ngx_uint_t number, ngx_pool_t *pool, u_char *err)
{
    json_t                         *v;
    ngx_int_t                       rc;
    ngx_str_t                       name;
    const char                     *key;
    ngx_http_infer_route_model_t   *m;

    m = ngx_http_infer_route_model_create(pool, number);
    if (m == NULL) {
        return NULL;
    }

    if (!json_is_object(obj)) {
        ngx_http_infer_route_registry_error(err, m, "not a JSON object");
        return NULL;
    }

    v = json_object_get(obj, "name");

    if (v == NULL) {
        ngx_http_infer_route_registry_error(err, m, "no \"name\"");
        return NULL;
    }

    rc = ngx_http_infer_route_file_name(v, pool, &name);

    if (rc == NGX_ERROR) {
        return NULL;
    }

    if (rc == NGX_DECLINED) {
        ngx_http_infer_route_registry_error(err, m,
            "\"name\" must be a string of 1 to %d bytes and no control "
            "characters", NGX_HTTP_INFER_MODEL_MAX);
        return NULL;
    }

    m->name = name;

    json_object_foreach(obj, key, v) {

        if (ngx_strcmp(key, "name") == 0) {
            continue;
        }

        if (ngx_strcmp(key, "targets") == 0) {
            rc = ngx_http_infer_route_file_targets(m, v, pool, err);

            if (rc != NGX_OK) {
                return NULL;
            }

            continue;
        }

        if (ngx_http_infer_route_file_param(m, key, v, pool, err)
            != NGX_OK)
        {
            return NULL;
        }
    }

    if (ngx_http_infer_route_model_check(m, umcf, err) != NGX_OK) {
        return NULL;
    }

    return m;
}


/*
 * A key of a model: its JSON value, as the text infer_model would give
 * it, to ngx_http_infer_route_model_param(), which checks both.
 */

static ngx_int_t
ngx_http_infer_route_file_param(ngx_http_infer_route_model_t *m,
    const char *key, json_t *v, ngx_pool_t *pool, u_char *err)
{
    double      d;
    size_t      index;
    json_t     *item;
    ngx_int_t   rc;
    ngx_str_t   name, s;

    name.data = (u_char *) key;
    name.len = ngx_strlen(key);

    if (ngx_strcmp(key, "sticky") == 0) {
        ngx_http_infer_route_registry_error(err, m,
            "\"sticky\" is not supported in a registry file (its value is "
            "compiled with nginx variables): declare the model with "
            "infer_model");
        return NGX_ERROR;
    }

    if (ngx_strcmp(key, "alias") == 0) {
        /* a parameter of infer_model; the file's key is "aliases" */
        goto unknown;
    }

    if (ngx_strcmp(key, "aliases") == 0
        || ngx_strcmp(key, "namespaces") == 0)
    {
        if (!json_is_array(v)) {
            ngx_http_infer_route_registry_error(err, m,
                "\"%s\" must be an array of names", key);
            return NGX_ERROR;
        }

        json_array_foreach(v, index, item) {
            rc = ngx_http_infer_route_file_string(item, pool, &s);

            if (rc == NGX_DECLINED) {
                ngx_http_infer_route_registry_error(err, m,
                    "\"%s\": a name must be a string", key);
                return NGX_ERROR;
            }

            if (rc != NGX_OK
                || ngx_http_infer_route_model_param(m, &name, &s, pool, err)
                   != NGX_OK)
            {
                return NGX_ERROR;
            }
        }

        return NGX_OK;
    }

    if (ngx_strcmp(key, "max_body_size") == 0 && json_is_integer(v)) {
        if (json_integer_value(v) < 0
            || json_integer_value(v) > NGX_MAX_OFF_T_VALUE)
        {
            /* refused with the words of a size that is no size */
            s.len = 0;
            return ngx_http_infer_route_model_param(m, &name, &s, pool, err);
        }

        m->max_body_size = (off_t) json_integer_value(v);
        return NGX_OK;
    }

    if (json_is_number(v)
        && (ngx_strcmp(key, "input_price") == 0
            || ngx_strcmp(key, "output_price") == 0
            || ngx_strcmp(key, "cached_input_price") == 0))
    {
        /* 0.15: its text with 6 decimals, checked as infer_model's */
        s.data = ngx_pnalloc(pool, 64);
        if (s.data == NULL) {
            return NGX_ERROR;
        }

        d = json_number_value(v);
        s.len = (d >= 0 && d <= 1e6)
                ? (size_t) (ngx_sprintf(s.data, "%.6f", d) - s.data) : 0;

        return ngx_http_infer_route_model_param(m, &name, &s, pool, err);
    }

    rc = ngx_http_infer_route_file_string(v, pool, &s);

    if (rc == NGX_ERROR) {
        return NGX_ERROR;
    }

    if (rc == NGX_DECLINED) {
        /* not a string: refused with the words of an empty one */
        s.len = 0;
    }

    rc = ngx_http_infer_route_model_param(m, &name, &s, pool, err);

    if (rc != NGX_DECLINED) {
        return rc;
    }

unknown:

    ngx_http_infer_route_registry_error(err, m, "unknown key \"%s\"", key);
    return NGX_ERROR;
}


/*
 * "targets": [{"upstream": POOL, "weight": N, "model": ID}, ...], as
 * infer_model_target declares them.
 */

static ngx_int_t
ngx_http_infer_route_file_targets(ngx_http_infer_route_model_t *m,
    json_t *list, ngx_pool_t *pool, u_char *err)
{
    u_char                          num[NGX_INT64_LEN];
    size_t                          i;
    json_t                         *item, *v;
    ngx_int_t                       rc;
    ngx_str_t                       name, s;
    const char                     *key;
    ngx_http_infer_route_target_t  *t;

    if (!json_is_array(list)) {
        ngx_http_infer_route_registry_error(err, m,
            "\"targets\" must be an array of objects");
        return NGX_ERROR;
    }

    json_array_foreach(list, i, item) {

        if (!json_is_object(item)) {
            ngx_http_infer_route_registry_error(err, m,
                                                "target #%uz: not a JSON "
                                                "object", i + 1);
            return NGX_ERROR;
        }

        t = ngx_http_infer_route_target_add(m);
        if (t == NULL) {
            return NGX_ERROR;
        }

        json_object_foreach(item, key, v) {

            name.data = (u_char *) key;
            name.len = ngx_strlen(key);

            /* the text infer_model_target would give; none: "" */

            if (ngx_strcmp(key, "weight") == 0) {
                s.data = num;
                s.len = json_is_integer(v)
                        ? (size_t) (ngx_sprintf(num, "%L",
                                        (int64_t) json_integer_value(v))
                                    - num)
                        : 0;

            } else {
                rc = ngx_http_infer_route_file_string(v, pool, &s);

                if (rc == NGX_ERROR) {
                    return NGX_ERROR;
                }

                if (rc == NGX_DECLINED) {
                    s.len = 0;
                }
            }

            rc = ngx_http_infer_route_target_param(m, t, &name, &s, err);

            if (rc == NGX_DECLINED) {
                ngx_http_infer_route_registry_error(err, m,
                    "target #%uz: unknown key \"%s\"", i + 1, key);
                return NGX_ERROR;
            }

            if (rc != NGX_OK) {
                return NGX_ERROR;
            }
        }

        if (t->upstream.len == 0) {
            ngx_http_infer_route_registry_error(err, m,
                                                "target #%uz: no "
                                                "\"upstream\"", i + 1);
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/*
 * A JSON string, copied into pool: NGX_DECLINED when v is not a string.
 */

static ngx_int_t
ngx_http_infer_route_file_string(json_t *v, ngx_pool_t *pool, ngx_str_t *s)
{
    if (!json_is_string(v)) {
        return NGX_DECLINED;
    }

    s->len = json_string_length(v);

    s->data = ngx_pnalloc(pool, s->len + 1);
    if (s->data == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(s->data, json_string_value(v), s->len + 1);

    return NGX_OK;
}


/*
 * A model name, alias or id, held to the rules infer_model holds them to.
 */

static ngx_int_t
ngx_http_infer_route_file_name(json_t *v, ngx_pool_t *pool, ngx_str_t *s)
{
    ngx_int_t  rc;

    rc = ngx_http_infer_route_file_string(v, pool, s);

    if (rc != NGX_OK) {
        return rc;
    }

    return (ngx_http_infer_route_registry_name_ok(s) == NGX_OK)
           ? NGX_OK : NGX_DECLINED;
}
