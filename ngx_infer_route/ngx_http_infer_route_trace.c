/*
 * Copyright (C) ngx_infer authors
 *
 * Request ids and W3C trace context (infer_trace).  The variables are
 * always there: $infer_request_id (the client's X-Request-Id when it is
 * a sane one, else $request_id), $infer_trace_id and $infer_parent_span_id
 * (from the client's traceparent when it is valid), $infer_span_id (the
 * gateway's own span, new per request), $infer_trace_flags and
 * $infer_traceparent (what the backend is sent).  Each is computed once
 * per request: nginx keeps an indexed variable's value for the request,
 * which is what makes a random id the same for every reader.
 *
 * With "infer_trace on", the request to the backend carries
 * X-Request-Id and traceparent (the client's trace, with the gateway's
 * span as parent; or a new trace when the client sent none or an invalid
 * one), and every answer of the location carries x-request-id, replacing
 * a backend's own.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <openssl/rand.h>

#include "ngx_http_infer.h"
#include "ngx_http_infer_route.h"


static ngx_int_t ngx_http_infer_route_trace_client(ngx_http_request_t *r,
    ngx_http_infer_route_traceparent_t *tp);
static ngx_int_t ngx_http_infer_route_trace_random(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, size_t bytes);
static uint64_t ngx_http_infer_route_trace_next(void);
static ngx_int_t ngx_http_infer_route_trace_set(ngx_http_request_t *r,
    u_char *name, size_t len, ngx_str_t *value);


ngx_int_t
ngx_http_infer_route_trace_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    u_char                             *p;
    ngx_str_t                           s;
    ngx_uint_t                          i;
    ngx_http_variable_value_t          *vv[3];
    ngx_http_infer_route_traceparent_t        tp;
    ngx_http_infer_route_main_conf_t   *rmcf;

    r = r->main;

    switch (data) {

    case ngx_http_infer_trace_var_request_id:
        ngx_http_infer_request_id(r, &s);

        v->data = s.data;
        v->len = s.len;
        break;

    case ngx_http_infer_trace_var_trace_id:
        if (ngx_http_infer_route_trace_client(r, &tp) == NGX_OK) {
            v->data = tp.trace_id;
            v->len = 32;
            break;
        }

        return ngx_http_infer_route_trace_random(r, v, 16);

    case ngx_http_infer_trace_var_span_id:
        return ngx_http_infer_route_trace_random(r, v, 8);

    case ngx_http_infer_trace_var_parent_span_id:
        if (ngx_http_infer_route_trace_client(r, &tp) != NGX_OK) {
            v->not_found = 1;
            return NGX_OK;
        }

        v->data = tp.parent_id;
        v->len = 16;
        break;

    case ngx_http_infer_trace_var_flags:

        /*
         * the client's sampling decision, its other bits dropped (version
         * 00 reserves them); a new trace is sampled
         */

        if (ngx_http_infer_route_trace_client(r, &tp) == NGX_OK
            && ngx_hextoi(tp.flags + 1, 1) % 2 == 0)
        {
            v->data = (u_char *) "00";

        } else {
            v->data = (u_char *) "01";
        }

        v->len = 2;
        break;

    default: /* ngx_http_infer_trace_var_traceparent */
        rmcf = ngx_http_get_module_main_conf(r, ngx_http_infer_route_module);

        for (i = 0; i < 3; i++) {
            vv[i] = ngx_http_get_indexed_variable(r, rmcf->trace_index[i]);

            if (vv[i] == NULL || vv[i]->not_found) {
                return NGX_ERROR;
            }
        }

        p = ngx_pnalloc(r->pool, NGX_HTTP_INFER_ROUTE_TRACEPARENT_LEN);
        if (p == NULL) {
            return NGX_ERROR;
        }

        v->data = p;
        v->len = ngx_snprintf(p, NGX_HTTP_INFER_ROUTE_TRACEPARENT_LEN,
                              "00-%v-%v-%v", vv[0], vv[1], vv[2])
                 - p;
        break;
    }

    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;

    return NGX_OK;
}


static ngx_int_t
ngx_http_infer_route_trace_client(ngx_http_request_t *r,
    ngx_http_infer_route_traceparent_t *tp)
{
    ngx_table_elt_t  *h;

    h = ngx_http_infer_header_find(&r->headers_in.headers,
                                   (u_char *) "traceparent",
                                   sizeof("traceparent") - 1);

    if (h == NULL) {
        return NGX_DECLINED;
    }

    return ngx_http_infer_route_traceparent_parse(h->value.data,
                                                  h->value.len, tp);
}


/*
 * bytes random bytes, in lowercase hex; never all zero.  Trace and span
 * ids need to be random, not secret (W3C Trace Context): they come from
 * xoshiro256** seeded from OpenSSL once per worker, not RAND_bytes() per
 * id, which costs a system call (getpid(), its fork check) and a lock,
 * about 2 us each on the benchmark's machine (bench/README.md).
 */

