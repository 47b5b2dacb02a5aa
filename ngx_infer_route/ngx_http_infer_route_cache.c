/*
 * Copyright (C) ngx_infer authors
 *
 * What nginx's own cache (proxy_cache, with POST) lacks to cache model
 * answers: a key made of the request's body in a canonical form (member
 * order and whitespace do not matter), the model served and a scope (by
 * default the client's credentials), and whether the request is
 * deterministic enough to be answered from a cache at all.
 *
 *   $infer_cache_key       64 hex digits, SHA-256 of scope, pool, model
 *                          served and canonical body; empty: none
 *   $infer_cacheable       1 or 0
 *   $infer_cache_bypass    for proxy_cache_bypass: 1 when not cacheable,
 *                          or the client asked for no-cache or no-store
 *   $infer_cache_no_store  for proxy_no_cache: 1 when not cacheable, or
 *                          the client asked for no-store
 *
 * Cacheable: a routed POST whose body is a JSON object that does not ask
 * for a stream, is deterministic (an embeddings request, "temperature"
 * 0, or an integer "seed"), and has none of the top-level members the
 * location lists in infer_cache_uncacheable.  The body is parsed once
 * per request, when one of the variables is first asked for, by
 * jansson, and its tree hashed in a canonical form (see
 * ngx_http_infer_route_cache_value()).
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <jansson.h>
#include <openssl/evp.h>
#include <openssl/sha.h>

#include "ngx_http_infer.h"
#include "ngx_http_infer_route.h"


#define NGX_HTTP_INFER_CACHE_VERSION  "ngx_infer cache 2\n"


typedef enum {
    ngx_http_infer_cache_var_key = 0,
    ngx_http_infer_cache_var_cacheable,
    ngx_http_infer_cache_var_bypass,
    ngx_http_infer_cache_var_no_store
} ngx_http_infer_cache_var_e;


typedef struct {
    const char                   *name;
    json_t                       *value;
} ngx_http_infer_cache_member_t;


static ngx_int_t ngx_http_infer_route_cache_compute(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx);
static ngx_uint_t ngx_http_infer_route_cache_deterministic(
    ngx_http_request_t *r, json_t *root);
static ngx_int_t ngx_http_infer_route_cache_scope(ngx_http_request_t *r,
    ngx_http_infer_route_loc_conf_t *rlcf, ngx_str_t *scope);
static void ngx_http_infer_route_cache_part(EVP_MD_CTX *md, ngx_str_t *s);
static ngx_int_t ngx_http_infer_route_cache_value(EVP_MD_CTX *md,
    json_t *v, ngx_pool_t *pool);
static int ngx_http_infer_route_cache_cmp(const void *one, const void *two);
static ngx_uint_t ngx_http_infer_route_cache_control(ngx_http_request_t *r,
    ngx_uint_t *no_store);


ngx_int_t
ngx_http_infer_route_cache_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_uint_t                   cacheable, no_store, no_cache;
    ngx_http_infer_route_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r->main, ngx_http_infer_route_module);

    cacheable = 0;

    if (ctx && ctx->status == NGX_OK) {
        if (!ctx->cache_done) {
            if (ngx_http_infer_route_cache_compute(r->main, ctx) != NGX_OK) {
                return NGX_ERROR;
            }

            ctx->cache_done = 1;
        }

        cacheable = ctx->cacheable;
    }

    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;

    switch (data) {

    case ngx_http_infer_cache_var_key:
        if (ctx == NULL || ctx->status != NGX_OK || ctx->cache_key == NULL) {
            v->len = 0;
            v->data = (u_char *) "";
            return NGX_OK;
        }

        v->len = 2 * SHA256_DIGEST_LENGTH;
        v->data = ctx->cache_key;
        return NGX_OK;

    case ngx_http_infer_cache_var_cacheable:
        break;

    default: /* bypass, no_store */
        no_store = 0;
        no_cache = ngx_http_infer_route_cache_control(r->main, &no_store);

        if (data == ngx_http_infer_cache_var_bypass) {
            cacheable = cacheable && !no_cache;

        } else {
            cacheable = cacheable && !no_store;
        }

        cacheable = !cacheable;
        break;
    }

    v->len = 1;
    v->data = (u_char *) (cacheable ? "1" : "0");

    return NGX_OK;
}


/* the key, and whether the request may be answered from the cache */

