
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


/*
 * The output buffers of a stream whose usage chunk is removed: as many
 * as nginx's own gzip_buffers default on x86-64, 4 x 8k.
 */
#define NGX_HTTP_INFER_ROUTE_STRIP_BUFS  4
#define NGX_HTTP_INFER_ROUTE_STRIP_SIZE  8192

/*
 * r->buffered while input waits for an output buffer.  The bit is the
 * image filter's, which never sees an event stream.
 */
#define NGX_HTTP_INFER_ROUTE_BUFFERED    0x08


static ngx_int_t ngx_http_infer_route_header_filter(ngx_http_request_t *r);
static ngx_int_t ngx_http_infer_route_body_filter(ngx_http_request_t *r,
    ngx_chain_t *in);
static ngx_int_t ngx_http_infer_route_strip(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx, ngx_chain_t *in);
static ngx_int_t ngx_http_infer_route_strip_run(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx);
static void ngx_http_infer_route_strip_event(ngx_http_request_t *r,
    ngx_http_infer_route_strip_t *st, ngx_http_infer_usage_t *u,
    ngx_uint_t events);
static ngx_int_t ngx_http_infer_route_strip_copy(ngx_http_request_t *r,
    ngx_http_infer_route_strip_t *st);
static ngx_int_t ngx_http_infer_route_strip_buf(ngx_http_request_t *r,
    ngx_http_infer_route_strip_t *st);
static ngx_int_t ngx_http_infer_route_strip_end(ngx_http_request_t *r,
    ngx_http_infer_route_strip_t *st);
static ngx_inline ngx_uint_t ngx_http_infer_route_strip_ending(
    ngx_http_request_t *r);
static void ngx_http_infer_route_ttft(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx);


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
    ngx_str_t                        *type;
    ngx_uint_t                        mode;
    ngx_http_infer_route_ctx_t       *ctx;
    ngx_http_infer_route_strip_t     *st;
    ngx_http_infer_route_loc_conf_t  *rlcf;

    if (r == r->main) {
        rlcf = ngx_http_get_module_loc_conf(r, ngx_http_infer_route_module);

        if (rlcf->trace && ngx_http_infer_route_trace_response(r) != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

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
        rlcf = ngx_http_get_module_loc_conf(r, ngx_http_infer_route_module);

        st = ngx_pcalloc(r->pool, sizeof(ngx_http_infer_route_strip_t));
        if (st == NULL) {
            return NGX_ERROR;
        }

        st->hold = ngx_pnalloc(r->pool, rlcf->event_buffer_size);
        if (st->hold == NULL) {
            return NGX_ERROR;
        }

        st->hold_size = rlcf->event_buffer_size;
        st->last_out = &st->out;
        ctx->strip = st;

        ngx_http_clear_content_length(r);
        ngx_http_clear_accept_ranges(r);
        ngx_http_weak_etag(r);
    }

    return ngx_http_next_header_filter(r);
}


