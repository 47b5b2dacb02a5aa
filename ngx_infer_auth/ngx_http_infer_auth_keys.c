
/*
 * Copyright (C) ngx_infer authors
 *
 * Keys read from files: the API key file and the JWKS file, which every
 * worker follows without a reload, and the PEM or secret files of
 * infer_auth_jwt_key; and the lookup of an API key by its SHA-256.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <openssl/crypto.h>

#include "ngx_http_infer.h"
#include "ngx_http_infer_auth.h"


static ngx_int_t ngx_http_infer_auth_watch_load(
    ngx_http_infer_auth_watch_t *w, ngx_log_t *log, ngx_log_t *keep,
    u_char *err);
static ngx_int_t ngx_http_infer_auth_apikey_parse(json_t *obj, size_t n,
    ngx_pool_t *pool, ngx_http_infer_auth_apikey_t *k, u_char *err);
static ngx_int_t ngx_http_infer_auth_apikey_cmp(const void *one,
    const void *two);
static void ngx_http_infer_auth_data_free(ngx_http_infer_auth_watch_t *w,
    void *data);
static void ngx_http_infer_auth_conf_cleanup(void *data);
static void ngx_http_infer_auth_watch_cleanup(void *data);
static void ngx_http_infer_auth_watch_changed(ngx_http_infer_watch_t *watch,
    ngx_int_t rc, u_char *stat_err, ngx_log_t *log);


ngx_int_t
ngx_http_infer_auth_api_key(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx, ngx_http_infer_auth_loc_conf_t *lcf)
{
    u_char                          hash[SHA256_DIGEST_LENGTH];
    ngx_int_t                       lo, hi, mid, c;
    ngx_http_infer_auth_apikey_t   *k, *found;
    ngx_http_infer_auth_apikeys_t  *keys;

    keys = lcf->api_keys ? lcf->api_keys->data : NULL;

    if (keys == NULL) {
        return ngx_http_infer_auth_reject(r, ctx, lcf,
                   NGX_HTTP_INFER_AUTH_INVALID, "invalid_api_key",
                   "API keys are not accepted here.");
    }

    SHA256(ctx->credential.data, ctx->credential.len, hash);

    /*
     * The search compares hashes, not keys: its timing says nothing of a
     * key.  The final comparison is in constant time all the same.
     */

    k = keys->keys.elts;
    found = NULL;
    lo = 0;
    hi = (ngx_int_t) keys->keys.nelts - 1;

    while (lo <= hi) {
        mid = lo + (hi - lo) / 2;
        c = ngx_memcmp(hash, k[mid].hash, SHA256_DIGEST_LENGTH);

        if (c == 0) {
            found = &k[mid];
            break;
        }

        if (c < 0) {
            hi = mid - 1;

        } else {
            lo = mid + 1;
        }
    }

    if (found == NULL
        || CRYPTO_memcmp(hash, found->hash, SHA256_DIGEST_LENGTH) != 0)
    {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "infer auth: unknown API key (sha256 %*xs...)",
                      (size_t) 4, hash);

        return ngx_http_infer_auth_reject(r, ctx, lcf,
                   NGX_HTTP_INFER_AUTH_INVALID, "invalid_api_key",
                   "Incorrect API key provided.");
    }

    /* the file may be read again while the request lives: copies */

    if (ngx_http_infer_auth_copy(r->pool, &ctx->key_id, &found->id)
           != NGX_OK
        || ngx_http_infer_auth_copy(r->pool, &ctx->tenant, &found->tenant)
           != NGX_OK
        || ngx_http_infer_auth_copy(r->pool, &ctx->plan, &found->plan)
           != NGX_OK
        || ngx_http_infer_auth_copy(r->pool, &ctx->models, &found->models)
           != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->subject = ctx->key_id;

    if (found->disabled) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "infer auth: disabled API key \"%V\"", &ctx->key_id);

        return ngx_http_infer_auth_reject(r, ctx, lcf,
                   NGX_HTTP_INFER_AUTH_DISABLED, "invalid_api_key",
                   "This API key has been disabled.");
    }

    return NGX_OK;
}


/* a copy of src, or none (data NULL) when src is unset */

ngx_int_t
ngx_http_infer_auth_copy(ngx_pool_t *pool, ngx_str_t *dst, ngx_str_t *src)
{
    if (src->data == NULL) {
        ngx_str_null(dst);
        return NGX_OK;
    }

    dst->len = src->len;
    dst->data = ngx_pstrdup(pool, src);

    return dst->data ? NGX_OK : NGX_ERROR;
}


