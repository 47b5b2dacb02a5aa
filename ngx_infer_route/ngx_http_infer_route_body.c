
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

        if (size == 0) {
            /* an empty buffer (a last_buf one, say) may have no memory */
            continue;
        }

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
 * The forwarded body names the model id the backend serves (the model for
 * an alias, a target's model=), and asks for usage when injection is on:
 * at most two edits, everything else kept byte for byte; proxy_pass sends
 * the new length.  Nothing is copied: the new body is a chain of buffers
 * that point into the body as it was read, in memory or in its temp file,
 * around small buffers with the edits.  nginx resends a body to the next
 * upstream with the file parts of its chain laid end to end from offset 0
 * (ngx_http_upstream_reinit()), so a chain that skips bytes of the file is
 * written, through a small buffer, into a temp file of its own.
 */

typedef struct {
    off_t        start;
    off_t        end;
    ngx_str_t    text;
} ngx_http_infer_route_edit_t;


#define NGX_HTTP_INFER_ROUTE_COPY_SIZE  65536


static ngx_int_t ngx_http_infer_route_body_piece(ngx_http_request_t *r,
    ngx_buf_t *src, off_t from, off_t to, ngx_chain_t ***ll);
static ngx_int_t ngx_http_infer_route_body_text(ngx_http_request_t *r,
    ngx_str_t *text, ngx_chain_t ***ll);
static ngx_int_t ngx_http_infer_route_body_file(ngx_http_request_t *r,
    ngx_chain_t **chain);
static ngx_int_t ngx_http_infer_route_body_write(ngx_temp_file_t *tf,
    ngx_chain_t *cl);


ngx_int_t
ngx_http_infer_route_rewrite_body(ngx_http_request_t *r,
    ngx_http_infer_route_ctx_t *ctx)
{
    u_char                       *p;
    off_t                         off, end, pos, to, len, file_pos;
    ngx_buf_t                    *b;
    ngx_uint_t                    i, n, gap;
    ngx_chain_t                  *cl, *out, **ll, *last;
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

        len = 2 + ctx->forward.len
              + ngx_escape_json(NULL, ctx->forward.data, ctx->forward.len);

        p = ngx_pnalloc(r->pool, len);
        if (p == NULL) {
            return NGX_ERROR;
        }

        edit[n].text.data = p;

        *p++ = '"';
        p = (u_char *) ngx_escape_json(p, ctx->forward.data,
                                       ctx->forward.len);
        *p++ = '"';

        edit[n].text.len = p - edit[n].text.data;
        n++;
    }

    if (ctx->inject) {

        if (body->include_usage_end) {
            /* "true", 1, null...: the value is replaced, not repeated */
            edit[n].start = body->include_usage_start;
            edit[n].end = body->include_usage_end;
            ngx_str_set(&edit[n].text, "true");

        } else if (body->stream_options_end == 0) {
            edit[n].start = body->object_end;
            edit[n].end = edit[n].start;
            ngx_str_set(&edit[n].text,
                        ", \"stream_options\": {\"include_usage\": true}");

        } else {
            edit[n].start = body->stream_options_start + 1;
            edit[n].end = edit[n].start;

            if (body->stream_options_empty) {
                ngx_str_set(&edit[n].text, "\"include_usage\": true");

            } else {
                ngx_str_set(&edit[n].text, "\"include_usage\": true, ");
            }
        }

        n++;
    }

    if (n == 0) {
        return NGX_OK;
    }

    if (n == 2 && edit[1].start < edit[0].start) {
        tmp = edit[0];
        edit[0] = edit[1];
        edit[1] = tmp;
    }

    if (ctx->bufs == NULL) {
        /* the body as the client sent it, kept for a fallback */
        ctx->bufs = r->request_body->bufs;
        ctx->length = 0;

        for (cl = ctx->bufs; cl; cl = cl->next) {
            ctx->length += ngx_buf_size(cl->buf);
        }
    }

    out = NULL;
    ll = &out;
    last = NULL;
    off = 0;
    pos = 0;
    i = 0;

    /* pos: the next byte of the body to pass on */

    for (cl = ctx->bufs; cl; cl = cl->next) {
        last = cl;
        end = off + ngx_buf_size(cl->buf);

        while (pos < end) {

            if (i < n && edit[i].start <= pos) {
                if (ngx_http_infer_route_body_text(r, &edit[i].text, &ll)
                    != NGX_OK)
                {
                    return NGX_ERROR;
                }

                pos = ngx_max(pos, edit[i].end);
                i++;
                continue;
            }

            to = (i < n && edit[i].start < end) ? edit[i].start : end;

            if (ngx_http_infer_route_body_piece(r, cl->buf, pos - off,
                                                to - off, &ll)
                != NGX_OK)
            {
                return NGX_ERROR;
            }

            pos = to;
        }

        off = end;
    }

    /* an insertion after the last byte (a body always ends with '}') */

    for ( /* void */ ; i < n; i++) {
        if (ngx_http_infer_route_body_text(r, &edit[i].text, &ll) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    if (out == NULL) {
        return NGX_ERROR;
    }

    /* the file's parts: laid end to end from 0, or written anew */

    gap = 0;
    file_pos = 0;
    len = 0;

    for (cl = out; cl; cl = cl->next) {
        b = cl->buf;

        if (b->in_file) {
            if (b->file_pos != file_pos) {
                gap = 1;
            }

            file_pos = b->file_last;
        }

        len += ngx_buf_size(b);
    }

    if (gap && ngx_http_infer_route_body_file(r, &out) != NGX_OK) {
        return NGX_ERROR;
    }

    for (cl = out; cl->next; cl = cl->next) { /* void */ }

    if (last) {
        cl->buf->last_buf = last->buf->last_buf;
        cl->buf->last_in_chain = last->buf->last_in_chain;
    }

    ctx->rewritten = 1;

    r->request_body->bufs = out;
    r->headers_in.content_length_n = len;

    ngx_log_debug3(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "infer route: body rewritten, %O -> %O bytes%s",
                   ctx->length, len, gap ? ", into a temp file" : "");

    return NGX_OK;
}


/* bytes from..to of a buffer of the body: where they are, not a copy */

static ngx_int_t
ngx_http_infer_route_body_piece(ngx_http_request_t *r, ngx_buf_t *src,
    off_t from, off_t to, ngx_chain_t ***ll)
{
    ngx_buf_t    *b;
    ngx_chain_t  *cl;

    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        return NGX_ERROR;
    }

    if (src->in_file) {
        b->in_file = 1;
        b->file = src->file;
        b->file_pos = src->file_pos + from;
        b->file_last = src->file_pos + to;

    } else {
        /* start as pos: a resend starts the buffer again from start */
        b->memory = 1;
        b->start = src->pos + from;
        b->pos = b->start;
        b->last = src->pos + to;
        b->end = b->last;
    }

    cl = ngx_alloc_chain_link(r->pool);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    cl->buf = b;
    cl->next = NULL;

    **ll = cl;
    *ll = &cl->next;

    return NGX_OK;
}


static ngx_int_t
ngx_http_infer_route_body_text(ngx_http_request_t *r, ngx_str_t *text,
    ngx_chain_t ***ll)
{
    ngx_buf_t    *b;
    ngx_chain_t  *cl;

    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        return NGX_ERROR;
    }

    b->memory = 1;
    b->start = text->data;
    b->pos = b->start;
    b->last = text->data + text->len;
    b->end = b->last;

    cl = ngx_alloc_chain_link(r->pool);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    cl->buf = b;
    cl->next = NULL;

    **ll = cl;
    *ll = &cl->next;

    return NGX_OK;
}


