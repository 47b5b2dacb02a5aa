
/*
 * Copyright (C) ngx_infer authors
 *
 * The usage filters: token usage read from a proxied answer as it
 * passes, JSON or SSE, and the usage chunk a client did not ask for (the
 * gateway injected include_usage) taken out of the stream.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_infer.h"
#include "ngx_http_infer_route.h"


static ngx_int_t ngx_http_infer_route_header_filter(ngx_http_request_t *r);
static ngx_int_t ngx_http_infer_route_body_filter(ngx_http_request_t *r,
    ngx_chain_t *in);
static ngx_int_t ngx_http_infer_route_strip(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx, ngx_chain_t *in);
static ngx_chain_t *ngx_http_infer_route_strip_out(ngx_http_request_t *r,
    u_char *p, size_t len);


static ngx_http_output_header_filter_pt  ngx_http_next_header_filter;
static ngx_http_output_body_filter_pt    ngx_http_next_body_filter;


void
ngx_http_infer_route_filter_init(ngx_conf_t *cf)
{
    ngx_http_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_http_infer_route_header_filter;

    ngx_http_next_body_filter = ngx_http_top_body_filter;
    ngx_http_top_body_filter = ngx_http_infer_route_body_filter;
}


/*
 * Token usage is read from the backend's answer as it passes: a JSON
 * answer or an SSE stream, by its content type.  Buffers are fed to the
 * parser and passed on at once, never held.
 */

static ngx_int_t
ngx_http_infer_route_header_filter(ngx_http_request_t *r)
{
    ngx_str_t                   *type;
    ngx_uint_t                   mode;
    ngx_http_infer_route_ctx_t  *ctx;

    if (r != r->main || r->upstream == NULL || r->header_only
        || r->headers_out.status < NGX_HTTP_OK
        || r->headers_out.status >= NGX_HTTP_SPECIAL_RESPONSE)
    {
        return ngx_http_next_header_filter(r);
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_infer_route_module);

    if (ctx == NULL || ctx->status != NGX_OK) {
        return ngx_http_next_header_filter(r);
    }

    type = &r->headers_out.content_type;

    if (type->len >= sizeof("text/event-stream") - 1
        && ngx_strncasecmp(type->data, (u_char *) "text/event-stream",
                           sizeof("text/event-stream") - 1) == 0)
    {
        mode = NGX_HTTP_INFER_USAGE_SSE;

    } else if (ngx_strlcasestrn(type->data, type->data + type->len,
                                (u_char *) "json", sizeof("json") - 2)
               != NULL)
    {
        mode = NGX_HTTP_INFER_USAGE_JSON;

    } else {
        return ngx_http_next_header_filter(r);
    }

    /* ~200 bytes for a JSON answer: the 8 KB line buffer is SSE's only */
    ctx->usage = ngx_palloc(r->pool, NGX_HTTP_INFER_USAGE_SIZE(mode));
    if (ctx->usage == NULL) {
        return NGX_ERROR;
    }

    /* usage the client did not ask for is removed from its stream */
    ngx_http_infer_usage_init(ctx->usage, mode,
                              ctx->inject && mode == NGX_HTTP_INFER_USAGE_SSE);

    if (ctx->usage->strip) {
        ngx_http_clear_content_length(r);
    }

    return ngx_http_next_header_filter(r);
}


static ngx_int_t
ngx_http_infer_route_body_filter(ngx_http_request_t *r, ngx_chain_t *in)
{
    ngx_buf_t                   *b;
    ngx_time_t                  *tp;
    ngx_chain_t                 *cl;
    ngx_http_infer_route_ctx_t  *ctx;

    if (r != r->main || in == NULL) {
        return ngx_http_next_body_filter(r, in);
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_infer_route_module);

    if (ctx == NULL || ctx->usage == NULL) {
        return ngx_http_next_body_filter(r, in);
    }

    if (ctx->usage->strip) {
        return ngx_http_infer_route_strip(r, ctx, in);
    }

    for (cl = in; cl; cl = cl->next) {
        b = cl->buf;

        if (ctx->ttft < 0 && ngx_buf_size(b) > 0) {
            tp = ngx_timeofday();
            ctx->ttft = (ngx_msec_int_t) ((tp->sec - r->start_sec) * 1000
                                          + (tp->msec - r->start_msec));
            if (ctx->ttft < 0) {
                ctx->ttft = 0;
            }
        }

        if (ngx_buf_in_memory(b)) {
            if (b->last > b->pos
                && ngx_http_infer_usage_feed(ctx->usage, b->pos,
                                             b->last - b->pos)
                   != NGX_OK)
            {
                ctx->usage_partial = 1;
            }

        } else if (ngx_buf_size(b) > 0) {
            /* an answer buffered to a proxy temp file is not read back */
            ctx->usage_partial = 1;
        }

        if (b->last_buf) {
            ngx_http_infer_usage_finish(ctx->usage);
        }
    }

    return ngx_http_next_body_filter(r, in);
}