/*
 * Reads a watched file into a new key set or API key table; on success
 * the new one replaces the old, and otherwise the old stays.  What is
 * read logs to keep, which lives as long as it does; log is for now.
 */

static ngx_int_t
ngx_http_infer_auth_watch_load(ngx_http_infer_auth_watch_t *w,
    ngx_log_t *log, ngx_log_t *keep, u_char *err)
{
    u_char                        *buf;
    void                          *data;
    size_t                         len;
    ngx_http_infer_auth_keyset_t  *ks;

    buf = ngx_http_infer_file_read(&w->watch.file,
                                   NGX_HTTP_INFER_AUTH_FILE_MAX,
                                   &len, log, err,
                                   NGX_HTTP_INFER_AUTH_ERRSTR);
    if (buf == NULL) {
        return NGX_ERROR;
    }

    if (w->jwks) {
        ks = ngx_http_infer_auth_keyset_create(keep);

        if (ks && ngx_http_infer_auth_keyset_jwks(ks, buf, len, err)
                  != NGX_OK)
        {
            ngx_http_infer_auth_keyset_free(ks);
            ks = NULL;
        }

        if (ks && ks->skipped) {
            ngx_log_error(NGX_LOG_WARN, log, 0,
                          "infer_auth_jwks \"%V\": %ui keys skipped, the "
                          "first: %s", &w->watch.file.name, ks->skipped,
                          err);
        }

        data = ks;

    } else {
        data = ngx_http_infer_auth_apikeys_parse(buf, len, keep, err);
    }

    ngx_free(buf);

    if (data == NULL) {
        return NGX_ERROR;
    }

    ngx_http_infer_auth_data_free(w, w->data);
    w->data = data;

    if (w->jwks) {
        /* no token is trusted from the cache on a key set that went */
        ngx_http_infer_auth_key_epoch++;
    }

    return NGX_OK;
}


static void
ngx_http_infer_auth_data_free(ngx_http_infer_auth_watch_t *w, void *data)
{
    if (data == NULL) {
        return;
    }

    if (w->jwks) {
        ngx_http_infer_auth_keyset_free(data);

    } else {
        ngx_destroy_pool(((ngx_http_infer_auth_apikeys_t *) data)->pool);
    }
}


/*
 * Every worker follows the file; worker 0 speaks for them all in the error
 * log, so that one failure is one line.
 */

static void
ngx_http_infer_auth_watch_changed(ngx_http_infer_watch_t *watch,
    ngx_int_t rc, u_char *stat_err, ngx_log_t *log)
{
    ngx_http_infer_auth_watch_t *w = watch->data;

    u_char      err[NGX_HTTP_INFER_AUTH_ERRSTR];
    ngx_uint_t  level;

    if (rc == NGX_OK) {
        rc = ngx_http_infer_auth_watch_load(w, log, ngx_cycle->log, err);

        level = (ngx_worker == 0) ? NGX_LOG_NOTICE : NGX_LOG_DEBUG;

        if (rc == NGX_OK) {
            ngx_log_error(level, log, 0, "%s \"%V\": loaded",
                          w->jwks ? "infer_auth_jwks" : "infer_auth_api_keys",
                          &watch->file.name);
            return;
        }

    } else {
        ngx_cpystrn(err, stat_err, sizeof(err));
    }

    level = (ngx_worker == 0) ? NGX_LOG_ERR : NGX_LOG_DEBUG;

    ngx_log_error(level, log, 0, "%s \"%V\": %s, keeping the keys "
                  "loaded before",
                  w->jwks ? "infer_auth_jwks" : "infer_auth_api_keys",
                  &watch->file.name, err);
}


/*
 * {"keys": [{"id", "hash": "sha256:<hex>", "tenant", "plan", "models",
 * "disabled"}]}
 */

