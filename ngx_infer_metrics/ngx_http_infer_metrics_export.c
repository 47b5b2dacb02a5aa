/*
 * Copyright (C) ngx_infer authors
 *
 * The pages of ngx_http_infer_metrics_module: /metrics in the Prometheus
 * text format 0.0.4 (or OpenMetrics 1.0 when the scraper asks for it),
 * /healthz and /readyz.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_infer.h"
#include "ngx_http_infer_metrics.h"


#define NGX_HTTP_INFER_METRICS_BUFSIZE  (256 * 1024)

#define NGX_HTTP_INFER_METRICS_TEXT                                          \
    "text/plain; version=0.0.4; charset=utf-8"
#define NGX_HTTP_INFER_METRICS_OPENMETRICS                                   \
    "application/openmetrics-text; version=1.0.0; charset=utf-8"


typedef struct {
    ngx_http_request_t   *r;
    ngx_chain_t          *out;
    ngx_chain_t         **last;
    ngx_buf_t            *b;
    off_t                 size;
    ngx_uint_t            om;      /* OpenMetrics */
} ngx_http_infer_metrics_page_t;


static ngx_int_t ngx_http_infer_metrics_render(
    ngx_http_infer_metrics_page_t *pg, ngx_http_infer_metrics_main_conf_t *mcf);
static ngx_int_t ngx_http_infer_metrics_render_family(
    ngx_http_infer_metrics_page_t *pg, ngx_http_infer_metrics_main_conf_t *mcf,
    ngx_uint_t f);
static u_char *ngx_http_infer_metrics_meta(u_char *p, ngx_str_t *name,
    ngx_uint_t type, ngx_str_t *help, ngx_uint_t om);
static u_char *ngx_http_infer_metrics_sample(u_char *p, ngx_str_t *name,
    char *suffix, u_char *labels, size_t len, char *le, size_t lelen);
static u_char *ngx_http_infer_metrics_reserve(
    ngx_http_infer_metrics_page_t *pg, size_t size);
static ngx_uint_t ngx_http_infer_metrics_wants_openmetrics(
    ngx_http_request_t *r);
static ngx_int_t ngx_http_infer_metrics_send_text(ngx_http_request_t *r,
    ngx_uint_t status, u_char *text, size_t len);


/*
 * Names follow Prometheus' conventions; a counter's name is given without
 * its "_total", which OpenMetrics leaves out of the family's name.
 */

ngx_http_infer_metrics_family_t
    ngx_http_infer_metrics_families[NGX_HTTP_INFER_METRICS_NFAMILIES] = {

    { ngx_string("infer_requests"), NGX_HTTP_INFER_METRICS_COUNTER,
      "Requests completed, by status class.", NULL },

    { ngx_string("infer_requests_in_flight"), NGX_HTTP_INFER_METRICS_GAUGE,
      "Requests being served: counted from the precontent phase until the "
      "request is freed.", NULL },

    { ngx_string("infer_request_duration_seconds"),
      NGX_HTTP_INFER_METRICS_HISTOGRAM,
      "Time from the request's first byte to the answer's last, as "
      "$request_time.", "request_duration" },

    { ngx_string("infer_upstream_response_time_seconds"),
      NGX_HTTP_INFER_METRICS_HISTOGRAM,
      "Time spent on upstream answers, every try summed.",
      "upstream_response_time" },

    { ngx_string("infer_gateway_overhead_seconds"),
      NGX_HTTP_INFER_METRICS_HISTOGRAM,
      "Request time minus upstream time, for proxied requests.",
      "gateway_overhead" },

    { ngx_string("infer_time_to_first_token_seconds"),
      NGX_HTTP_INFER_METRICS_HISTOGRAM,
      "Streams: time from the request to the answer's first body byte.",
      "time_to_first_token" },

    { ngx_string("infer_time_per_output_token_seconds"),
      NGX_HTTP_INFER_METRICS_HISTOGRAM,
      "Streams: time after the first token per completion token after "
      "the first.", "time_per_output_token" },

    { ngx_string("infer_tokens"), NGX_HTTP_INFER_METRICS_COUNTER,
      "Tokens the backends reported, by type.", NULL },

    { ngx_string("infer_request_bytes"), NGX_HTTP_INFER_METRICS_COUNTER,
      "Bytes received from clients: request line, headers and body.", NULL },

    { ngx_string("infer_response_bytes"), NGX_HTTP_INFER_METRICS_COUNTER,
      "Bytes sent to clients.", NULL },

    { ngx_string("infer_auth_outcomes"), NGX_HTTP_INFER_METRICS_COUNTER,
      "Authentication outcomes.", NULL },

    { ngx_string("infer_ratelimit_decisions"), NGX_HTTP_INFER_METRICS_COUNTER,
      "Rate-limit decisions.", NULL },

    { ngx_string("infer_endpoint_requests"), NGX_HTTP_INFER_METRICS_COUNTER,
      "Upstream tries per endpoint address, by status class.", NULL },

    { ngx_string("infer_endpoint_response_time_seconds"),
      NGX_HTTP_INFER_METRICS_HISTOGRAM,
      "Upstream response time per endpoint address.",
      "endpoint_response_time" },

    { ngx_string("infer_endpoint_picks"), NGX_HTTP_INFER_METRICS_COUNTER,
      "Peers picked by infer_balance (the last pick of each request), "
      "by reason.", NULL }
};


