/*
 * Copyright (C) ngx_infer authors
 *
 * What every ngx_infer module shares.  Everything here is static inline:
 * nginx loads modules RTLD_GLOBAL, so a function defined in a .c file
 * linked into two modules would silently bind to the first copy loaded.
 */


#ifndef _NGX_HTTP_INFER_H_INCLUDED_
#define _NGX_HTTP_INFER_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>


/*
 * The log for what configuration makes to live as long as its cycle (a
 * pool, a key set): the cycle's own.  While a reload parses, cf->log and
 * cf->cycle->log are still the old cycle's, whose memory goes while the
 * new cycle lives on; the new cycle takes new_log once it is configured.
 * At run time, ngx_cycle->log.
 */
#define ngx_http_infer_conf_log(cf)  (&(cf)->cycle->new_log)


/*
 * State a module shows on the metrics module's page (the balancer's
 * pools, ejections): the module puts an ngx_http_infer_export_t first in
 * its main conf, and the metrics module, when both are loaded, finds it
 * by the module's name (ngx_http_infer_export_find()).  size() bounds
 * what write() writes; write() starts each family with meta(), the
 * page's "# HELP" and "# TYPE" lines for the page's format (om: the
 * OpenMetrics one, whose counters are typed without "_total").
 */

#define NGX_HTTP_INFER_EXPORT_COUNTER  0
#define NGX_HTTP_INFER_EXPORT_GAUGE    1

typedef u_char *(*ngx_http_infer_export_meta_pt)(u_char *p, ngx_str_t *name,
    ngx_uint_t type, ngx_str_t *help, ngx_uint_t om);

typedef struct {
    size_t                    (*size)(void *conf);
    u_char                   *(*write)(void *conf, u_char *p,
                                   ngx_http_infer_export_meta_pt meta,
                                   ngx_uint_t om);
} ngx_http_infer_export_t;


static ngx_inline ngx_http_infer_export_t *
ngx_http_infer_export_find(ngx_http_request_t *r, const char *name)
{
    ngx_uint_t     i;
    ngx_module_t  *m;

    for (i = 0; ngx_cycle->modules[i]; i++) {
        m = ngx_cycle->modules[i];

        if (m->type == NGX_HTTP_MODULE && ngx_strcmp(m->name, name) == 0) {
            return r->main_conf[m->ctx_index];
        }
    }

    return NULL;
}


/*
 * A shared zone's init for one zeroed struct of size bytes that lives on
 * across reloads (counters): shm_zone->data points to it.
 */

static ngx_inline ngx_int_t
ngx_http_infer_shm_struct(ngx_shm_zone_t *shm_zone, void *data, size_t size)
{
    ngx_slab_pool_t  *shpool;

    if (data) {
        shm_zone->data = data;
        return NGX_OK;
    }

    shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (!shm_zone->shm.exists) {
        shpool->data = ngx_slab_calloc(shpool, size);
        if (shpool->data == NULL) {
            return NGX_ERROR;
        }
    }

    shm_zone->data = shpool->data;

    return NGX_OK;
}


/*
 * The message of a 500 gateway_misconfigured (type server_error): a value
 * the configuration gives a location (an Ingress annotation's, say) that
 * the module cannot use.  Every module's answer says the same.
 */
#define NGX_HTTP_INFER_MISCONFIGURED_MSG                                      \
    "The gateway's configuration for this path is invalid; its operators "   \
    "have been told."


/*
 * Sends b, a whole JSON answer in memory, with status.  Returns what the
 * output filter returns, for ngx_http_finalize_request().
 */

static ngx_inline ngx_int_t
ngx_http_infer_send_json(ngx_http_request_t *r, ngx_uint_t status,
    ngx_buf_t *b)
{
    ngx_int_t     rc;
    ngx_chain_t   out;

    static u_char  ct[] = "application/json";

    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    r->headers_out.status = status;
    r->headers_out.content_type.len = sizeof(ct) - 1;
    r->headers_out.content_type.data = ct;
    r->headers_out.content_type_len = sizeof(ct) - 1;
    r->headers_out.content_length_n = b->last - b->pos;

    ngx_http_clear_accept_ranges(r);
    ngx_http_clear_last_modified(r);
    ngx_http_clear_etag(r);

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}


/* whether the bytes from p on start a UTF-8 character, and its length */

