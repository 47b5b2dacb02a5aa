
/*
 * Copyright (C) ngx_infer authors
 *
 * The x-ratelimit-* headers, in OpenAI's names and formats, on every
 * answer of a request the limits looked at.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_infer.h"
#include "ngx_http_infer_ratelimit.h"


static ngx_int_t ngx_http_infer_ratelimit_header_filter(ngx_http_request_t *r);
static ngx_int_t ngx_http_infer_ratelimit_set_header(ngx_http_request_t *r,
    char *name, u_char *value, size_t len);
static u_char *ngx_http_infer_ratelimit_format_reset(u_char *p,
    ngx_msec_t ms);


static ngx_http_output_header_filter_pt  ngx_http_next_header_filter;


void
ngx_http_infer_ratelimit_headers_init(ngx_conf_t *cf)
{
    ngx_http_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_http_infer_ratelimit_header_filter;
}


/*
 * x-ratelimit-{limit,remaining,reset}-{requests,tokens}, as OpenAI sends
 * them, for the most constrained limit of each kind.
 */

static ngx_int_t
ngx_http_infer_ratelimit_header_filter(ngx_http_request_t *r)
{
    u_char                                *p;
    ngx_uint_t                             i, k;
    ngx_http_infer_ratelimit_ctx_t        *ctx;
    ngx_http_infer_ratelimit_item_t       *item, *best[2];
    ngx_http_infer_ratelimit_loc_conf_t   *lcf;
    u_char                                 buf[NGX_INT64_LEN + 32];

    static char  *names[2][3] = {
        { "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
          "x-ratelimit-reset-requests" },
        { "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens",
          "x-ratelimit-reset-tokens" }
    };

    if (r != r->main) {
        return ngx_http_next_header_filter(r);
    }

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_infer_ratelimit_module);

    if (!lcf->headers) {
        return ngx_http_next_header_filter(r);
    }

    ctx = ngx_http_infer_ratelimit_get_ctx(r);

    if (ctx == NULL || !ctx->decided) {
        return ngx_http_next_header_filter(r);
    }

    best[0] = NULL;
    best[1] = NULL;

    for (i = 0; i < ctx->nitems; i++) {
        item = &ctx->items[i];

        if (!item->known) {
            continue;
        }

        k = item->limit->kind;

        if (k == NGX_HTTP_INFER_RL_CONCURRENCY
            || k == NGX_HTTP_INFER_RL_BUDGET)
        {
            continue;
        }

        if (best[k] == NULL || item->remaining < best[k]->remaining) {
            best[k] = item;
        }
    }

    for (k = 0; k < 2; k++) {
        item = best[k];

        if (item == NULL) {
            continue;
        }

        p = ngx_sprintf(buf, "%uL", item->limit_n);
        if (ngx_http_infer_ratelimit_set_header(r, names[k][0], buf, p - buf)
            != NGX_OK)
        {
            return NGX_ERROR;
        }

        p = ngx_sprintf(buf, "%uL", item->remaining);
        if (ngx_http_infer_ratelimit_set_header(r, names[k][1], buf, p - buf)
            != NGX_OK)
        {
            return NGX_ERROR;
        }

        p = ngx_http_infer_ratelimit_format_reset(buf, item->reset);
        if (ngx_http_infer_ratelimit_set_header(r, names[k][2], buf, p - buf)
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    return ngx_http_next_header_filter(r);
}


/* sets a header of ours, in place of one the backend sent */

static ngx_int_t
ngx_http_infer_ratelimit_set_header(ngx_http_request_t *r, char *name,
    u_char *value, size_t len)
{
    size_t            nlen;
    ngx_uint_t        i;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    nlen = ngx_strlen(name);

    part = &r->headers_out.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].hash && h[i].key.len == nlen
            && ngx_strncasecmp(h[i].key.data, (u_char *) name, nlen) == 0)
        {
            h[i].hash = 0;
        }
    }

    h = ngx_http_infer_header_add(r, (u_char *) name, nlen);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->value.data = ngx_pnalloc(r->pool, len);
    if (h->value.data == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(h->value.data, value, len);
    h->value.len = len;

    return NGX_OK;
}


/*
 * A duration as OpenAI (and Go's time.Duration) writes it: "20ms", "1s",
 * "1.5s", "6m0s", "1h0m0s".  p has room for 32 bytes.
 */

static u_char *
ngx_http_infer_ratelimit_format_reset(u_char *p, ngx_msec_t ms)
{
    ngx_msec_t  h, m, s, frac;

    if (ms == 0) {
        return ngx_cpymem(p, "0s", 2);
    }

    if (ms < 1000) {
        return ngx_sprintf(p, "%Mms", ms);
    }

    h = ms / 3600000;
    m = ms / 60000 % 60;
    s = ms / 1000 % 60;
    frac = ms % 1000;

    if (h) {
        p = ngx_sprintf(p, "%Mh", h);
    }

    if (h || m) {
        p = ngx_sprintf(p, "%Mm", m);
    }

    p = ngx_sprintf(p, "%M", s);

    if (frac) {
        p = ngx_sprintf(p, ".%03M", frac);

        while (p[-1] == '0') {
            p--;
        }
    }

    *p++ = 's';

    return p;
}
