
/*
 * Copyright (C) ngx_infer authors
 *
 * The request body as the route module reads and forwards it: as one run
 * of bytes for the scanner, and rewritten so that the backend receives
 * the model id it serves (and a request for usage, when the module asks
 * for it).
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_infer.h"
#include "ngx_http_infer_route.h"
#include "ngx_http_infer_route_json.h"


/*
 * A body in several buffers is copied into one to be scanned: here, a
 * buffer each worker keeps and grows, so that large bodies do not cost a
 * fresh allocation (an mmap, and its page faults) per request.
 */
static u_char  *ngx_http_infer_route_scratch;
static size_t   ngx_http_infer_route_scratch_size;


/*
 * The body as one run of bytes: the buffer itself when it is a single one
 * in memory, else a copy, reading nginx's own temp file for the part that
 * spilled there; in the worker's scratch buffer (valid until the next
 * request's scan) or in the request's pool.
 */

ngx_int_t
ngx_http_infer_route_body_bytes(ngx_http_request_t *r, ngx_str_t *body,
    ngx_uint_t scratch)
{
    u_char       *p;
    size_t        len, size;
    ssize_t       n;
    ngx_buf_t    *buf;
    ngx_chain_t  *cl;

    ngx_str_null(body);

    if (r->request_body == NULL || r->request_body->bufs == NULL) {
        return NGX_OK;
    }

    cl = r->request_body->bufs;

    if (cl->next == NULL && !cl->buf->in_file) {
        body->data = cl->buf->pos;
        body->len = cl->buf->last - cl->buf->pos;
        return NGX_OK;
    }

    len = 0;

    for ( /* void */ ; cl; cl = cl->next) {
        len += ngx_buf_size(cl->buf);
    }

    if (len == 0) {
        return NGX_OK;
    }

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "infer route: body of %uz bytes copied into one buffer%s",
                   len, r->request_body->temp_file ? " from a temp file" : "");

    if (!scratch) {
        p = ngx_pnalloc(r->pool, len);
        if (p == NULL) {
            return NGX_ERROR;
        }

    } else {
        if (len > ngx_http_infer_route_scratch_size) {
            size = ngx_max(ngx_align(len, 65536),
                           2 * ngx_http_infer_route_scratch_size);

            p = ngx_alloc(size, r->connection->log);
            if (p == NULL) {
                return NGX_ERROR;
            }

            if (ngx_http_infer_route_scratch) {
                ngx_free(ngx_http_infer_route_scratch);
            }

            ngx_http_infer_route_scratch = p;
            ngx_http_infer_route_scratch_size = size;
        }

        p = ngx_http_infer_route_scratch;
    }

    body->data = p;
    body->len = len;

    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        buf = cl->buf;
        size = ngx_buf_size(buf);

        if (!buf->in_file) {
            p = ngx_cpymem(p, buf->pos, size);
            continue;
        }

        n = ngx_read_file(buf->file, p, size, buf->file_pos);

        if (n != (ssize_t) size) {
            ngx_log_error(NGX_LOG_ALERT, r->connection->log, 0,
                          "infer route: read %z of %uz bytes of the body "
                          "from \"%V\"", n, size, &buf->file->name);
            return NGX_ERROR;
        }

        p += size;
    }

    return NGX_OK;
}


/*
 * KServe v2: /v2/models/{name}[/versions/{v}]/infer, and the model's other
 * endpoints under /v2/models/{name}/.
 */

/*
 * The forwarded body names the model id the backend serves (the model for
 * an alias, a target's model=), and asks for usage when injection is on:
 * at most two edits, everything else kept byte for byte; proxy_pass sends
 * the new length.
 */

typedef struct {
    size_t       start;
    size_t       end;
    ngx_str_t    text;
    ngx_uint_t   quote;         /* text is a JSON string to quote, escape */
} ngx_http_infer_route_edit_t;