/*
 * Removing the usage chunk: the stream's bytes are copied aside as they
 * come and passed on as soon as the parser has seen their event whole,
 * less the usage-only event.  Only the current, unfinished event is ever
 * held back.
 */

static ngx_int_t
ngx_http_infer_route_strip(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx, ngx_chain_t *in)
{
    u_char                  *p;
    off_t                    upto, cut_start, cut_end;
    size_t                   size, need;
    ngx_buf_t               *b;
    ngx_uint_t               flush, last;
    ngx_time_t              *tp;
    ngx_chain_t             *cl, *out, **ll;
    ngx_http_infer_usage_t  *u;

    u = ctx->usage;
    flush = 0;
    last = 0;

    for (cl = in; cl; cl = cl->next) {
        b = cl->buf;

        flush |= b->flush;
        last |= b->last_buf;

        if (!ngx_buf_in_memory(b)) {
            if (ngx_buf_size(b) > 0) {
                /* a proxy temp file: too late to strip; should not be */
                ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                              "infer route: a stream buffered to a file "
                              "cannot have its usage chunk removed");
                return NGX_ERROR;
            }

            continue;
        }

        size = b->last - b->pos;

        if (size) {
            if (ctx->ttft < 0) {
                tp = ngx_timeofday();
                ctx->ttft = (ngx_msec_int_t)
                                ((tp->sec - r->start_sec) * 1000
                                 + (tp->msec - r->start_msec));
            }

            need = ctx->held_len + size;

            if (need > ctx->held_size) {
                need = ngx_max(need, 2 * ctx->held_size);
                need = ngx_max(need, 4096);

                p = ngx_pnalloc(r->pool, need);
                if (p == NULL) {
                    return NGX_ERROR;
                }

                ngx_memcpy(p, ctx->held, ctx->held_len);
                ctx->held = p;
                ctx->held_size = need;
            }

            ngx_memcpy(ctx->held + ctx->held_len, b->pos, size);
            ctx->held_len += size;

            (void) ngx_http_infer_usage_feed(u, b->pos, size);

            b->pos = b->last;
        }

        if (b->last_buf) {
            ngx_http_infer_usage_finish(u);
        }
    }

    upto = last ? ctx->held_off + (off_t) ctx->held_len : u->event_start;

    cut_start = upto;
    cut_end = upto;

    if (u->usage_event_end > ctx->held_off && u->usage_event_end <= upto) {
        cut_start = ngx_max(u->usage_event_start, ctx->held_off);
        cut_end = u->usage_event_end;
    }

    out = NULL;
    ll = &out;

    /* what comes before the usage event, then what comes after it */

    if (cut_start > ctx->held_off) {
        *ll = ngx_http_infer_route_strip_out(r, ctx->held,
                                             cut_start - ctx->held_off);
        if (*ll == NULL) {
            return NGX_ERROR;
        }

        ll = &(*ll)->next;
    }

    if (upto > cut_end) {
        *ll = ngx_http_infer_route_strip_out(r,
                                             ctx->held + (cut_end
                                                          - ctx->held_off),
                                             upto - cut_end);
        if (*ll == NULL) {
            return NGX_ERROR;
        }

        ll = &(*ll)->next;
    }

    size = upto - ctx->held_off;
    ngx_memmove(ctx->held, ctx->held + size, ctx->held_len - size);
    ctx->held_len -= size;
    ctx->held_off = upto;

    if (last || (flush && out == NULL)) {
        *ll = ngx_http_infer_route_strip_out(r, NULL, 0);
        if (*ll == NULL) {
            return NGX_ERROR;
        }
    }

    if (out == NULL) {
        return NGX_OK;
    }

    for (cl = out; cl->next; cl = cl->next) { /* void */ }

    cl->buf->flush = flush;
    cl->buf->last_buf = last;
    cl->buf->last_in_chain = 1;

    return ngx_http_next_body_filter(r, out);
}


static ngx_chain_t *
ngx_http_infer_route_strip_out(ngx_http_request_t *r, u_char *p, size_t len)
{
    ngx_buf_t    *b;
    ngx_chain_t  *cl;

    cl = ngx_alloc_chain_link(r->pool);
    if (cl == NULL) {
        return NULL;
    }

    if (len) {
        b = ngx_create_temp_buf(r->pool, len);
        if (b == NULL) {
            return NULL;
        }

        b->last = ngx_cpymem(b->pos, p, len);

    } else {
        b = ngx_calloc_buf(r->pool);
        if (b == NULL) {
            return NULL;
        }
    }

    cl->buf = b;
    cl->next = NULL;

    return cl;
}