ngx_http_infer_auth_apikeys_t *
ngx_http_infer_auth_apikeys_parse(u_char *data, size_t len, ngx_log_t *log,
    u_char *err)
{
    size_t                          i;
    json_t                         *root, *list, *obj;
    ngx_pool_t                     *pool;
    ngx_uint_t                      n;
    json_error_t                    jerr;
    ngx_http_infer_auth_apikey_t   *k;
    ngx_http_infer_auth_apikeys_t  *keys;

    root = json_loadb((char *) data, len, JSON_REJECT_DUPLICATES, &jerr);

    if (root == NULL) {
        ngx_http_infer_auth_error(err, "invalid JSON at line %d, column %d: "
                                  "%s", jerr.line, jerr.column, jerr.text);
        return NULL;
    }

    list = json_object_get(root, "keys");

    if (!json_is_array(list)) {
        ngx_http_infer_auth_error(err, "no \"keys\" array");
        json_decref(root);
        return NULL;
    }

    pool = ngx_create_pool(NGX_DEFAULT_POOL_SIZE, log);
    if (pool == NULL) {
        json_decref(root);
        return NULL;
    }

    keys = ngx_pcalloc(pool, sizeof(ngx_http_infer_auth_apikeys_t));
    if (keys == NULL
        || ngx_array_init(&keys->keys, pool, json_array_size(list) + 1,
                          sizeof(ngx_http_infer_auth_apikey_t))
           != NGX_OK)
    {
        goto failed;
    }

    keys->pool = pool;

    json_array_foreach(list, i, obj) {
        k = ngx_array_push(&keys->keys);
        if (k == NULL) {
            goto failed;
        }

        if (ngx_http_infer_auth_apikey_parse(obj, i, pool, k, err) != NGX_OK)
        {
            goto failed;
        }
    }

    json_decref(root);
    root = NULL;

    ngx_sort(keys->keys.elts, keys->keys.nelts,
             sizeof(ngx_http_infer_auth_apikey_t),
             ngx_http_infer_auth_apikey_cmp);

    k = keys->keys.elts;

    for (n = 1; n < keys->keys.nelts; n++) {
        if (ngx_memcmp(k[n - 1].hash, k[n].hash, SHA256_DIGEST_LENGTH) == 0) {
            ngx_http_infer_auth_error(err, "keys \"%V\" and \"%V\" have the "
                                      "same hash", &k[n - 1].id, &k[n].id);
            goto failed;
        }
    }

    return keys;

failed:

    if (root) {
        json_decref(root);
    }

    ngx_destroy_pool(pool);

    return NULL;
}


static ngx_int_t
ngx_http_infer_auth_apikey_parse(json_t *obj, size_t n, ngx_pool_t *pool,
    ngx_http_infer_auth_apikey_t *k, u_char *err)
{
    u_char      *h;
    json_t      *v;
    ngx_int_t    hi, lo;
    ngx_uint_t   i;
    ngx_str_t    s;

    ngx_memzero(k, sizeof(ngx_http_infer_auth_apikey_t));

    if (!json_is_object(obj)) {
        ngx_http_infer_auth_error(err, "key %uz: not an object", n);
        return NGX_ERROR;
    }

    v = json_object_get(obj, "id");

    if (!json_is_string(v) || json_string_length(v) == 0) {
        ngx_http_infer_auth_error(err, "key %uz: no \"id\"", n);
        return NGX_ERROR;
    }

    s.data = (u_char *) json_string_value(v);
    s.len = json_string_length(v);

    /* id, tenant, plan and models go into headers and log lines */

    if (ngx_http_infer_has_control(s.data, s.len)) {
        ngx_http_infer_auth_error(err, "key %uz: \"id\" holds a control "
                                  "character", n);
        return NGX_ERROR;
    }

    k->id.data = ngx_pstrdup(pool, &s);
    k->id.len = s.len;

    v = json_object_get(obj, "tenant");

    if (!json_is_string(v) || json_string_length(v) == 0) {
        ngx_http_infer_auth_error(err, "key \"%V\": no \"tenant\"", &k->id);
        return NGX_ERROR;
    }

    s.data = (u_char *) json_string_value(v);
    s.len = json_string_length(v);

    k->tenant.data = ngx_pstrdup(pool, &s);
    k->tenant.len = s.len;

    v = json_object_get(obj, "hash");

    if (!json_is_string(v)
        || json_string_length(v) != sizeof("sha256:") - 1
                                    + 2 * SHA256_DIGEST_LENGTH
        || ngx_strncmp(json_string_value(v), "sha256:",
                       sizeof("sha256:") - 1) != 0)
    {
        ngx_http_infer_auth_error(err, "key \"%V\": \"hash\" must be "
                                  "\"sha256:\" and 64 hex digits", &k->id);
        return NGX_ERROR;
    }

    h = (u_char *) json_string_value(v) + sizeof("sha256:") - 1;

    for (i = 0; i < SHA256_DIGEST_LENGTH; i++) {
        hi = ngx_hextoi(&h[2 * i], 1);
        lo = ngx_hextoi(&h[2 * i + 1], 1);

        if (hi == NGX_ERROR || lo == NGX_ERROR) {
            ngx_http_infer_auth_error(err, "key \"%V\": \"hash\" must be "
                                      "\"sha256:\" and 64 hex digits",
                                      &k->id);
            return NGX_ERROR;
        }

        k->hash[i] = (u_char) (hi << 4 | lo);
    }

    v = json_object_get(obj, "plan");

    if (v && !json_is_null(v)) {
        if (!json_is_string(v)) {
            ngx_http_infer_auth_error(err, "key \"%V\": \"plan\" must be a "
                                      "string", &k->id);
            return NGX_ERROR;
        }

        s.data = (u_char *) json_string_value(v);
        s.len = json_string_length(v);

        k->plan.data = ngx_pstrdup(pool, &s);
        k->plan.len = s.len;
    }

    v = json_object_get(obj, "models");

    if (v && !json_is_null(v)
        && ngx_http_infer_auth_join(pool, v, &k->models) != NGX_OK)
    {
        ngx_http_infer_auth_error(err, "key \"%V\": \"models\" must be an "
                                  "array of strings", &k->id);
        return NGX_ERROR;
    }

    if (ngx_http_infer_has_control(k->tenant.data, k->tenant.len)
        || ngx_http_infer_has_control(k->plan.data, k->plan.len)
        || ngx_http_infer_has_control(k->models.data, k->models.len))
    {
        ngx_http_infer_auth_error(err, "key \"%V\": a control character in "
                                  "\"tenant\", \"plan\" or \"models\"",
                                  &k->id);
        return NGX_ERROR;
    }

    v = json_object_get(obj, "disabled");

    if (v && !json_is_boolean(v)) {
        ngx_http_infer_auth_error(err, "key \"%V\": \"disabled\" must be "
                                  "true or false", &k->id);
        return NGX_ERROR;
    }

    k->disabled = json_is_true(v);

    return NGX_OK;
}


