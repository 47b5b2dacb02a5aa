
/*
 * Copyright (C) ngx_infer authors
 *
 * A refusal, and how the client sees it.  The ACCESS handler returns a
 * refusal as a status, so that "satisfy any" can still let an allow rule
 * pass the request; nginx then makes its own error page, and these
 * filters give that page the OpenAI envelope (and a model refusal the
 * status infer_auth_model_denied chose).  Only answers nginx made itself
 * for a refusal of ours are touched: never one from an upstream.  The
 * body filter also takes the answers of the JWKS subrequests.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_infer.h"
#include "ngx_http_infer_auth.h"


static ngx_int_t ngx_http_infer_auth_header_filter(ngx_http_request_t *r);
static ngx_int_t ngx_http_infer_auth_body_filter(ngx_http_request_t *r,
    ngx_chain_t *in);


static const char *ngx_http_infer_auth_type(ngx_http_infer_auth_ctx_t *ctx);

static ngx_http_output_header_filter_pt  ngx_http_next_header_filter;
static ngx_http_output_body_filter_pt    ngx_http_next_body_filter;


/* from the module's postconfiguration */

void
ngx_http_infer_auth_filter_init(void)
{
    ngx_http_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_http_infer_auth_header_filter;

    ngx_http_next_body_filter = ngx_http_top_body_filter;
    ngx_http_top_body_filter = ngx_http_infer_auth_body_filter;
}


/*
 * Records a refusal and returns the status nginx finalizes the request
 * with; the filters give it the OpenAI envelope.  fmt says what was wrong
 * without a secret; for a 401 it also goes in WWW-Authenticate (RFC 6750),
 * and so holds no double quote.
 */