ngx_int_t
ngx_http_infer_route_rewrite_body(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx)
{
    u_char                       *p, *q;
    size_t                        len, from;
    ngx_buf_t                    *b;
    ngx_uint_t                    i, n;
    ngx_chain_t                  *cl, *last;
    ngx_http_infer_route_body_t  *body;
    ngx_http_infer_route_edit_t   edit[2], tmp;

    body = ctx->body;
    n = 0;

    if (body->has_model && ctx->forward.len
        && (ctx->forward.len != ctx->model.len
            || ngx_strncmp(ctx->forward.data, ctx->model.data,
                           ctx->model.len) != 0))
    {
        edit[n].start = body->model_start;
        edit[n].end = body->model_end;
        edit[n].text = ctx->forward;
        edit[n].quote = 1;
        n++;
    }

    if (ctx->inject) {
        edit[n].quote = 0;

        if (body->stream_options_end == 0) {
            edit[n].start = body->object_end;
            ngx_str_set(&edit[n].text,
                        ", \"stream_options\": {\"include_usage\": true}");

        } else {
            edit[n].start = body->stream_options_start + 1;
            ngx_str_set(&edit[n].text, "\"include_usage\": true, ");
        }

        edit[n].end = edit[n].start;
        n++;
    }

    if (n == 0) {
        return NGX_OK;
    }

    /* the scan's copy is gone: the body as the client sent it, again */

    if (ctx->raw.data == NULL
        && ngx_http_infer_route_body_bytes(r, &ctx->raw, 0) != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (n == 2 && edit[1].start < edit[0].start) {
        tmp = edit[0];
        edit[0] = edit[1];
        edit[1] = tmp;
    }

    len = ctx->raw.len;

    for (i = 0; i < n; i++) {

        if (!edit[i].quote && body->stream_options_end
            && edit[i].start == body->stream_options_start + 1)
        {
            /* an empty stream_options object takes no comma */

            for (q = ctx->raw.data + edit[i].start;
                 q < ctx->raw.data + body->stream_options_end - 1;
                 q++)
            {
                if (*q != ' ' && *q != '\t' && *q != '\r' && *q != '\n') {
                    break;
                }
            }

            if (q == ctx->raw.data + body->stream_options_end - 1) {
                edit[i].text.len -= 2;
            }
        }

        len += edit[i].text.len - (edit[i].end - edit[i].start);

        if (edit[i].quote) {
            len += 2 + ngx_escape_json(NULL, edit[i].text.data,
                                       edit[i].text.len);
        }
    }

    b = ngx_create_temp_buf(r->pool, len);
    if (b == NULL) {
        return NGX_ERROR;
    }

    p = b->last;
    from = 0;

    for (i = 0; i < n; i++) {
        p = ngx_cpymem(p, ctx->raw.data + from, edit[i].start - from);

        if (edit[i].quote) {
            *p++ = '"';
            p = (u_char *) ngx_escape_json(p, edit[i].text.data,
                                           edit[i].text.len);
            *p++ = '"';

        } else {
            p = ngx_cpymem(p, edit[i].text.data, edit[i].text.len);
        }

        from = edit[i].end;
    }

    b->last = ngx_cpymem(p, ctx->raw.data + from, ctx->raw.len - from);

    for (last = r->request_body->bufs; last->next; last = last->next) {
        /* void */
    }

    b->last_buf = last->buf->last_buf;
    b->last_in_chain = last->buf->last_in_chain;

    cl = ngx_alloc_chain_link(r->pool);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    cl->buf = b;
    cl->next = NULL;

    ctx->bufs = r->request_body->bufs;
    ctx->rewritten = 1;

    r->request_body->bufs = cl;
    r->headers_in.content_length_n = b->last - b->pos;

    ngx_log_debug2(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "infer route: body rewritten, %uz -> %O bytes",
                   ctx->raw.len, r->headers_in.content_length_n);

    return NGX_OK;
}