/*
 * A list of models, a JSON array of strings or one string, as one string
 * of names separated by spaces: the form $infer_allowed_models shows and
 * infer_model_list reads.
 */

ngx_int_t
ngx_http_infer_auth_join(ngx_pool_t *pool, json_t *v, ngx_str_t *out)
{
    u_char  *p, *src, *last;
    size_t   i, len;
    json_t  *e;

    if (json_is_string(v)) {
        /* "a, b c": separators become one space each */
        src = (u_char *) json_string_value(v);
        last = src + json_string_length(v);

        out->data = ngx_pnalloc(pool, last - src + 1);
        if (out->data == NULL) {
            return NGX_ERROR;
        }

        p = out->data;

        while (src < last) {
            if (*src == ' ' || *src == ',') {
                if (p > out->data && p[-1] != ' ') {
                    *p++ = ' ';
                }

                src++;
                continue;
            }

            *p++ = *src++;
        }

        if (p > out->data && p[-1] == ' ') {
            p--;
        }

        out->len = p - out->data;

        return NGX_OK;
    }

    if (!json_is_array(v)) {
        return NGX_ERROR;
    }

    len = 0;

    json_array_foreach(v, i, e) {
        if (!json_is_string(e)) {
            return NGX_ERROR;
        }

        len += json_string_length(e) + 1;
    }

    out->data = ngx_pnalloc(pool, len + 1);
    if (out->data == NULL) {
        return NGX_ERROR;
    }

    p = out->data;

    json_array_foreach(v, i, e) {
        if (i) {
            *p++ = ' ';
        }

        p = ngx_cpymem(p, json_string_value(e), json_string_length(e));
    }

    out->len = p - out->data;

    return NGX_OK;
}


static ngx_int_t
ngx_http_infer_auth_apikey_cmp(const void *one, const void *two)
{
    const ngx_http_infer_auth_apikey_t  *a = one, *b = two;

    return ngx_memcmp(a->hash, b->hash, SHA256_DIGEST_LENGTH);
}


/*
 * infer_auth_jwt_key file [alg=] [kid=]: read now, so that "nginx -t"
 * names a wrong key.
 */