ngx_int_t
ngx_http_infer_auth_reject(ngx_http_request_t *r,
    ngx_http_infer_auth_ctx_t *ctx, ngx_http_infer_auth_loc_conf_t *lcf,
    ngx_http_infer_auth_status_e status, const char *code,
    const char *fmt, ...)
{
    u_char     *p;
    u_char      buf[NGX_HTTP_INFER_AUTH_ERRSTR * 2];
    va_list     args;
    ngx_str_t   desc, *www;
    ngx_uint_t  i;

    va_start(args, fmt);
    p = ngx_vslprintf(buf, buf + sizeof(buf), fmt, args);
    va_end(args);

    desc.data = buf;
    desc.len = p - buf;

    /*
     * it may quote the client (a model name): no control character for
     * WWW-Authenticate and the log, UTF-8 for the JSON envelope
     */

    if (ngx_http_infer_escape_control(r->pool, &desc, &desc) != NGX_OK
        || ngx_http_infer_utf8_fix(r->pool, &desc, &desc) != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->status = status;
    ctx->code = code;

    switch (status) {

    case NGX_HTTP_INFER_AUTH_FORBIDDEN:
        ctx->http_status = NGX_HTTP_FORBIDDEN;
        ctx->message.data = ngx_pstrdup(r->pool, &desc);
        ctx->message.len = desc.len;
        break;

    case NGX_HTTP_INFER_AUTH_UNAVAILABLE:
        ctx->http_status = NGX_HTTP_SERVICE_UNAVAILABLE;
        ctx->message.data = ngx_pstrdup(r->pool, &desc);
        ctx->message.len = desc.len;
        break;

    case NGX_HTTP_INFER_AUTH_MISCONFIGURED:
        ctx->http_status = NGX_HTTP_INTERNAL_SERVER_ERROR;
        ctx->message.data = ngx_pstrdup(r->pool, &desc);
        ctx->message.len = desc.len;
        break;

    default:
        ctx->http_status = NGX_HTTP_UNAUTHORIZED;

        /* the header filter sends it, with the refusal only */

        www = &ctx->www_authenticate;

        www->data = ngx_pnalloc(r->pool,
                        sizeof("Bearer realm=\"\", error=\"invalid_token\", "
                               "error_description=\"\"") - 1
                        + lcf->realm.len + desc.len);
        if (www->data == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        p = ngx_sprintf(www->data, "Bearer realm=\"%V\"", &lcf->realm);

        if (status != NGX_HTTP_INFER_AUTH_MISSING) {
            p = ngx_cpymem(p, ", error=\"invalid_token\", error_description=\"",
                           sizeof(", error=\"invalid_token\", "
                                  "error_description=\"") - 1);

            /* a quoted-string of RFC 7230: its quotes become apostrophes */

            for (i = 0; i < desc.len; i++) {
                *p++ = (desc.data[i] == '"' || desc.data[i] == '\\')
                       ? '\'' : desc.data[i];
            }

            *p++ = '"';
        }

        www->len = p - www->data;

        if (status == NGX_HTTP_INFER_AUTH_MISSING
            || ngx_strcmp(code, "invalid_api_key") == 0)
        {
            ctx->message.data = ngx_pstrdup(r->pool, &desc);
            ctx->message.len = desc.len;
            break;
        }

        ctx->message.data = ngx_pnalloc(r->pool, desc.len + 32);
        if (ctx->message.data == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        p = ngx_sprintf(ctx->message.data, "Invalid token: %V.", &desc);
        ctx->message.len = p - ctx->message.data;

        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "infer auth: invalid token: %V", &desc);
    }

    if (ctx->message.data == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return ctx->http_status;
}


/*
 * Gives nginx's page for a refusal of ours the OpenAI envelope (and a
 * model refusal the status infer_auth_model_denied chose).  Only answers
 * nginx made itself are touched: never one from an upstream.
 */

static ngx_int_t
ngx_http_infer_auth_header_filter(ngx_http_request_t *r)
{
    ngx_table_elt_t                 *h;
    ngx_http_infer_auth_ctx_t       *ctx;
    ngx_http_infer_auth_loc_conf_t  *lcf;

    static u_char  ct[] = "application/json";

    if (r != r->main || r->upstream) {
        return ngx_http_next_header_filter(r);
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_infer_auth_module);

    if (ctx == NULL || ctx->http_status == 0 || ctx->replaced
        || r->headers_out.status != ctx->http_status)
    {
        return ngx_http_next_header_filter(r);
    }

    if (ctx->www_authenticate.len) {
        h = ngx_http_infer_header_add(r, (u_char *) "WWW-Authenticate",
                                      sizeof("WWW-Authenticate") - 1);
        if (h == NULL) {
            return NGX_ERROR;
        }

        h->value = ctx->www_authenticate;

        /* what nginx's own auth_basic sets, and auth_request copies */
        r->headers_out.www_authenticate = h;
    }

    if (ctx->status == NGX_HTTP_INFER_AUTH_FORBIDDEN) {
        lcf = ngx_http_get_module_loc_conf(r, ngx_http_infer_auth_module);

        r->headers_out.status = (lcf->denied == NGX_HTTP_NOT_FOUND)
                                ? NGX_HTTP_NOT_FOUND : NGX_HTTP_FORBIDDEN;
        r->headers_out.status_line.len = 0;

        /* what $status logs */
        r->err_status = r->headers_out.status;
    }

    r->headers_out.content_type.len = sizeof(ct) - 1;
    r->headers_out.content_type.data = ct;
    r->headers_out.content_type_len = sizeof(ct) - 1;
    r->headers_out.content_type_lowcase = NULL;

    /* made here, for its length; sent by the body filter */

    ctx->envelope = ngx_http_infer_error_buf(r, ngx_http_infer_auth_type(ctx),
                                             ctx->code, &ctx->message);
    if (ctx->envelope == NULL) {
        return NGX_ERROR;
    }

    ctx->replaced = 1;

    r->headers_out.content_length_n = ctx->envelope->last
                                      - ctx->envelope->pos;

    if (r->headers_out.content_length) {
        r->headers_out.content_length->hash = 0;
        r->headers_out.content_length = NULL;
    }

    ngx_http_clear_accept_ranges(r);
    ngx_http_clear_last_modified(r);
    ngx_http_clear_etag(r);

    return ngx_http_next_header_filter(r);
}


static ngx_int_t
ngx_http_infer_auth_body_filter(ngx_http_request_t *r, ngx_chain_t *in)
{
    ngx_buf_t                        *b;
    ngx_chain_t                      *cl, out;
    ngx_http_infer_auth_ctx_t        *ctx;
    ngx_http_infer_auth_jwks_body_t  *body;

    if (r != r->main) {
        body = ngx_http_get_module_ctx(r, ngx_http_infer_auth_module);

        if (body) {
            /* a JWKS subrequest's answer: ours, not the client's */
            return ngx_http_infer_auth_jwks_body(r, body, in);
        }

        return ngx_http_next_body_filter(r, in);
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_infer_auth_module);

    if (ctx == NULL || !ctx->replaced) {
        return ngx_http_next_body_filter(r, in);
    }

    /* nginx's own page is dropped */

    for (cl = in; cl; cl = cl->next) {
        cl->buf->pos = cl->buf->last;
        cl->buf->file_pos = cl->buf->file_last;
    }

    if (ctx->sent) {
        return ngx_http_next_body_filter(r, NULL);
    }

    ctx->sent = 1;

    b = ctx->envelope;

    b->last_buf = 1;
    b->last_in_chain = 1;

    out.buf = b;
    out.next = NULL;

    return ngx_http_next_body_filter(r, &out);
}


/* the envelope's type: the client's error, or the gateway's */

static const char *
ngx_http_infer_auth_type(ngx_http_infer_auth_ctx_t *ctx)
{
    return (ctx->status == NGX_HTTP_INFER_AUTH_MISCONFIGURED)
           ? "server_error" : "invalid_request_error";
}