static ngx_inline size_t
ngx_http_infer_utf8_char(u_char *p, u_char *last)
{
    u_char    *q;
    uint32_t   c;

    if (*p < 0x80) {
        return 1;
    }

    q = p;
    c = ngx_utf8_decode(&q, last - p);

    if (c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff)) {
        return 0;
    }

    return q - p;
}


/*
 * s with every byte that starts no UTF-8 character as U+FFFD, in pool;
 * s itself when it is UTF-8 all through.
 */

static ngx_inline ngx_int_t
ngx_http_infer_utf8_fix(ngx_pool_t *pool, ngx_str_t *s, ngx_str_t *out)
{
    u_char  *p, *q, *last;
    size_t   n, bad;

    last = s->data + s->len;
    bad = 0;

    for (p = s->data; p < last; p += n ? n : 1) {
        n = ngx_http_infer_utf8_char(p, last);
        bad += (n == 0);
    }

    if (bad == 0) {
        *out = *s;
        return NGX_OK;
    }

    q = ngx_pnalloc(pool, s->len + 2 * bad);
    if (q == NULL) {
        return NGX_ERROR;
    }

    /* out may be s */
    p = s->data;
    out->data = q;

    for ( /* void */ ; p < last; p += n ? n : 1) {
        n = ngx_http_infer_utf8_char(p, last);

        if (n) {
            q = ngx_cpymem(q, p, n);

        } else {
            *q++ = 0xef;
            *q++ = 0xbf;
            *q++ = 0xbd;
        }
    }

    out->len = q - out->data;

    return NGX_OK;
}


/*
 * The request's id, as OpenAI's x-request-id: the client's X-Request-Id
 * when it is 1 to 128 bytes of A-Z a-z 0-9 and "._:+/=@-" (an SDK's or
 * another proxy's id, kept so that one id follows the request), else
 * nginx's $request_id, 32 hex digits.  $request_id is the same all
 * through a request only when it is indexed: every module that answers
 * with an id asks for its index at configuration
 * (ngx_http_infer_request_id_init()).
 */

#define NGX_HTTP_INFER_REQUEST_ID_MAX  128


static ngx_inline ngx_uint_t
ngx_http_infer_request_id_valid(ngx_str_t *id)
{
    u_char  *p, *last;

    if (id->len == 0 || id->len > NGX_HTTP_INFER_REQUEST_ID_MAX) {
        return 0;
    }

    for (p = id->data, last = p + id->len; p < last; p++) {
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z')
              || (*p >= '0' && *p <= '9')
              || ngx_strlchr((u_char *) "._:+/=@-",
                             (u_char *) "._:+/=@-" + sizeof("._:+/=@-") - 1,
                             *p)))
        {
            return 0;
        }
    }

    return 1;
}


/* the first header of that name in a list of headers, case aside */

static ngx_inline ngx_table_elt_t *
ngx_http_infer_header_find(ngx_list_t *headers, u_char *name, size_t len)
{
    ngx_uint_t        i;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    part = &headers->part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                return NULL;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].hash && h[i].key.len == len
            && ngx_strncasecmp(h[i].key.data, name, len) == 0)
        {
            return &h[i];
        }
    }
}


static ngx_inline void
ngx_http_infer_request_id(ngx_http_request_t *r, ngx_str_t *id)
{
    ngx_str_t                   name;
    ngx_table_elt_t            *h;
    ngx_http_variable_value_t  *vv;

    h = ngx_http_infer_header_find(&r->main->headers_in.headers,
                                   (u_char *) "X-Request-Id",
                                   sizeof("X-Request-Id") - 1);

    if (h && ngx_http_infer_request_id_valid(&h->value)) {
        *id = h->value;
        return;
    }

    ngx_str_set(&name, "request_id");

    vv = ngx_http_get_variable(r->main, &name,
                               ngx_hash_key(name.data, name.len));

    if (vv == NULL || vv->not_found) {
        ngx_str_null(id);
        return;
    }

    id->data = vv->data;
    id->len = vv->len;
}


static ngx_inline ngx_int_t
ngx_http_infer_request_id_init(ngx_conf_t *cf)
{
    ngx_str_t  name;

    ngx_str_set(&name, "request_id");

    return (ngx_http_get_variable_index(cf, &name) == NGX_ERROR)
           ? NGX_ERROR : NGX_OK;
}