static ngx_int_t
ngx_http_infer_route_trace_random(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, size_t bytes)
{
    u_char    *p, raw[16];
    uint64_t   x;
    size_t     i;

    p = ngx_pnalloc(r->pool, 2 * bytes);
    if (p == NULL) {
        return NGX_ERROR;
    }

    for (i = 0; i < bytes; i += sizeof(uint64_t)) {
        x = ngx_http_infer_route_trace_next();
        ngx_memcpy(raw + i, &x, ngx_min(sizeof(uint64_t), bytes - i));
    }

    raw[bytes - 1] |= 1;

    v->data = p;
    v->len = ngx_hex_dump(p, raw, bytes) - p;
    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;

    return NGX_OK;
}


/* xoshiro256**, its state seeded in each process that draws from it */

static uint64_t
ngx_http_infer_route_trace_next(void)
{
    uint64_t    t, result;
    ngx_uint_t  i;

    static uint64_t   s[4];
    static ngx_pid_t  seeded;

#define ngx_infer_rotl(x, k)  (((x) << (k)) | ((x) >> (64 - (k))))

    if (seeded != ngx_pid) {
        if (RAND_bytes((u_char *) s, sizeof(s)) != 1
            || (s[0] | s[1] | s[2] | s[3]) == 0)
        {
            /* splitmix64 of what the process has */
            t = (uint64_t) ngx_random() << 32 ^ (uint64_t) ngx_pid
                ^ (uint64_t) ngx_time() << 20 ^ ngx_current_msec;

            for (i = 0; i < 4; i++) {
                t += 0x9e3779b97f4a7c15ULL;
                s[i] = t;
                s[i] = (s[i] ^ (s[i] >> 30)) * 0xbf58476d1ce4e5b9ULL;
                s[i] = (s[i] ^ (s[i] >> 27)) * 0x94d049bb133111ebULL;
                s[i] ^= s[i] >> 31;
            }
        }

        seeded = ngx_pid;
    }

    result = ngx_infer_rotl(s[1] * 5, 7) * 9;
    t = s[1] << 17;

    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = ngx_infer_rotl(s[3], 45);

#undef ngx_infer_rotl

    return result;
}


/*
 * infer_trace on: the request to the backend gets X-Request-Id (when the
 * client's is missing or not kept) and traceparent; tracestate passes as
 * the client sent it.  Run in PREACCESS, before the content handler
 * reads the headers; setting the same values again is harmless.
 */

ngx_int_t
ngx_http_infer_route_trace_request(ngx_http_request_t *r)
{
    ngx_str_t                          id;
    ngx_http_variable_value_t         *vv;
    ngx_http_infer_route_main_conf_t  *rmcf;

    rmcf = ngx_http_get_module_main_conf(r, ngx_http_infer_route_module);

    ngx_http_infer_request_id(r, &id);

    if (ngx_http_infer_route_trace_set(r, (u_char *) "X-Request-Id",
                                       sizeof("X-Request-Id") - 1, &id)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    /*
     * the client's parent span, read before its traceparent is replaced
     * (kept for the request, for the logs); then the one sent on
     */

    if (ngx_http_get_indexed_variable(r, rmcf->trace_index[3]) == NULL) {
        return NGX_ERROR;
    }

    vv = ngx_http_get_indexed_variable(r, rmcf->traceparent_index);
    if (vv == NULL || vv->not_found) {
        return NGX_ERROR;
    }

    id.data = vv->data;
    id.len = vv->len;

    return ngx_http_infer_route_trace_set(r, (u_char *) "traceparent",
                                          sizeof("traceparent") - 1, &id);
}


static ngx_int_t
ngx_http_infer_route_trace_set(ngx_http_request_t *r, u_char *name,
    size_t len, ngx_str_t *value)
{
    ngx_table_elt_t  *h;

    h = ngx_http_infer_header_find(&r->headers_in.headers, name, len);

    if (h == NULL) {
        h = ngx_list_push(&r->headers_in.headers);
        if (h == NULL) {
            return NGX_ERROR;
        }

        h->key.len = len;
        h->key.data = name;
        h->lowcase_key = ngx_pnalloc(r->pool, len);
        if (h->lowcase_key == NULL) {
            return NGX_ERROR;
        }

        /* the hash proxy_set_header's table is keyed by: one replaces it */

        h->hash = ngx_hash_strlow(h->lowcase_key, name, len);
#if (nginx_version >= 1023000)
        h->next = NULL;
#endif
    }

    h->value = *value;

    return NGX_OK;
}


/*
 * infer_trace on: x-request-id on every answer of the location, nginx's
 * own and the gateway's errors included; a backend's own id is replaced,
 * so that the client, the logs and the error envelopes show one id.
 */

ngx_int_t
ngx_http_infer_route_trace_response(ngx_http_request_t *r)
{
    ngx_str_t         id;
    ngx_table_elt_t  *h;

    for ( ;; ) {
        h = ngx_http_infer_header_find(&r->headers_out.headers,
                                       (u_char *) "X-Request-Id",
                                       sizeof("X-Request-Id") - 1);
        if (h == NULL) {
            break;
        }

        h->hash = 0;
    }

    ngx_http_infer_request_id(r, &id);

    if (id.len == 0) {
        return NGX_OK;
    }

    h = ngx_http_infer_header_add(r, (u_char *) "x-request-id",
                                  sizeof("x-request-id") - 1);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->value = id;

    return NGX_OK;
}