static ngx_int_t
ngx_http_infer_route_body_filter(ngx_http_request_t *r, ngx_chain_t *in)
{
    ngx_buf_t                   *b;
    ngx_chain_t                 *cl;
    ngx_http_infer_route_ctx_t  *ctx;

    if (r != r->main) {
        return ngx_http_next_body_filter(r, in);
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_infer_route_module);

    if (ctx == NULL || ctx->usage == NULL) {
        return ngx_http_next_body_filter(r, in);
    }

    if (ctx->strip) {
        return ngx_http_infer_route_strip(r, ctx, in);
    }

    for (cl = in; cl; cl = cl->next) {
        b = cl->buf;

        if (ctx->ttft < 0 && ngx_buf_size(b) > 0) {
            ngx_http_infer_route_ttft(r, ctx);
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
 * Removing the usage chunk, and the "usage": null of the other chunks:
 * the parser is fed one event at a time; the bytes of the event not yet
 * complete are copied into the hold buffer, and passed on once it is
 * complete, less what the backend sent only because it was asked for
 * usage.  An event that does not fit the hold is passed on unchanged as
 * it comes.  Output goes through a few buffers reused once sent, as the
 * gzip filter does: when all of them are in flight the input is kept
 * (unread, so the upstream's buffers stay busy) until they are free.
 */

static ngx_int_t
ngx_http_infer_route_strip(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx, ngx_chain_t *in)
{
    ngx_int_t                      rc;
    ngx_uint_t                     flush;
    ngx_chain_t                   *cl;
    ngx_http_infer_route_strip_t  *st;

    st = ctx->strip;

    if (st->done) {
        return ngx_http_next_body_filter(r, in);
    }

    if (in) {
        if (ngx_chain_add_copy(r->pool, &st->in, in) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    if (st->nomem) {

        /* all output buffers were in flight: send what can be sent */

        if (ngx_http_next_body_filter(r, NULL) == NGX_ERROR) {
            return NGX_ERROR;
        }

        cl = NULL;

        ngx_chain_update_chains(r->pool, &st->free, &st->busy, &cl,
                                (ngx_buf_tag_t) &ngx_http_infer_route_module);

        st->nomem = 0;
    }

    rc = NGX_OK;

    /* buffers in flight are pushed on by a call without data too */
    flush = (st->busy != NULL);

    for ( ;; ) {

        if (ngx_http_infer_route_strip_run(r, ctx) != NGX_OK) {
            return NGX_ERROR;
        }

        if (st->out == NULL && !flush) {
            break;
        }

        if (st->out && st->in == NULL && !st->send && !st->last
            && ngx_http_infer_route_strip_ending(r))
        {
            /*
             * The upstream has all of the answer and ends the request as
             * soon as this returns: the rest goes out with the end of
             * the stream, one write to the client instead of two.
             */
            r->buffered |= NGX_HTTP_INFER_ROUTE_BUFFERED;
            return st->busy ? NGX_AGAIN : NGX_OK;
        }

        rc = ngx_http_next_body_filter(r, st->out);

        ngx_chain_update_chains(r->pool, &st->free, &st->busy, &st->out,
                                (ngx_buf_tag_t) &ngx_http_infer_route_module);
        st->last_out = &st->out;
        flush = 0;

        if (rc == NGX_ERROR) {
            return NGX_ERROR;
        }

        if (!st->nomem || st->free == NULL) {
            break;
        }

        /* buffers came free: read on */

        st->nomem = 0;
    }

    if (st->in || st->send || st->nomem) {
        r->buffered |= NGX_HTTP_INFER_ROUTE_BUFFERED;

    } else {
        r->buffered &= ~NGX_HTTP_INFER_ROUTE_BUFFERED;
    }

    if (st->done) {
        return rc;
    }

    return st->busy ? NGX_AGAIN : rc;
}


/*
 * Reads input and fills output until the input is all read, or the
 * output buffers are all taken (st->nomem), or last_buf is passed on.
 */

static ngx_int_t
ngx_http_infer_route_strip_run(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx)
{
    size_t                         len, n;
    ngx_buf_t                     *b;
    ngx_uint_t                     events;
    ngx_chain_t                   *cl;
    ngx_http_infer_usage_t        *u;
    ngx_http_infer_route_strip_t  *st;

    st = ctx->strip;
    u = ctx->usage;

    for ( ;; ) {

        /* what was passed on goes out before anything more is read */

        if (st->send) {
            if (ngx_http_infer_route_strip_copy(r, st) != NGX_OK) {
                return NGX_ERROR;
            }

            if (st->send) {
                return NGX_OK;      /* nomem */
            }
        }

        if (st->last) {
            return ngx_http_infer_route_strip_end(r, st);
        }

        if (st->in == NULL) {

            /* what is complete goes out now: an event is news */

            if (st->buf && st->buf->last > st->buf->pos) {
                return ngx_http_infer_route_strip_buf(r, st);
            }

            return NGX_OK;
        }

        b = st->in->buf;

        if (!ngx_buf_in_memory(b) && ngx_buf_size(b) > 0) {
            /* a proxy temp file: too late to strip; should not be */
            ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                          "infer route: a stream buffered to a file "
                          "cannot have its usage chunk removed");
            return NGX_ERROR;
        }

        if (!ngx_buf_in_memory(b) || b->pos == b->last) {
            st->flush |= b->flush;

            if (b->last_buf) {
                events = u->events;
                ngx_http_infer_usage_finish(u);
                ngx_http_infer_route_strip_event(r, st, u, events);
                st->last = 1;
            }

            /* the link is ours (ngx_chain_add_copy): back to the pool */

            cl = st->in;
            st->in = cl->next;
            ngx_free_chain(r->pool, cl);
            continue;
        }

        if (ctx->ttft < 0) {
            ngx_http_infer_route_ttft(r, ctx);
        }

        /* one event at most, and never more than the hold has room for */

        len = b->last - b->pos;

        if (len > st->hold_size - st->hold_len) {
            len = st->hold_size - st->hold_len;
        }

        events = u->events;
        n = ngx_http_infer_usage_step(u, b->pos, len);

        ngx_memcpy(st->hold + st->hold_len, b->pos, n);
        st->hold_len += n;
        b->pos += n;

        ngx_http_infer_route_strip_event(r, st, u, events);
    }
}


/*
 * After a step of the parser: an event just completed is passed on, less
 * the usage chunk or its "usage": null; bytes outside any event are
 * passed on; an event that fills the hold is passed on as it is.
 */

static void
ngx_http_infer_route_strip_event(ngx_http_request_t *r,
    ngx_http_infer_route_strip_t *st, ngx_http_infer_usage_t *u,
    ngx_uint_t events)
{
    off_t   end;
    size_t  cut;

    end = st->hold_off + (off_t) st->hold_len;

    if (u->events != events) {

        if (!st->passing) {

            if (u->usage_event_end == end
                && u->usage_event_start >= st->hold_off)
            {
                /* the usage chunk the client did not ask for */
                st->hold_len = u->usage_event_start - st->hold_off;

            } else if (u->null_end > u->null_start
                       && u->null_start >= st->hold_off
                       && u->null_end <= end)
            {
                cut = u->null_end - u->null_start;

                ngx_memmove(st->hold + (u->null_start - st->hold_off),
                            st->hold + (u->null_end - st->hold_off),
                            end - u->null_end);
                st->hold_len -= cut;
            }
        }

        st->passing = 0;

    } else if (u->event_start != u->offset) {

        /* an event goes on */

        if (st->hold_len < st->hold_size && !st->passing) {
            return;
        }

        if (!st->passing) {
            ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                          "infer route: a stream event longer than "
                          "infer_stream_event_buffer_size (%uz) is passed "
                          "on as it is", st->hold_size);
            st->passing = 1;
        }
    }

    st->send = st->hold_len;
    st->sent = 0;
    st->hold_off = u->offset;
}


/* the hold's bytes to pass on, into the output buffers */

static ngx_int_t
ngx_http_infer_route_strip_copy(ngx_http_request_t *r,
    ngx_http_infer_route_strip_t *st)
{
    size_t        n;
    ngx_buf_t    *b;
    ngx_chain_t  *cl;

    while (st->sent < st->send) {

        if (st->buf == NULL) {

            if (st->free) {
                cl = st->free;
                st->buf = cl->buf;
                st->free = cl->next;
                ngx_free_chain(r->pool, cl);

            } else if (st->bufs < NGX_HTTP_INFER_ROUTE_STRIP_BUFS) {
                st->buf = ngx_create_temp_buf(r->pool,
                                              NGX_HTTP_INFER_ROUTE_STRIP_SIZE);
                if (st->buf == NULL) {
                    return NGX_ERROR;
                }

                st->buf->tag = (ngx_buf_tag_t) &ngx_http_infer_route_module;
                st->buf->recycled = 1;
                st->bufs++;

            } else {
                st->nomem = 1;
                return NGX_OK;
            }

            st->buf->flush = 0;
        }

        b = st->buf;

        n = ngx_min((size_t) (b->end - b->last), st->send - st->sent);

        b->last = ngx_cpymem(b->last, st->hold + st->sent, n);
        st->sent += n;

        if (b->last == b->end
            && ngx_http_infer_route_strip_buf(r, st) != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    st->send = 0;
    st->sent = 0;
    st->hold_len = 0;

    return NGX_OK;
}


/* the output buffer being filled joins the chain passed on */

static ngx_int_t
ngx_http_infer_route_strip_buf(ngx_http_request_t *r,
    ngx_http_infer_route_strip_t *st)
{
    ngx_chain_t  *cl;

    cl = ngx_alloc_chain_link(r->pool);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    st->buf->flush = st->flush;

    cl->buf = st->buf;
    cl->next = NULL;

    *st->last_out = cl;
    st->last_out = &cl->next;

    st->buf = NULL;

    return NGX_OK;
}


static ngx_int_t
ngx_http_infer_route_strip_end(ngx_http_request_t *r,
    ngx_http_infer_route_strip_t *st)
{
    ngx_buf_t    *b;
    ngx_chain_t  *cl;

    if (st->buf && st->buf->last > st->buf->pos) {
        b = st->buf;

        if (ngx_http_infer_route_strip_buf(r, st) != NGX_OK) {
            return NGX_ERROR;
        }

    } else {
        /* not tagged: not one of the output buffers to reuse */

        b = ngx_calloc_buf(r->pool);
        if (b == NULL) {
            return NGX_ERROR;
        }

        cl = ngx_alloc_chain_link(r->pool);
        if (cl == NULL) {
            return NGX_ERROR;
        }

        cl->buf = b;
        cl->next = NULL;

        *st->last_out = cl;
        st->last_out = &cl->next;
    }

    b->last_buf = 1;
    b->last_in_chain = 1;
    b->flush = 1;

    st->done = 1;

    return NGX_OK;
}


/*
 * Without proxy buffering, the upstream finalizes the request, and so
 * passes last_buf, right after the output call in which its length came
 * to 0, once its own buffers are consumed: the input is all read when
 * this is asked.  With buffering the event pipe ends the answer on its
 * own schedule: not known here.
 */

static ngx_inline ngx_uint_t
ngx_http_infer_route_strip_ending(ngx_http_request_t *r)
{
    ngx_http_upstream_t  *u;

    u = r->upstream;

    return (u != NULL && !u->buffering && u->length == 0);
}


static void
ngx_http_infer_route_ttft(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx)
{
    ngx_time_t  *tp;

    tp = ngx_timeofday();

    ctx->ttft = (ngx_msec_int_t) ((tp->sec - r->start_sec) * 1000
                                  + (tp->msec - r->start_msec));
    if (ctx->ttft < 0) {
        ctx->ttft = 0;
    }
}