/*
 * An error in the OpenAI envelope, so that the official SDKs raise the
 * matching exception, with the request's id:
 *
 *   {"error": {"message": "...", "type": "...", "param": null,
 *              "code": "...", "request_id": "..."}}
 *
 * type and code are literals of ours; message may carry client input
 * (a model name) and is JSON-escaped; the id is of safe bytes only.
 */

static ngx_inline ngx_buf_t *
ngx_http_infer_error_buf(ngx_http_request_t *r, const char *type,
    const char *code, ngx_str_t *text)
{
    u_char     *p;
    size_t      len, tlen, clen;
    uintptr_t   esc;
    ngx_str_t   valid, id, *message;
    ngx_buf_t  *b;

    /* a model name the client sent may be no UTF-8: the JSON must be */

    if (ngx_http_infer_utf8_fix(r->pool, text, &valid) != NGX_OK) {
        return NULL;
    }

    ngx_http_infer_request_id(r, &id);

    message = &valid;

    tlen = ngx_strlen(type);
    clen = ngx_strlen(code);
    esc = ngx_escape_json(NULL, message->data, message->len);

    len = sizeof("{\"error\": {\"message\": \"") - 1
          + message->len + esc
          + sizeof("\", \"type\": \"") - 1 + tlen
          + sizeof("\", \"param\": null, \"code\": \"") - 1 + clen
          + sizeof("\", \"request_id\": \"") - 1 + id.len
          + sizeof("\"}}\n") - 1;

    b = ngx_create_temp_buf(r->pool, len);
    if (b == NULL) {
        return NULL;
    }

    p = ngx_cpymem(b->last, "{\"error\": {\"message\": \"",
                   sizeof("{\"error\": {\"message\": \"") - 1);
    p = (u_char *) ngx_escape_json(p, message->data, message->len);
    p = ngx_cpymem(p, "\", \"type\": \"", sizeof("\", \"type\": \"") - 1);
    p = ngx_cpymem(p, type, tlen);
    p = ngx_cpymem(p, "\", \"param\": null, \"code\": \"",
                   sizeof("\", \"param\": null, \"code\": \"") - 1);
    p = ngx_cpymem(p, code, clen);
    p = ngx_cpymem(p, "\", \"request_id\": \"",
                   sizeof("\", \"request_id\": \"") - 1);
    p = ngx_cpymem(p, id.data, id.len);
    b->last = ngx_cpymem(p, "\"}}\n", sizeof("\"}}\n") - 1);

    return b;
}


/*
 * A header added to the response, its value still to be set.  Since
 * nginx 1.23.0 headers of one name are linked through h->next, which
 * nginx follows for the headers it knows (Cache-Control, Link,
 * WWW-Authenticate, ...): the new one starts a chain of its own, as
 * nginx's modules do (the list's memory is not zeroed).
 */

static ngx_inline ngx_table_elt_t *
ngx_http_infer_header_add(ngx_http_request_t *r, u_char *key, size_t len)
{
    ngx_table_elt_t  *h;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NULL;
    }

    h->hash = 1;
    h->key.len = len;
    h->key.data = key;
    h->lowcase_key = NULL;
#if (nginx_version >= 1023000)
    h->next = NULL;
#endif

    return h;
}


/* a Retry-After header of sec seconds, for a 429 or a 503 */

static ngx_inline ngx_int_t
ngx_http_infer_retry_after(ngx_http_request_t *r, time_t sec)
{
    ngx_table_elt_t  *h;

    h = ngx_http_infer_header_add(r, (u_char *) "Retry-After",
                                  sizeof("Retry-After") - 1);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->value.data = ngx_pnalloc(r->pool, NGX_TIME_T_LEN);
    if (h->value.data == NULL) {
        return NGX_ERROR;
    }

    h->value.len = ngx_sprintf(h->value.data, "%T", sec) - h->value.data;

    return NGX_OK;
}


/*
 * The time of a "name=time" parameter, skip bytes into value (the name
 * and "="): in milliseconds, or in seconds for ngx_http_infer_param_sec();
 * (ngx_msec_t) NGX_ERROR if it is no time.
 */

static ngx_inline ngx_msec_t
ngx_http_infer_param_time(ngx_str_t *value, size_t skip, ngx_uint_t is_sec)
{
    ngx_str_t  s;

    s.data = value->data + skip;
    s.len = value->len - skip;

    return ngx_parse_time(&s, is_sec);
}


#define ngx_http_infer_param_msec(value, skip)                               \
    ngx_http_infer_param_time(value, skip, 0)