static ngx_int_t
ngx_http_infer_route_cache_compute(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx)
{
    u_char                           *p, digest[EVP_MAX_MD_SIZE];
    size_t                            i;
    json_t                           *root;
    ngx_int_t                         rc;
    ngx_str_t                         body, scope, s;
    ngx_uint_t                        n, cacheable;
    EVP_MD_CTX                       *md;
    unsigned int                      dlen;
    json_error_t                      jerr;
    ngx_http_variable_value_t        *vv;
    ngx_http_infer_route_loc_conf_t  *rlcf;
    ngx_http_infer_route_main_conf_t *rmcf;

    static u_char  hex[] = "0123456789abcdef";

    ctx->cacheable = 0;

    if (r->method != NGX_HTTP_POST || ctx->body == NULL) {
        return NGX_OK;
    }

    if (ngx_http_infer_route_body_bytes(r, &body, 1) != NGX_OK) {
        return NGX_ERROR;
    }

    if (body.len == 0) {
        return NGX_OK;
    }

    /*
     * jansson's tree: strings decoded (escapes do not matter), numbers
     * as integers or reals (1 and 1.0 differ), a duplicate member
     * refused; malloc()ed, freed on every path below
     */

    root = json_loadb((char *) body.data, body.len,
                      JSON_REJECT_DUPLICATES, &jerr);

    if (root == NULL) {
        ngx_log_debug1(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                       "infer route: no cache key: %s", jerr.text);
        return NGX_OK;
    }

    if (!json_is_object(root)) {
        json_decref(root);
        return NGX_OK;
    }

    rlcf = ngx_http_get_module_loc_conf(r, ngx_http_infer_route_module);
    rmcf = ngx_http_get_module_main_conf(r, ngx_http_infer_route_module);

    cacheable = ngx_http_infer_route_cache_deterministic(r, root);

    if (cacheable && rlcf->cache_uncacheable) {
        for (n = 0; n < rlcf->cache_uncacheable->nelts; n++) {
            s = ((ngx_str_t *) rlcf->cache_uncacheable->elts)[n];

            if (json_object_get(root, (char *) s.data)) {
                cacheable = 0;
                break;
            }
        }
    }

    if (ngx_http_infer_route_cache_scope(r, rlcf, &scope) != NGX_OK) {
        json_decref(root);
        return NGX_ERROR;
    }

    md = EVP_MD_CTX_new();
    if (md == NULL || EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1) {
        EVP_MD_CTX_free(md);
        json_decref(root);
        return NGX_ERROR;
    }

    /* each part with its length first: no two keys run together alike */

    EVP_DigestUpdate(md, NGX_HTTP_INFER_CACHE_VERSION,
                     sizeof(NGX_HTTP_INFER_CACHE_VERSION) - 1);
    ngx_http_infer_route_cache_part(md, &scope);

    for (n = 0; n < 2; n++) {
        vv = ngx_http_get_indexed_variable(r, n ? rmcf->target_index
                                                : rmcf->upstream_index);
        if (vv && !vv->not_found) {
            s.data = vv->data;
            s.len = vv->len;

        } else {
            ngx_str_null(&s);
        }

        ngx_http_infer_route_cache_part(md, &s);
    }

    rc = ngx_http_infer_route_cache_value(md, root, r->pool);

    if (rc == NGX_DECLINED) {
        EVP_MD_CTX_free(md);
        json_decref(root);
        return NGX_OK;
    }

    if (rc != NGX_OK || EVP_DigestFinal_ex(md, digest, &dlen) != 1) {
        EVP_MD_CTX_free(md);
        json_decref(root);
        return NGX_ERROR;
    }

    EVP_MD_CTX_free(md);
    json_decref(root);

    p = ngx_pnalloc(r->pool, 2 * SHA256_DIGEST_LENGTH);
    if (p == NULL) {
        return NGX_ERROR;
    }

    for (i = 0; i < SHA256_DIGEST_LENGTH; i++) {
        p[2 * i] = hex[digest[i] >> 4];
        p[2 * i + 1] = hex[digest[i] & 0xf];
    }

    ctx->cache_key = p;
    ctx->cacheable = cacheable;

    return NGX_OK;
}


/*
 * Deterministic: not a stream, and an embeddings request (the last part
 * of the path), "temperature" 0, or an integer "seed".
 */