/*
 * The new body into a temp file of its own (client_body_temp_path),
 * through one buffer of NGX_HTTP_INFER_ROUTE_COPY_SIZE: as nginx writes a
 * body that spills, in the worker, and removed when the request is freed.
 */

static ngx_int_t
ngx_http_infer_route_body_file(ngx_http_request_t *r, ngx_chain_t **chain)
{
    off_t                      pos;
    size_t                     size;
    ssize_t                    n;
    ngx_buf_t                 *b, *copy;
    ngx_chain_t                one, *cl;
    ngx_temp_file_t           *tf;
    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);

    tf = ngx_pcalloc(r->pool, sizeof(ngx_temp_file_t));
    if (tf == NULL) {
        return NGX_ERROR;
    }

    tf->file.fd = NGX_INVALID_FILE;
    tf->file.log = r->connection->log;
    tf->path = clcf->client_body_temp_path;
    tf->pool = r->pool;
    tf->warn = "a rewritten request body is buffered to a temporary file";
    tf->log_level = r->request_body_file_log_level;
    tf->persistent = 0;         /* unlinked once open */
    tf->clean = 0;
    tf->access = 0;

    copy = ngx_create_temp_buf(r->pool, NGX_HTTP_INFER_ROUTE_COPY_SIZE);
    if (copy == NULL) {
        return NGX_ERROR;
    }

    one.buf = copy;
    one.next = NULL;

    for (cl = *chain; cl; cl = cl->next) {
        b = cl->buf;

        if (!b->in_file) {
            one.buf = b;

            if (ngx_http_infer_route_body_write(tf, &one) != NGX_OK) {
                return NGX_ERROR;
            }

            one.buf = copy;
            continue;
        }

        for (pos = b->file_pos; pos < b->file_last; pos += n) {
            size = (size_t) ngx_min(b->file_last - pos,
                                    NGX_HTTP_INFER_ROUTE_COPY_SIZE);

            n = ngx_read_file(b->file, copy->start, size, pos);

            if (n != (ssize_t) size) {
                ngx_log_error(NGX_LOG_ALERT, r->connection->log, 0,
                              "infer route: read %z of %uz bytes of the "
                              "body from \"%V\"", n, size, &b->file->name);
                return NGX_ERROR;
            }

            copy->pos = copy->start;
            copy->last = copy->start + size;

            if (ngx_http_infer_route_body_write(tf, &one) != NGX_OK) {
                return NGX_ERROR;
            }
        }
    }

    ngx_pfree(r->pool, copy->start);

    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        return NGX_ERROR;
    }

    b->in_file = 1;
    b->file = &tf->file;
    b->file_pos = 0;
    b->file_last = tf->offset;

    cl = ngx_alloc_chain_link(r->pool);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    cl->buf = b;
    cl->next = NULL;

    *chain = cl;

    return NGX_OK;
}


static ngx_int_t
ngx_http_infer_route_body_write(ngx_temp_file_t *tf, ngx_chain_t *cl)
{
    ssize_t  n;

    n = ngx_write_chain_to_temp_file(tf, cl);

    if (n == NGX_ERROR) {
        return NGX_ERROR;
    }

    tf->offset += n;

    return NGX_OK;
}