static char  *ngx_http_infer_metrics_types[] = {
    "counter", "gauge", "histogram"
};


ngx_int_t
ngx_http_infer_metrics_export_handler(ngx_http_request_t *r)
{
    ngx_int_t                            rc;
    ngx_http_infer_metrics_page_t        pg;
    ngx_http_infer_metrics_main_conf_t  *mcf;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    mcf = ngx_http_get_module_main_conf(r, ngx_http_infer_metrics_module);

    ngx_memzero(&pg, sizeof(ngx_http_infer_metrics_page_t));
    pg.r = r;
    pg.last = &pg.out;
    pg.om = ngx_http_infer_metrics_wants_openmetrics(r);

    if (ngx_http_infer_metrics_render(&pg, mcf) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    r->headers_out.status = NGX_HTTP_OK;
    r->headers_out.content_length_n = pg.size;

    /* the type's length without its parameters, for gzip_types */

    if (pg.om) {
        ngx_str_set(&r->headers_out.content_type,
                    NGX_HTTP_INFER_METRICS_OPENMETRICS);
        r->headers_out.content_type_len =
                                 sizeof("application/openmetrics-text") - 1;

    } else {
        ngx_str_set(&r->headers_out.content_type,
                    NGX_HTTP_INFER_METRICS_TEXT);
        r->headers_out.content_type_len = sizeof("text/plain") - 1;
    }

    r->headers_out.content_type_lowcase = NULL;

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    pg.b->last_buf = (r == r->main) ? 1 : 0;
    pg.b->last_in_chain = 1;

    return ngx_http_output_filter(r, pg.out);
}


static ngx_int_t
ngx_http_infer_metrics_render(ngx_http_infer_metrics_page_t *pg,
    ngx_http_infer_metrics_main_conf_t *mcf)
{
    u_char                            *p;
    ngx_str_t                          name, help, *fname;
    ngx_uint_t                         f, nfamilies;
    ngx_http_infer_metrics_zone_t     *zone;
    ngx_http_infer_metrics_shctx_t    *sh;
    ngx_http_infer_metrics_counter_t  *counter;
    ngx_http_infer_export_t           *export;

    p = ngx_http_infer_metrics_reserve(pg, 1024);
    if (p == NULL) {
        return NGX_ERROR;
    }

    ngx_str_set(&name, "infer_build_info");
    ngx_str_set(&help, "ngx_infer's version and nginx's.");
    p = ngx_http_infer_metrics_meta(p, &name, NGX_HTTP_INFER_METRICS_GAUGE,
                                    &help, pg->om);
    p = ngx_sprintf(p, "infer_build_info{version=\""
                    NGX_HTTP_INFER_METRICS_VERSION "\",nginx_version=\""
                    NGINX_VERSION "\"} 1\n");

    pg->b->last = p;

    zone = mcf->shm_zone ? mcf->shm_zone->data : NULL;

    if (zone && zone->sh) {
        sh = zone->sh;

        nfamilies = NGX_HTTP_INFER_METRICS_NFAMILIES + mcf->counters.nelts;

        p = ngx_http_infer_metrics_reserve(pg, nfamilies * 160 + 1024);
        if (p == NULL) {
            return NGX_ERROR;
        }

        ngx_str_set(&name, "infer_metrics_series");
        ngx_str_set(&help, "Series in the zone, overflow series left out.");
        p = ngx_http_infer_metrics_meta(p, &name,
                                        NGX_HTTP_INFER_METRICS_GAUGE,
                                        &help, pg->om);
        p = ngx_sprintf(p, "infer_metrics_series %ui\n", sh->nseries);

        ngx_str_set(&name, "infer_metrics_series_max");
        ngx_str_set(&help, "The zone's max_series.");
        p = ngx_http_infer_metrics_meta(p, &name,
                                        NGX_HTTP_INFER_METRICS_GAUGE,
                                        &help, pg->om);
        p = ngx_sprintf(p, "infer_metrics_series_max %ui\n",
                        zone->max_series);

        ngx_str_set(&name, "infer_metrics_overflow");
        ngx_str_set(&help, "Observations folded into a family's overflow "
                           "series.");
        p = ngx_http_infer_metrics_meta(p, &name,
                                        NGX_HTTP_INFER_METRICS_COUNTER,
                                        &help, pg->om);

        counter = mcf->counters.elts;

        for (f = 0; f < nfamilies; f++) {
            fname = (f < NGX_HTTP_INFER_METRICS_NFAMILIES)
                    ? &ngx_http_infer_metrics_families[f].name
                    : &counter[f - NGX_HTTP_INFER_METRICS_NFAMILIES].name;

            p = ngx_sprintf(p, "infer_metrics_overflow_total{family=\"%V\"} "
                            "%uA\n", fname, sh->folded[f]);
        }

        pg->b->last = p;

        for (f = 0; f < nfamilies; f++) {
            if (ngx_http_infer_metrics_render_family(pg, mcf, f) != NGX_OK) {
                return NGX_ERROR;
            }
        }
    }

    /* the balancer's pools, when the route module is loaded */

    export = ngx_http_infer_export_find(pg->r,
                                        "ngx_http_infer_balance_module");

    if (export) {
        p = ngx_http_infer_metrics_reserve(pg, export->size(export));
        if (p == NULL) {
            return NGX_ERROR;
        }

        pg->b->last = export->write(export, p, ngx_http_infer_metrics_meta,
                                    pg->om);
    }

    /* the rate-limit module's usage events, when it sends them */

    export = ngx_http_infer_export_find(pg->r,
                                        "ngx_http_infer_ratelimit_module");

    if (export && export->size) {
        p = ngx_http_infer_metrics_reserve(pg, export->size(export));
        if (p == NULL) {
            return NGX_ERROR;
        }

        pg->b->last = export->write(export, p, ngx_http_infer_metrics_meta,
                                    pg->om);
    }

    if (pg->om) {
        p = ngx_http_infer_metrics_reserve(pg, sizeof("# EOF\n"));
        if (p == NULL) {
            return NGX_ERROR;
        }

        pg->b->last = ngx_cpymem(p, "# EOF\n", sizeof("# EOF\n") - 1);
    }

    pg->size += pg->b->last - pg->b->pos;

    return NGX_OK;
}


static ngx_int_t
ngx_http_infer_metrics_render_family(ngx_http_infer_metrics_page_t *pg,
    ngx_http_infer_metrics_main_conf_t *mcf, ngx_uint_t f)
{
    u_char                            *p, *labels;
    size_t                             len;
    uint32_t                           layout;
    uint64_t                           cum, sum;
    ngx_str_t                         *name, help;
    ngx_uint_t                         i, type;
    ngx_http_infer_metrics_node_t     *node;
    ngx_http_infer_metrics_zone_t     *zone;
    ngx_http_infer_metrics_family_t   *fam;
    ngx_http_infer_metrics_counter_t  *c;
    ngx_http_infer_metrics_buckets_t  *b;

    zone = mcf->shm_zone->data;
    b = NULL;

    if (f < NGX_HTTP_INFER_METRICS_NFAMILIES) {
        fam = &ngx_http_infer_metrics_families[f];
        name = &fam->name;
        type = fam->type;
        help.data = (u_char *) fam->help;
        help.len = ngx_strlen(fam->help);
        b = mcf->buckets[f];
        layout = b ? b->layout : 0;

    } else {
        c = mcf->counters.elts;
        c = &c[f - NGX_HTTP_INFER_METRICS_NFAMILIES];
        name = &c->name;
        type = NGX_HTTP_INFER_METRICS_COUNTER;
        help = c->help;
        layout = c->layout;
    }

    p = ngx_http_infer_metrics_reserve(pg, 2 * name->len + help.len + 128);
    if (p == NULL) {
        return NGX_ERROR;
    }

    pg->b->last = ngx_http_infer_metrics_meta(p, name, type, &help, pg->om);

    for (node = zone->sh->head[f]; node; node = node->fnext) {

        /*
         * a series of an older configuration (other buckets, or another
         * counter in this place): kept, not shown
         */

        if (node->layout != layout) {
            continue;
        }

        labels = (u_char *) &node->values[node->nvalues];
        len = node->len;

        switch (type) {

        case NGX_HTTP_INFER_METRICS_COUNTER:
            p = ngx_http_infer_metrics_reserve(pg, len + 128);
            if (p == NULL) {
                return NGX_ERROR;
            }

            p = ngx_http_infer_metrics_sample(p, name, "_total", labels, len,
                                              NULL, 0);
            p = ngx_sprintf(p, " %uA\n", node->values[0]);
            break;

        case NGX_HTTP_INFER_METRICS_GAUGE:
            p = ngx_http_infer_metrics_reserve(pg, len + 128);
            if (p == NULL) {
                return NGX_ERROR;
            }

            p = ngx_http_infer_metrics_sample(p, name, "", labels, len,
                                              NULL, 0);
            p = ngx_sprintf(p, " %A\n", (ngx_atomic_int_t) node->values[0]);
            break;

        default: /* NGX_HTTP_INFER_METRICS_HISTOGRAM */

            p = ngx_http_infer_metrics_reserve(pg,
                                               (b->n + 3) * (len + 128));
            if (p == NULL) {
                return NGX_ERROR;
            }

            cum = 0;

            for (i = 0; i < b->n; i++) {
                cum += node->values[i];
                p = ngx_http_infer_metrics_sample(p, name, "_bucket", labels,
                                                  len, (char *) b->text[i].data,
                                                  b->text[i].len);
                p = ngx_sprintf(p, " %uL\n", cum);
            }

            cum += node->values[b->n];
            p = ngx_http_infer_metrics_sample(p, name, "_bucket", labels, len,
                                              "+Inf", 4);
            p = ngx_sprintf(p, " %uL\n", cum);

            sum = node->values[b->n + 1];
            p = ngx_http_infer_metrics_sample(p, name, "_sum", labels, len,
                                              NULL, 0);
            p = ngx_sprintf(p, " %uL.%06uL\n", sum / 1000000, sum % 1000000);

            p = ngx_http_infer_metrics_sample(p, name, "_count", labels, len,
                                              NULL, 0);
            p = ngx_sprintf(p, " %uL\n", cum);
        }

        pg->b->last = p;
    }

    return NGX_OK;
}


static u_char *
ngx_http_infer_metrics_meta(u_char *p, ngx_str_t *name, ngx_uint_t type,
    ngx_str_t *help, ngx_uint_t om)
{
    char  *suffix;

    suffix = (type == NGX_HTTP_INFER_METRICS_COUNTER && !om) ? "_total" : "";

    return ngx_sprintf(p, "# HELP %V%s %V\n# TYPE %V%s %s\n",
                       name, suffix, help, name, suffix,
                       ngx_http_infer_metrics_types[type]);
}


/* name, suffix and {labels[,le="..."]}, without the value */

static u_char *
ngx_http_infer_metrics_sample(u_char *p, ngx_str_t *name, char *suffix,
    u_char *labels, size_t len, char *le, size_t lelen)
{
    p = ngx_cpymem(p, name->data, name->len);

    while (*suffix) {
        *p++ = (u_char) *suffix++;
    }

    if (len == 0 && le == NULL) {
        return p;
    }

    *p++ = '{';
    p = ngx_cpymem(p, labels, len);

    if (le) {
        if (len) {
            *p++ = ',';
        }

        p = ngx_cpymem(p, "le=\"", 4);
        p = ngx_cpymem(p, le, lelen);
        *p++ = '"';
    }

    *p++ = '}';

    return p;
}


/*
 * Room for size bytes at the end of the page: the page is a chain of
 * large buffers from the request's pool, so that its size is known before
 * the header goes out and the shared memory is read only once.
 */

static u_char *
ngx_http_infer_metrics_reserve(ngx_http_infer_metrics_page_t *pg, size_t size)
{
    ngx_buf_t    *b;
    ngx_chain_t  *cl;

    if (pg->b && (size_t) (pg->b->end - pg->b->last) >= size) {
        return pg->b->last;
    }

    if (pg->b) {
        pg->size += pg->b->last - pg->b->pos;
    }

    b = ngx_create_temp_buf(pg->r->pool,
                            ngx_max(size, NGX_HTTP_INFER_METRICS_BUFSIZE));
    if (b == NULL) {
        return NULL;
    }

    cl = ngx_alloc_chain_link(pg->r->pool);
    if (cl == NULL) {
        return NULL;
    }

    cl->buf = b;
    cl->next = NULL;

    *pg->last = cl;
    pg->last = &cl->next;
    pg->b = b;

    return b->last;
}


static ngx_uint_t
ngx_http_infer_metrics_wants_openmetrics(ngx_http_request_t *r)
{
    ngx_uint_t        i;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    static u_char  om[] = "application/openmetrics-text";

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

        if (h[i].key.len == sizeof("Accept") - 1
            && ngx_strncasecmp(h[i].key.data, (u_char *) "Accept",
                               sizeof("Accept") - 1) == 0
            && ngx_strlcasestrn(h[i].value.data,
                                h[i].value.data + h[i].value.len,
                                om, sizeof(om) - 2)
               != NULL)
        {
            return 1;
        }
    }

    return 0;
}