static ngx_uint_t
ngx_http_infer_route_cache_deterministic(ngx_http_request_t *r,
    json_t *root)
{
    json_t  *v;

    v = json_object_get(root, "stream");

    if (v && json_is_true(v)) {
        return 0;
    }

    if (r->uri.len >= sizeof("/embeddings") - 1
        && ngx_strncmp(r->uri.data + r->uri.len - sizeof("/embeddings") + 1,
                       "/embeddings", sizeof("/embeddings") - 1) == 0)
    {
        return 1;
    }

    v = json_object_get(root, "temperature");

    if (v && json_is_number(v) && json_number_value(v) == 0.0) {
        return 1;
    }

    v = json_object_get(root, "seed");

    return v && json_is_integer(v);
}


/*
 * The scope: infer_cache_scope's value, else the client's credentials
 * (Authorization and x-api-key), so that by default no two keys share an
 * answer.
 */

static ngx_int_t
ngx_http_infer_route_cache_scope(ngx_http_request_t *r,
    ngx_http_infer_route_loc_conf_t *rlcf, ngx_str_t *scope)
{
    u_char           *p;
    ngx_uint_t        i;
    ngx_str_t         key;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    if (rlcf->cache_scope) {
        return ngx_http_complex_value(r, rlcf->cache_scope, scope);
    }

    ngx_str_null(&key);

    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */ ; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].key.len == sizeof("x-api-key") - 1
            && ngx_strncasecmp(h[i].key.data, (u_char *) "x-api-key",
                               sizeof("x-api-key") - 1) == 0)
        {
            key = h[i].value;
            break;
        }
    }

    h = r->headers_in.authorization;

    scope->len = (h ? h->value.len : 0) + 1 + key.len;
    scope->data = ngx_pnalloc(r->pool, scope->len);
    if (scope->data == NULL) {
        return NGX_ERROR;
    }

    p = scope->data;

    if (h) {
        p = ngx_cpymem(p, h->value.data, h->value.len);
    }

    *p++ = '\n';
    ngx_memcpy(p, key.data, key.len);

    return NGX_OK;
}


static void
ngx_http_infer_route_cache_part(EVP_MD_CTX *md, ngx_str_t *s)
{
    u_char  len[NGX_SIZE_T_LEN + 1], *p;

    p = ngx_sprintf(len, "%uz:", s->len);

    EVP_DigestUpdate(md, len, p - len);
    EVP_DigestUpdate(md, s->data, s->len);
}


/*
 * The canonical form, into the digest: "n", "t", "f"; an integer "i" and
 * its digits, a real "r" and %.17g, each with ";"; a string "s", its
 * length, ":" and its bytes (escapes decoded); an array "[" its elements
 * "]"; an object "{" its members sorted by name (each a string, then its
 * value) "}".  Depth is bounded: the body was scanned first, at most 64
 * levels deep.
 */

static ngx_int_t
ngx_http_infer_route_cache_value(EVP_MD_CTX *md, json_t *v, ngx_pool_t *pool)
{
    u_char                         buf[NGX_INT64_LEN + 32], *p;
    void                          *it;
    size_t                         i, n;
    ngx_int_t                      rc;
    ngx_str_t                      s;
    ngx_http_infer_cache_member_t *m;

    switch (json_typeof(v)) {

    case JSON_OBJECT:
        n = json_object_size(v);

        m = ngx_palloc(pool,
                       (n ? n : 1) * sizeof(ngx_http_infer_cache_member_t));
        if (m == NULL) {
            return NGX_ERROR;
        }

        i = 0;

        for (it = json_object_iter(v);
             it && i < n;
             it = json_object_iter_next(v, it))
        {
            m[i].name = json_object_iter_key(it);
            m[i].value = json_object_iter_value(it);

#if (JANSSON_VERSION_HEX >= 0x020e00)
            /* a name with a NUL in it: not one canonical form */
            if (json_object_iter_key_len(it) != ngx_strlen(m[i].name)) {
                ngx_pfree(pool, m);
                return NGX_DECLINED;
            }
#endif

            i++;
        }

        n = i;

        ngx_qsort(m, n, sizeof(ngx_http_infer_cache_member_t),
                  ngx_http_infer_route_cache_cmp);

        EVP_DigestUpdate(md, "{", 1);

        for (i = 0; i < n; i++) {
            s.data = (u_char *) m[i].name;
            s.len = ngx_strlen(m[i].name);

            EVP_DigestUpdate(md, "s", 1);
            ngx_http_infer_route_cache_part(md, &s);

            rc = ngx_http_infer_route_cache_value(md, m[i].value, pool);

            if (rc != NGX_OK) {
                return rc;
            }
        }

        ngx_pfree(pool, m);
        EVP_DigestUpdate(md, "}", 1);
        return NGX_OK;

    case JSON_ARRAY:
        EVP_DigestUpdate(md, "[", 1);

        n = json_array_size(v);

        for (i = 0; i < n; i++) {
            rc = ngx_http_infer_route_cache_value(md, json_array_get(v, i),
                                                  pool);
            if (rc != NGX_OK) {
                return rc;
            }
        }

        EVP_DigestUpdate(md, "]", 1);
        return NGX_OK;

    case JSON_STRING:
        s.data = (u_char *) json_string_value(v);
        s.len = json_string_length(v);

        EVP_DigestUpdate(md, "s", 1);
        ngx_http_infer_route_cache_part(md, &s);
        return NGX_OK;

    case JSON_INTEGER:
        p = ngx_sprintf(buf, "i%L;", (int64_t) json_integer_value(v));
        break;

    case JSON_REAL:
        n = snprintf((char *) buf, sizeof(buf), "r%.17g;",
                     json_real_value(v));
        p = buf + ngx_min(n, sizeof(buf) - 1);
        break;

    case JSON_TRUE:
        p = ngx_cpymem(buf, "t", 1);
        break;

    case JSON_FALSE:
        p = ngx_cpymem(buf, "f", 1);
        break;

    default: /* JSON_NULL */
        p = ngx_cpymem(buf, "n", 1);
        break;
    }

    EVP_DigestUpdate(md, buf, p - buf);

    return NGX_OK;
}