char *
ngx_http_infer_auth_jwt_key_conf(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_infer_auth_loc_conf_t *lcf = conf;

    u_char                  err[NGX_HTTP_INFER_AUTH_ERRSTR];
    u_char                 *buf;
    size_t                  len;
    ngx_str_t              *value, alg, kid;
    ngx_uint_t              i;
    ngx_pool_cleanup_t     *cln;
    ngx_http_infer_file_t   file;

    value = cf->args->elts;

    ngx_str_null(&alg);
    ngx_str_null(&kid);

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "alg=", 4) == 0) {
            alg.data = value[i].data + 4;
            alg.len = value[i].len - 4;
            continue;
        }

        if (ngx_strncmp(value[i].data, "kid=", 4) == 0) {
            kid.data = value[i].data + 4;
            kid.len = value[i].len - 4;
            continue;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid parameter \"%V\"", &value[i]);
        return NGX_CONF_ERROR;
    }

    if (lcf->keys == NULL) {
        lcf->keys = ngx_http_infer_auth_keyset_create(
                        ngx_http_infer_conf_log(cf));
        if (lcf->keys == NULL) {
            return NGX_CONF_ERROR;
        }

        cln = ngx_pool_cleanup_add(cf->pool, 0);
        if (cln == NULL) {
            ngx_http_infer_auth_keyset_free(lcf->keys);
            return NGX_CONF_ERROR;
        }

        cln->handler = ngx_http_infer_auth_conf_cleanup;
        cln->data = lcf->keys;
    }

    ngx_memzero(&file, sizeof(ngx_http_infer_file_t));
    file.name = value[1];

    if (ngx_conf_full_name(cf->cycle, &file.name, 1) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    buf = ngx_http_infer_file_read(&file, NGX_HTTP_INFER_AUTH_FILE_MAX, &len,
                                   cf->log, err, sizeof(err));
    if (buf == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "infer_auth_jwt_key \"%V\": %s", &value[1], err);
        return NGX_CONF_ERROR;
    }

    if (ngx_http_infer_auth_keyset_pem(lcf->keys, buf, len, &alg, &kid, err)
        != NGX_OK)
    {
        ngx_explicit_memzero(buf, len);
        ngx_free(buf);
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "infer_auth_jwt_key \"%V\": %s", &value[1], err);
        return NGX_CONF_ERROR;
    }

    ngx_explicit_memzero(buf, len);
    ngx_free(buf);

    return NGX_CONF_OK;
}


static void
ngx_http_infer_auth_conf_cleanup(void *data)
{
    ngx_http_infer_auth_keyset_free(data);
}


/* the free of a watched file's data when its cycle goes */

static void
ngx_http_infer_auth_watch_cleanup(void *data)
{
    ngx_http_infer_auth_watch_t *w = data;

    ngx_http_infer_auth_data_free(w, w->data);
    w->data = NULL;
}


/*
 * infer_auth_api_keys file [interval=] and infer_auth_jwks file
 * [interval=]: read now, so that "nginx -t" names a broken file.
 */

char *
ngx_http_infer_auth_file_conf(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    char  *p = conf;

    u_char                            err[NGX_HTTP_INFER_AUTH_ERRSTR];
    ngx_str_t                        *value;
    ngx_pool_cleanup_t               *cln;
    ngx_http_infer_auth_watch_t     **wp, *w;
    ngx_http_infer_auth_main_conf_t  *amcf;

    wp = (ngx_http_infer_auth_watch_t **) (p + cmd->offset);

    if (*wp != NGX_CONF_UNSET_PTR) {
        return "is duplicate";
    }

    value = cf->args->elts;

    w = ngx_pcalloc(cf->pool, sizeof(ngx_http_infer_auth_watch_t));
    if (w == NULL) {
        return NGX_CONF_ERROR;
    }

    w->watch.interval = NGX_HTTP_INFER_WATCH_INTERVAL;
    w->watch.changed = ngx_http_infer_auth_watch_changed;
    w->watch.data = w;

    if (cf->args->nelts == 3) {
        switch (ngx_http_infer_watch_interval(&w->watch, &value[2])) {

        case NGX_DECLINED:
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid parameter \"%V\"", &value[2]);
            return NGX_CONF_ERROR;

        case NGX_ERROR:
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid interval \"%V\"", &value[2]);
            return NGX_CONF_ERROR;
        }
    }

    w->watch.file.name = value[1];
    w->jwks = (cmd->offset
               == offsetof(ngx_http_infer_auth_loc_conf_t, jwks_file));

    if (ngx_conf_full_name(cf->cycle, &w->watch.file.name, 1) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    cln = ngx_pool_cleanup_add(cf->pool, 0);
    if (cln == NULL) {
        return NGX_CONF_ERROR;
    }

    cln->handler = ngx_http_infer_auth_watch_cleanup;
    cln->data = w;

    if (ngx_http_infer_auth_watch_load(w, cf->log,
                                       ngx_http_infer_conf_log(cf), err)
        != NGX_OK)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "%V \"%V\": %s",
                           &cmd->name, &value[1], err);
        return NGX_CONF_ERROR;
    }

    amcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_infer_auth_module);

    wp = ngx_array_push(&amcf->watches);
    if (wp == NULL) {
        return NGX_CONF_ERROR;
    }

    *wp = w;
    *(ngx_http_infer_auth_watch_t **) (p + cmd->offset) = w;

    return NGX_CONF_OK;
}