/* alive: the worker answers */

ngx_int_t
ngx_http_infer_metrics_health_handler(ngx_http_request_t *r)
{
    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    return ngx_http_infer_metrics_send_text(r, NGX_HTTP_OK,
                                            (u_char *) "ok\n", 3);
}


/*
 * Ready when every infer_metrics_ready_condition is non-empty and not
 * "0": the other modules say what they depend on (a registry loaded,
 * Redis connected) through variables, and this page needs no change for
 * a new one.
 */

ngx_int_t
ngx_http_infer_metrics_ready_handler(ngx_http_request_t *r)
{
    u_char                             *p, *text;
    size_t                              len;
    ngx_str_t                           v;
    ngx_uint_t                          i, failed;
    ngx_http_infer_metrics_label_t     *c;
    ngx_http_infer_metrics_loc_conf_t  *lcf;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    lcf = ngx_http_get_module_loc_conf(r, ngx_http_infer_metrics_module);

    if (lcf->ready == NULL || lcf->ready->nelts == 0) {
        return ngx_http_infer_metrics_send_text(r, NGX_HTTP_OK,
                                                (u_char *) "ready\n", 6);
    }

    c = lcf->ready->elts;

    len = sizeof("not ready:\n");

    for (i = 0; i < lcf->ready->nelts; i++) {
        len += c[i].name.len + 2;
    }

    text = ngx_pnalloc(r->pool, len);
    if (text == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = ngx_cpymem(text, "not ready:", sizeof("not ready:") - 1);
    failed = 0;

    for (i = 0; i < lcf->ready->nelts; i++) {
        if (ngx_http_complex_value(r, &c[i].value, &v) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        if (v.len == 0 || (v.len == 1 && v.data[0] == '0')) {
            *p++ = ' ';
            p = ngx_cpymem(p, c[i].name.data, c[i].name.len);
            failed++;
        }
    }

    if (failed == 0) {
        return ngx_http_infer_metrics_send_text(r, NGX_HTTP_OK,
                                                (u_char *) "ready\n", 6);
    }

    *p++ = '\n';

    return ngx_http_infer_metrics_send_text(r,
                                            NGX_HTTP_SERVICE_UNAVAILABLE,
                                            text, p - text);
}


static ngx_int_t
ngx_http_infer_metrics_send_text(ngx_http_request_t *r, ngx_uint_t status,
    u_char *text, size_t len)
{
    ngx_int_t     rc;
    ngx_buf_t    *b;
    ngx_chain_t   out;

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    r->headers_out.status = status;
    r->headers_out.content_length_n = len;
    ngx_str_set(&r->headers_out.content_type, "text/plain");
    r->headers_out.content_type_len = r->headers_out.content_type.len;
    r->headers_out.content_type_lowcase = NULL;

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    b->pos = text;
    b->last = text + len;
    b->memory = 1;
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}