#define ngx_http_infer_param_sec(value, skip)                                \
    ngx_http_infer_param_time(value, skip, 1)


/*
 * Sends an error in the OpenAI envelope.  Returns what the output filter
 * returns, for ngx_http_finalize_request().
 */

static ngx_inline ngx_int_t
ngx_http_infer_send_error(ngx_http_request_t *r, ngx_uint_t status,
    const char *type, const char *code, ngx_str_t *message)
{
    ngx_buf_t  *b;

    if (ngx_http_discard_request_body(r) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    b = ngx_http_infer_error_buf(r, type, code, message);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return ngx_http_infer_send_json(r, status, b);
}


/*
 * Registers a module's variables, from a table ended by
 * ngx_http_null_variable; for the preconfiguration.
 */

static ngx_inline ngx_int_t
ngx_http_infer_add_variables(ngx_conf_t *cf, ngx_http_variable_t *vars)
{
    ngx_http_variable_t  *var, *v;

    for (v = vars; v->name.len; v++) {
        var = ngx_http_add_variable(cf, &v->name, v->flags);
        if (var == NULL) {
            return NGX_ERROR;
        }

        var->get_handler = v->get_handler;
        var->data = v->data;
    }

    return NGX_OK;
}


/*
 * Whether another module registered the variable name: at configuration
 * time only (postconfiguration and merge), while nginx still keeps the
 * names.  A module uses another's variables only when it is loaded, so
 * that "nginx -t" never fails with "unknown variable" for a module that
 * is not.
 */

static ngx_inline ngx_uint_t
ngx_http_infer_variable_exists(ngx_conf_t *cf, ngx_str_t *name)
{
    ngx_uint_t                  i;
    ngx_hash_key_t             *key;
    ngx_http_core_main_conf_t  *cmcf;

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    if (cmcf->variables_keys == NULL) {
        return 0;
    }

    key = cmcf->variables_keys->keys.elts;

    for (i = 0; i < cmcf->variables_keys->keys.nelts; i++) {
        if (key[i].key.len == name->len
            && ngx_strncmp(key[i].key.data, name->data, name->len) == 0)
        {
            return 1;
        }
    }

    return 0;
}


/*
 * Another module's variable, for reading it per request: its index, or
 * NGX_DECLINED when no loaded module registered the name (see above), so
 * that a module not loaded is a variable never read, not "unknown
 * variable" from "nginx -t".
 */

static ngx_inline ngx_int_t
ngx_http_infer_variable_index(ngx_conf_t *cf, ngx_str_t *name)
{
    if (!ngx_http_infer_variable_exists(cf, name)) {
        return NGX_DECLINED;
    }

    return ngx_http_get_variable_index(cf, name);
}


/*
 * Its value now (evaluated again if it is not cacheable); NULL when the
 * module is not loaded or the value is not found.
 */

static ngx_inline ngx_http_variable_value_t *
ngx_http_infer_variable(ngx_http_request_t *r, ngx_int_t index)
{
    ngx_http_variable_value_t  *vv;

    if (index < 0) {
        return NULL;
    }

    vv = ngx_http_get_flushed_variable(r, (ngx_uint_t) index);

    if (vv == NULL || vv->not_found) {
        return NULL;
    }

    return vv;
}


/* its value as a whole number, or NGX_ERROR: none, or no number */

static ngx_inline ngx_int_t
ngx_http_infer_variable_number(ngx_http_request_t *r, ngx_int_t index)
{
    ngx_http_variable_value_t  *vv;

    vv = ngx_http_infer_variable(r, index);

    if (vv == NULL || vv->len == 0) {
        return NGX_ERROR;
    }

    return ngx_atoi(vv->data, vv->len);
}


/*
 * A request's module context that an internal redirect does not lose.
 * The redirect clears r->ctx, so the context is also the data of a pool
 * cleanup with the module's own handler (which may free what the context
 * holds, or do nothing), and is found there again.
 */

static ngx_inline void *
ngx_http_infer_ctx_create(ngx_http_request_t *r, ngx_module_t *module,
    size_t size, ngx_pool_cleanup_pt handler)
{
    void                *ctx;
    ngx_pool_cleanup_t  *cln;

    ctx = ngx_pcalloc(r->pool, size);
    if (ctx == NULL) {
        return NULL;
    }

    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        return NULL;
    }

    cln->handler = handler;
    cln->data = ctx;

    r->ctx[module->ctx_index] = ctx;

    return ctx;
}