/* member names, bytewise (none has a NUL in it) */

static int
ngx_http_infer_route_cache_cmp(const void *one, const void *two)
{
    const ngx_http_infer_cache_member_t  *a = one, *b = two;

    return ngx_strcmp(a->name, b->name);
}


/*
 * The client's Cache-Control: "no-cache" (or Pragma: no-cache) asks for
 * an answer not taken from a cache, "no-store" for one not kept either.
 */

static ngx_uint_t
ngx_http_infer_route_cache_control(ngx_http_request_t *r,
    ngx_uint_t *no_store)
{
    u_char           *p, *last;
    ngx_uint_t        i, no_cache;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    no_cache = 0;
    *no_store = 0;

    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */ ; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if ((h[i].key.len != sizeof("Cache-Control") - 1
             || ngx_strncasecmp(h[i].key.data, (u_char *) "Cache-Control",
                                sizeof("Cache-Control") - 1) != 0)
            && (h[i].key.len != sizeof("Pragma") - 1
                || ngx_strncasecmp(h[i].key.data, (u_char *) "Pragma",
                                   sizeof("Pragma") - 1) != 0))
        {
            continue;
        }

        p = h[i].value.data;
        last = p + h[i].value.len;

        if (ngx_strlcasestrn(p, last, (u_char *) "no-cache",
                             sizeof("no-cache") - 2))
        {
            no_cache = 1;
        }

        if (ngx_strlcasestrn(p, last, (u_char *) "no-store",
                             sizeof("no-store") - 2))
        {
            no_cache = 1;
            *no_store = 1;
        }
    }

    return no_cache;
}


char *
ngx_http_infer_route_cache_uncacheable(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_infer_route_loc_conf_t  *rlcf = conf;

    u_char      *p;
    ngx_str_t   *value, *s;
    ngx_uint_t   i;

    if (rlcf->cache_uncacheable != NGX_CONF_UNSET_PTR) {
        return "is duplicate";
    }

    value = cf->args->elts;

    rlcf->cache_uncacheable = ngx_array_create(cf->pool, cf->args->nelts - 1,
                                               sizeof(ngx_str_t));
    if (rlcf->cache_uncacheable == NULL) {
        return NGX_CONF_ERROR;
    }

    for (i = 1; i < cf->args->nelts; i++) {
        if (value[i].len == 0
            || ngx_strlchr(value[i].data, value[i].data + value[i].len, '\0'))
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid member name \"%V\"", &value[i]);
            return NGX_CONF_ERROR;
        }

        s = ngx_array_push(rlcf->cache_uncacheable);
        if (s == NULL) {
            return NGX_CONF_ERROR;
        }

        /* NUL-terminated, for json_object_get() */

        p = ngx_pnalloc(cf->pool, value[i].len + 1);
        if (p == NULL) {
            return NGX_CONF_ERROR;
        }

        ngx_memcpy(p, value[i].data, value[i].len);
        p[value[i].len] = '\0';

        s->data = p;
        s->len = value[i].len;
    }

    return NGX_CONF_OK;
}