/* the context after a redirect cleared r->ctx, or NULL */

static ngx_inline void *
ngx_http_infer_ctx_find(ngx_http_request_t *r, ngx_pool_cleanup_pt handler)
{
    ngx_pool_cleanup_t  *cln;

    if (!r->internal) {
        return NULL;
    }

    for (cln = r->pool->cleanup; cln; cln = cln->next) {
        if (cln->handler == handler) {
            return cln->data;
        }
    }

    return NULL;
}


/* the context, set in r->ctx again when a redirect had cleared it */

static ngx_inline void *
ngx_http_infer_ctx_get(ngx_http_request_t *r, ngx_module_t *module,
    ngx_pool_cleanup_pt handler)
{
    void  *ctx;

    ctx = r->ctx[module->ctx_index];

    if (ctx == NULL) {
        ctx = ngx_http_infer_ctx_find(r, handler);
        r->ctx[module->ctx_index] = ctx;
    }

    return ctx;
}


/*
 * Whether a value holds a control character: one that would split a
 * header (proxy_set_header $infer_tenant) or forge an error log line.
 */

static ngx_inline ngx_uint_t
ngx_http_infer_has_control(u_char *p, size_t len)
{
    /* no p + len: an unset value has p NULL, and NULL + 0 is undefined */

    for ( /* void */ ; len; p++, len--) {
        if (*p < 0x20 || *p == 0x7f) {
            return 1;
        }
    }

    return 0;
}


/*
 * src with each control character written \xHH, as nginx writes them in
 * its access log, for a value that goes into a header or the error log;
 * src itself when it holds none.  NGX_ERROR when out of memory.
 */

static ngx_inline ngx_int_t
ngx_http_infer_escape_control(ngx_pool_t *pool, ngx_str_t *src,
    ngx_str_t *dst)
{
    u_char  *p, *q, *last;
    size_t   n;

    static u_char  hex[] = "0123456789ABCDEF";

    last = src->data + src->len;
    n = 0;

    for (p = src->data; p < last; p++) {
        n += (*p < 0x20 || *p == 0x7f);
    }

    if (n == 0) {
        *dst = *src;
        return NGX_OK;
    }

    q = ngx_pnalloc(pool, src->len + 3 * n);
    if (q == NULL) {
        return NGX_ERROR;
    }

    /* dst may be src */
    p = src->data;
    dst->data = q;

    for ( /* void */ ; p < last; p++) {
        if (*p < 0x20 || *p == 0x7f) {
            *q++ = '\\';
            *q++ = 'x';
            *q++ = hex[*p >> 4];
            *q++ = hex[*p & 0xf];

        } else {
            *q++ = *p;
        }
    }

    dst->len = q - dst->data;

    return NGX_OK;
}


/*
 * Whether name matches pattern, where "*" stands for any run of bytes
 * (and nothing else is special): "llama-*", "*-instruct", "*".
 */

static ngx_inline ngx_uint_t
ngx_http_infer_pattern_match(u_char *pat, size_t plen, u_char *name,
    size_t nlen)
{
    size_t  p, n, star, mark;

    p = 0;
    n = 0;
    star = (size_t) -1;
    mark = 0;

    while (n < nlen) {

        if (p < plen && pat[p] == '*') {
            star = p++;
            mark = n;

        } else if (p < plen && pat[p] == name[n]) {
            p++;
            n++;

        } else if (star != (size_t) -1) {
            /* let the last star take one byte more */
            p = star + 1;
            n = ++mark;

        } else {
            return 0;
        }
    }

    while (p < plen && pat[p] == '*') {
        p++;
    }

    return p == plen;
}


/*
 * Whether one of the patterns in list, separated by spaces or commas,
 * matches name.
 */

static ngx_inline ngx_uint_t
ngx_http_infer_list_match(ngx_str_t *list, u_char *name, size_t nlen)
{
    u_char  *p, *last, *start;

    p = list->data;
    last = list->data + list->len;

    for ( ;; ) {

        while (p < last && (*p == ' ' || *p == ',')) {
            p++;
        }

        if (p == last) {
            return 0;
        }

        start = p;

        while (p < last && *p != ' ' && *p != ',') {
            p++;
        }

        if (ngx_http_infer_pattern_match(start, p - start, name, nlen)) {
            return 1;
        }
    }
}


#endif /* _NGX_HTTP_INFER_H_INCLUDED_ */
